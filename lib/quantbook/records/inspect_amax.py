"""Judge a run's calibration from its amax snapshot and token counts alone (never the model).

The failures that cost the most are silent: experts never routed during calibration, zero or
missing scales, w1/w3 of one expert with different scales. Everything here reads
`amax.safetensors` and `expert_token_counts.json` from a run directory, so it takes seconds
even for V4 Pro's ~48,000 quantizers, and feeds notebook 04.

The table (`AmaxRun.table`, one row per quantizer attribute, plus a row per missing quantizer)
carries each quantizer's place in V4 terms from `amax.parse_quantizer`: layer, expert, native
projection(s), role (input/weight), the summary group ("routed w2", "shared expert", ...), and
the layer group ("hash-routed" for the first `num_hash_layers`, "score-routed", "mtp").
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..amax import SNAPSHOT, TOKEN_COUNTS, parse_quantizer, split_key
from ..atomic import write_text
from ..errors import AmaxError, StateError

# anomaly categories, most serious first (a missing or non-finite amax breaks export or serving)
CATEGORIES = ("missing", "empty", "nan", "inf", "negative", "zero", "outlier", "w1/w3 ratio", "never routed")
LAYER_GROUPS = ("hash-routed", "score-routed", "mtp", "other")
ANOMALIES_CSV = "amax_anomalies.csv"
HIST_GROUPS = ("attention", "shared expert", "routed w1/w3", "routed w2")
_PREFIX = re.compile(r"^(.*?(?:layers|mtp)\.\d+\.)")
_NATIVE_EXPERT_IDX = re.compile(r"experts\.(\d+)\.")
_TRAILING_IDX = re.compile(r"\.(\d+)$")


def quantizer_group(kind: str, projs: tuple[str, ...], role: str) -> str:
    """Summary group of a quantizer: 'attention', 'routed w1+w3', 'routed w2', 'shared expert', ..."""
    if role == "bmm":
        return "attention bmm"
    if kind == "routed_expert":
        return "routed " + "+".join(projs)
    return {"shared_expert": "shared expert"}.get(kind, kind)


def hist_group(group: str) -> str:
    """Coarser group for histograms: attention with its compressor/indexer, routed w1/w3 together."""
    if group in ("attention", "indexer", "compressor", "attention bmm"):
        return "attention"
    if group in ("routed w1+w3", "routed w1", "routed w3"):
        return "routed w1/w3"
    return group


def layer_group(layer, mtp: bool, num_hash_layers: int | None) -> str:
    if layer is None or (isinstance(layer, float) and math.isnan(layer)):
        return "other"
    if mtp:
        return "mtp"
    if num_hash_layers is None:
        return "score-routed"
    return "hash-routed" if layer < num_hash_layers else "score-routed"


@dataclass
class AmaxRun:
    """One run's calibration facts, loaded for inspection."""

    path: Path
    table: pd.DataFrame
    meta: dict
    counts: np.ndarray | None = None  # [layer, expert] calibration tokens; None when no file
    count_layers: list[int] = field(default_factory=list)
    num_hash_layers: int | None = None
    hash_source: str = ""  # where num_hash_layers came from
    quantizer_list: bool = False  # the snapshot listed every enabled quantizer
    n_experts: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def amax(self) -> pd.DataFrame:
        """Rows of `_amax` (present or missing), the ones every check looks at."""
        return self.table[self.table["attr"] == "_amax"]


def _find_hash_layers(param, meta: dict) -> tuple[int | None, str]:
    if param is not None:
        return int(param), "parameter num_hash_layers"
    if meta.get("num_hash_layers") is not None:
        return int(meta["num_hash_layers"]), "snapshot metadata"
    cfg = meta.get("config")
    if isinstance(cfg, dict) and cfg.get("num_hash_layers") is not None:
        return int(cfg["num_hash_layers"]), "snapshot metadata config"
    for key in ("config_path", "model_config", "model", "model_path", "source"):
        v = meta.get(key)
        if isinstance(v, str) and v:
            p = Path(v)
            p = p / "config.json" if p.is_dir() else p
            if p.name.endswith(".json") and p.is_file():
                n = json.loads(p.read_text()).get("num_hash_layers")
                if n is not None:
                    return int(n), f"{p}"
    return None, "unknown (pass num_hash_layers): hash-routed layers are not told apart"


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file

        return load_file(str(path))
    except (TypeError, ValueError):  # a dtype numpy lacks (bf16): go through torch
        from safetensors.torch import load_file

        return {k: v.float().numpy() for k, v in load_file(str(path)).items()}


