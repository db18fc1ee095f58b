"""Drive JupyterLab (served by `quantbook.records.lab.LabServer`) in Debian's Chromium through Playwright.

`chromium_context(exe)` launches the system browser (never a downloaded one); `LabPage` is the page
of one open notebook: wait for its kernel, Run > Run All Cells from the menu as a person does, wait
until every code cell ran (or one failed), read errors from the notebook model, change a widget and
wait for its figure to be redrawn. Every wait is a condition polled in the page, never a fixed
sleep; state is read from `window.jupyterapp` (the server runs with `expose_app_in_browser`).
`pixel_diff` compares two screenshots.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@contextlib.contextmanager
def chromium_context(executable: str, viewport=(1400, 1000)):
    """A Playwright browser context on the system Chromium at `executable`; closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=ARGS, headless=True)
        try:
            yield browser.new_context(viewport={"width": viewport[0], "height": viewport[1]}, device_scale_factor=1)
        finally:
            browser.close()


_NOTEBOOK = """() => {
  const app = window.jupyterapp;
  const w = app && app.shell && app.shell.currentWidget;
  return (w && w.content && w.sessionContext && w.context && w.context.isReady) ? w : null;
}"""
_IDLE = f"""() => {{
  const w = ({_NOTEBOOK})();
  const k = w && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle' && k.connectionStatus === 'connected';
}}"""
_STATE = f"""() => {{
  const w = ({_NOTEBOOK})();
  if (!w) return null;
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  const cells = w.content.widgets.map((c, i) => {{
    const m = c.model;
    if (m.type !== 'code') return {{index: i, type: m.type}};
    return {{index: i, type: 'code', count: m.executionCount,
             running: ((c.promptNode && c.promptNode.textContent) || '').includes('*'),
             errors: m.outputs.toJSON().filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue),
             source: m.sharedModel.getSource().slice(0, 80)}};
  }});
  return {{kernel: k ? k.status : 'none', kernelName: w.sessionContext.kernelDisplayName, path: w.context.path, cells}};
}}"""
# every code cell ran (a count, none pending) with the kernel idle, or one failed (the queue stops there)
_FINISHED = f"""() => {{
  const s = ({_STATE})();
  if (!s || s.kernel !== 'idle') return false;
  const code = s.cells.filter(c => c.type === 'code');
  return code.some(c => c.errors.length) || code.every(c => c.count !== null && !c.running);
}}"""
_CLEARED = f"""() => {{
  const s = ({_STATE})();
  return !!s && s.cells.every(c => c.type !== 'code' || c.count === null);
}}"""
# an image's identity once decoded (null while loading)
_IMAGE = """el => {
  const img = el.tagName === 'IMG' ? el : el.querySelector('img');
  if (!img || !img.complete || img.naturalWidth === 0) return null;
  return img.src.length + ':' + img.src.slice(-64) + ':' + img.naturalWidth + 'x' + img.naturalHeight;
}"""
_IMAGE_CHANGED = f"""([el, before]) => {{ const s = ({_IMAGE})(el); return s !== null && s !== before; }}"""


