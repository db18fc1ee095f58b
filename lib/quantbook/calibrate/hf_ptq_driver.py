"""Step 02 through modelopt's own `examples/hf_ptq/hf_ptq.py`, run in-process from a checkout.

The reference driver: the project never copies hf_ptq; it runs the script of a Model-Optimizer
checkout named by `quantize.hf_ptq_dir` (default `$QUANTBOOK_HF_PTQ_DIR`, the checkout's
`examples/hf_ptq` folder) as its command line would, with these differences, each called for by
one of the predecessor's failures, and nothing else:

1. Before anything loads, the checkout's version must match the installed modelopt
   (`check_checkout`), and every setting must be a flag of hf_ptq's own parser with a value of
   the right kind (`build_argv`); then hf_ptq's `parse_args()` and the rest of its `__main__`
   block run on that command line (`prepare_args`), so a wrong flag or a refused combination
   fails in seconds, not after a 50-minute model load (runs 4-9).
2. The project's runtime patches (`patches`) are applied before `main()` runs.
3. `export_quantized`, which hf_ptq's `post_quantize` calls through the module global, is wrapped
   (`export_hook`): before the export starts, the post-calibration hook (`state.post_calibration`)
   snapshots every amax to CPU and to a file, repairs bad amax and saves the cheap calibrated
   state, so an export that fails (run 2) never costs the calibration. hf_ptq's own export (the
   generic one, not servable for V4) then runs only with `quantize.export_generic: true`; without
   it the call ends after the hook and the record says the export was not written. Four more module globals
   are wrapped only to observe (`calibration_observers`): the calibration data, the experts
   reached, the quantization config, the time and memory of each phase.
4. hf_ptq writes into `<export_path>.partial`, renamed onto `export_path` when main() returns, so
   an interrupted run never leaves a half export under the final name (without the export, its
   quantizer summary goes to a scratch directory in the run directory, kept beside the record).
5. On a machine without CUDA and with `device: cpu` only, `main()`'s opening "GPU is required"
   check is let through (`cpu_rehearsal`); everything after it runs on CPU unchanged. This is
   what lets the whole script be rehearsed in CI on the tiny model.

Version match (`version_mismatch`): the installed nvidia-modelopt must be a release, and the
checkout must be exactly that release: `git describe` of its work tree is the release tag with no
commit or local edit on top; or, outside a git work tree, the top heading of the repository's
CHANGELOG.rst is that release's minor with a real date (CHANGELOG headings name the minor only,
and an unreleased minor's heading has a date like `2026-09-xx`). A dev, rc or later checkout of
the same minor is a mismatch. `quantize.force: true` runs a mismatched or undeterminable checkout
anyway, with a loud warning and `forced: true` in the run record.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import functools
import importlib
import importlib.metadata
import inspect
import io
import json
import os
import re
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

from ..errors import ParamsError
from . import patches, state
from .checks import check_quantize_settings
from .data import ExpertTokenCounter, coverage, describe_dataloader
from .driver import Driver, DriverRun, check_inputs, export_dirs, finish_export, start_export
from .settings import HF_PTQ_DEFAULTS

CHECKOUT_ENV = "QUANTBOOK_HF_PTQ_DIR"
# export_quantized's parameters, unchanged from 0.44 to 0.47; the hook passes them through.
EXPORT_PARAMS = ("args", "full_model", "language_model", "model_type", "tokenizer",
                 "default_padding_side", "default_pad_token")


# ----------------------------------------------------------------------------- checkout version

@dataclass(frozen=True)
class CheckoutVersion:
    """What a checkout says about its version, and where it said it."""

    text: str  # as read: "0.47.0dev-81-ga2fbac7ba", "0.47 (2026-09-xx)"
    version: str  # "0.47.0dev", "0.47"
    release: bool  # exactly a release (see the module docstring)
    source: str  # "git describe" | "CHANGELOG.rst"

    def __str__(self) -> str:
        return f"{self.text} (from {self.source}{'' if self.release else ', not a release'})"


def installed_modelopt() -> str:
    """Version of the installed nvidia-modelopt wheel."""
    return importlib.metadata.version("nvidia-modelopt")


def resolve_checkout(q: dict) -> Path:
    """The `examples/hf_ptq` folder named by `quantize.hf_ptq_dir` or `$QUANTBOOK_HF_PTQ_DIR`."""
    named = q.get("hf_ptq_dir") or os.environ.get(CHECKOUT_ENV)
    if not named:
        raise ParamsError(
            f"quantize.driver hf_ptq runs examples/hf_ptq/hf_ptq.py of a Model-Optimizer checkout: set "
            f"quantize.hf_ptq_dir or ${CHECKOUT_ENV} to that folder of a checkout at the installed "
            f"release (git clone --branch {installed_modelopt()} https://github.com/NVIDIA/Model-Optimizer)")
    path = Path(named).expanduser().resolve()
    if not (path / "hf_ptq.py").is_file():
        raise ParamsError(f"quantize.hf_ptq_dir {path} has no hf_ptq.py; name the checkout's examples/hf_ptq folder")
    return path


def _git(cwd: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _is_release(version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        v = Version(version)
    except InvalidVersion:
        return False
    return not (v.is_prerelease or v.is_devrelease or v.local)


_DESCRIBE = re.compile(r"^(?P<tag>.+?)(?:-(?P<ahead>\d+)-g[0-9a-f]+)?(?P<dirty>-dirty)?$")
_HEADING = re.compile(r"^(?P<version>\d+\.\d+(?:\.\d+)?)\s+\((?P<date>[^)]*)\)\s*$")


def checkout_version(hf_ptq_dir: str | Path) -> CheckoutVersion:
    """The Model-Optimizer version of the checkout holding `hf_ptq_dir`.

    `git describe --tags --dirty` when the folder is in a git work tree whose top is the
    checkout (two levels up), else the top version heading of the checkout's CHANGELOG.rst;
    ParamsError when neither says.
    """
    folder = Path(hf_ptq_dir).resolve()
    repo = folder.parent.parent
    top = _git(folder, "rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == repo:
        described = _git(repo, "describe", "--tags", "--dirty")
        if described and (m := _DESCRIBE.match(described)):
            release = not m.group("ahead") and not m.group("dirty") and _is_release(m.group("tag"))
            return CheckoutVersion(described, m.group("tag"), release, "git describe")
    changelog = repo / "CHANGELOG.rst"
    if changelog.is_file():
        for line in changelog.read_text(errors="replace").splitlines():
            if m := _HEADING.match(line.strip()):
                dated = re.fullmatch(r"\d{4}-\d{2}-\d{2}", m.group("date").strip()) is not None
                return CheckoutVersion(line.strip(), m.group("version"), dated, "CHANGELOG.rst")
    raise ParamsError(
        f"cannot determine the Model-Optimizer version of the checkout at {repo} (not a git work tree "
        f"with tags, and no version heading in {changelog}); the installed nvidia-modelopt is "
        f"{installed_modelopt()}. Use a checkout of the release tag, or set quantize.force: true to run it anyway")


def version_mismatch(checkout: CheckoutVersion, installed: str) -> str | None:
    """Why `checkout` does not count as the installed release, or None when it does."""
    from packaging.version import Version

    if not _is_release(installed):
        return f"the installed nvidia-modelopt {installed} is not a release"
    if not checkout.release:
        return "the checkout is not exactly a release (a dev/rc tag, commits or edits on top, or an undated heading)"
    inst = Version(installed)
    if checkout.source == "git describe":
        return None if Version(checkout.version) == inst else "the release tag differs"
    parts = [int(p) for p in checkout.version.split(".")]
    if parts[:2] != [inst.major, inst.minor] or (len(parts) == 3 and parts[2] != inst.micro):
        return "the CHANGELOG's release differs"
    return None


def check_checkout(hf_ptq_dir: Path, force: bool = False) -> dict:
    """Refuse a checkout whose version is not the installed modelopt's, unless forced (loudly).

    Returns the facts for the run record: folder, both versions, whether they match, forced.
    """
    installed = installed_modelopt()
    try:
        found = checkout_version(hf_ptq_dir)
    except ParamsError as e:
        if not force:
            raise
        found, reason = None, str(e)
    else:
        reason = version_mismatch(found, installed)
    facts = {"hf_ptq_dir": str(hf_ptq_dir), "checkout_version": str(found) if found else None,
             "installed_modelopt": installed, "match": reason is None, "forced": False}
    if reason is None:
        return facts
    message = (f"hf_ptq checkout {hf_ptq_dir} is Model-Optimizer {found or 'of unknown version'}, but the "
               f"installed nvidia-modelopt is {installed}: {reason}. hf_ptq.py and example_utils.py change "
               f"between releases (flags, defaults, loading and export code), so a mismatched pair can fail "
               f"after the model has loaded or export differently")
    if not force:
        raise ParamsError(message + f". Check out tag {installed} of Model-Optimizer, or set "
                                    "quantize.force: true to run this checkout anyway")
    banner = "!" * 100
    print(f"\n{banner}\nWARNING (quantize.force: true): {message}.\nRunning it anyway; this run is NOT "
          f"the tested pairing.\n{banner}\n", file=sys.stderr, flush=True)
    warnings.warn(f"quantize.force: running a mismatched hf_ptq checkout: {message}", stacklevel=2)
    facts["forced"] = True
    return facts


# ----------------------------------------------------------------------------- the module

@contextmanager
def hf_ptq_module(hf_ptq_dir: str | Path):
    """Import the checkout's hf_ptq (its folder on sys.path only inside the block).

    hf_ptq imports example_utils and its other siblings by bare name; modules of that folder are
    dropped from sys.modules afterwards, and same-named modules from elsewhere are put back.
    """
    folder = Path(hf_ptq_dir).resolve()
    siblings = {p.stem for p in folder.glob("*.py")}
    saved_path = list(sys.path)
    shadowed = {name: sys.modules.pop(name) for name in siblings if name in sys.modules}
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module("hf_ptq")
        if Path(module.__file__).resolve().parent != folder:
            raise ParamsError(f"imported hf_ptq from {module.__file__}, not from {folder}")
        yield module
    finally:
        sys.path[:] = saved_path
        inside = str(folder) + os.sep
        for name, mod in list(sys.modules.items()):
            if name in siblings or str(getattr(mod, "__file__", None) or "").startswith(inside):
                del sys.modules[name]
        sys.modules.update(shadowed)


def _main_block(module) -> ast.If:
    tree = ast.parse(Path(module.__file__).read_text(), module.__file__)
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and \
                isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__":
            return node
    raise ParamsError(f"{module.__file__} has no `if __name__ == '__main__':` block; unsupported layout")


def check_interface(module) -> None:
    """Refuse a checkout whose hf_ptq lacks what this driver calls, before anything loads."""
    path = module.__file__
    for name in ("parse_args", "main", "quantize_main", "make_calib_dataloader", "post_quantize",
                 "export_quantized"):
        if not callable(getattr(module, name, None)):
            raise ParamsError(f"{path} has no function {name}(); this driver supports hf_ptq 0.44-0.47")
    for caller, callee in (("main", "quantize_main"), ("quantize_main", "make_calib_dataloader"),
                           ("post_quantize", "export_quantized")):
        if callee not in getattr(module, caller).__code__.co_names:
            raise ParamsError(f"{path}: {caller} does not call {callee} through the module global; the "
                              "driver's observers and post-calibration hook would never run")
    if list(inspect.signature(module.quantize_main).parameters)[:2] != ["args", "full_model"]:
        raise ParamsError(f"{path}: quantize_main does not take (args, full_model, ...)")
    params = tuple(inspect.signature(module.export_quantized).parameters)
    if params != EXPORT_PARAMS:
        raise ParamsError(f"{path}: export_quantized{params} is not export_quantized{EXPORT_PARAMS}; "
                          "the post-calibration hook cannot wrap it")
    _main_block(module)


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def hf_ptq_parser(module) -> argparse.ArgumentParser:
    """hf_ptq's own ArgumentParser, taken from its parse_args() at the moment it would parse."""
    original = argparse.ArgumentParser.parse_known_args

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_known_args = capture
    try:
        module.parse_args()
    except _Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
    raise ParamsError(f"{module.__file__}: parse_args() returned without parsing; unsupported layout")


