"""See an export's scales before paying for serving it: what decides whether it serves well.

A v4-serving export (step 03, `export.layout`) gives every routed expert projection of the main
layers four tensors: `weight` (packed E2M1), `weight_scale` (E4M3 per 16 inputs), `weight_scale_2`
and `input_scale` (F32 scalars). Everything here reads only headers and the tensors it shows:

- `scale_table`: every expert projection's `weight_scale_2` and `input_scale` (a few bytes each,
  adjacent in the shard, read in one pass per shard): at V4 Pro scale 70,272 projections;
- `scale_outliers`: missing, non-finite or non-positive scales, w1/w3 scales that differ (engines
  fuse them), and scales more than a factor from their layer's median for the same projection;
- `expert_blocks`: one expert's E4M3 `weight_scale` per projection, and which 32-input blocks were
  carried losslessly from the release's MXFP4 and which were re-quantized: with the lossless cast
  (`options.cast_mxfp4_to_nvfp4` in the export's manifest) a block is carried exactly when
  `k_max - k <= 17` (`export.nvfp4.carry_scales` decides, from the release's `.scale` of that
  expert); without it every block was re-quantized from BF16 with the calibrated amax.

Figures and an interactive explorer (JupyterLab) draw these for notebook 04.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import read_json
from ..errors import FormatError
from ..release.format import FP4_GROUP, PROJS, expert_prefix, load_config
from ..release.shards import Checkpoint
from .explorer import RED, FigureWidget, rows_html

SCALES = ("weight_scale_2", "input_scale")
SHOWN = ("w1", "w3", "w2")  # w1 and w3 side by side: the lossless cast and the engines treat them together
CATEGORIES = ("missing", "not finite", "not positive", "w1/w3 differ", "outlier")
EXPORT_RECORD = "export.json"  # step 03's record in the run directory (export.recover.RECORD)
PROJ_COLORS = {"w1": "#4c72b0", "w3": "#55a868", "w2": "#dd8452"}
HEAT_CELLS = 256  # a heat map is pooled to at most this many cells per side before drawing
MARKED = 2000  # up to this many re-quantized blocks are also ringed one by one


@dataclass
class ExportRun:
    """An export opened for inspection: its reader, config and manifest, and where its release is."""

    path: Path
    ckpt: Checkpoint
    config: dict
    manifest: dict
    layers: list[int]
    n_experts: int
    cast: bool | None  # options.cast_mxfp4_to_nvfp4; None when the manifest does not say
    source: Path | None  # the release it was built from, when found on disk
    notes: list[str] = field(default_factory=list)
    release: Checkpoint | None = None  # opened on first use


def find_export(run_dir: str | Path) -> tuple[Path | None, str]:
    """The export step 03 wrote for this run (from `<run_dir>/export.json`), and a note on how it was found."""
    rec = read_json(Path(run_dir) / EXPORT_RECORD)
    if not isinstance(rec, dict):
        return None, f"no {EXPORT_RECORD} in {run_dir} (step 03 writes it): pass export_dir"
    report = rec.get("layout_report") if isinstance(rec.get("layout_report"), dict) else {}
    settings = rec.get("settings") if isinstance(rec.get("settings"), dict) else {}
    if settings.get("layout") not in (None, "v4-serving"):
        return None, f"step 03 wrote a {settings.get('layout')!r} export; this view reads the v4-serving layout"
    for where in (report.get("export"), settings.get("dir")):
        if where and Path(where).is_dir():
            return Path(where), f"from {Path(run_dir) / EXPORT_RECORD}"
    recorded = report.get("export") or settings.get("dir")
    return None, (f"the export recorded in {Path(run_dir) / EXPORT_RECORD} ({recorded}) is not on this machine: "
                  "pass export_dir")


def open_export(export_dir: str | Path, source: str | Path | None = None) -> ExportRun:
    """Open a v4-serving export: headers, config, manifest; the release from `source` or the manifest."""
    from ..export.layout import MANIFEST

    path = Path(export_dir)
    ckpt = Checkpoint(path)
    config = load_config(path)
    first = f"{expert_prefix(0, 0, 'w1')}.weight_scale_2"
    if first not in ckpt:
        raise FormatError(f"{path}: no {first}; not a v4-serving export (a generic one?). This view reads the "
                          "v4-serving layout step 03 writes by default")
    try:
        manifest = read_json(path / MANIFEST, {})
    except ValueError:  # a half-written or hand-edited manifest: the view still shows the tensors
        manifest = None
    manifest = manifest if isinstance(manifest, dict) else {}
    notes = [] if manifest else [f"no readable {MANIFEST} in {path}: lossless and re-quantized blocks cannot be "
                                 "told apart"]
    options = manifest.get("options") if isinstance(manifest.get("options"), dict) else {}
    cast = options.get("cast_mxfp4_to_nvfp4")
    cast = bool(cast) if cast is not None else None
    src = source or manifest.get("source") or (manifest.get("report") or {}).get("source")
    src = Path(src) if src else None
    if src is not None and not (src / "config.json").is_file():
        notes.append(f"the release {src} is not on this machine: lossless blocks cannot be marked (pass source)")
        src = None
    return ExportRun(path, ckpt, config, manifest, list(range(config["num_hidden_layers"])),
                     config["n_routed_experts"], cast, src, notes)


def open_run_export(run_dir: str | Path, export_dir: str | Path | None = None,
                    source: str | Path | None = None) -> tuple[ExportRun | None, str]:
    """(the export, how it was found) for notebook 04: `export_dir` when given, else the one step 03
    recorded for the run; (None, why) when there is none to show."""
    if export_dir:
        return open_export(export_dir, source), f"export {export_dir} (parameter export_dir)"
    path, note = find_export(run_dir)
    if path is None:
        return None, note
    return open_export(path, source), f"export {path} ({note})"


def describe(ex: ExportRun) -> pd.DataFrame:
    """What was opened: the export, its options, the release, the manifest's counts of fills and cast blocks."""
    report = ex.manifest.get("report") if isinstance(ex.manifest.get("report"), dict) else {}
    cast = report.get("cast") if isinstance(report.get("cast"), dict) else {}
    filled = report.get("filled") if isinstance(report.get("filled"), dict) else {}
    how = {True: "lossless MXFP4 -> NVFP4 cast (blocks re-quantized only where the release's exponents spread "
                 "too far)", False: "re-quantized from BF16 with the calibrated amax (no lossless cast)",
           None: "unknown (the export's manifest does not say)"}[ex.cast]
    rows = [("export", str(ex.path)),
            ("routed experts", f"{len(ex.layers)} layers x {ex.n_experts} experts x {len(PROJS)} projections"),
            ("weights", how),
            ("release", str(ex.source) if ex.source else "not found")]
    if cast.get("blocks"):
        rows.append(("lossless 32-blocks (manifest)", f"{cast.get('lossless', 0):,} of {cast['blocks']:,}"))
    if filled:
        rows.append(("amax filled at export (manifest)", ", ".join(f"{v} {k}" for k, v in filled.items())))
    rows += [("note", n) for n in ex.notes]
    return pd.DataFrame(rows, columns=["item", "value"]).set_index("item")


