"""`quantbook preflight PARAMS`: the whole run judged from headers and configs alone, in seconds.

    verdict = preflight(params)                      # every step of a params file (the CLI)
    verdict = preflight({"quantize": q}, ["02"], run_dir=run_dir)   # one step (each notebook's first cell)
    require_pass(verdict)                            # RunError listing every refusal

Before a night on the node is committed, and again at the top of each step's notebook:

- the release: every header validated and every tensor classified and counted against what its
  config implies (`release.census`);
- each step's settings refused the way the step itself would refuse them (step 02's known-bad
  settings, step 03's layout options), versions (transformers with deepseek_v4, modelopt as the
  patches were tested, the hf_ptq checkout's release), the calibration data with enough samples;
- host and GPU memory against what the chosen driver holds (`Driver.memory_need`: the whole model
  for modelopt / hf_ptq, one layer for a streaming driver), placed layer by layer on the GPUs;
- every output directory safe (not the release, not another job's directory) and the disk for
  everything the plan writes, summed per filesystem;
- the plan: each step with its projected time from the measured rates (`rates.yaml`, each figure
  with where it was measured), and whether a rehearsal with these params has passed.

The verdict lists every check with its status (ok, warn, refuse, skip); any refusal fails it.
Nothing is written and no weight is read.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ParamsError, RunError
from ..machine import Machine
from ..params import load_params
from . import rates as rates_mod
from .steps import OK, REFUSE, SKIP, STEPS, WARN, Context, run_checks, size


@dataclass
class Verdict:
    """What the preflight found: checks, census, outputs on disk, the plan; `ok` when nothing refused."""

    name: str
    machine: str
    steps: list[str]
    checks: list[dict]
    census: list[dict] = field(default_factory=list)
    disk: list[dict] = field(default_factory=list)
    plan: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def refusals(self) -> list[dict]:
        return [c for c in self.checks if c["status"] == REFUSE]

    @property
    def ok(self) -> bool:
        return not self.refusals

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def preflight(params: dict | str | Path, steps=None, run_dir: str | Path | None = None,
              runs_dir: str | Path | None = None, machine: Machine | None = None,
              rates: list[dict] | None = None, now: bool = False) -> Verdict:
    """Judge the steps of `params` (a params file or its dict; only the sections present count) on
    `machine` (default: this one). `steps`: step numbers to judge (default: every step whose section
    is there). `run_dir`: where the run keeps its records (default `<runs_dir>/<name>`); with
    `runs_dir`, the rehearsals there are looked up too. `now`: the steps are about to run (`quantbook
    run` and the step commands): an input that no judged step writes must exist already (refused, not
    a warning, when step 02 is judged without step 01 and the BF16 copy is not there)."""
    t0 = time.perf_counter()
    if not isinstance(params, dict):
        params = load_params(params)
    chosen = [k for k in STEPS if STEPS[k] in params] if steps is None else select(steps)
    if run_dir is None:
        run_dir = Path(runs_dir or "runs") / params.get("name", "run")
    ctx = Context(params=params, steps=chosen, run_dir=Path(run_dir), runs_dir=Path(runs_dir) if runs_dir else None,
                  machine=machine or Machine.here(), rates=rates if rates is not None else rates_mod.load_rates(), now=now)
    run_checks(ctx)
    return Verdict(params.get("name", "params"), ctx.machine.describe(), chosen, ctx.checks, ctx.census, ctx.disk_rows(),
                   ctx.plan, round(time.perf_counter() - t0, 2))


def select(spec) -> list[str]:
    """Step numbers from "01", "2", "quantize", "01-03" (or a list of them), in chain order."""
    import re

    tokens = [t for part in ([spec] if isinstance(spec, str) else spec) for t in re.split(r"[,\s]+", str(part)) if t]
    chosen = set()
    for tok in tokens:
        if re.fullmatch(r"\d+-\d+", tok):
            lo, hi = (int(x) for x in tok.split("-"))
            chosen |= {k for k in STEPS if lo <= int(k) <= hi}
        elif tok.isdigit() and tok.zfill(2) in STEPS:
            chosen.add(tok.zfill(2))
        elif tok in STEPS.values():
            chosen.add(next(k for k, v in STEPS.items() if v == tok))
        else:
            raise ParamsError(f"no step {tok!r}; steps: {', '.join(f'{k} ({v})' for k, v in STEPS.items())}")
    return [k for k in STEPS if k in chosen]


def refusal_lines(v: Verdict) -> list[str]:
    """One line per refusal, `  - step NN area: item: detail`: what every refusal message lists."""
    return [f"  - step {c['step']} {c['area']}: {c['item']}: " + str(c["detail"]).strip().replace("\n", "\n      ")
            for c in v.refusals]


def require_pass(v: Verdict) -> None:
    """Raise RunError naming every refusal of the verdict (what the notebooks and the runner stop on)."""
    if not v.ok:
        raise RunError(f"preflight refused {v.name} ({len(v.refusals)} reason(s)):\n" + "\n".join(refusal_lines(v)))


def duration(seconds: float | None) -> str:
    """`1 h 05 min`, `3 min 20 s`, `12 s`; empty for an unknown time."""
    if seconds is None:
        return ""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def _table(rows: list[dict], cols: list[str]) -> list[str]:
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    width = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, width)).rstrip()]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, width)).rstrip() for row in cells]
    return lines


def census_rows(v: Verdict) -> list[dict]:
    """The census with sizes in words, for tables."""
    return [{**r, "bytes": size(r["bytes"])} for r in v.census]


def disk_rows(v: Verdict) -> list[dict]:
    return [{**r, "needs": size(r["needs"]), "free": size(r["free"])} for r in v.disk]


def plan_rows(v: Verdict) -> list[dict]:
    return [{**{k: r[k] for k in ("step", "what", "runs")}, "size": size(r.get("bytes")),
             "projected": duration(r.get("seconds")) if r.get("seconds") is not None else
             ("not measured" if r["runs"] == "yes" else ""), "rate": r.get("rate") or ""} for r in v.plan]


def format_verdict(v: Verdict) -> str:
    """The verdict as text (the CLI): checks, census, disk, plan, then PASS or REFUSED with reasons."""
    mark = {OK: "ok", WARN: "WARN", REFUSE: "REFUSE", SKIP: "skip"}
    out = [f"preflight of {v.name} (steps {', '.join(v.steps) or 'none'}) on {v.machine}", ""]
    out += [f"  [{mark[c['status']]:>6}] {c['step']} {c['area']}: {c['item']}: {c['detail']}" for c in v.checks]
    if v.census:
        implied = sum(r["expected"] for r in v.census)
        found = (f"{sum(r['tensors'] for r in v.census):,} tensors found, {implied:,} implied by config.json"
                 if v.census[0]["tensors"] is not None else f"{implied:,} tensors implied by the config of the release "
                 "step 01 builds")
        out += ["", f"release census ({found}):"]
        out += ["  " + ln for ln in _table(census_rows(v), ["part", "block", "kind", "dtype", "tensors", "expected",
                                                            "bytes"])]
    if v.disk:
        out += ["", "disk (outputs on one filesystem summed):"]
        out += ["  " + ln for ln in _table(disk_rows(v), ["step", "output", "path", "needs", "free", "status"])]
    if v.plan:
        rows = plan_rows(v)
        known = [r["seconds"] for r in v.plan if r["runs"] == "yes" and r.get("seconds") is not None]
        unknown = [r for r in v.plan if r["runs"] == "yes" and r.get("seconds") is None]
        out += ["", "plan:"]
        out += ["  " + ln for ln in _table(rows, ["step", "what", "runs", "size", "projected"])]
        out += ["  projected total: " + duration(sum(known)) + (f" + {len(unknown)} step(s) not measured"
                                                                if unknown else "")]
        out += ["  rates:"] + [f"    {r['step']} {r['what']}: {r['rate']}" for r in rows if r["rate"]]
    out.append("")
    if v.ok:
        out.append(f"PASS: {v.name} ({len(v.checks)} checks, {sum(c['status'] == WARN for c in v.checks)} warnings) "
                   f"in {v.seconds:.1f} s")
    else:
        out.append(f"REFUSED: {v.name}, {len(v.refusals)} reason(s) ({v.seconds:.1f} s):")
        out += refusal_lines(v)
    return "\n".join(out)
