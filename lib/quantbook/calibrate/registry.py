"""Calibration drivers by name, the way papermill keeps its engines.

The built-in drivers are named here by import path and imported on first use, so naming the
choices (for a refusal, the notebook, the CLI) costs nothing; packages can add drivers through
the `quantbook.drivers` entry-point group (`name = "module:Class"`, a `driver.Driver` subclass).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from ..errors import ParamsError

BUILTIN = {
    "modelopt": "quantbook.calibrate.modelopt_driver:ModeloptDriver",
    "hf_ptq": "quantbook.calibrate.hf_ptq_driver:HfPtqDriver",
    "streaming": "quantbook.calibrate.streaming_driver:StreamingDriver",
}
ENTRY_POINT_GROUP = "quantbook.drivers"


def _targets() -> dict[str, str]:
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def names() -> list[str]:
    """Every driver name that `quantize.driver` accepts."""
    return list(_targets())


def get(name: str):
    """The driver class registered under `name`; ParamsError naming the choices otherwise."""
    targets = _targets()
    if name not in targets:
        raise ParamsError(f"quantize.driver: {name!r} is not one of {list(targets)}")
    module, _, attr = targets[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def bf16_copy_unneeded(params: dict) -> str | None:
    """Why the chain needs no step 01 (BF16 copy) for these params, or None when it does: the
    driver calibrates from the release and the verifier compares with the release (no
    `export.reference`). The preflight plans it so and `quantbook run` skips it."""
    try:
        drv = get(((params.get("quantize") or {}).get("driver")) or "modelopt")
    except ParamsError:
        return None
    if drv.needs_bf16_copy or (params.get("export") or {}).get("reference"):
        return None
    return f"driver {drv.name} calibrates from the release and the verifier compares with it: no BF16 copy"