# -- the per-expert scalars ------------------------------------------------------------------------
def read_scalars(ckpt: Checkpoint, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(values as float64, present) of F32 scalar tensors by name, NaN where the checkpoint lacks one:
    one open file per shard, neighbouring tensors in one read. A name that is not an F32 scalar is refused."""
    out = np.full(len(names), np.nan)
    present = np.zeros(len(names), dtype=bool)
    by_shard: dict[str, list[tuple[int, int]]] = {}
    for i, n in enumerate(names):
        if n in ckpt:
            e = ckpt.entry(n)
            if e.dtype != "F32" or math.prod(e.shape) != 1:
                raise FormatError(f"shard {ckpt.weight_map[n]}: {n} is {e.dtype}{list(e.shape)}, not an F32 scalar")
            by_shard.setdefault(ckpt.weight_map[n], []).append((e.start, i))
            present[i] = True
    for shard, items in by_shard.items():
        items.sort()
        starts = np.array([s for s, _ in items])
        # runs of back-to-back scalars (weight_scale_2 then input_scale) become one read each
        breaks = np.flatnonzero(np.diff(starts) != 4) + 1
        with open(ckpt.dir / shard, "rb") as f:
            for run in np.split(np.arange(len(items)), breaks):
                f.seek(int(starts[run[0]]))
                raw = f.read(4 * len(run))
                if len(raw) != 4 * len(run):
                    raise FormatError(f"shard {shard}: short read at offset {starts[run[0]]}")
                out[[items[k][1] for k in run]] = np.frombuffer(raw, dtype="<f4")
    return out, present


def scale_table(ex: ExportRun, layers: list[int] | None = None) -> pd.DataFrame:
    """One row per (layer, expert, projection): its `weight_scale_2` and `input_scale` (NaN when the
    export lacks the tensor, then named in `missing`)."""
    layers = ex.layers if layers is None else list(layers)
    idx = pd.MultiIndex.from_product([layers, range(ex.n_experts), PROJS], names=["layer", "expert", "proj"])
    t = idx.to_frame(index=False)
    prefixes = [expert_prefix(i, j, p) for i, j, p in idx]
    values, present = read_scalars(ex.ckpt, [f"{p}.{s}" for p in prefixes for s in SCALES])
    values, present = values.reshape(-1, len(SCALES)), present.reshape(-1, len(SCALES))
    for k, s in enumerate(SCALES):
        t[s] = values[:, k]
    t["prefix"] = prefixes
    t["missing"] = [",".join(s for s, ok in zip(SCALES, row) if not ok) for row in present]
    return t


def scale_outliers(table: pd.DataFrame, factor: float = 8.0) -> pd.DataFrame:
    """Every scale that is missing, NaN/inf, <= 0, differs between w1 and w3 of one expert, or lies more
    than `factor` from the median of its layer's experts for the same projection; by tensor name,
    most serious category first, largest deviation first."""
    rows = []
    for s in SCALES:
        v = table[s].to_numpy()
        names = (table["prefix"] + "." + s).to_numpy()
        good = np.isfinite(v) & (v > 0)
        med = pd.Series(np.where(good, v, np.nan)).groupby([table["layer"], table["proj"]]).transform(
            "median").to_numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = v / med
            far = np.abs(np.log(ratio)) > math.log(factor)
        missing = table["missing"].str.split(",").apply(lambda m: s in m).to_numpy()
        cats = {"missing": missing, "not finite": ~missing & ~np.isfinite(v), "not positive": np.isfinite(v) & (v <= 0),
                "outlier": good & far}
        for cat, mask in cats.items():
            for k in np.flatnonzero(mask):
                detail = (f"{ratio[k]:.3g}x the median {med[k]:.4g} of layer {table['layer'].iat[k]}'s experts"
                          if cat == "outlier" else "")
                rows.append((cat, names[k], table["layer"].iat[k], table["expert"].iat[k], table["proj"].iat[k],
                             s, v[k], med[k], detail))
        w = table.pivot_table(index=["layer", "expert"], columns="proj", values=s, dropna=False)
        if {"w1", "w3"} <= set(w.columns):
            for (li, e), r in w[(w["w1"] != w["w3"]) & w["w1"].notna() & w["w3"].notna()].iterrows():
                rows.append(("w1/w3 differ", f"{expert_prefix(li, e, 'w1')}.{s}", li, e, "w1", s, r["w1"], np.nan,
                             f"w3 has {r['w3']:.6g}: engines run w1 and w3 as one GEMM with one scale"))
    out = pd.DataFrame(rows, columns=["category", "name", "layer", "expert", "proj", "scale", "value", "median",
                                      "detail"])
    out["category"] = pd.Categorical(out["category"], categories=CATEGORIES, ordered=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        dev = np.abs(np.log(out["value"].to_numpy(dtype=float) / out["median"].to_numpy(dtype=float)))
    out["_dev"] = -np.nan_to_num(dev, nan=0.0, posinf=0.0)
    out = out.sort_values(["category", "_dev", "layer", "expert"], kind="stable").drop(columns="_dev")
    return out.reset_index(drop=True)


def scale_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per layer and projection: each scale's min, median and max across experts, and how far apart
    the extremes are (max / min)."""
    g = table.groupby(["layer", "proj"], sort=True)
    cols = {}
    for s in SCALES:
        good = table[s].where(np.isfinite(table[s]) & (table[s] > 0))
        gs = good.groupby([table["layer"], table["proj"]])
        cols[f"{s} min"], cols[f"{s} median"], cols[f"{s} max"] = gs.min(), gs.median(), gs.max()
        cols[f"{s} max/min"] = cols[f"{s} max"] / cols[f"{s} min"]
    out = pd.DataFrame(cols)
    out.insert(0, "experts", g.size())
    return out.reindex(pd.MultiIndex.from_product([sorted(table["layer"].unique()), list(PROJS)],
                                                  names=["layer", "proj"]))


def pick_expert(table: pd.DataFrame, layer: int | None = None, expert: int | None = None) -> tuple[int, int]:
    """(layer, expert) to show first: the ones given, else the layer whose weight_scale_2 spread most
    across experts, and in it the expert farthest from the layer's median."""
    t = table[np.isfinite(table["weight_scale_2"]) & (table["weight_scale_2"] > 0)]
    if t.empty:
        return (layer if layer is not None else int(table["layer"].min())), (expert if expert is not None else 0)
    dev = np.abs(np.log(t["weight_scale_2"] / t.groupby(["layer", "proj"])["weight_scale_2"].transform("median")))
    if layer is None:
        layer = int(dev.groupby(t["layer"]).max().idxmax())
    if expert is None:
        here = t["layer"] == layer
        expert = int(t.loc[dev[here].idxmax(), "expert"]) if here.any() else 0
    return layer, expert


# -- one expert's blocks ----------------------------------------------------------------------------
@dataclass
class ProjBlocks:
    """One expert projection's block scales, and which 32-input blocks were re-quantized."""

    prefix: str
    weight_scale: np.ndarray  # E4M3 values as float32 [out, in/16]
    weight_scale_2: float
    requantized: np.ndarray | None  # bool [out, in/32], True where re-quantized; None when unknown
    why: str  # how `requantized` was decided (or why it is unknown)
    reported: int | None = None  # re-quantized blocks the manifest lists for this tensor, if it lists them

    @property
    def blocks(self) -> int:
        return self.weight_scale.shape[0] * self.weight_scale.shape[1] * 16 // FP4_GROUP


def reported_requantized(manifest: dict) -> dict[str, int]:
    """Re-quantized block counts per tensor or projection name, from any mapping in the manifest's
    report under a key that says so ('requantized...'); {} when the writer lists none."""
    found: dict[str, int] = {}

    def walk(x):
        if not isinstance(x, dict):
            return
        for k, v in x.items():
            if isinstance(v, dict) and "requant" in str(k).lower():
                for name, n in v.items():
                    if isinstance(n, dict):
                        n = next((n[c] for c in ("requantized", "lossy", "blocks") if isinstance(n.get(c), int)), None)
                    if isinstance(n, int) and not isinstance(n, bool):
                        found[str(name)] = n
            walk(v)

    walk(manifest.get("report"))
    return found


def _release(ex: ExportRun) -> Checkpoint | None:
    if ex.source is not None and ex.release is None:
        ex.release = Checkpoint(ex.source)
    return ex.release


def expert_blocks(ex: ExportRun, layer: int, expert: int) -> dict[str, ProjBlocks]:
    """w1, w3, w2 of one expert: E4M3 `weight_scale` and re-quantized 32-blocks (from the release's
    `.scale` and `export.nvfp4.carry_scales` when the export was cast)."""
    import torch

    from ..export.nvfp4 import carry_scales

    prefixes = {p: expert_prefix(layer, expert, p) for p in SHOWN}
    ws2, _ = read_scalars(ex.ckpt, [f"{prefixes[p]}.weight_scale_2" for p in SHOWN])
    reported = reported_requantized(ex.manifest)
    release = _release(ex) if ex.cast else None
    e8m0 = {}
    if release is not None:
        for p, pre in prefixes.items():
            e8m0[p] = release.tensor(f"{pre}.scale").view(torch.uint8).numpy()
    out = {}
    for (p, pre), s2 in zip(prefixes.items(), ws2):
        ws = ex.ckpt.tensor(f"{pre}.weight_scale").float().numpy()
        rows, cols = ws.shape[0], ws.shape[1] * 16 // FP4_GROUP
        if ex.cast is False:
            req, why = np.ones((rows, cols), dtype=bool), "no lossless cast: every block re-quantized from BF16"
        elif ex.cast is None:
            req, why = None, "unknown: the export has no manifest saying how its weights were made"
        elif release is None:
            req, why = None, "unknown: the release is not on this machine"
        else:
            group = ("w1", "w3") if p in ("w1", "w3") else ("w2",)
            _, cast_ws2, lossy = carry_scales(e8m0[p], max(int(e8m0[q].max()) for q in group))
            if float(cast_ws2) != float(s2):
                req, why = None, (f"unknown: weight_scale_2 {float(s2):.6g} is not the cast's 2^(k_max-8) = "
                                  f"{float(cast_ws2):.6g} from {ex.source} (another release?)")
            else:
                req = np.zeros(e8m0[p].shape, dtype=bool)
                req.reshape(-1)[lossy] = True
                why = f"lossless cast: re-quantized where k_max - k > 17 (k from {ex.source.name}'s .scale)"
        n = reported.get(pre, reported.get(f"{pre}.weight"))
        out[p] = ProjBlocks(pre, ws, float(s2), req, why, n)
    return out


def blocks_table(blocks: dict[str, ProjBlocks]) -> pd.DataFrame:
    """Per projection: weight_scale_2, the E4M3 block scales' range, 32-blocks re-quantized (and what
    the manifest says, when it lists it)."""
    rows = []
    for p, b in blocks.items():
        pos = b.weight_scale[b.weight_scale > 0]
        rows.append({"tensor": f"{b.prefix}.weight_scale", "weight_scale_2": b.weight_scale_2,
                     "weight_scale min": float(pos.min()) if pos.size else np.nan,
                     "weight_scale max": float(b.weight_scale.max()),
                     "zero blocks": int((b.weight_scale == 0).sum()), "32-blocks": b.blocks,
                     "re-quantized": int(b.requantized.sum()) if b.requantized is not None else None,
                     "manifest says": b.reported, "how": b.why})
    return pd.DataFrame(rows)


# -- figures ----------------------------------------------------------------------------------------
def _pool(a: np.ndarray, how: str, cells: int = HEAT_CELLS) -> np.ndarray:
    """Shrink a 2-D array to at most `cells` per side by blocks ('any' for masks, 'mean' ignoring NaN),
    so one re-quantized block still shows at screen size."""
    fr, fc = max(1, -(-a.shape[0] // cells)), max(1, -(-a.shape[1] // cells))
    if fr == fc == 1:
        return a
    pr, pc = -a.shape[0] % fr, -a.shape[1] % fc
    fill = False if how == "any" else np.nan
    a = np.pad(a, ((0, pr), (0, pc)), constant_values=fill).reshape(a.shape[0] // fr + (pr > 0), fr,
                                                                  a.shape[1] // fc + (pc > 0), fc)
    if how == "any":
        return a.any(axis=(1, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN cell (all-zero blocks) stays NaN
        return np.nanmean(a, axis=(1, 3))


def draw_layer_scales(axes, table: pd.DataFrame, layer: int, expert: int | None = None,
                      outliers: pd.DataFrame | None = None, labels: int = 6) -> None:
    """On two axes, `weight_scale_2` and `input_scale` of every expert of `layer` per projection, the
    median dashed, outliers ringed in red and the largest named, the chosen expert marked."""
    t = table[table["layer"] == layer]
    for ax, s in zip(axes, SCALES):
        bad = 0
        for p, size in zip(PROJS, (14, 14, 5)):  # w3 over w1 smaller: they are equal by construction
            tp = t[t["proj"] == p]
            v = tp[s].to_numpy()
            ok = np.isfinite(v) & (v > 0)
            bad += int((~ok).sum())
            ax.scatter(tp["expert"].to_numpy()[ok], v[ok], s=size, color=PROJ_COLORS[p], label=p, lw=0)
            if ok.any():
                ax.axhline(np.median(v[ok]), color=PROJ_COLORS[p], lw=0.8, ls="--", alpha=0.7)
        if outliers is not None and len(outliers):
            o = outliers[(outliers["layer"] == layer) & (outliers["scale"] == s) & (outliers["category"] == "outlier")]
            ax.scatter(o["expert"], o["value"], s=60, facecolors="none", edgecolors=RED, lw=1)
            for _, r in o.head(labels).iterrows():
                ax.annotate(f"e{r['expert']} {r['proj']}", (r["expert"], r["value"]), fontsize=7, color=RED,
                            xytext=(3, 3), textcoords="offset points")
        if expert is not None:
            ax.axvline(expert, color=RED, lw=0.8, alpha=0.6)
        ax.set_yscale("log")
        ax.set_xlabel("expert")
        ax.set_title(f"{s}, layer {layer}: {t['expert'].nunique()} experts" + (f" ({bad} missing/<=0/NaN)" if bad
                                                                                   else ""), fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        ax.tick_params(labelsize=7)


def draw_blocks(axes, blocks: dict[str, ProjBlocks], cax=None) -> None:
    """One heat map per projection: log2 of the E4M3 `weight_scale` per 16-input block (rows = output
    channels), re-quantized 32-blocks overlaid in red; pooled to screen size (a mark survives pooling)."""
    from matplotlib.colors import ListedColormap

    logs = {}
    for p, b in blocks.items():
        with np.errstate(divide="ignore"):
            logs[p] = np.where(b.weight_scale > 0, np.log2(b.weight_scale), np.nan)
    finite = [x[np.isfinite(x)] for x in logs.values()]
    lo = min((x.min() for x in finite if x.size), default=0.0)
    hi = max((x.max() for x in finite if x.size), default=1.0)
    im = None
    for ax, (p, b) in zip(axes, blocks.items()):
        rows, cols = b.weight_scale.shape
        img = _pool(logs[p], "mean")
        im = ax.imshow(img, aspect="auto", interpolation="nearest", cmap="viridis", vmin=lo, vmax=max(hi, lo + 1),
                       extent=(0, cols, rows, 0))
        n = int(b.requantized.sum()) if b.requantized is not None else None
        if n == b.blocks:  # nothing carried losslessly: a red sheet would hide the scales
            what = f"all {n:,} 32-blocks re-quantized"
        elif n is not None:
            mask = _pool(np.repeat(b.requantized, FP4_GROUP // 16, axis=1), "any")
            ax.imshow(np.ma.masked_where(~mask, mask), aspect="auto", interpolation="nearest", alpha=0.7,
                      cmap=ListedColormap([RED]), vmin=0, vmax=1, extent=(0, cols, rows, 0))
            if 0 < n <= MARKED:  # a few blocks among 688,128 are a pixel each: ring them too
                r, c = np.nonzero(b.requantized)
                ax.scatter(c * FP4_GROUP / 16 + 1, r + 0.5, s=40, facecolors="none", edgecolors=RED, lw=1,
                           clip_on=False)
            what = f"{n:,} of {b.blocks:,} 32-blocks re-quantized (red)"
        else:
            what = "re-quantized blocks unknown"
        ax.set_title(f"{p} weight_scale [{rows}x{cols}], weight_scale_2 {b.weight_scale_2:.4g}\n{what}", fontsize=8)
        ax.set_xlabel("16-input block", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("output row", fontsize=7)
    if im is not None:
        fig = axes[0].figure
        bar = fig.colorbar(im, cax=cax) if cax is not None else fig.colorbar(im, ax=list(axes), fraction=0.03)
        bar.set_label("log2 weight_scale (E4M3)", fontsize=7)
        bar.ax.tick_params(labelsize=7)


def plot_scale_profile(table: pd.DataFrame, outliers: pd.DataFrame | None = None, labels: int = 4):
    """Per layer, the median and min-max band across experts of `weight_scale_2` and `input_scale`
    for each projection; outliers in red, the largest named."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.2))
    for ax, s in zip(axes, SCALES):
        good = table[np.isfinite(table[s]) & (table[s] > 0)]
        for p in ("w1", "w2"):  # w3 equals w1 (one fused scale); its differences are listed, not drawn
            g = good[good["proj"] == p].groupby("layer")[s]
            med = g.median()
            line, = ax.plot(med.index, med.values, marker=".", color=PROJ_COLORS[p], label=f"{p} median" +
                            (" (= w3)" if p == "w1" else ""))
            ax.fill_between(med.index, g.min().values, g.max().values, color=line.get_color(), alpha=0.15)
        if outliers is not None and len(outliers):
            o = outliers[(outliers["scale"] == s) & (outliers["category"] == "outlier")]
            ax.scatter(o["layer"], o["value"], marker="x", color=RED, s=20, label=f"outliers ({len(o)})")
            for _, r in o.head(labels).iterrows():
                ax.annotate(f"L{r['layer']} e{r['expert']} {r['proj']}", (r["layer"], r["value"]), fontsize=7,
                            color=RED, xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers (no 0.5 ticks)
        ax.set_title(f"{s} per layer across experts (median, min-max band)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_layer_scales(table: pd.DataFrame, layer: int, expert: int | None = None,
                      outliers: pd.DataFrame | None = None):
    """`draw_layer_scales` as a figure of its own."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3))
    draw_layer_scales(axes, table, layer, expert, outliers)
    fig.tight_layout()
    return fig


def plot_expert_blocks(blocks: dict[str, ProjBlocks]):
    """`draw_blocks` as a figure of its own."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(blocks), figsize=(12, 3.4))
    draw_blocks(list(axes), blocks)
    return fig


class ExportExplorer(FigureWidget):
    """Layer and expert controls over an export: the layer's scales across experts on top, the chosen
    expert's block scales with re-quantized blocks below."""

    def __init__(self, ex: ExportRun, table: pd.DataFrame, outliers: pd.DataFrame | None = None,
                 layer: int | None = None, expert: int | None = None, figsize=(12, 6.6), dpi=80):
        import ipywidgets as w

        self.ex, self.table, self.outliers = ex, table, outliers
        layers = sorted(int(x) for x in table["layer"].unique())
        layer, expert = pick_expert(table, layer, expert)
        self.layer_w = w.SelectionSlider(options=layers, value=layer, description="layer", continuous_update=False)
        self.expert_w = w.IntSlider(min=0, max=ex.n_experts - 1, value=expert, description="expert",
                                    continuous_update=False)
        super().__init__([self.layer_w, self.expert_w], figsize, dpi, "quantbook-export-explorer")
        self.blocks: dict[str, ProjBlocks] = {}
        self.layer_w.observe(self.redraw, names="value")
        self.expert_w.observe(self.redraw, names="value")
        self.redraw()

    def draw(self, fig) -> str:
        layer, expert = self.layer_w.value, self.expert_w.value
        top = [fig.add_axes((0.07, 0.6, 0.41, 0.33)), fig.add_axes((0.57, 0.6, 0.41, 0.33))]
        draw_layer_scales(top, self.table, layer, expert, self.outliers)
        bottom = [fig.add_axes((0.07 + 0.29 * i, 0.08, 0.24, 0.36)) for i in range(len(SHOWN))]
        self.blocks = expert_blocks(self.ex, layer, expert)
        draw_blocks(bottom, self.blocks, cax=fig.add_axes((0.93, 0.08, 0.012, 0.36)))
        t = blocks_table(self.blocks)
        return rows_html([tuple(r) for r in t[["tensor", "weight_scale_2", "re-quantized", "32-blocks"]].itertuples(
            index=False)], ("tensor", "weight_scale_2", "re-quantized", "32-blocks")) + \
            f"<div style='font-size:11px'>{next(iter(self.blocks.values())).why}</div>"

    def describe(self) -> str:
        return f"export explorer: {self.ex.path}, layer {self.layer_w.value}, expert {self.expert_w.value}"


def explorer(ex: ExportRun, table: pd.DataFrame, outliers: pd.DataFrame | None = None, layer: int | None = None,
             expert: int | None = None) -> ExportExplorer:
    """The export explorer for JupyterLab (`display()` it; an executed copy shows its first view)."""
    return ExportExplorer(ex, table, outliers, layer, expert)