def build_argv(settings: dict, parser: argparse.ArgumentParser) -> list[str]:
    """hf_ptq's command line for `settings` ({dest: value}), every key checked against `parser`.

    True -> `--flag` for a store_true switch, False -> nothing (`--no-flag` for a
    BooleanOptionalAction); None -> hf_ptq's default; lists -> comma strings; anything else ->
    `--flag=value`. Unknown keys, aliases, dashes and values of the wrong kind are refused, all
    of them in one error.
    """
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    aliases = {o.lstrip("-"): a.dest for a in actions.values() for o in a.option_strings}
    problems, argv = [], []
    for key, value in settings.items():
        action = actions.get(key)
        if action is None:
            if key in aliases:
                problems.append(f"{key}: write hf_ptq's setting name {aliases[key]!r} (flags "
                                f"{'/'.join(actions[aliases[key]].option_strings)})")
            else:
                near = difflib.get_close_matches(str(key), list(actions), n=3, cutoff=0.6)
                problems.append(f"{key}: hf_ptq has no flag --{key}" + (f"; did you mean {near}?" if near else ""))
            continue
        if value is None:
            continue
        flag = f"--{key}" if f"--{key}" in action.option_strings else action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                problems.append(f"{key}: a switch (--{key}/--no-{key}); write true or false, not {value!r}")
            else:
                argv.append(flag if value else f"--no-{flag[2:]}")
        elif action.nargs == 0:
            if action.const not in (True, False):
                problems.append(f"{key}: --{key} is not a true/false switch; not supported here")
            elif not isinstance(value, bool):
                problems.append(f"{key}: a switch (--{key}); write true or false, not {value!r}")
            elif value == action.const:
                argv.append(flag)
        else:
            if isinstance(value, bool):
                problems.append(f"{key}: --{key} takes a value, not {value!r}")
                continue
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            argv.append(f"{flag}={value}")
    given = {k for k, v in settings.items() if v is not None}
    for dest, action in actions.items():
        if action.required and dest not in given:
            problems.append(f"{dest}: required by hf_ptq (--{dest})")
    if problems:
        raise ParamsError("quantize.hf_ptq settings refused by hf_ptq's parser:\n  - " + "\n  - ".join(problems))
    return argv