class LabPage:
    """The JupyterLab page of one notebook, with the page's console kept for a failure's record."""

    def __init__(self, context, timeout_ms: float = 60_000):
        self.page = context.new_page()
        self.page.set_default_timeout(timeout_ms)
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    def open(self, url: str, timeout_ms: float = 120_000) -> None:
        """Load a /lab/tree/... address; wait until its notebook is the current widget and its kernel idle."""
        self.page.goto(url, wait_until="domcontentloaded")
        self.page.wait_for_function(f"() => !!({_NOTEBOOK})()", timeout=timeout_ms, polling=100)
        self.wait_idle(timeout_ms)

    def wait_idle(self, timeout_ms: float = 120_000) -> None:
        self.page.wait_for_function(_IDLE, timeout=timeout_ms, polling=100)

    def state(self) -> dict:
        return self.page.evaluate(_STATE)

    def menu(self, menu: str, *commands: str) -> None:
        """Open a menu of the menu bar by its label and click its item bound to one of `commands`."""
        self.page.locator("#jp-MainMenu .lm-MenuBar-item", has=self.page.locator(
            ".lm-MenuBar-itemLabel", has_text=re.compile(f"^{menu}$"))).click()
        self.page.locator(", ".join(f'#jp-mainmenu-{menu.lower()} .lm-Menu-item[data-command="{c}"]'
                                    for c in commands)).first.click()

    def run_all(self, timeout_ms: float = 300_000) -> dict:
        """Edit > Clear Outputs of All Cells when the notebook holds a record's outputs (their counts
        would look like a finished run), then Run > Run All Cells; wait for the end; the state."""
        if any(c["type"] == "code" and c["count"] is not None for c in self.state()["cells"]):
            self.menu("Edit", "editmenu:clear-all", "notebook:clear-all-cell-outputs")
            self.page.wait_for_function(_CLEARED, polling=100)
        self.menu("Run", "runmenu:run-all", "notebook:run-all-cells")  # JupyterLab 4.6: runmenu:run-all
        self.page.wait_for_function(_FINISHED, timeout=timeout_ms, polling=100)
        return self.state()

    @staticmethod
    def errors(state: dict) -> list[str]:
        return [f"cell {c['index']} ({c['source']!r}): {e}" for c in state["cells"] if c["type"] == "code"
                for e in c["errors"]]

    def rendered_tracebacks(self) -> int:
        """Error outputs as rendered (a traceback is a stderr-typed output), whatever the model says."""
        return self.page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                                 has_text=re.compile("Traceback|Error")).count()

    def control(self, widget, label: str):
        """The control labelled `label` ('layer', 'projection', ...) inside an explorer."""
        return widget.locator(".widget-slider, .widget-dropdown", has=self.page.locator(
            "label.widget-label", has_text=re.compile(rf"^\s*{label}\s*$"))).first

    def image(self, el) -> str | None:
        return el.evaluate(_IMAGE)

    def wait_image(self, el) -> str:
        self.page.wait_for_function(f"el => ({_IMAGE})(el) !== null", arg=el, polling=50)
        return self.image(el)

    def wait_redrawn(self, el, before: str, timeout_ms: float = 30_000) -> str:
        """After a control changed: a new decoded image (the kernel got the change), then the kernel
        idle (every image of that change has arrived: iopub is ordered), then the last one decoded."""
        self.page.wait_for_function(_IMAGE_CHANGED, arg=[el, before], polling=50, timeout=timeout_ms)
        self.wait_idle(timeout_ms)
        return self.wait_image(el)

    def choose(self, select, label_start: str) -> bool:
        """Pick the first option of a <select> whose text starts with `label_start` (ipywidgets option
        values are indices and labels show spaces as NBSP); False when there is none or it is chosen."""
        texts = [t.replace("\u00a0", " ") for t in select.locator("option").all_inner_texts()]
        want = next((t for t in texts if t.startswith(label_start)), None)
        if want is None or self.selected(select) == want:
            return False
        select.select_option(index=texts.index(want))
        return True

    @staticmethod
    def selected(select) -> str:
        return select.evaluate("s => s.selectedIndex < 0 ? '' : s.options[s.selectedIndex].text").replace("\u00a0", " ")

    def next_value(self, control) -> None:
        """One step right on a slider (its noUiSlider handle takes ArrowRight), as a keyboard user does."""
        control.locator(".noUi-handle").first.focus()
        self.page.keyboard.press("ArrowRight")

    @staticmethod
    def readout(control) -> str:
        return control.locator(".widget-readout").inner_text().strip()

    def save_console(self, path: Path) -> None:
        path.write_text("\n".join(self.console))


def pixel_diff(a: str | Path, b: str | Path, tol: int = 8) -> float:
    """Fraction of pixels (of the common top-left area) whose RGB differs by more than `tol`."""
    import numpy as np
    from PIL import Image

    ia = np.asarray(Image.open(a).convert("RGB"), dtype=np.int16)
    ib = np.asarray(Image.open(b).convert("RGB"), dtype=np.int16)
    h, w = min(ia.shape[0], ib.shape[0]), min(ia.shape[1], ib.shape[1])
    return float((np.abs(ia[:h, :w] - ib[:h, :w]).max(axis=2) > tol).mean())
