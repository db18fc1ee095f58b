"""Run records and the chain runner: `quantbook run PARAMS` executes notebooks 01->04 with papermill.

Each run lives in `runs/<run_id>/`: the executed notebook and an HTML copy of every step, the
memory timeline and the steps' own outputs, a `run.log` with every cell's output, and an atomic
`manifest.json` (params, versions, git commit, host, GPUs, start/end/duration, outcome and error
of every step). Papermill has no resume and writes its output notebook in place; here a step
is executed into `<step>.running.ipynb` and renamed when it ends, and a rerun of the same run id
skips the steps already complete with the same parameters, so a failure at step 3 costs step 3.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..atomic import read_json, write_json, write_text
from ..errors import ParamsError, RunError, StepFailed
from ..params import load_params, run_dir_for
from . import rehearsal
from .rehearsal import default_notebooks_dir

log = logging.getLogger("quantbook.runs")

MANIFEST = "manifest.json"
RUN_LOG = "run.log"
LOCK = ".lock"
# step number -> params section and what the step does (shown on the progress bar)
SECTIONS = {"01": "dequant", "02": "quantize", "03": "export", "04": "inspect"}
TITLES = {"01": "dequantize FP8/FP4 -> BF16", "02": "calibrate and quantize (amax)",
          "03": "recover and export NVFP4", "04": "inspect the amax"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEP_FILE = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.ipynb$")
_PY_NAMES = {"python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]}
PACKAGES = ("torch", "transformers", "nvidia-modelopt", "accelerate", "safetensors", "datasets", "numpy",
            "papermill", "nbclient", "ipykernel", "quantbook")


@dataclass(frozen=True)
class Step:
    key: str  # "02"
    name: str  # "02_quantize"
    path: Path  # the source notebook
    section: str | None  # params section feeding it

    @property
    def title(self) -> str:
        return TITLES.get(self.key, self.name)


def discover_steps(notebooks_dir: str | Path | None = None) -> list[Step]:
    """Every `NN_name.ipynb` in the notebooks directory, in number order."""
    d = Path(notebooks_dir) if notebooks_dir else default_notebooks_dir()
    steps = []
    for p in sorted(d.glob("*.ipynb")):
        m = _STEP_FILE.match(p.name)
        if m:
            steps.append(Step(m.group(1), p.stem, p, SECTIONS.get(m.group(1))))
    return steps


def select_steps(steps: list[Step], spec: str | list[str] | None) -> list[Step]:
    """Steps named by `spec`: numbers ("02", "2"), names ("02_quantize"), sections ("quantize"),
    ranges ("01-03"), comma or space separated. None: all of them."""
    if not spec:
        return list(steps)
    tokens = [t for part in ([spec] if isinstance(spec, str) else spec) for t in re.split(r"[,\s]+", part) if t]

    def find(tok):
        for s in steps:
            if tok in (s.key, s.name, s.section) or (tok.isdigit() and int(tok) == int(s.key)):
                return s
        raise ParamsError(f"no step {tok!r}; steps: {', '.join(s.name for s in steps) or 'none found'}")

    chosen = set()
    for tok in tokens:
        if re.fullmatch(r"\d+-\d+", tok):
            lo, hi = (int(x) for x in tok.split("-"))
            chosen |= {s.name for s in steps if lo <= int(s.key) <= hi}
        else:
            chosen.add(find(tok).name)
    return [s for s in steps if s.name in chosen]


def step_parameters(params: dict, step: Step, run_dir: Path, declared: set[str]) -> dict:
    """The values papermill injects: the step's params section, `run_dir`, and for a notebook
    that declares it, the `tiny` section (step 01 builds the tiny source when it is missing) or the
    `export` section (step 02's streaming driver writes the export along calibration)."""
    values = dict(params.get(step.section) or {}) if step.section else {}
    for other in ("tiny", "export"):  # 01 builds the tiny source when missing; 02 may write the export along
        if other in declared and other != step.section and other not in values:
            values[other] = params.get(other)
    values["run_dir"] = str(run_dir)
    return values


def notebook_parameters(path: Path) -> set[str]:
    """Names assigned in the notebook's `parameters` cell."""
    import papermill as pm

    pm_log = logging.getLogger("papermill")
    level = pm_log.level
    pm_log.setLevel(logging.WARNING)  # not its "Input Notebook: ..." line per inspection
    try:
        return set(pm.inspect_notebook(str(path)))
    finally:
        pm_log.setLevel(level)


def params_digest(values: dict) -> str:
    """Hash of a step's parameters (run_dir aside): a completed step is reused only for the same."""
    clean = {k: v for k, v in values.items() if k != "run_dir"}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- environment -------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """What a run record needs to be reproduced: versions, git commit, host, GPUs, driver."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        import torch

        versions["torch_cuda"] = torch.version.cuda  # the CUDA torch was built for; no GPU touched
    except ImportError:
        versions["torch_cuda"] = None
    gpus, driver, cuda_driver = [], None, None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            v = pynvml.nvmlSystemGetCudaDriverVersion()
            cuda_driver = f"{v // 1000}.{v % 1000 // 10}"
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                             "memory_gib": round(pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30, 1)})
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # no GPU, no driver, no pynvml
        gpus = []
        driver = None
        cuda_driver = f"none ({type(e).__name__})"
    versions["driver"] = driver.decode() if isinstance(driver, bytes) else driver
    versions["cuda_driver"] = cuda_driver
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        mem = None
    return {
        "versions": versions,
        "git": {"commit": commit, "dirty": bool(dirty) if dirty is not None else None},
        "host": {"name": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count(),
                 "memory_gib": mem, "python": sys.executable},
        "gpus": gpus,
    }


def runs_this_python(exe: str) -> bool:
    """Whether a kernelspec's argv[0] starts this interpreter: a bare `python` (jupyter_client puts
    sys.executable there) or this very path (not resolved: a venv's bin/python is a symlink)."""
    return exe in _PY_NAMES or os.path.abspath(exe) == os.path.abspath(sys.executable)


def choose_kernel() -> str:
    """A Jupyter kernel that runs THIS interpreter (the venv with quantbook), by name.

    jupyter_client starts a kernelspec whose argv[0] is a bare `python` with sys.executable, so
    the stock `python3` spec qualifies unless a user-level spec of that name points elsewhere.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm = KernelSpecManager()
    seen = []
    for name in ("quantbook", "python3"):
        try:
            spec = ksm.get_kernel_spec(name)
        except NoSuchKernel:
            continue
        exe = spec.argv[0] if spec.argv else ""
        seen.append(f"{name} -> {exe}")
        if runs_this_python(exe):
            return name
    raise RunError(f"no Jupyter kernel runs {sys.executable} (found: {'; '.join(seen) or 'none'}); "
                       f"install one: {sys.executable} -m ipykernel install --sys-prefix --name quantbook")


# -- manifest ----------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def load_manifest(run_dir: str | Path) -> dict | None:
    return read_json(Path(run_dir) / MANIFEST)


_ORDER = ("run_id", "status", "created", "updated", "params_file", "rehearsal", "rehearsal_of", "host", "gpus",
          "versions", "git", "steps", "invocations", "params")


def _save(run_dir: Path, manifest: dict) -> None:
    """Rewrite manifest.json atomically (a reader never sees half of it), in a fixed key order."""
    manifest["updated"] = _now()
    ordered = {k: manifest[k] for k in _ORDER if k in manifest}
    ordered.update((k, v) for k, v in manifest.items() if k not in ordered)
    write_json(run_dir / MANIFEST, ordered)


def _lock(run_dir: Path):
    """Hold `<run_dir>/.lock` (flock) while a run works; `_unlock` removes it. A lock file removed by
    its holder between our open and our flock is not the lock any more: open it again."""
    while True:
        f = open(run_dir / LOCK, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise RunError(f"run directory {run_dir} is in use by another `quantbook run` ({holder})") from None
        try:
            same = os.stat(run_dir / LOCK).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n")
    f.flush()
    return f


def _unlock(run_dir: Path, f) -> None:
    """Remove the lock file, then let the lock go: `.lock` exists only while a run works."""
    try:
        os.unlink(run_dir / LOCK)
    except FileNotFoundError:
        pass
    f.close()


def _locked(run_dir: Path) -> bool:
    p = run_dir / LOCK
    if not p.exists():
        return False
    with open(p) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


# -- failure location --------------------------------------------------------------------------
def _failed_cell(executed: Path, source: Path) -> dict:
    """Locate the cell that failed (or was running when the kernel died) in the SOURCE notebook."""
    import nbformat

    try:
        nb = nbformat.read(str(executed), as_version=4)
    except Exception:
        return {}
    bad, last_started = None, None
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        pm = cell.get("metadata", {}).get("papermill", {})
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if errors or pm.get("exception") or pm.get("status") == "running":
            bad = (cell, errors[0] if errors else None)
            break
        if pm.get("start_time"):
            last_started = cell
    if bad is None:  # the kernel died (OOM kill, segfault): the last cell that started is the culprit
        if last_started is None:
            return {}
        bad = (last_started, None)
    cell, err = bad
    info = {"execution_count": cell.get("execution_count"), "source_head": cell.source.strip().splitlines()[0][:120]
            if cell.source.strip() else ""}
    if err is not None:
        info.update(ename=err.get("ename"), evalue=str(err.get("evalue"))[:2000])
        arrows = [ln for ln in _ANSI.sub("", "\n".join(err.get("traceback", []))).splitlines() if "---->" in ln]
        if arrows:  # IPython marks the failing line of each frame; the first frame is the cell's own
            m = re.match(r"^-+>\s*(\d+)\s+(.*)$", arrows[0].strip())
            info["line"] = (f"{m.group(1)}: {m.group(2).strip()}" if m else arrows[0].strip())[:200]
    try:
        src = nbformat.read(str(source), as_version=4)
        code_no = 0
        for i, c in enumerate(src.cells):
            code_no += c.cell_type == "code"
            if (c.get("id") and c.get("id") == cell.get("id")) or (c.cell_type == "code" and c.source == cell.source):
                info.update(cell=i + 1, code_cell=code_no, cells=len(src.cells))
                break
    except Exception:
        pass
    return info


def _describe_failure(step: Step, info: dict, exc: BaseException, out_nb: Path, html: Path | None) -> str:
    where = f"notebook {step.path}"
    if info.get("cell"):
        where += (f", cell {info['cell']} of {info['cells']} (code cell {info['code_cell']}"
                  f"{', In [%s]' % info['execution_count'] if info.get('execution_count') else ''})")
    elif info.get("execution_count"):
        where += f", In [{info['execution_count']}]"
    lines = [f"step {step.name} FAILED in {where}"]
    if info.get("source_head"):
        lines.append(f"    {info['source_head']}" + ("\n    ..." if info.get("line") else ""))
    if info.get("line"):
        lines.append(f"    line {info['line']}")
    what = f"{info['ename']}: {info.get('evalue', '')}" if info.get("ename") else f"{type(exc).__name__}: {exc}"
    # the whole message: a refusal lists its reasons on the lines after the first (at most 40 of them)
    body = [ln[:500] for ln in what.strip().splitlines()] or [type(exc).__name__]
    lines += body[:40] + ([f"    ... {len(body) - 40} more line(s): the executed notebook has them all"]
                          if len(body) > 40 else [])
    if type(exc).__name__ == "DeadKernelError":
        lines.append("the kernel process died: host out-of-memory is the usual cause "
                     "(see memory.csv in the run directory and `dmesg`)")
    lines.append(f"executed notebook: {out_nb}" + (f" (HTML: {html})" if html else ""))
    return "\n".join(lines)


_EXPORTERS: dict = {}


def _html_exporter(cls):
    """One nbconvert exporter of class `cls` for the process, made on first use. A new exporter
    builds a new template environment and compiles nbconvert's templates again (~1-3 s, more than
    converting a step's notebook), and each run converts four; one exporter converts any number
    (nbconvert's own command line reuses one the same way), with the same output."""
    exporter = _EXPORTERS.get(cls)
    if exporter is None:
        exporter = _EXPORTERS[cls] = cls()
        exporter.log.setLevel(logging.ERROR)  # not the accessibility notes about figures' alt text
    return exporter


def export_html(notebook: Path, html: Path) -> Path | None:
    """HTML copy of an executed notebook (figures embedded), written atomically."""
    import nbformat
    from nbconvert import HTMLExporter

    try:
        nb = nbformat.read(str(notebook), as_version=4)
        body, _ = _html_exporter(HTMLExporter).from_notebook_node(nb)
    except Exception as e:
        log.warning("no HTML for %s: %s", notebook, e)
        return None
    write_text(html, body)
    return html


# -- the chain -----------------------------------------------------------------------------------
# papermill's own bookkeeping lines, said better by the runner ("[2/4] 02_quantize: ..."): not cell output
_PAPERMILL_NOISE = ("Executing Cell", "Ending Cell", "Input Notebook:", "Output Notebook:", "Working directory:",
                    "Executing notebook with kernel:")


def _quiet_papermill(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_PAPERMILL_NOISE)


def _setup_log(run_dir: Path) -> logging.Handler:
    """Append papermill's cell output and this module's records to run_dir/run.log. The runner's
    own records go to the file only (the terminal gets `echo`); papermill's also propagate to
    whatever the caller configured (the CLI: stderr)."""
    h = logging.FileHandler(run_dir / RUN_LOG)
    h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    h.setLevel(logging.INFO)
    logging.getLogger("papermill").addFilter(_quiet_papermill)
    for lg in (logging.getLogger("papermill"), log):
        lg.addHandler(h)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    log.propagate = False
    return h


def _drop_log(h: logging.Handler) -> None:
    logging.getLogger("papermill").removeFilter(_quiet_papermill)
    for lg in (logging.getLogger("papermill"), log):
        lg.removeHandler(h)
    log.propagate = True
    h.close()


def run_chain(params_path: str | Path, steps=None, run_id: str | None = None, runs_dir: str | Path = "runs",
              notebooks_dir: str | Path | None = None, redo=None, log_output: bool = True,
              progress: bool = True, echo=print, no_rehearsal: bool = False, rehearsal_of: dict | None = None,
              judge: bool | None = None, machine=None) -> dict:
    """Run the selected steps' notebooks into `runs_dir/run_id/`, skipping steps already complete.

    A step completed by an earlier invocation with the same parameters is skipped unless named in
    `redo`; once any step runs, every later selected step runs too (it may depend on the new
    outputs). A completed step whose parameters changed is refused (name it in `redo`). All
    steps' parameters are checked against their notebooks' `parameters` cells before anything
    runs, then the whole run is judged (`judge`: `quantbook preflight` of every step that will run, on
    `machine`, default this one): a refusal raises RunError with every reason before step 01, recorded
    in the run's run.log and manifest when the run directory exists, and leaves none behind when it did
    not. A run of steps 01-03 starts only after a rehearsal of the same params passed
    (`rehearsal.gate`; `no_rehearsal` starts anyway and records it); `rehearsal_of` is the record
    of the run a rehearsal stands for (`rehearse`). Raises StepFailed at the first failure;
    returns the manifest. `judge` defaults to whether the steps are the repository's notebooks (the
    preflight judges what they do); other notebooks (`--notebooks`) are checked against their
    parameters cells only, unless `judge=True`.
    """
    import papermill as pm

    params = load_params(params_path)
    all_steps = discover_steps(notebooks_dir)
    if not all_steps:
        raise ParamsError(f"no step notebooks (NN_name.ipynb) in {notebooks_dir or default_notebooks_dir()}")
    if not steps:  # the whole chain: every numbered step must be there, or later ones read stale outputs
        gaps = sorted(set(SECTIONS) - {s.key for s in all_steps})
        if gaps:
            raise ParamsError(f"the chain lacks step notebook(s) {gaps} in {all_steps[0].path.parent}; "
                              f"name the steps to run with --steps")
    chosen = select_steps(all_steps, steps)
    not_needed = set()
    if not steps:  # the whole chain: a step these params make pointless is left out, saying why
        from ..calibrate.registry import bf16_copy_unneeded

        why = bf16_copy_unneeded(params)
        if why:
            not_needed = {s.name for s in chosen if s.key == "01"}
            chosen = [s for s in chosen if s.name not in not_needed]
            for name in sorted(not_needed):
                echo(f"{name}: not run ({why}; `--steps 01` runs it anyway)")
    redo_names = {s.name for s in select_steps(all_steps, redo)} if redo else set()
    run_dir = run_dir_for(params, run_id, runs_dir).resolve()
    run_id = run_dir.name

    plan = []
    for s in chosen:  # every step's parameters checked before the first one runs
        declared = notebook_parameters(s.path)
        values = step_parameters(params, s, run_dir, declared)
        unknown = sorted(set(values) - declared - {"run_dir"})
        if unknown:
            raise ParamsError(f"{params['_path']}: section {s.section!r} has key(s) {unknown} that notebook "
                              f"{s.path} does not take; it takes: {sorted(declared - {'run_dir'})}")
        plan.append((s, values))
    if judge is None:
        judge = notebooks_dir is None or Path(notebooks_dir).resolve() == default_notebooks_dir().resolve()
    if judge:  # the whole run judged before step 01: every step that will run, every section's keys
        earlier = load_manifest(run_dir) or {"steps": {}}
        to_run = [s.key for s, _, _, what in _decide(plan, earlier, redo_names, run_id) if what == "run"]
        if to_run:
            judge_run(params, to_run, run_dir, machine)
    if rehearsal_of is None and any(s.key in ("01", "02", "03") for s in chosen):
        gate = rehearsal.gate(params, runs_dir, no_rehearsal, notebooks_dir)
        if gate.get("skipped"):
            echo(f"WARNING: {gate['skipped']} (params digest {gate['digest']})")
    else:
        gate = None
    kernel = choose_kernel()

    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(run_dir)
    handler = _setup_log(run_dir)
    manifest, started = None, False
    try:
        manifest = load_manifest(run_dir) or {"run_id": run_id, "created": _now(), "steps": {}, "invocations": []}
        decisions = _decide(plan, manifest, redo_names, run_id)  # refusals cost nothing and write nothing
        started = True
        env = environment()
        manifest.update(params_file=str(Path(params["_path"]).resolve()),
                        params={k: v for k, v in params.items() if k != "_path"}, **env)
        if rehearsal_of is not None:
            manifest["rehearsal_of"] = rehearsal_of
        elif gate is not None:
            manifest["rehearsal"] = gate
        manifest["invocations"].append({"started": _now(), "argv": sys.argv, "steps": [s.name for s in chosen],
                                        **({"not_needed": sorted(not_needed)} if not_needed else {}),
                                        "host": env["host"]["name"], "git": env["git"]["commit"]})
        manifest["status"] = "running"
        _save(run_dir, manifest)
        for n, (s, values, digest, what) in enumerate(decisions, 1):
            if what == "skip":
                rec = manifest["steps"][s.name]
                echo(f"[{n}/{len(decisions)}] {s.name}: {s.title} - skipped, complete since {rec.get('end')}")
                log.info("%s skipped (complete since %s)", s.name, rec.get("end"))
                continue
            echo(f"[{n}/{len(decisions)}] {s.name}: {s.title}")
            _run_step(pm, s, values, digest, run_dir, manifest, kernel, log_output, progress, echo)
        done = all(manifest["steps"].get(s.name, {}).get("status") == "complete" for s in all_steps
                   if s.name not in not_needed)
        manifest["status"] = "complete" if done else "incomplete"
        return manifest
    except BaseException as e:
        if started and manifest.get("status") == "running":
            manifest["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        raise
    finally:
        if started and manifest.get("invocations"):
            manifest["invocations"][-1].setdefault("ended", _now())
            _save(run_dir, manifest)
        _drop_log(handler)
        _unlock(run_dir, lock)


def judge_run(params: dict, steps: list[str], run_dir: Path, machine=None) -> None:
    """`quantbook preflight` of the steps about to run (`quantbook run`, and each step command run alone);
    RunError naming every refusal. The refusal goes into an existing run directory's run.log and
    manifest (its invocations); none is created."""
    from ..preflight import preflight, refusal_lines

    v = preflight(params, steps=steps, run_dir=run_dir, machine=machine, now=True)
    if v.ok:
        return
    run_dir = Path(run_dir)
    msg = (f"preflight refused {params.get('_path', v.name)} before step {steps[0]} "
           f"({len(v.refusals)} reason(s); `quantbook preflight {params.get('_path', 'PARAMS')}` shows every check):\n"
           + "\n".join(refusal_lines(v)))
    if run_dir.is_dir() and not _locked(run_dir):
        lock = _lock(run_dir)
        try:
            with open(run_dir / RUN_LOG, "a") as f:
                f.write(f"{_now()} quantbook.runs ERROR {msg}\n")
            m = load_manifest(run_dir)
            if m is not None and m.get("run_id"):
                m.setdefault("invocations", []).append(
                    {"started": _now(), "ended": _now(), "argv": sys.argv, "steps": steps, "host": socket.gethostname(),
                     "refused": [f"step {c['step']} {c['area']}: {c['item']}: {c['detail']}" for c in v.refusals]})
                _save(run_dir, m)
        finally:
            _unlock(run_dir, lock)
    raise RunError(msg)


def refuse_finished_calibration(run_dir: Path) -> None:
    """`quantbook quantize` into a run directory whose calibration finished would replace the amax its
    export and records were made from: refused (a killed or failed one resumes or starts again)."""
    from ..calibrate.driver import RESULT

    if _locked(Path(run_dir)):
        raise RunError(f"run directory {run_dir} is in use by a `quantbook run`")
    rec = read_json(Path(run_dir) / RESULT)
    if isinstance(rec, dict) and rec.get("status") == "done":
        raise RunError(f"run directory {run_dir} holds a finished calibration ({RESULT}, done {rec.get('finished')}); "
                       "a new one would replace its amax: pass another --run-id, export from it (quantbook export), "
                       "or recalibrate it inside its chain (quantbook run PARAMS --redo 02)")


def _decide(plan, manifest: dict, redo_names: set[str], run_id: str) -> list[tuple]:
    """(step, values, digest, 'run' | 'skip') for each planned step."""
    ran_before = False
    decisions = []
    for s, values in plan:
        rec = manifest["steps"].get(s.name, {})
        digest = params_digest(values)
        if rec.get("status") == "complete" and not ran_before and s.name not in redo_names:
            if rec.get("params_digest") != digest:
                old = rec.get("params", {})
                changed = sorted(k for k in set(old) | set(values) if k != "run_dir" and old.get(k) != values.get(k))
                raise ParamsError(f"step {s.name} of run {run_id} completed with other parameters "
                                  f"(changed: {changed}); rerun it with --redo {s.key} or use a new --run-id")
            decisions.append((s, values, digest, "skip"))
            continue
        ran_before = True
        decisions.append((s, values, digest, "run"))
    return decisions


def _run_step(pm, s: Step, values: dict, digest: str, run_dir: Path, manifest: dict, kernel: str,
              log_output: bool, progress: bool, echo) -> None:
    running = run_dir / f"{s.name}.running.ipynb"
    out_nb, html = run_dir / f"{s.name}.ipynb", run_dir / f"{s.name}.html"
    rec = {"notebook": str(s.path), "notebook_sha256": hashlib.sha256(s.path.read_bytes()).hexdigest(),
           "params": values, "params_digest": digest, "status": "running", "start": _now(),
           "host": socket.gethostname(), "git_commit": manifest.get("git", {}).get("commit"), "kernel": kernel,
           "attempt": manifest["steps"].get(s.name, {}).get("attempt", 0) + 1,
           "output": out_nb.name, "html": html.name, "cwd": os.getcwd()}
    manifest["steps"][s.name] = rec
    _save(run_dir, manifest)
    t0 = time.monotonic()
    log.info("%s started: %s with %s", s.name, s.path, values)
    bar = {"desc": f"{s.name}: {s.title}", "unit": "cell", "leave": True} if progress else False
    error = None
    from ..progress import ENV as PROGRESS_ENV

    before = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "lines"  # the kernel inherits it: text progress lines, not widgets frozen at 0%
    try:
        # no widget state saved: the HTML copy then shows an explorer's own image/png (its first view)
        # where nbconvert would otherwise emit a widget view that renders only with CDN access
        # the kernel's own log (IPKernelApp: "running over TCP without encryption", "KeyboardInterrupt caught in
        # kernel" at shutdown) only below CRITICAL: a kernel that dies is reported by the runner itself
        pm.execute_notebook(str(s.path), str(running), parameters=values, kernel_name=kernel,
                            log_output=log_output, progress_bar=bar, cwd=os.getcwd(), store_widget_state=False,
                            extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
    except BaseException as e:  # noqa: BLE001 - recorded, then re-raised
        error = e
    finally:
        if before is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = before
    rec["end"] = _now()
    rec["duration_s"] = round(time.monotonic() - t0, 3)
    if running.exists():
        os.replace(running, out_nb)
    rec["html"] = html.name if out_nb.exists() and export_html(out_nb, html) else None
    gate = (read_json(run_dir / "export.json") or {}).get("fidelity") if s.name.startswith("03") else None
    if gate:  # the fidelity gate's verdict and numbers, for `quantbook runs`
        rec["fidelity"] = {k: gate.get(k) for k in ("verdict", "ppl_ratio", "kld_mean", "same_top", "mtp_agreement",
                                                    "worst_blocks", "why")}
    if error is None:
        rec["status"] = "complete"
        rec.pop("error", None)
        _save(run_dir, manifest)
        log.info("%s complete in %.1f s", s.name, rec["duration_s"])
        echo(f"    {s.name} complete in {rec['duration_s']:.1f} s")
        return
    info = _failed_cell(out_nb, s.path) if out_nb.exists() else {}
    interrupted = isinstance(error, KeyboardInterrupt)
    rec["status"] = "interrupted" if interrupted else "failed"
    rec["error"] = {"type": type(error).__name__, **info,
                    "message": (info.get("evalue") if info.get("ename") else str(error))[:2000]}
    _save(run_dir, manifest)
    if interrupted:
        raise error
    msg = _describe_failure(s, info, error, out_nb, html if rec["html"] else None)
    log.error(msg)
    raise StepFailed(msg, rec) from error


def rehearse(params_path: str | Path, runs_dir: str | Path = "runs", run_id: str | None = None,
             notebooks_dir: str | Path | None = None, calib_file: str | Path = rehearsal.DEFAULT_CALIB,
             log_output: bool = True, progress: bool = True, echo=print, cuda: bool | None = None) -> dict:
    """`quantbook run PARAMS --rehearse`: the whole chain of `params_path` on a tiny copy of its own
    release, into `<runs_dir>/<run id>-rehearsal` (fresh each time); returns its manifest.

    First the real params' own checks that do not depend on this machine (the release's headers,
    every setting, versions: `preflight`); then `rehearsal.prepare` (the tiny release, the params
    with what cannot run here changed, each change with its reason); then `run_chain`, whose
    manifest records what it rehearsed ("rehearsal_of": params file, digest, changes)."""
    from ..preflight import preflight

    params = load_params(params_path)
    verdict = preflight(params, run_dir=run_dir_for(params, run_id, runs_dir))
    own = [c for c in verdict.refusals if c["area"] in ("release", "settings", "params", "model", "versions")]
    if own:
        raise RunError(f"{params['_path']}: refused before rehearsing (the params' own checks):\n  - " + "\n  - ".join(
            f"step {c['step']} {c['area']}: {c['item']}: {c['detail']}" for c in own))
    rd = Path(runs_dir) / f"{run_id or params['name']}{rehearsal.SUFFIX}"
    if _locked(rd):
        raise RunError(f"run directory {rd} is in use by another `quantbook run`")
    rehearsal.clear(rd)
    params_file, record = rehearsal.prepare(params, rd, calib_file=calib_file, cuda=cuda, notebooks_dir=notebooks_dir)
    echo(f"rehearsal of {params['_path']} (params digest {record['digest']}) in {rd}:")
    echo(f"  a tiny release from {record['release']}/config.json: {record['tiny']['layers']} layers, every key kept")
    for c in record["changes"]:
        echo(f"  {c['key']}: {c['from']} -> {c['to']} ({c['why']})")
    if record["device"] == "cpu":
        echo("  running on CPU: this machine has no CUDA GPU")
    return run_chain(params_file, run_id=rd.name, runs_dir=runs_dir, notebooks_dir=notebooks_dir,
                     log_output=log_output, progress=progress, echo=echo, rehearsal_of=record)


def after_rehearsal(params_path: str | Path, manifest: dict, runs_dir: str | Path = "runs", run_id: str | None = None,
                    machine=None) -> tuple[bool, list[str]]:
    """What a passed rehearsal tells the user: (whether the real run may start HERE, the lines to print).

    The rehearsal proves the code and settings; the real run also needs a machine that holds it. So
    the real params are judged on this machine (`quantbook preflight`): "may start" only when that
    passes; otherwise every reason it refuses, and where the real run must go instead."""
    from ..preflight import preflight, refusal_lines

    params = load_params(params_path)
    cmd = f"quantbook run {params['_path']}" + (f" --run-id {run_id}" if run_id else "")
    v = preflight(params, run_dir=run_dir_for(params, run_id, runs_dir), runs_dir=runs_dir, machine=machine)
    digest = (manifest.get("rehearsal_of") or {}).get("digest")
    if v.ok:
        return True, [f"the real run may start: {cmd} (its manifest will name this rehearsal; params digest {digest})"]
    return False, [f"the rehearsal passed (params digest {digest}), but the real run cannot start on this machine "
                   f"({v.machine}): the preflight refuses it ({len(v.refusals)} reason(s)):", *refusal_lines(v),
                   f"run `quantbook preflight {params['_path']}` on the machine meant for it (the node), then {cmd} there"]


# -- listing -----------------------------------------------------------------------------------
def _dur(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def list_runs(runs_dir: str | Path = "runs") -> list[dict]:
    """One summary per run directory a command made, oldest first: `quantbook run`'s (its manifest) and
    the step commands' (`quantize`, `export`, `verify`: their records). A run recorded as running
    whose lock nobody holds is reported 'interrupted' (its process died)."""
    out = []
    root = Path(runs_dir)
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        m = load_manifest(d)
        if not m:
            row = _step_cli_run(d)
            if row:
                out.append(row)
            continue
        status = m.get("status", "?")
        if status == "running" and not _locked(d):
            status = "interrupted"
        steps = m.get("steps", {})
        failed = [(k, v) for k, v in steps.items() if v.get("status") in ("failed", "interrupted")]
        note = ""
        if failed:
            k, v = failed[-1]
            e = v.get("error", {})
            where = f"{k} cell {e['cell']}" if e.get("cell") else k
            note = f"{where}: {e.get('ename') or e.get('type', '')}: {e.get('message', '')}"
        refused = (m.get("invocations") or [{}])[-1].get("refused")
        if refused:
            note = f"refused by the preflight ({len(refused)} reason(s)): {refused[0]}"
        note = " ".join(note.split())[:100]  # one line a run: a message's line breaks would break the table
        gate = next((v["fidelity"] for v in steps.values() if v.get("fidelity")), None)
        out.append({"run_id": m.get("run_id", d.name), "status": status, "created": m.get("created"),
                    "fidelity": gate,
                    "updated": m.get("updated"), "path": str(d),
                    "steps": {k: v.get("status") for k, v in sorted(steps.items())},
                    "duration_s": sum(v.get("duration_s") or 0 for v in steps.values()) or None, "note": note})
    return sorted(out, key=lambda r: r["created"] or "")


# what the step commands leave in a run directory they made (no manifest: `quantbook run` writes that)
STEP_RECORDS = (("02_quantize", "quantize.json"), ("03_export", "export.json"), ("verify", "verify.json"))


def _step_cli_run(d: Path) -> dict | None:
    """A run directory made by `quantbook quantize` / `export` / `verify` alone: a row from their records."""
    import datetime as _dt

    steps, times, note, seconds = {}, [], "", 0.0
    for name, file in STEP_RECORDS:
        rec = read_json(d / file)
        if not isinstance(rec, dict):
            continue
        if name == "verify":
            status = {"pass": "complete", "fail": "failed"}.get(rec.get("verdict"), rec.get("verdict") or "?")
            started = _dt.datetime.fromtimestamp((d / file).stat().st_mtime).astimezone().isoformat(timespec="seconds")
            seconds += rec.get("elapsed_s") or 0
        else:
            status = {"done": "complete"}.get(rec.get("status"), rec.get("status") or "?")
            started = rec.get("started")
            seconds += rec.get("seconds") or sum((rec.get("timings") or {}).values()) or 0
        steps[name] = status
        times.append(started or "")
        if status not in ("complete", "running") and not note:
            note = f"{name}: {rec.get('error') or rec.get('summary') or status}"
    if not steps:
        return None
    states = set(steps.values())
    status = "failed" if states & {"failed", "fail"} else "running" if "running" in states else \
        "complete" if states == {"complete"} else sorted(states - {"complete"})[0]
    return {"run_id": d.name, "status": status, "created": min(times) or None, "updated": max(times) or None,
            "path": str(d), "steps": steps, "duration_s": round(seconds, 3) or None,
            "note": " ".join(f"(step commands, no manifest) {note}".split())[:100]}


def format_runs(rows: list[dict]) -> str:
    """A plain-text table of `list_runs` rows."""
    if not rows:
        return "no runs"
    mark = {"complete": "ok", "failed": "FAILED", "running": "running", "interrupted": "interrupted"}
    table = [("RUN", "STATUS", "STEPS", "CREATED", "STEP TIME", "FIDELITY", "NOTE")]
    for r in rows:
        steps = " ".join(f"{k.split('_')[0]}:{mark.get(v, v)}" for k, v in r["steps"].items())
        table.append((r["run_id"], r["status"], steps, (r["created"] or "")[:19].replace("T", " "),
                      _dur(r["duration_s"]), _fidelity_cell(r.get("fidelity")), r["note"]))
    widths = [max(len(str(row[i])) for row in table) for i in range(6)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row[:6], widths)) + "  " + str(row[6])
                     for row in table).rstrip()


def _fidelity_cell(gate: dict | None) -> str:
    """`PASS ppl x1.002 kld 0.0012` for a run whose step 03 ran the fidelity gate."""
    if not gate:
        return ""
    if gate.get("ppl_ratio") is None:
        return str(gate.get("verdict"))
    return f"{gate['verdict'].upper()} ppl x{gate['ppl_ratio']:.3f} kld {gate['kld_mean']:.4f}"