@contextmanager
def _sys_argv(argv: list[str]):
    saved = sys.argv
    sys.argv = list(argv)
    try:
        yield
    finally:
        sys.argv = saved


def prepare_args(module, argv: list[str]) -> argparse.Namespace:
    """Run hf_ptq's own `__main__` block on `argv`, with its final `main(args)` call captured.

    The block parses the command line and applies the conversions main() relies on (dataset ->
    list, calib_size -> list of int, and its checks): the checkout's code, not a copy, so a later
    checkout's block is applied as it is. Parse errors and the block's own refusals become
    ParamsError, before anything loads.
    """
    block = _main_block(module)
    captured = []
    namespace = dict(vars(module))
    namespace["main"] = captured.append
    code = compile(ast.Module(body=block.body, type_ignores=[]), module.__file__, "exec")
    err = io.StringIO()
    try:
        with _sys_argv([module.__file__, *argv]), redirect_stderr(err):
            exec(code, namespace)
    except SystemExit as e:
        raise ParamsError(f"hf_ptq refused the command line {argv} (exit {e.code}):\n"
                          f"{err.getvalue().strip()}") from None
    except (ValueError, AssertionError) as e:
        raise ParamsError(f"hf_ptq's __main__ checks refused the settings: {e}") from None
    finally:
        if err.getvalue():
            sys.stderr.write(err.getvalue())
    if len(captured) != 1:
        raise ParamsError(f"{module.__file__}: the __main__ block called main() {len(captured)} times, not "
                          "once; unsupported layout")
    args = captured[0]
    if not (isinstance(args.calib_size, list) and all(isinstance(n, int) for n in args.calib_size)
            and (args.dataset is None or isinstance(args.dataset, list))):
        raise ParamsError(f"{module.__file__}: after its __main__ block calib_size={args.calib_size!r} and "
                          f"dataset={args.dataset!r} are not lists; unsupported layout")
    return args


