"""Interactive figures for JupyterLab that stay fast at V4 Pro scale and leave a figure in the record.

`FigureWidget` is the mechanics shared by notebook 04's explorers: controls (ipywidgets) above a
matplotlib figure rendered to PNG into an `ipywidgets.Image`. Every change draws once into one
persistent `Figure` (no pyplot: nothing accumulates in a global figure list), and sets the image's
value: a widget state update, which JupyterLab renders reliably (figures printed into an `Output`
widget from an observer were sometimes dropped by ipykernel 7 under load). Its display bundle
carries the widget view AND `image/png` of the current view, so an executed notebook without
saved widget state (`quantbook run` saves none) shows the first view as a figure in its HTML copy,
and JupyterLab, where the widget renderer outranks images, shows the live widget alone.

`AmaxExplorer` is the amax explorer (layer, projection, role, expert): the snapshot table is turned once
into arrays (per projection a [layer, expert] amax matrix per role, a [layer] vector otherwise),
so a redraw indexes arrays instead of filtering the 48,000-row table.
"""

from __future__ import annotations

import base64
import html
import io
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

BLUE, RED, GRAY = "#4c72b0", "#d62728", "gray"
ROLE_COLORS = {"input": "#4c72b0", "weight": "#dd8452"}
MANY_EXPERTS = 64  # above this, experts are drawn as one step patch instead of one bar each


class FigureWidget:
    """Controls above a figure redrawn on every change; `draw(fig)` (a subclass's) fills the figure
    and returns the HTML shown between controls and figure."""

    def __init__(self, controls: list, figsize: tuple[float, float], dpi: int = 80, css_class: str = ""):
        import ipywidgets as w
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=figsize, dpi=dpi)
        FigureCanvasAgg(self.fig)
        self.image = w.Image(format="png", layout=w.Layout(width="auto"))
        self.image.add_class("quantbook-figure")
        self.text = w.HTML()
        self.widget = w.VBox([w.HBox(controls), self.text, self.image])
        if css_class:
            self.widget.add_class(css_class)
        self.draws = 0  # how many times the figure was drawn (one per change)
        self._held = 0

    @contextmanager
    def held(self):
        """Control updates inside the block draw nothing; the caller draws once after."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1

    def redraw(self, *_) -> None:
        if self._held:
            return
        self.fig.clear()
        text = self.draw(self.fig)
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png")
        self.image.value = buf.getvalue()
        self.text.value = text
        self.draws += 1

    def draw(self, fig) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        """One line for `text/plain` (the run log, a terminal)."""
        return type(self).__name__

    def png(self) -> bytes:
        """The current view as PNG bytes."""
        return bytes(self.image.value)

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude) or {})
        if self.image.value:
            bundle["image/png"] = base64.b64encode(self.image.value).decode("ascii")
        bundle["text/plain"] = f"{self.describe()} (interactive in JupyterLab with a live kernel)"
        return bundle


def rows_html(rows: list[tuple], header: tuple[str, ...]) -> str:
    """A small monospace table of `rows` (numbers to 6 significant digits)."""
    if not rows:
        return ""

    def cell(v):
        if v is None:
            return "unknown"
        return f"{v:.6g}" if isinstance(v, (float, np.floating)) else html.escape(str(v))

    head = "".join(f"<th align=left>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table style='font-family:monospace;font-size:11px'><tr>{head}</tr>{body}</table>"


# -- the amax explorer ---------------------------------------------------------------------------
@dataclass
class AmaxViews:
    """An amax table as arrays for the explorer: what one redraw needs, indexed by layer position."""

    layers: list[int]
    n_experts: int
    projections: dict[int, list[str]]  # layer -> its projection keys ("group | module projs"), sorted
    groups: dict[str, str]  # projection key -> summary group
    experts: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]  # key -> role -> ([L, E] amax, [L, E] names)
    per_layer: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]  # key -> role -> ([L] amax, [L] names)
    counts: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> tokens per expert


def amax_views(run) -> AmaxViews:
    """One pass over an `AmaxRun`'s table (quantizers with a layer) into `AmaxViews`."""
    t = run.amax[run.amax["layer"].notna()]
    key = (t["group"] + " | " + t["module"] + " " + t["projs"]).to_numpy(dtype=object)
    layer = t["layer"].to_numpy(dtype=np.int64)
    expert = t["expert"].to_numpy(dtype=np.float64, na_value=np.nan)
    role = t["role"].to_numpy(dtype=object)
    amax = t["amax"].to_numpy(dtype=np.float64, na_value=np.nan)
    names = t["name"].to_numpy(dtype=object)
    group = t["group"].to_numpy(dtype=object)

    layers = [int(x) for x in np.unique(layer)]
    li = np.searchsorted(layers, layer)
    has_e = ~np.isnan(expert)
    n_exp = int(np.nanmax(expert)) + 1 if has_e.any() else 1
    ei = np.where(has_e, expert, 0).astype(np.int64)
    projections: dict[int, set] = {L: set() for L in layers}
    for L, k in set(zip(layer.tolist(), key.tolist())):
        projections[L].add(k)
    views = AmaxViews(layers, n_exp, {L: sorted(ks) for L, ks in projections.items()}, {}, {}, {})
    keys, inv = np.unique(key, return_inverse=True)
    for j, k in enumerate(keys):
        idx = np.flatnonzero(inv == j)
        views.groups[k] = group[idx[0]]
        for r in np.unique(role[idx]):
            sel = idx[role[idx] == r]
            e_sel, n_sel = sel[has_e[sel]], sel[~has_e[sel]]
            if e_sel.size:
                m = np.full((len(layers), n_exp), np.nan)
                nm = np.full((len(layers), n_exp), None, dtype=object)
                m[li[e_sel], ei[e_sel]] = amax[e_sel]
                nm[li[e_sel], ei[e_sel]] = names[e_sel]
                views.experts.setdefault(k, {})[r] = (m, nm)
            if n_sel.size:
                v = np.full(len(layers), np.nan)
                nv = np.full(len(layers), None, dtype=object)
                v[li[n_sel]] = amax[n_sel]
                nv[li[n_sel]] = names[n_sel]
                views.per_layer.setdefault(k, {})[r] = (v, nv)
    if run.counts is not None:
        views.counts = {L: run.counts[i] for i, L in enumerate(run.count_layers)}
    return views


