"""A step's JSON record in the run directory and its timed phases.

`StepRecord` is rewritten atomically as the step goes: `running` when it starts, then `done` or
`failed` (with the error and the end of its traceback), so a reader never sees half a record and a
killed step is told apart from a finished one. `Phases` times named spans of a step, prints them,
and marks them in the memory timeline.
"""

from __future__ import annotations

import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path

from ..atomic import write_json


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class StepRecord:
    """`<run_dir>/<name>`: a step's record, atomic at every update; a context manager that marks
    the record failed (and re-raises) when its block raises."""

    def __init__(self, path: str | Path, kind: str, **facts):
        self.path = Path(path)
        self.data = {"kind": kind, "status": "running", "started": now(), **facts}
        self.save()

    def update(self, **kw) -> None:
        self.data.update(kw)
        self.save()

    def done(self, **kw) -> dict:
        self.update(status="done", finished=now(), **kw)
        return self.data

    def failed(self, exc: BaseException, **kw) -> None:
        self.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc()[-4000:], **kw)

    def save(self) -> None:
        write_json(self.path, self.data)

    def __enter__(self) -> "StepRecord":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and self.data.get("status") == "running":
            self.failed(exc)


class Phases:
    """Named, timed spans of a step: printed, kept in `timings` (name -> seconds), and marked in
    the memory timeline when a `MemorySampler` is given."""

    def __init__(self, memory=None, timings: dict | None = None):
        self.memory = memory
        self.timings = {} if timings is None else timings

    @contextmanager
    def __call__(self, name: str):
        t0 = time.time()
        print(f"[quantbook] phase {name} ...", flush=True)
        with self.memory.phase(name) if self.memory is not None else nullcontext():
            yield
        self.timings[name] = round(time.time() - t0, 3)
        print(f"[quantbook] phase {name} done in {self.timings[name]:.1f} s", flush=True)