# ----------------------------------------------------------------------------- running it

def gpu_guard_lines(module) -> set[int]:
    """Lines of hf_ptq's `main` holding its `if not torch.cuda.is_available(): raise ...` guard."""
    tree = ast.parse(Path(module.__file__).read_text(), module.__file__)
    mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    lines = set()
    for node in ast.walk(mains[0]) if mains else ():
        if not (isinstance(node, ast.If) and isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not)):
            continue
        call = node.test.operand
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "torch.cuda.is_available" \
                and any(isinstance(b, ast.Raise) for b in node.body):
            lines.add(call.lineno)
    return lines


@contextmanager
def cpu_rehearsal(module, args: argparse.Namespace):
    """CPU rehearsal only: let exactly hf_ptq.main's "GPU is required" check pass.

    Active only with `device: cpu` on a machine without CUDA. `torch.cuda.is_available` answers
    True to the call on the guard's own line in hf_ptq's `main` (found in the source), and the
    truth to every other caller (main elsewhere, modelopt, transformers, accelerate, hf_ptq's
    helpers), so nothing else changes path. Yields the lines where main was let through (empty
    when inactive: on a GPU machine, or with another device, main's guard answers honestly).
    """
    import torch

    let_through: list[int] = []
    if args.device != "cpu" or torch.cuda.is_available():
        yield let_through
        return
    real = torch.cuda.is_available
    guarded, lines = module.main.__code__, gpu_guard_lines(module)

    @functools.wraps(real)
    def is_available() -> bool:
        caller = sys._getframe(1)
        if caller.f_code is guarded and caller.f_lineno in lines:
            let_through.append(caller.f_lineno)
            return True
        return real()

    torch.cuda.is_available = is_available
    try:
        yield let_through
    finally:
        torch.cuda.is_available = real


