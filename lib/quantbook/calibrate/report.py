"""What notebook 02 shows, as tables: the preflight, the patches, the phases, the quantizers, the
repairs, the expert coverage, where every output went. Each function reads records the step wrote
(or the preflight facts) and returns a pandas DataFrame, so the notebook only displays them."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd

from .. import amax
from . import patches, state
from .data import coverage
from . import registry
from .checks import STREAMING_DEFAULTS
from .driver import RESULT, SUMMARY, generic_export_dir
from .resources import size
from .settings import calib_plan, writes_generic_export

FLAGS = ("qformat", "kv_cache_qformat", "recipe", "use_seq_device_map", "gpu_max_mem_percentage",
         "inference_tensor_parallel", "skip_generate")
RUN_FLAGS = ("layerwise", "layerwise_save_every", "save_full_state", "force")
STREAMING_KEYS = tuple(STREAMING_DEFAULTS)


def _table(rows: list[tuple], columns: list[str], index: str | None = None) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=columns)
    return df.set_index(index) if index else df


def preflight_summary(facts: dict, q: dict, run_dir: str | Path) -> pd.DataFrame:
    """The run at a glance: driver, versions, model, calibration data, sizes, memory."""
    s, cfg, res = facts["settings"], facts["model_config"], facts["resources"]
    v = state.versions()
    datasets, sizes = calib_plan(s)
    rows = [
        ("driver", q["driver"]),
        ("nvidia-modelopt", f"{facts['modelopt']} (patches tested with {', '.join(patches.TESTED_MODELOPT)})"),
        ("transformers / torch", f"{v['transformers']} / {v['torch']}"),
        ("model", f"{s['pyt_ckpt_path']}: {cfg['architectures'][0]}, {cfg['num_hidden_layers']} layers, "
                  f"{cfg.get('n_routed_experts')} routed experts, {size(res['model_bytes'])} of weights"),
        ("calibration", ", ".join(f"{n} samples from {d}" for d, n in zip(datasets, sizes))
         + f"; calib_seq {s['calib_seq']}; batch_size {s['batch_size']}; device {s['device']}"),
    ]
    if registry.get(q["driver"]).loads_whole_model:
        rows += [("generic export (estimate)", size(res["export_bytes"]) if writes_generic_export(q) else
                  "not written (quantize.export_generic: false)"),
                 ("calibrated state", "< 64 MiB" + (f" + full state {size(res['model_bytes'])}"
                                                    if q["save_full_state"] else ""))]
    else:
        df = facts.get("driver_facts") or {}
        rows += [("blocks", f"{len(df.get('blocks', []))} ({', '.join(df.get('blocks', [])[-2:])} last), "
                            f"MTP {df.get('mtp')}; {q['gpus']} process(es)"),
                 ("memory (estimate)", res["memory"]["need"]["what"]),
                 ("export", "none: step 03 writes the v4-serving layout from the release + the amax"),
                 ("resume checkpoint", f"~{size(res['layerwise_bytes'])} in {Path(run_dir) / 'streaming'} (saved "
                                       f"every {q['save_every']} block(s)); no calibrated state (no whole model)")]
        if df.get("ignored_flags"):
            rows.append(("ignored (whole-model loading/export flags)", ", ".join(df["ignored_flags"])))
    rows.append(("host memory available", size(res["host_available"])))
    if q["layerwise"]:
        paths = state.layerwise_paths(run_dir)
        progress = state.modelopt_progress(paths["ckpt"])
        rows.append(("layerwise checkpoint", f"~{size(res['layerwise_bytes'])} in {paths['dir']}; " + (
            f"last completed layer {progress['last_completed_layer']} of {progress['num_layers']} "
            "(verified, then resumed)" if progress else "none yet")))
    for problem in res["problems"]:
        rows.append(("FORCED despite", problem))
    return _table(rows, ["item", "value"], "item")


def flags_table(facts: dict, q: dict) -> pd.DataFrame:
    """The hf_ptq flags that shape the export, and the run's own switches (the driver's)."""
    s = facts["settings"]
    run_flags = RUN_FLAGS + (() if registry.get(q["driver"]).loads_whole_model else STREAMING_KEYS)
    return _table([(k, s.get(k)) for k in FLAGS] + [(k, q[k]) for k in run_flags], ["flag", "value"], "flag")


def disk_table(facts: dict) -> pd.DataFrame:
    disk = facts["resources"]["disk"]
    return _table([(k, d["path"], size(d["need"]), size(d["free"])) for k, d in disk.items()],
                  ["for", "path", "needs (estimate)", "free"], "for")


def gpu_table(facts: dict) -> pd.DataFrame:
    gpus = facts["resources"]["gpus"]
    return _table([(g["gpu"], size(g["free"]), size(g["total"])) for g in gpus], ["GPU", "free", "total"], "GPU")


def patches_table(applied: list[str]) -> pd.DataFrame:
    return _table([(n, n in applied, d) for n, d in patches.PATCHES.items()], ["patch", "in place", "what"], "patch")


def timings_table(rec: dict) -> pd.DataFrame:
    return _table([(k, round(v, 1)) for k, v in rec["timings"].items()], ["phase", "seconds"], "phase")


def quantizer_table(run_dir: str | Path) -> pd.DataFrame:
    """Quantizers by kind and role, enabled and disabled, from modelopt's `.quant_summary.txt`."""
    lines = [ln for ln in (Path(run_dir) / SUMMARY).read_text().splitlines()
             if ln.split() and "quantizer" in ln.split()[0]]
    groups: Counter = Counter()
    for line in lines:
        p = amax.parse_quantizer(line.split()[0])
        groups[(p.kind, p.role, "disabled" if "disabled" in line else "enabled")] += 1
    keys = sorted({(k, r) for k, r, _ in groups})
    return _table([(k, r, groups[(k, r, "enabled")], groups[(k, r, "disabled")]) for k, r in keys],
                  ["kind", "role", "enabled", "disabled"])


