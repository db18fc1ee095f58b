"""Run parameters: one YAML file per target, one section per step.

Sections: `name`, `tiny` (build the source checkpoint when it is missing), `dequant` (01),
`quantize` (02), `export` (03), `inspect` (04). Each section's keys are the parameters of that
step's notebook and library call, so the same file drives papermill, the CLI and the tests.
`${VAR}` and `~` in string values are expanded from the environment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from .errors import ParamsError

SECTIONS = ("name", "tiny", "dequant", "quantize", "export", "inspect")


def _expand(v):
    if isinstance(v, str):
        return os.path.expanduser(os.path.expandvars(v))
    if isinstance(v, dict):
        return {k: _expand(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_expand(x) for x in v]
    return v


def load_params(path: str | Path) -> dict:
    """Read a params file and refuse unknown sections."""
    path = Path(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ParamsError(f"params file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{path}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    out = _expand(raw)
    out.setdefault("name", path.stem)
    out["_path"] = str(path)
    return out


def section(params: dict, name: str, defaults: dict | None = None) -> dict:
    """One step's parameters, with defaults filled and unknown keys refused."""
    got = dict(params.get(name) or {})
    if defaults is not None:
        unknown = sorted(set(got) - set(defaults))
        if unknown:
            raise ParamsError(f"{params.get('_path', 'params')}: section {name!r} has unknown key(s) {unknown}; "
                              f"known: {sorted(defaults)}")
        got = {**defaults, **got}
    return got


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def run_dir_for(params: dict, run_id: str | None = None, runs_dir: str | Path = "runs") -> Path:
    """The one rule every command names and finds a run by: `<runs_dir>/<run id>`, the run id being
    `--run-id` or else the params file's `name` (its stem when it has none). `quantbook run`,
    `quantize`, `export` and `preflight` all use it."""
    run_id = run_id or params.get("name") or "run"
    if not RUN_ID.fullmatch(run_id):
        raise ParamsError(f"run id {run_id!r}: use letters, digits, '.', '_', '-'")
    return Path(runs_dir) / run_id