@contextmanager
def export_hook(module, before, around=None, export: bool = True):
    """Wrap hf_ptq's module-global `export_quantized`: `before(full_model, args)` runs first, then
    hf_ptq's own export unless `export` is False (`quantize.export_generic: false`).

    hf_ptq's post_quantize looks the name up at call time, so the wrapper sees every export.
    `around(name)` (optional) gives a context for "snapshot_and_state" and "export" (memory
    phases). Yields the list of export calls (one per export) for the caller to check.
    """
    original = module.export_quantized
    calls: list[float] = []
    around = around or (lambda name: contextlib.nullcontext())

    @functools.wraps(original)
    def export_quantized(args, full_model, language_model, model_type, tokenizer,
                         default_padding_side, default_pad_token):
        calls.append(time.time())
        with around("snapshot_and_state"):
            before(full_model=full_model, args=args)
        if not export:
            return None
        with around("export"):
            return original(args, full_model, language_model, model_type, tokenizer,
                            default_padding_side, default_pad_token)

    module.export_quantized = export_quantized
    try:
        yield calls
    finally:
        module.export_quantized = original


@contextmanager
def calibration_observers(module, around=None):
    """Watch hf_ptq's calibration without changing it: the model, the data, the experts reached.

    Wraps module globals that hf_ptq looks up at call time (same in 0.44-0.47): `load_model`
    (timed as "load"), `make_calib_dataloader` (its dataloader kept, to describe afterwards),
    `quantize_main` (`data.ExpertTokenCounter` hooks the routers of the loaded model for the
    call, before calibration starts), `mono_quantize` (its quantization config kept; timed as
    "calibrate"). Yields {"dataloader", "counter", "quant_cfg"} as they appear.
    """
    around = around or (lambda name: contextlib.nullcontext())
    seen: dict = {"dataloader": None, "counter": None, "quant_cfg": None}
    originals: dict = {}

    def wrap(name, make):
        fn = getattr(module, name, None)
        if callable(fn):
            originals[name] = fn
            setattr(module, name, functools.wraps(fn)(make(fn)))

    def load_model(fn):
        def wrapper(*args, **kwargs):
            with around("load"):
                return fn(*args, **kwargs)
        return wrapper

    def make_calib_dataloader(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen["dataloader"] = out[0] if isinstance(out, tuple) else out
            return out
        return wrapper

    def quantize_main(fn):
        def wrapper(args, full_model, *rest, **kwargs):
            seen["counter"] = ExpertTokenCounter(full_model)
            try:
                return fn(args, full_model, *rest, **kwargs)
            finally:
                seen["counter"].remove()
        return wrapper

    def mono_quantize(fn):
        def wrapper(args, quant_cfg, *rest, **kwargs):
            seen["quant_cfg"] = quant_cfg
            with around("calibrate"):
                return fn(args, quant_cfg, *rest, **kwargs)
        return wrapper

    for name, make in (("load_model", load_model), ("make_calib_dataloader", make_calib_dataloader),
                       ("quantize_main", quantize_main), ("mono_quantize", mono_quantize)):
        wrap(name, make)
    try:
        yield seen
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def post_calibration_hook(run_dir: Path, q: dict, seen: dict, results: dict, ledger: "patches.Ledger"):
    """The project's hook (`state.post_calibration`) fed with what hf_ptq calibrated on.

    amax to CPU and to `amax.safetensors`, expert token counts, bad-amax repair, cheap state with
    its manifest; its record lands in `results["post_calibration"]`.
    """

    def hook(full_model, args):
        loader, counter = seen.get("dataloader"), seen.get("counter")
        counts = counter.as_dict() if counter is not None else None
        results["post_calibration"] = state.post_calibration(
            full_model, run_dir, q, ledger,
            calib=describe_dataloader(loader) if loader is not None else None,
            token_counts=counts, model_path=args.pyt_ckpt_path, quant_cfg=seen.get("quant_cfg"))
        if counts is not None:
            results["expert_coverage"] = coverage(counts)

    return hook


def _model_config(settings: dict) -> dict | None:
    path = Path(str(settings.get("pyt_ckpt_path") or "")) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class Prepared:
    """Everything decided before hf_ptq loads a model."""

    module: object
    argv: list[str]
    args: argparse.Namespace
    facts: dict


@contextmanager
def prepared(q: dict, export_dir: str | Path | None = None):
    """Check settings and checkout, import hf_ptq, build and parse its command line; no model loads.

    `export_dir` replaces `export_path` on the command line (run() lets hf_ptq write into
    `<export_path>.partial` and renames it when complete).
    """
    settings = q["hf_ptq"]
    check_quantize_settings(q, _model_config(settings))
    folder = resolve_checkout(q)
    facts = check_checkout(folder, force=bool(q.get("force", False)))
    t0 = time.time()
    with hf_ptq_module(folder) as module:
        check_interface(module)
        parser = hf_ptq_parser(module)
        build_argv(settings, parser)  # refusals name the settings as written
        argv = build_argv({**settings, "export_path": str(export_dir)} if export_dir else settings, parser)
        args = prepare_args(module, argv)
        facts.update(argv=argv, hf_ptq=module.__file__, preflight_s=round(time.time() - t0, 2))
        yield Prepared(module, argv, args, facts)


def checkout_preflight(q: dict) -> dict:
    """Everything `run` checks before hf_ptq loads the model (seconds); returns the facts."""
    with prepared(q) as p:
        return dict(p.facts)


def run(q: dict, run_dir: str | Path, hook=None, progress: bool = True, facts: dict | None = None) -> dict:
    """Quantize with the checkout's hf_ptq in this process; returns (and records) the result.

    With `export_generic`, hf_ptq writes into `<export_path>.partial`, renamed onto `export_path`
    once main() returns (as the modelopt driver does); without, its export call is skipped.
    `hook(full_model, args)` runs after calibration, right before hf_ptq's export; by default
    `post_calibration_hook`. The record `quantize.json` in `run_dir` (atomic, status running /
    done / failed) holds the params, versions, hf_ptq's command line, both version facts and
    whether they were forced, the patches, the hook's record, what was (not) exported, the bad
    amax replaced at export, and the time of each phase (also in `memory.csv`).
    """
    final, work = export_dirs(q, q["hf_ptq"], run_dir)
    with prepared(q, export_dir=work) as p, \
            DriverRun(run_dir, HfPtqDriver.name, q, hf_ptq=p.facts, resources=(facts or {}).get("resources")) as run:
        run.update(patches=patches.apply(force=bool(q.get("force", False))))
        start_export(work)
        results: dict = {}
        with calibration_observers(p.module, run.phase) as seen, \
                export_hook(p.module, hook or post_calibration_hook(run.run_dir, q, seen, results, run.ledger),
                            run.phase, export=final is not None) as exports, \
                cpu_rehearsal(p.module, p.args) as let_through:
            p.module.main(p.args)
        if len(exports) != 1:
            raise RuntimeError(f"hf_ptq.main returned after {len(exports)} calls of export_quantized, not 1")
        with run.phase("finalize"):
            export = finish_export(final, work, run.run_dir)
        return run.done(export=export, cpu_rehearsal_guard_lines=let_through, **results)


class HfPtqDriver(Driver):
    """modelopt's own examples/hf_ptq/hf_ptq.py from a Model-Optimizer checkout, run in-process."""

    name = "hf_ptq"

    @classmethod
    def settings(cls, q: dict) -> dict:
        return {**HF_PTQ_DEFAULTS, **q["hf_ptq"]}

    @classmethod
    def preflight(cls, q: dict) -> dict:
        facts = checkout_preflight(q)
        return {**check_inputs(q, cls.settings(q)), "driver_facts": facts}

    @classmethod
    def run(cls, q: dict, run_dir: Path, progress: bool = True, facts: dict | None = None) -> dict:
        return run(q, run_dir, progress=progress, facts=facts)
