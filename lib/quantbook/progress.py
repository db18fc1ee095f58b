"""Progress bars that read right wherever they end up.

Interactively (a terminal, a live notebook) this is `tqdm.auto`. Inside `quantbook run` (papermill),
a notebook widget bar is saved with its first frame only: the executed notebook and its HTML copy
showed `v4-serving: 0%| 0.00/6.88M` for a step that had finished. There the runner sets
`QUANTBOOK_PROGRESS=lines` for the kernel, and a bar is plain text, one line per update at most every
`LINE_INTERVAL_S` seconds plus its final state: readable in the record, in run.log and on the node's
terminal.
"""

from __future__ import annotations

import os
import sys

ENV = "QUANTBOOK_PROGRESS"
LINE_INTERVAL_S = 30.0


class _Lines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> int:
        lines = [ln.rstrip() for ln in s.replace("\r", "\n").split("\n")]
        text = "".join(ln + "\n" for ln in lines if ln)
        if text:
            self.stream.write(text)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def tqdm(*args, **kwargs):
    """`tqdm.auto.tqdm(*args, **kwargs)`, or plain text lines under `QUANTBOOK_PROGRESS=lines`."""
    if os.environ.get(ENV) == "lines":
        from tqdm.std import tqdm as text_bar

        kwargs["file"] = _Lines(kwargs.get("file") or sys.stderr)
        kwargs.setdefault("mininterval", LINE_INTERVAL_S)
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("ncols", 100)
        return text_bar(*args, **kwargs)
    from tqdm.auto import tqdm as auto_bar

    return auto_bar(*args, **kwargs)
