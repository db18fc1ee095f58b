"""Every refusal a user can cause is a `QuantbookError`; anything else is a bug.

The CLI catches `QuantbookError` alone: it prints the message (which names the tensor, shard,
flag or file, and what to do) without a traceback and exits 2. Any other exception keeps its
traceback, because it means the code is wrong, not the input. Notebooks let these propagate so
papermill marks the cell and `quantbook run` names it.
"""

from __future__ import annotations


class QuantbookError(Exception):
    """A refusal with a message a user can act on."""


class ParamsError(QuantbookError):
    """A params file or setting that names an unknown section, key, flag or value."""


class FormatError(QuantbookError):
    """A checkpoint that does not follow the V4 format; the message names tensor and shard."""


class DestinationError(QuantbookError):
    """An output directory that is the source, holds something else, or lacks the disk space."""


class LayoutError(FormatError):
    """The serving layout cannot be written from these inputs; the message says which and why."""


class CalibDataError(QuantbookError):
    """Calibration text that could not be obtained or is unusable."""


class QuantizeError(QuantbookError):
    """A calibration run that cannot start or cannot finish (the message names the cause)."""


class PatchError(QuantbookError):
    """An installed modelopt the runtime patches were not tested with, or that lacks a patched function."""


class StateError(QuantbookError):
    """A calibrated state or checkpoint that is missing, incomplete, corrupt or from another model."""


class StaleCheckpoint(StateError):
    """A per-layer checkpoint written by another model, data, settings or versions."""


class AmaxError(QuantbookError):
    """Amax values that cannot be repaired (no calibrated activation at all, broken weights)."""


class RecoverError(QuantbookError):
    """Nothing usable to export from, or an export that cannot be written; the message says why."""


class VerifyFailed(QuantbookError):
    """An export that failed `quantbook verify`; the message names the failed checks."""


class FidelityFailed(QuantbookError):
    """An export that failed the fidelity gate (`quantbook eval`); the message names the worst blocks."""


class RunError(QuantbookError):
    """A chain run that cannot start: a locked run directory, no kernel for this interpreter."""


class StepFailed(QuantbookError):
    """A step's notebook raised; the message names the notebook and the cell."""

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record