def calibration_facts(rec: dict) -> pd.DataFrame:
    """What the run calibrated on, and where a layerwise run started."""
    c = rec.get("calibration") or {}
    rows = [("samples", c.get("samples")), ("tokens", c.get("tokens")),
            ("positions (with padding)", c.get("positions")), ("data sha256", str(c.get("sha256"))[:16])]
    lw = rec.get("layerwise")
    if lw:
        rows.append(("layerwise", (f"resumed from layer {lw['start_layer']}" if lw["resume"]
                                   else "calibrated from layer 0") + f"; checkpoint {lw['checkpoint_dir']}"))
    return _table(rows, ["item", "value"], "item")


def repairs_table(rec: dict) -> pd.DataFrame:
    """Activation amax the post-calibration hook replaced before the export (raw, replacement, source)."""
    repairs = rec["post_calibration"]["amax_repairs"]
    return _table([(r["quantizer"], r["problem"], r["values"], r["replacement"], r["fallback"]) for r in repairs],
                  ["quantizer", "problem", "raw", "replacement", "from"])


def export_time_bad_amax(rec: dict) -> pd.DataFrame:
    """Bad amax the export-time patch caught (none when the hook repaired everything first)."""
    late = [r for r in rec.get("bad_amax", []) if "export input_scale" in r["seen_in"]]
    return _table([(r["quantizer"], r["problem"], r["replacement"], r["fallback"]) for r in late],
                  ["quantizer", "problem", "replacement", "from"])


def coverage_table(counts: dict[str, list[int]]) -> pd.DataFrame:
    """Per MoE layer: tokens routed in all, the least and most an expert got, experts never routed."""
    cov = coverage(counts)
    return _table([(k, v["total"], v["min"], v["max"], len(cov["never_routed"].get(k, [])))
                   for k, v in cov["per_layer"].items()],
                  ["layer", "tokens", "min per expert", "max per expert", "never routed"], "layer")