def _stats(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-tensor max/min/NaN/inf/negative/zero counts, vectorised over all tensors at once."""
    n = len(arrays)
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    out = {k: np.full(n, np.nan) for k in ("amax", "amax_min")}
    for k in ("n_nan", "n_inf", "n_neg", "n_zero"):
        out[k] = np.zeros(n, dtype=np.int64)
    nz = np.flatnonzero(sizes)
    if nz.size:
        flat = np.concatenate([arrays[i].reshape(-1).astype(np.float64) for i in nz])
        starts = np.concatenate([[0], np.cumsum(sizes[nz])[:-1]])
        finite = np.where(np.isfinite(flat), flat, np.nan)
        with np.errstate(invalid="ignore"):
            out["amax"][nz] = np.fmax.reduceat(finite, starts)
            out["amax_min"][nz] = np.fmin.reduceat(finite, starts)
        out["n_nan"][nz] = np.add.reduceat(np.isnan(flat), starts)
        out["n_inf"][nz] = np.add.reduceat(np.isinf(flat), starts)
        out["n_neg"][nz] = np.add.reduceat(flat < 0, starts)
        out["n_zero"][nz] = np.add.reduceat(flat == 0, starts)
    out["numel"] = sizes
    return out


def _row_facts(names, num_hash_layers):
    cols = {k: [] for k in ("native", "role", "kind", "group", "layer", "mtp", "layer_group", "expert",
                            "projs", "module")}
    for name in names:
        q = parse_quantizer(name)
        cols["native"].append(q.native)
        cols["role"].append(q.role)
        cols["kind"].append(q.kind)
        cols["group"].append(quantizer_group(q.kind, q.projs, q.role))
        cols["layer"].append(q.layer)
        cols["mtp"].append(q.mtp)
        cols["layer_group"].append(layer_group(q.layer, q.mtp, num_hash_layers))
        cols["expert"].append(q.expert)
        cols["projs"].append("+".join(q.projs))
        cols["module"].append(q.module)
    return cols


def load_token_counts(path: str | Path) -> tuple[np.ndarray, list[int]]:
    """`expert_token_counts.json` -> ([layer, expert] int array, layer numbers) for the main layers
    (`layers.<i>` keys; `mtp.<i>` rows are left out); ragged rows padded with -1."""
    raw = json.loads(Path(path).read_text())
    items = sorted(((int(k.split(".")[-1]), v) for k, v in raw.items() if k.startswith("layers.")),
                   key=lambda kv: kv[0])
    width = max((len(v) for _, v in items), default=0)
    counts = np.full((len(items), width), -1, dtype=np.int64)
    for r, (_, v) in enumerate(items):
        counts[r, : len(v)] = v
    return counts, [k for k, _ in items]


def enabled_quantizers(meta: dict) -> list[str] | None:
    """Names of every enabled quantizer that should have an amax, from the snapshot metadata
    (`enabled_quantizers`, or `quantizers` when it is a list or a {name: enabled} map); None when
    the producer did not record them."""
    for key in ("enabled_quantizers", "quantizers"):
        v = meta.get(key)
        if isinstance(v, dict):
            return [k for k, on in v.items() if on]
        if isinstance(v, list):
            return [str(x) for x in v]
    return None


def load_repairs(run_dir: str | Path) -> pd.DataFrame:
    """The activation amax step 02 replaced before export (`amax_repairs` in its quantize.json):
    the snapshot holds the values BEFORE that repair."""
    p = Path(run_dir) / "quantize.json"  # calibrate.driver.RESULT (not imported: it pulls in modelopt's patches)
    found = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "amax_repairs" and isinstance(v, list):
                    found.extend(r for r in v if isinstance(r, dict))
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    if p.is_file():
        try:
            walk(json.loads(p.read_text()))
        except json.JSONDecodeError:
            pass
    cols = ["quantizer", "problem", "values", "replacement", "fallback"]
    return pd.DataFrame(found, columns=cols).drop_duplicates(subset=["quantizer"]) if found else pd.DataFrame(columns=cols)


def load_run(run_dir: str | Path | None = None, snapshot: str | Path | None = None,
             token_counts: str | Path | None = None, num_hash_layers: int | None = None) -> AmaxRun:
    """Load a run's amax snapshot (and token counts beside it when present) into an `AmaxRun`.

    Missing quantizers are added as rows with `present=False`: those the snapshot's
    `quantizers` metadata lists (every enabled quantizer) without an `_amax`, and, from the
    structure alone, routed-expert quantizers absent for some experts or layers.
    """
    if snapshot is None:
        if run_dir is None:
            raise ValueError("load_run needs run_dir or snapshot")
        snapshot = Path(run_dir) / SNAPSHOT
    snapshot = Path(snapshot)
    if not snapshot.is_file():
        raise StateError(f"amax snapshot {snapshot} not found (step 02 writes it)")
    from safetensors import safe_open

    with safe_open(str(snapshot), "numpy") as f:
        meta = json.loads((f.metadata() or {}).get("quantbook", "{}"))
    tensors = _read_tensors(snapshot)
    keys = sorted(tensors)
    split = [split_key(k) for k in keys]
    nh, nh_source = _find_hash_layers(num_hash_layers, meta)
    stats = _stats([tensors[k] for k in keys])
    table = pd.DataFrame({"name": [q for q, _ in split], "attr": [a for _, a in split], "present": True, **stats})
    run = AmaxRun(snapshot, table, meta, num_hash_layers=nh, hash_source=nh_source)

    counts_path = Path(token_counts) if token_counts else snapshot.parent / TOKEN_COUNTS
    if counts_path.is_file():
        run.counts, run.count_layers = load_token_counts(counts_path)
    else:
        run.notes.append(f"no token counts at {counts_path}: never-routed experts cannot be listed")

    listed = enabled_quantizers(meta)
    run.quantizer_list = listed is not None
    have = set(table.loc[table["attr"] == "_amax", "name"])
    missing = set(listed or []) - have
    problems = meta.get("amax_problems_before_repair")
    if isinstance(problems, dict):  # step 02's own check, by name, before its repair
        missing |= {n for n, p in problems.items() if p == "missing"} - have
    run.n_experts = _n_experts(meta, run.counts, table)
    missing |= _structural_missing(table, run.n_experts) - have
    if not run.quantizer_list:
        run.notes.append("snapshot metadata lists no enabled quantizers (`enabled_quantizers`): 'missing' covers "
                         "routed experts inferred from the structure and step 02's own 'missing' findings only")
    if missing:
        extra = pd.DataFrame({"name": sorted(missing), "attr": "_amax", "present": False,
                              "amax": np.nan, "amax_min": np.nan, "numel": 0,
                              **{k: 0 for k in ("n_nan", "n_inf", "n_neg", "n_zero")}})
        table = pd.concat([table, extra], ignore_index=True)
    for k, v in _row_facts(table["name"].tolist(), nh).items():
        table[k] = pd.array(v, dtype="Int64") if k in ("layer", "expert") else v
    run.table = table
    return run


def _n_experts(meta: dict, counts, table: pd.DataFrame) -> int | None:
    for k in ("n_routed_experts", "num_experts"):
        if meta.get(k):
            return int(meta[k])
    cfg = meta.get("config")
    if isinstance(cfg, dict) and cfg.get("n_routed_experts"):
        return int(cfg["n_routed_experts"])
    if counts is not None and counts.size:
        return int(counts.shape[1])
    experts = [parse_quantizer(n).expert for n in table["name"].unique() if ".experts" in n]
    experts = [e for e in experts if e is not None]
    return max(experts) + 1 if experts else None


def _structural_missing(table: pd.DataFrame, n_experts: int | None) -> set[str]:
    """Routed-expert quantizer names implied by the others: every expert of every layer that has
    routed-expert quantizers, and the shared input quantizers present in any other layer."""
    if n_experts is None:
        return set()
    prefixes, shared, per_expert = set(), set(), set()
    for n in table.loc[table["attr"] == "_amax", "name"]:
        q = parse_quantizer(n)
        m = _PREFIX.match(n)
        if q.kind != "routed_expert" or m is None:
            continue
        prefixes.add(m.group(1))
        tail = n[m.end(1):]
        if q.expert is None:
            shared.add(tail)
        elif _NATIVE_EXPERT_IDX.search(tail):
            per_expert.add(_NATIVE_EXPERT_IDX.sub("experts.{e}.", tail, count=1))
        else:
            per_expert.add(_TRAILING_IDX.sub(".{e}", tail))
    want = {p + t for p in prefixes for t in shared}
    want |= {p + t.format(e=e) for p in prefixes for t in per_expert for e in range(n_experts)}
    return want


def load_compare(path: str | Path, num_hash_layers: int | None = None) -> AmaxRun:
    """A second run to diff against: a run directory or a snapshot file."""
    p = Path(path)
    return load_run(p if p.is_dir() else None, None if p.is_dir() else p, num_hash_layers=num_hash_layers)


def describe(run: AmaxRun) -> pd.DataFrame:
    """What was loaded: quantizers, attributes, layers, experts, where the hash-layer count came from."""
    a = run.amax
    rows = [
        ("snapshot", str(run.path)),
        ("quantizers", f"{a['name'].nunique():,} ({(~a['present']).sum():,} of them without _amax)"),
        ("other attributes", f"{(run.table['attr'] != '_amax').sum():,} (_pre_quant_scale, _global_amax)"),
        ("enabled quantizers listed by step 02", "yes" if run.quantizer_list else "no"),
        ("layers", f"{a['layer'].dropna().nunique()}, routed experts per layer: {run.n_experts}"),
        ("hash-routed layers", f"{run.num_hash_layers} (from {run.hash_source})"),
        ("token counts", "%d layers x %d experts" % run.counts.shape if run.counts is not None else "none"),
    ] + [("note", n) for n in run.notes]
    return pd.DataFrame(rows, columns=["item", "value"]).set_index("item")


# -- checks -------------------------------------------------------------------------------------
def summary(run: AmaxRun) -> pd.DataFrame:
    """Per quantizer group and role: counts, missing/zero/NaN/inf/negative, min/median/max amax."""
    t = run.amax
    ok = t["present"] & (t["amax"] > 0)
    rows = []
    for (group, role), g in t.groupby(["group", "role"], sort=True):
        good = g.loc[ok[g.index], "amax"]
        layers = g["layer"].dropna()
        rows.append({
            "group": group, "role": role, "quantizers": len(g),
            "layers": f"{layers.min()}-{layers.max()}" if len(layers) else "",
            "missing": int((~g["present"]).sum()), "zero": int((g["n_zero"] > 0).sum()),
            "nan": int((g["n_nan"] > 0).sum()), "inf": int((g["n_inf"] > 0).sum()),
            "negative": int((g["n_neg"] > 0).sum()),
            "min": good.min() if len(good) else np.nan, "median": good.median() if len(good) else np.nan,
            "max": good.max() if len(good) else np.nan,
        })
    return pd.DataFrame(rows)


def _outliers(t: pd.DataFrame, factor: float) -> pd.DataFrame:
    """Each amax against the median of its layer's population: a routed expert against the other
    experts of the same projection and role; any other quantizer against the layer's other
    non-expert quantizers of its role. Populations of fewer than 3 are not judged."""
    good = t[t["present"] & (t["amax"] > 0) & np.isfinite(t["amax"])].copy()
    per_expert = good["expert"].notna()
    good["population"] = np.where(per_expert, "routed " + good["projs"] + " per expert", "non-expert")
    good["layer_key"] = good["layer"].astype("string").fillna("-") + np.where(good["mtp"], "m", "")
    keys = ["layer_key", "role", "population"]
    grouped = good.groupby(keys)["amax"]
    good["median"] = grouped.transform("median")
    good["size"] = grouped.transform("size")
    good["ratio"] = good["amax"] / good["median"]
    bad = good[(good["size"] >= 3) & ((good["ratio"] > factor) | (good["ratio"] < 1 / factor))]
    return bad


def w13_ratios(run: AmaxRun) -> tuple[pd.DataFrame, str]:
    """Per routed expert, the larger over the smaller of its w1 and w3 amax (weight and input).

    Where transformers fuses w1 and w3 (`gate_up_proj`), one quantizer covers both, so the ratio
    is 1 by construction; the note says so and the frame lists those experts with `fused=True`.
    """
    t = run.amax
    t = t[(t["kind"] == "routed_expert") & t["present"]]
    fused = t[t["projs"] == "w1+w3"]
    sep = t[t["projs"].isin(["w1", "w3"])]
    frames = []
    if len(fused):
        f = fused[["layer", "mtp", "expert", "role"]].copy()
        f["w1"] = f["w3"] = fused["amax"].values
        f["ratio"] = 1.0
        f["fused"] = True
        frames.append(f)
    if len(sep):
        p = sep.pivot_table(index=["layer", "mtp", "expert", "role"], columns="projs", values="amax",
                            aggfunc="first", dropna=False).reset_index()
        p = p.dropna(subset=[c for c in ("w1", "w3") if c in p.columns])
        if {"w1", "w3"} <= set(p.columns) and len(p):
            with np.errstate(divide="ignore", invalid="ignore"):
                p["ratio"] = np.maximum(p["w1"], p["w3"]) / np.minimum(p["w1"], p["w3"])
            p["fused"] = False
            frames.append(p[["layer", "mtp", "expert", "role", "w1", "w3", "ratio", "fused"]])
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["layer", "mtp", "expert", "role", "w1", "w3", "ratio", "fused"])
    notes = []
    if len(fused):
        notes.append(f"{fused['name'].nunique()} quantizers cover w1 and w3 together (transformers' fused "
                     "gate_up_proj): one amax for both, ratio 1 by construction")
    if len(sep):
        notes.append(f"{len(out) - (len(fused) if len(fused) else 0)} expert/role pairs with separate w1 and w3 amax")
    if not notes:
        notes.append("no routed-expert w1/w3 quantizers in this snapshot")
    return out, "; ".join(notes)


def never_routed(run: AmaxRun) -> pd.DataFrame:
    """(layer, expert, layer_group) of every expert with zero calibration tokens."""
    if run.counts is None:
        return pd.DataFrame(columns=["layer", "expert", "layer_group"])
    r, e = np.nonzero(run.counts == 0)
    layers = [run.count_layers[i] for i in r]
    return pd.DataFrame({"layer": layers, "expert": e,
                         "layer_group": [layer_group(li, False, run.num_hash_layers) for li in layers]})


def anomalies(run: AmaxRun, outlier_factor: float = 8.0, w13_ratio_threshold: float = 2.0) -> pd.DataFrame:
    """Every suspicious quantizer by name: category (see CATEGORIES), value, and why."""
    t = run.amax
    rows = []

    def add(cat, r, value, detail):
        rows.append({"category": cat, "name": r["name"], "native": r["native"], "layer": r["layer"],
                     "expert": r["expert"], "layer_group": r["layer_group"], "value": value, "detail": detail})

    src = "listed in the snapshot's quantizers" if run.quantizer_list else "implied by the other experts"
    for _, r in t[~t["present"]].iterrows():
        add("missing", r, np.nan, f"enabled quantizer without _amax ({src})")
    present = run.table[run.table["present"]]
    for _, r in present[present["numel"] == 0].iterrows():
        add("empty", r, np.nan, f"{r['attr']} has no elements")
    for col, cat in (("n_nan", "nan"), ("n_inf", "inf"), ("n_neg", "negative"), ("n_zero", "zero")):
        for _, r in present[present[col] > 0].iterrows():
            value = r["amax_min"] if cat == "negative" else r["amax"]
            add(cat, r, value, f"{r[col]} of {r['numel']} element(s) of {r['attr']}")
    for _, r in _outliers(t, outlier_factor).iterrows():
        add("outlier", r, r["amax"], f"{r['ratio']:.3g}x the median {r['median']:.4g} of {r['size']} "
                                     f"{r['population']} {r['role']} amax in its layer")
    ratios, _ = w13_ratios(run)
    for _, r in ratios[(~ratios["fused"].astype(bool)) & (ratios["ratio"] > w13_ratio_threshold)].iterrows():
        rows.append({"category": "w1/w3 ratio", "name": f"layer {r['layer']} expert {r['expert']} {r['role']}",
                     "native": f"{'mtp' if r['mtp'] else 'layers'}.{r['layer']}.ffn.experts.{r['expert']}.w1/w3",
                     "layer": r["layer"], "expert": r["expert"],
                     "layer_group": layer_group(r["layer"], r["mtp"], run.num_hash_layers),
                     "value": r["ratio"], "detail": f"w1 {r['w1']:.4g}, w3 {r['w3']:.4g}: serving shares one scale"})
    for _, r in never_routed(run).iterrows():
        rows.append({"category": "never routed", "name": f"layers.{r['layer']}.ffn.experts.{r['expert']}",
                     "native": f"layers.{r['layer']}.ffn.experts.{r['expert']}", "layer": r["layer"],
                     "expert": r["expert"], "layer_group": r["layer_group"], "value": 0,
                     "detail": "no calibration tokens: input amax comes from other experts"})
    out = pd.DataFrame(rows, columns=["category", "name", "native", "layer", "expert", "layer_group", "value", "detail"])
    out["category"] = pd.Categorical(out["category"], categories=CATEGORIES, ordered=True)
    return out.sort_values(["category", "layer", "expert", "name"], kind="stable").reset_index(drop=True)


def anomaly_counts(anom: pd.DataFrame) -> pd.DataFrame:
    """One row: how many anomalies of each category (every category listed, zeros included)."""
    return anom.groupby("category", observed=False).size().rename("count").to_frame().T


def anomaly_tables(anom: pd.DataFrame, max_rows: int = 200) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) per category present, at most `max_rows` rows each, largest categories not cut silently."""
    out = []
    for cat, rows in anom.groupby("category", observed=True):
        more = f" (first {max_rows} shown; all in {ANOMALIES_CSV})" if len(rows) > max_rows else ""
        out.append((f"{cat}: {len(rows)}{more}", rows.head(max_rows)[
            ["name", "native", "layer", "expert", "layer_group", "value", "detail"]].reset_index(drop=True)))
    return out


def write_anomalies(anom: pd.DataFrame, run_dir: str | Path) -> Path:
    """Every anomaly to `<run_dir>/amax_anomalies.csv` (atomic)."""
    path = Path(run_dir) / ANOMALIES_CSV
    write_text(path, anom.to_csv(index=False))
    return path


def check_fail_on(anom: pd.DataFrame, fail_on) -> None:
    """Raise AmaxError naming the categories of `fail_on` that occur (and a few quantizers of each)."""
    failed = sorted(set(anom["category"].astype(str)) & set(fail_on or ()))
    if failed:
        raise AmaxError(f"amax anomalies in {failed} (fail_on): " + "; ".join(
            f"{c}: {', '.join(anom.loc[anom['category'] == c, 'name'].head(5))}" for c in failed))


def diff_runs(a: AmaxRun, b: AmaxRun, moved_threshold: float = 0.05) -> pd.DataFrame:
    """Every quantizer attribute of two runs side by side; `status` is 'moved' when |b/a - 1| >
    moved_threshold, 'same', 'only in A', 'only in B' or 'not finite'. Sorted largest move first."""
    cols = ["name", "attr", "native", "group", "role", "layer", "expert", "amax"]
    ta = a.table[a.table["present"]][cols]
    tb = b.table[b.table["present"]][["name", "attr", "amax"]]
    m = ta.merge(tb, on=["name", "attr"], how="outer", suffixes=("_a", "_b"), indicator=True)
    if m["native"].isna().any():  # rows only in B: take their facts from B
        facts = b.table.set_index(["name", "attr"])[cols[2:7]]
        idx = m["native"].isna()
        filled = facts.reindex(pd.MultiIndex.from_frame(m.loc[idx, ["name", "attr"]]))
        for c in cols[2:7]:
            m.loc[idx, c] = filled[c].values
    m = m.rename(columns={"amax_a": "a", "amax_b": "b"})
    with np.errstate(divide="ignore", invalid="ignore"):
        m["ratio"] = m["b"] / m["a"]
    m["change"] = m["ratio"] - 1
    status = np.where(m["_merge"] == "left_only", "only in A", np.where(m["_merge"] == "right_only", "only in B", ""))
    finite = np.isfinite(m["ratio"]) & (m["a"] > 0)
    status = np.where(status != "", status, np.where(~finite, "not finite",
                      np.where(np.abs(m["change"]) > moved_threshold, "moved", "same")))
    m["status"] = status
    m["abs_log2"] = np.abs(np.log2(m["ratio"].where(finite)))
    m = m.drop(columns=["_merge"]).sort_values(["abs_log2"], ascending=False, na_position="first")
    return m.reset_index(drop=True)


def diff_summary(d: pd.DataFrame) -> pd.DataFrame:
    """Per group and role: how many quantizers moved, the median and largest change."""
    rows = []
    for (group, role), g in d.groupby(["group", "role"], dropna=False):
        moved = g[g["status"] == "moved"]
        rows.append({"group": group, "role": role, "quantizers": len(g), "moved": len(moved),
                     "only in A": int((g["status"] == "only in A").sum()),
                     "only in B": int((g["status"] == "only in B").sum()),
                     "median |change|": float(np.nanmedian(np.abs(g["change"]))) if g["change"].notna().any() else np.nan,
                     "largest change": g.loc[g["abs_log2"].idxmax(), "change"] if g["abs_log2"].notna().any() else np.nan})
    return pd.DataFrame(rows)


# -- figures ----------------------------------------------------------------------------------
def plot_histograms(run: AmaxRun, bins: int = 40):
    """log10 amax histograms: one row per layer group (hash-routed apart from score-routed),
    one column per projection group, input and weight overlaid."""
    import matplotlib.pyplot as plt

    t = run.amax
    t = t[t["present"] & (t["amax"] > 0) & np.isfinite(t["amax"])].assign(hgroup=lambda x: x["group"].map(hist_group))
    lgroups = [g for g in LAYER_GROUPS if (t["layer_group"] == g).any()]
    hgroups = [g for g in HIST_GROUPS if (t["hgroup"] == g).any()]
    hgroups += sorted(set(t["hgroup"]) - set(hgroups))
    if not lgroups or not hgroups:
        return None
    logs = np.log10(t["amax"].to_numpy(dtype=float))
    edges = {role: np.linspace(logs[(t["role"] == role).to_numpy()].min(), logs[(t["role"] == role).to_numpy()].max() + 1e-9, bins + 1)
             for role in t["role"].unique()}
    fig, axes = plt.subplots(len(lgroups), len(hgroups), figsize=(3.2 * len(hgroups), 2.4 * len(lgroups)),
                             squeeze=False, sharex="col")
    colors = {"input": "#4c72b0", "weight": "#dd8452"}
    for i, lg in enumerate(lgroups):
        for j, hg in enumerate(hgroups):
            ax = axes[i, j]
            sel = (t["layer_group"] == lg) & (t["hgroup"] == hg)
            for role in ("input", "weight", *sorted(set(t["role"]) - {"input", "weight"})):
                v = logs[(sel & (t["role"] == role)).to_numpy()]
                if v.size:
                    ax.hist(v, bins=edges[role], alpha=0.6, color=colors.get(role), label=f"{role} ({v.size})")
            if sel.any():
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes, color="gray")
            if i == 0:
                ax.set_title(hg, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{lg}\ncount", fontsize=9)
            if i == len(lgroups) - 1:
                ax.set_xlabel("log10 amax", fontsize=8)
            ax.tick_params(labelsize=7)
    hl = f"hash-routed = layers < {run.num_hash_layers}" if run.num_hash_layers is not None else "hash layers unknown"
    fig.suptitle(f"amax distribution ({hl})", fontsize=10)
    fig.tight_layout()
    return fig


def plot_layer_profile(run: AmaxRun):
    """Median and min-max band of amax per layer for each projection group and role."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    t = run.amax
    t = t[t["present"] & (t["amax"] > 0) & np.isfinite(t["amax"]) & t["layer"].notna() & ~t["mtp"].astype(bool)]
    if t.empty:
        return None
    t = t.assign(hgroup=t["group"].map(hist_group), layer=t["layer"].astype(int))
    roles = [r for r in ("input", "weight") if (t["role"] == r).any()]
    fig, axes = plt.subplots(1, len(roles), figsize=(6 * len(roles), 3.2), squeeze=False)
    for ax, role in zip(axes[0], roles):
        for hg, g in t[t["role"] == role].groupby("hgroup"):
            s = g.groupby("layer")["amax"]
            med, lo, hi = s.median(), s.min(), s.max()
            line, = ax.plot(med.index, med.values, marker=".", label=hg)
            ax.fill_between(med.index, lo.values, hi.values, color=line.get_color(), alpha=0.15)
        if run.num_hash_layers:
            ax.axvspan(-0.5, run.num_hash_layers - 0.5, color="gray", alpha=0.12, label="hash-routed")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers (no 0.5 ticks)
        ax.set_ylabel(f"{role} amax")
        ax.set_title(f"{role} amax per layer (median, min-max band)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_w13_ratios(ratios: pd.DataFrame, threshold: float):
    """Histogram of max(w1, w3) / min(w1, w3) amax per expert (separate quantizers only), the
    threshold marked; None when transformers fused every w1/w3 pair (ratio 1 by construction)."""
    import matplotlib.pyplot as plt

    sep = ratios[~ratios["fused"].astype(bool)]
    if not len(sep):
        return None
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.hist(sep["ratio"].clip(upper=10), bins=50)
    ax.axvline(threshold, color="red", lw=1)
    ax.set_xlabel("max(w1, w3) / min(w1, w3) amax (clipped at 10)")
    ax.set_yscale("log")
    return fig


def plot_token_counts(run: AmaxRun):
    """Layer x expert heat map of calibration tokens; never-routed experts in red."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    if run.counts is None:
        return None
    c = run.counts.astype(float)
    zero = c == 0
    shown = np.ma.masked_where(c <= 0, np.log10(np.maximum(c, 1)))
    fig, ax = plt.subplots(figsize=(min(16, 6 + 0.04 * c.shape[1]), 1.5 + min(8.0, 0.22 * c.shape[0])))
    im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.imshow(np.ma.masked_where(~zero, zero), aspect="auto", interpolation="nearest",
              cmap=ListedColormap(["red"]), vmin=0, vmax=1)
    ax.set_yticks(range(len(run.count_layers)))
    ax.set_yticklabels([str(li) for li in run.count_layers], fontsize=6 if len(run.count_layers) > 20 else 8)
    if run.num_hash_layers:
        k = sum(1 for li in run.count_layers if li < run.num_hash_layers)
        if 0 < k < len(run.count_layers):
            ax.axhline(k - 0.5, color="white", lw=1.5)
            ax.text(c.shape[1] - 0.5, k - 0.6, " hash-routed above", color="white", fontsize=7, ha="right", va="bottom")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"calibration tokens per expert (log10); never routed in red: {int(zero.sum())} of {c.size}",
                 fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 tokens", fraction=0.03)
    fig.tight_layout()
    return fig


def plot_diff(d: pd.DataFrame, label_a: str = "A", label_b: str = "B"):
    """Scatter of every quantizer's amax in run A against run B (log-log), moved ones outlined."""
    import matplotlib.pyplot as plt

    both = d[np.isfinite(d["a"]) & np.isfinite(d["b"]) & (d["a"] > 0) & (d["b"] > 0)]
    if both.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for g, s in both.groupby(both["group"].map(hist_group)):
        ax.scatter(s["a"], s["b"], s=6, alpha=0.6, label=g)
    moved = both[both["status"] == "moved"]
    ax.scatter(moved["a"], moved["b"], s=30, facecolors="none", edgecolors="red", lw=0.8, label=f"moved ({len(moved)})")
    lo, hi = min(both["a"].min(), both["b"].min()), max(both["a"].max(), both["b"].max())
    ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel(f"amax in {label_a}"), ax.set_ylabel(f"amax in {label_b}")
    ax.legend(fontsize=7)
    ax.set_title("amax, run against run", fontsize=9)
    ax = axes[1]
    ax.hist(np.log2(both["ratio"]), bins=60, color="#4c72b0")
    ax.set_yscale("log")
    ax.set_xlabel(f"log2 (amax {label_b} / amax {label_a})")
    ax.set_title("distribution of changes", fontsize=9)
    fig.tight_layout()
    return fig


def explorer(run: AmaxRun):
    """ipywidgets controls (layer, projection, role, expert) over the snapshot, for JupyterLab: an
    `explorer.AmaxExplorer`, a tenth of a second per redraw at V4 Pro scale. `display()` it; an
    executed copy (HTML record, a reopened notebook) shows its first view as a figure."""
    from .explorer import AmaxExplorer

    return AmaxExplorer(run)
