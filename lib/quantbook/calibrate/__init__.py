"""Step 02: calibrate and quantize with NVIDIA Model Optimizer, through a driver chosen by name.

    quantize(q, run_dir)   # preflight, resource check, then the driver's run: the record
    preflight(q, run_dir)  # everything checked before a model loads (seconds)

`q` is the `quantize:` section of a params file; `q["driver"]` names a driver in `registry`
(`modelopt`: hf_ptq's pipeline on modelopt's API; `hf_ptq`: modelopt's own hf_ptq.py from a
checkout; `streaming`: block by block from the release, no BF16 copy). Modules: `settings`
(defaults, hf_ptq flag names), `checks` (settings refused with the reason), `driver` (the
interface and the scaffolding every driver runs in), `hf_model` (load, data, config and export as
hf_ptq does them), `resources`, `patches`, `state` (amax snapshot and cheap calibrated state),
`data` (calibration text, token counts), `report`; the streaming driver's own `blocks` (a release
block as transformers' layer), `mtp` (the MTP block), `block_checkpoint` (resume state) and
`distributed` (processes, exact reductions).
"""

from __future__ import annotations

import warnings
from pathlib import Path

# modelopt 0.47 warns on import that transformers >= 5.15 "is not tested" (its [hf] extra pins < 5.15). quantbook
# runs 5.23.0 on purpose: 5.14's DeepSeek V4 cannot run a BF16 forward (README, pyproject); the preflight's
# versions row says which transformers runs and that it is the tested one. The warning alone, an unexplained box
# in every executed notebook, is not shown.
warnings.filterwarnings("ignore", message=r"transformers \S+ is not tested with current version of modelopt")

from . import registry
from .resources import check_resources
from .settings import normalize


def preflight(q: dict, run_dir: str | Path) -> dict:
    """The driver's checks (settings, checkpoint, data, versions, CUDA) and the resource estimate
    (memory, disk), in seconds and before anything loads. Raises a QuantbookError on a refusal
    (resources: unless `force`); returns the facts, resources under "resources"."""
    q = normalize(q)
    driver = registry.get(q["driver"])
    facts = driver.preflight(q)
    facts["resources"] = check_resources(q, run_dir)
    return facts


def quantize(q: dict, run_dir: str | Path, progress: bool = True, facts: dict | None = None,
             export: dict | None = None) -> dict:
    """Run step 02 with the driver `q["driver"]` names; the result record (also in quantize.json).

    `facts` from an earlier `preflight(q, run_dir)` of the same settings skip a second preflight.
    `export`: the params' `export:` section; a driver that writes it along calibration
    (`quantize.export_along`, driver streaming) writes step 03's export as it goes."""
    q = normalize(q)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    facts = dict(facts or preflight(q, run_dir))
    res = facts["resources"]
    facts["resources"] = {k: res[k] for k in ("model_bytes", "export_bytes", "layerwise_bytes", "disk")}
    driver = registry.get(q["driver"])
    if driver.writes_along:
        return driver.run(q, run_dir, progress=progress, facts=facts, export=along_settings(q, export))
    return driver.run(q, run_dir, progress=progress, facts=facts)


def along_settings(q: dict, export: dict | None) -> dict | None:
    """The export settings a streaming pass writes along (checked as step 03 checks them), or None:
    no `export:` section, `quantize.export_along: false`, or a layout other than v4-serving."""
    from ..export.recover import export_settings

    if not export or not q.get("export_along", True):
        return None
    e = export_settings(export)
    return e if e["layout"] == "v4-serving" else None
