"""Headless Chromium (Debian's `chromium` package) for checking that HTML reports really render.

`render_report(html)` loads a copy of the report with a small script appended that, after the
load event, counts the <img> elements the browser decoded, and returns the DOM Chromium dumped
plus those counts; `screenshot(html, png)` saves what a reader would see.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]
_CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = Array.from(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  var pre = document.createElement("pre");
  pre.id = "quantbook-render-check";
  pre.textContent = "images=" + imgs.length + " decoded=" + ok.length +
    " widths=" + ok.map(function (i) { return i.naturalWidth + "x" + i.naturalHeight; }).join(",");
  document.body.appendChild(pre);
});
</script>"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "HOME": profile})


def render_report(html: str | Path, timeout: float = 120) -> tuple[str, dict]:
    """(dumped DOM, {'images': n, 'decoded': k, 'sizes': [(w, h), ...]}) for the report."""
    html = Path(html)
    with tempfile.TemporaryDirectory(prefix="render-") as tmp:
        probe = Path(tmp) / html.name
        text = html.read_text()
        probe.write_text(text.replace("</body>", _CHECK + "</body>") if "</body>" in text else text + _CHECK)
        r = _run(["--virtual-time-budget=15000", "--dump-dom", probe.as_uri()], timeout)
    m = re.search(r'id="quantbook-render-check">images=(\d+) decoded=(\d+) widths=([\dx,]*)<', r.stdout)
    if r.returncode != 0 or m is None:
        raise RuntimeError(f"chromium did not render {html} (rc {r.returncode}): {r.stderr[-2000:]}")
    sizes = [tuple(int(v) for v in s.split("x")) for s in m.group(3).split(",") if s]
    return r.stdout, {"images": int(m.group(1)), "decoded": int(m.group(2)), "sizes": sizes}


def screenshot(html: str | Path, png: str | Path, width: int = 1280, height: int = 4000, timeout: float = 120) -> Path:
    """Save a screenshot of the report's first `height` pixels."""
    r = _run([f"--window-size={width},{height}", "--virtual-time-budget=15000", f"--screenshot={png}",
              Path(html).resolve().as_uri()], timeout)
    if r.returncode != 0 or not Path(png).is_file():
        raise RuntimeError(f"chromium screenshot of {html} failed (rc {r.returncode}): {r.stderr[-2000:]}")
    return Path(png)


if __name__ == "__main__":  # python tests/browser.py REPORT.html [SHOT.png]
    import sys

    dom, facts = render_report(sys.argv[1])
    print(facts)
    if len(sys.argv) > 2:
        print(screenshot(sys.argv[1], sys.argv[2]))