def outputs_table(run_dir: str | Path, rec: dict) -> pd.DataFrame:
    """Where everything went, with sizes: export, state, snapshot, token counts, checkpoint, record."""
    run_dir = Path(run_dir)

    def tree(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size

    rows = []
    export_dir = generic_export_dir(rec)
    along = rec.get("export") or {}
    if along.get("along"):
        rows.append(("v4-serving export (written along the pass; step 03 verifies it)", along["dir"],
                     size(tree(Path(along["dir"])))))
    elif export_dir is not None and export_dir.exists():
        rows.append(("export (unified HF, NVFP4)", str(export_dir), size(tree(export_dir))))
    elif export_dir is None:
        rows.append(("export (unified HF, NVFP4)", _not_written(rec), ""))
    if (rec.get("post_calibration") or {}).get("state"):
        man = state.load_manifest(run_dir / state.STATE_DIR)
        rows.append(("calibrated state", str(run_dir / state.STATE_DIR),
                     size(sum(v["size"] for v in man["files"].values()))))
    if rec.get("streaming"):
        d = Path(rec["streaming"]["checkpoint_dir"])
        rows.append(("block checkpoint (resume)", str(d), size(tree(d))))
    for what, name in (("amax snapshot", amax.SNAPSHOT), ("expert token counts", amax.TOKEN_COUNTS)):
        rows.append((what, str(run_dir / name), size(tree(run_dir / name))))
    if (run_dir / state.LAYERWISE_DIR).exists():
        rows.append(("layerwise checkpoint", str(run_dir / state.LAYERWISE_DIR), size(tree(run_dir / state.LAYERWISE_DIR))))
    rows.append(("run record", str(run_dir / RESULT), size(tree(run_dir / RESULT))))
    return _table(rows, ["what", "path", "size"], "what")


def _not_written(rec: dict) -> str:
    if registry.get(rec.get("driver") or "modelopt").loads_whole_model:
        return "not written (quantize.export_generic: false)"
    return f"not written (driver {rec['driver']} never holds the whole model)"


def token_counts(run_dir: str | Path) -> dict[str, list[int]]:
    return json.loads((Path(run_dir) / amax.TOKEN_COUNTS).read_text())


def verify_generic_export(rec: dict, run_dir: str | Path, reference: str | Path | None) -> dict | None:
    """`quantbook verify` on step 02's generic export, written to `verify-02.json` / `.md` in the run
    directory; None when the run wrote none (`quantize.export_generic: false`): nothing to verify."""
    from ..export import verify

    export_dir = generic_export_dir(rec)
    if export_dir is None:
        return None
    checked = verify.verify(export_dir, reference=reference, progress=False)
    verify.write_result(checked, run_dir, stem="verify-02")
    return checked



def has_timeline(rec: dict) -> bool:
    return bool(rec.get("timeline"))


TIMELINE_COLUMNS = {"read_s": "read", "read_wait_s": "read (waited)", "dequant_s": "dequant + build",
                    "calibrate_s": "calibrate", "forward_s": "(forward)", "record_s": "record", "reduce_s": "reduce",
                    "eval_s": "gate (both models)", "write_s": "checkpoint (background)",
                    "write_wait_s": "checkpoint (waited)", "total_s": "total"}


def timeline_table(rec: dict) -> pd.DataFrame:
    """Per block: seconds per phase, bytes read and the read rate, peak GPU and host memory, and
    whether this run computed it (False: saved by an earlier, interrupted run)."""
    rows = []
    shards = {layer: s for s in (rec.get("export") or {}).get("along_shards") or [] for layer in s["layers"]}
    for t in rec["timeline"]:
        row = {"block": t["block"], "this run": t.get("this_run", True)}
        for k, label in TIMELINE_COLUMNS.items():
            row[label] = round(t[k], 2) if k in t else None
        row["export shard write (background)"] = shards[t["block"]]["write_s"] if t["block"] in shards else None
        row["read GiB"] = round(t["read_bytes"] / 2**30, 3) if "read_bytes" in t else None
        row["read GiB/s"] = round(t["read_bytes"] / 2**30 / t["read_s"], 2) if t.get("read_s") else None
        row["GPU peak GiB"] = round(t["gpu_peak_bytes"] / 2**30, 2) if "gpu_peak_bytes" in t else None
        row["host peak GiB"] = round(t.get("host_peak_bytes", t.get("host_rss_bytes", 0)) / 2**30, 2) or None
        rows.append(row)
    return pd.DataFrame(rows).set_index("block")


def along_table(rec: dict) -> pd.DataFrame | None:
    """The export written along the pass (driver streaming, `export_along`): per shard the layers whose
    amax it waited for, its size, its write seconds (in the background, beside calibration), what it
    was written from (the pass's read buffer, or the release's files) and the expert tensors whose
    verify numbers it computed on the bytes written (with the threads' seconds), then what was left
    for the end; None when the run wrote none."""
    e = rec.get("export") or {}
    if not e.get("along"):
        return None
    rows = [{"shard": s["shard"], "layers": ", ".join(s["layers"]) or "(no routed experts: at the start)",
             "GiB": round(s["bytes"] / 2**30, 3), "write s": s["write_s"], "from": s.get("from"),
             "verify numbers": f"{s['checked']} ({s['check_s']:.1f} s)" if s.get("checked") else ""}
            for s in e["along_shards"]]
    rows.append({"shard": f"at the end ({e['along_wait_s']:.2f} s waited for the pass's last shards)",
                 "layers": f"{e['shards_written_at_end']} shard(s) written, index and configs", "GiB": None,
                 "write s": None, "from": "the release's files", "verify numbers": ""})
    return pd.DataFrame(rows).set_index("shard")


def plot_timeline(rec: dict):
    """Seconds per block stacked by phase (read waited, dequant, calibrate, record, reduce, the gate, checkpoint
    waited), the background read and export write of each block as marks, and peak memory per block (GPU where
    recorded, else host); blocks from an earlier run hatched."""
    import matplotlib.pyplot as plt

    t = timeline_table(rec)
    phases = ["read (waited)", "dequant + build", "calibrate", "record", "reduce", "gate (both models)",
              "checkpoint (waited)"]
    fig, (ax, mem) = plt.subplots(2, 1, figsize=(max(6, 0.5 * len(t) + 3), 5.5), sharex=True)
    x = range(len(t))
    bottom = [0.0] * len(t)
    for ph in phases:
        vals = [v if v == v and v is not None else 0.0 for v in t[ph].tolist()]
        ax.bar(x, vals, bottom=bottom, label=ph)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, this_run in enumerate(t["this run"].tolist()):
        if not this_run:
            ax.bar([i], [bottom[i]], fill=False, hatch="//", edgecolor="gray", lw=0)
    ax.plot(list(x), [v or 0 for v in t["read"].tolist()], "k.", label="read (background)")
    if t["export shard write (background)"].notna().any():
        ax.plot(list(x), t["export shard write (background)"].tolist(), "rx", label="export shard write (background)")
    ax.set_ylabel("seconds")
    ax.set_title("per block: where the time went (hatched: saved by an earlier run)", fontsize=9, loc="left")
    ax.legend(fontsize=7, ncol=3)
    col = "GPU peak GiB" if t["GPU peak GiB"].notna().any() else "host peak GiB"
    mem.bar(x, t[col].fillna(0).tolist(), color="#8172b3")
    mem.set_ylabel(col)
    mem.set_xticks(list(x), t.index.tolist(), rotation=90, fontsize=7)
    fig.tight_layout()
    return fig


def gate_in_pass(rec: dict, run_dir: str | Path) -> dict | None:
    """The fidelity gate the pass ran (`eval-02.json`, as `quantbook eval` records it), {"why"} when the pass
    left it to step 03, or None when the run had no gate along."""
    from .. import atomic
    from ..export.fidelity_along import RECORD

    g = (rec.get("export") or {}).get("gate")
    if not g:
        return None
    return atomic.read_json(Path(run_dir) / f"{RECORD}.json") if g["in_pass"] else {"why": g["why"]}


def resume_summary(rec: dict) -> str:
    """Where the run started: from the first block, or resumed after an interrupted run."""
    st = rec.get("streaming") or {}
    done_before = [t["block"] for t in rec.get("timeline", []) if not t.get("this_run", True)]
    if st.get("resumed_from"):
        return (f"resumed at {st['resumed_from']}: {len(done_before)} block(s) ({', '.join(done_before[:3])}"
                f"{', ...' if len(done_before) > 3 else ''}) came from the checkpoint of an interrupted run "
                f"(signature verified); this run calibrated {len(st.get('blocks_this_run', []))}")
    return f"calibrated from the first block: {len(st.get('blocks_this_run', []))} blocks in this run"
