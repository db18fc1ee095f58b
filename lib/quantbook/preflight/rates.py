"""The measured rates the preflight projects step times from: `rates.yaml` beside this module.

Each figure carries where it was measured (machine, command, date, record); a step without one is
"not measured", never guessed. `pick` chooses the figure that applies to a step's settings: the
device and driver it names, on the measured machine whose core count is nearest this one's, with
the most workers not above the step's.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from ..errors import ParamsError

RATES = Path(__file__).with_name("rates.yaml")
UNITS = ("MiB/s", "s/layer", "s/tensor", "s")
FIELDS = ("what", "unit", "value", "machine", "command", "date", "source")


def load_rates(path: str | Path = RATES) -> list[dict]:
    """Every figure of a rates file, each checked for its value, unit and where it was measured."""
    path = Path(path)
    rows = (yaml.safe_load(path.read_text()) or {}).get("rates") or []
    for i, r in enumerate(rows):
        missing = [k for k in FIELDS if r.get(k) in (None, "")]
        if missing or r["unit"] not in UNITS or not isinstance(r["value"], (int, float)) or r["value"] <= 0:
            raise ParamsError(f"{path}: rate {i + 1} ({r.get('what')}): needs {list(FIELDS)} with a positive value "
                              f"and a unit in {list(UNITS)}; missing or wrong: {missing or [r.get('unit'), r.get('value')]}")
    return rows


def _applies(r: dict, key: str, value) -> bool:
    want = r.get(key)
    if want is None or value is None:
        return True
    return value in want if isinstance(want, list) else value == want


def pick(rates: list[dict], what: str, device: str | None = None, workers: int | None = None,
         driver: str | None = None, cpus: int | None = None, route: str | None = None) -> dict | None:
    """The figure for `what` that applies to these settings, or None when nothing was measured.
    `route`: step 03's writer carrying the released codes (`carry`) or re-quantizing (`requant`)."""
    device = device.split(":")[0] if device else None
    found = [r for r in rates if r["what"] == what and _applies(r, "device", device) and _applies(r, "driver", driver)
             and _applies(r, "route", route)]
    if not found:
        return None
    if cpus:  # the measured machine nearest this one in cores (unknown core counts last)
        near = min(abs(math.log(r["cores"] / cpus)) if r.get("cores") else math.inf for r in found)
        found = [r for r in found if (abs(math.log(r["cores"] / cpus)) if r.get("cores") else math.inf) == near]
    if workers is not None and any(r.get("workers") for r in found):
        below = [r for r in found if (r.get("workers") or 0) <= workers]
        found = [max(below, key=lambda r: r.get("workers") or 0)] if below else \
            [min(found, key=lambda r: r.get("workers") or 0)]
    return found[0]


def seconds(rate: dict, nbytes: int | None = None, layers: int | None = None, tensors: int | None = None) -> float:
    """The projected time of a step at `rate`: bytes over a rate, layers or tensors times seconds, or the figure."""
    if rate["unit"] == "MiB/s":
        return nbytes / (rate["value"] * 2**20)
    if rate["unit"] == "s/layer":
        return layers * rate["value"]
    if rate["unit"] == "s/tensor":
        return tensors * rate["value"]
    return float(rate["value"])


def describe(rate: dict) -> str:
    """`1105 MiB/s (8 workers) on H200 node, 16 cores, NVMe; <command>; 2026-11-29; <source>`."""
    how = f" ({rate['workers']} workers)" if rate.get("workers") else ""
    return (f"{rate['value']:g} {rate['unit']}{how} on {rate['machine']}; `{rate['command']}`; {rate['date']}; "
            f"{rate['source']}")