def roles(v: AmaxViews) -> list[str]:
    """The quantizer roles the snapshot has, weight first."""
    have = {r for d in (v.experts, v.per_layer) for by_role in d.values() for r in by_role}
    return sorted(have, key=lambda r: (r != "weight", r != "input", r))


def draw_amax(fig, v: AmaxViews, layer: int, proj: str, role: str, expert: int) -> list[tuple]:
    """Draw one view into `fig`; the (name, role, amax) rows of what is chosen.

    A role with one quantizer per expert (routed experts' weights): the layer's amax of every expert,
    the chosen expert in red, calibration tokens on a second axis. A role with one quantizer per
    layer (attention, shared experts, the routed experts' shared input): the amax across layers,
    the chosen layer in red. The rows also list the other roles' quantizers of that layer.
    """
    from matplotlib.ticker import MaxNLocator

    L = v.layers.index(layer)
    ax = fig.add_axes((0.1, 0.16, 0.78, 0.74))  # fixed margins: no layout pass per redraw
    experts, per_layer = v.experts.get(proj, {}), v.per_layer.get(proj, {})
    rows = [(nm[L][expert], r, m[L][expert]) for r, (m, nm) in experts.items() if nm[L][expert] is not None]
    rows += [(nv[L], r, val[L]) for r, (val, nv) in per_layer.items() if nv[L] is not None]
    rows.sort(key=lambda row: row[1] != role)
    if role in experts:
        m = experts[role][0][L]
        ok = np.isfinite(m) & (m > 0)
        floor = m[ok].min() / 2 if ok.any() else 1e-3
        top = m[ok].max() if ok.any() else floor * 4
        h = np.where(ok, m, floor)
        x = np.arange(v.n_experts)
        color = ROLE_COLORS.get(role, GRAY)
        if v.n_experts <= MANY_EXPERTS:
            ax.bar(x, h - floor, width=0.8, bottom=floor, color=color, alpha=0.9, label=role)
        else:  # hundreds of experts: one step patch, not one Rectangle artist per expert
            ax.stairs(h, np.arange(v.n_experts + 1) - 0.5, baseline=floor, fill=True, color=color, alpha=0.9,
                      label=role)
        if 0 <= expert < v.n_experts:
            ax.bar([expert], [h[expert] - floor], width=0.8, bottom=floor, color=RED)
        ax.axvline(expert, color=RED, lw=0.8, alpha=0.6)  # findable among 384 one-pixel bars
        if layer in v.counts:
            ax2 = ax.twinx()
            ax2.plot(v.counts[layer], color=GRAY, lw=0.8)
            ax2.set_ylabel("tokens")
        ax.set_ylim(floor, top * 1.6)  # headroom: equal amax must not fill the axes
        ax.set_xlim(-0.5, v.n_experts - 0.5)
        ax.set_xlabel("expert")
        title = f"{v.groups[proj]} {role}: layer {layer}, expert {expert} in red"
    elif role in per_layer:
        val = per_layer[role][0]
        ok = np.isfinite(val) & (val > 0)
        ax.plot(np.asarray(v.layers)[ok], val[ok], marker="o", ms=3, lw=1, color=ROLE_COLORS.get(role, GRAY),
                label=role)
        ax.axvline(layer, color=RED, lw=1)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers (no 0.5 ticks)
        title = f"{v.groups[proj]} {role}: one quantizer per layer, layer {layer} in red"
    else:
        ax.text(0.5, 0.5, f"no {role} quantizer for {proj}", ha="center", va="center", transform=ax.transAxes)
        title = f"{v.groups[proj]}: layer {layer}"
    if role in experts or role in per_layer:
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper left")
    ax.set_ylabel("amax")
    ax.set_title(title, fontsize=9)
    return rows


class AmaxExplorer(FigureWidget):
    """Layer, projection, role and expert controls over an amax snapshot (`inspect_amax.explorer`)."""

    def __init__(self, run, figsize=(10, 3), dpi=80):
        import ipywidgets as w

        self.views = v = amax_views(run)
        first = v.layers[0]
        self.layer_w = w.SelectionSlider(options=v.layers, value=first, description="layer", continuous_update=False)
        self.proj_w = w.Dropdown(options=v.projections[first], description="projection",
                                 layout=w.Layout(width="400px"))
        self.role_w = w.Dropdown(options=roles(v), description="role", layout=w.Layout(width="170px"))
        self.expert_w = w.IntSlider(min=0, max=max(v.n_experts - 1, 0), value=0, description="expert",
                                    continuous_update=False)
        super().__init__([self.layer_w, self.proj_w, self.role_w, self.expert_w], figsize, dpi,
                         "quantbook-amax-explorer")
        self.rows: list[tuple] = []
        self.layer_w.observe(self._on_layer, names="value")
        for control in (self.proj_w, self.role_w, self.expert_w):
            control.observe(self.redraw, names="value")
        self.redraw()

    def _on_layer(self, change) -> None:
        """Another layer may list other projections (compressor, indexer): keep the chosen one when
        the layer has it, and draw once after the options settle."""
        opts = self.views.projections[change["new"]]
        with self.held():
            keep = self.proj_w.value if self.proj_w.value in opts else opts[0]
            if list(self.proj_w.options) != opts:
                self.proj_w.options = opts
            self.proj_w.value = keep
        self.redraw()

    def draw(self, fig) -> str:
        if self.proj_w.value is None:
            return ""
        self.rows = draw_amax(fig, self.views, self.layer_w.value, self.proj_w.value, self.role_w.value,
                              self.expert_w.value)
        return rows_html(self.rows, ("name", "role", "amax"))

    def describe(self) -> str:
        return (f"amax explorer: layer {self.layer_w.value}, {self.proj_w.value}, {self.role_w.value}, expert "
                f"{self.expert_w.value} ({len(self.views.layers)} layers x {self.views.n_experts} experts)")
