"""GPU and host memory over time: a background sampler writing `memory.csv` in the run directory.

Out-of-memory is the failure that costs the most on the real node (it comes hours in, after
loading 3 TB), so every step records memory as it goes and the inspection notebook plots it.
Steps 01-03 append to the same `run_dir/memory.csv`; each row is flushed as it is written, so a
step killed by the OOM killer still leaves every row up to its last second.

Columns: `wall_time` (ISO 8601, local zone), `unix_time`, `session` (one id per sampler, so a
rerun of a step is told apart from the first try), `step`, `phase`, `event` (`sample`, `start`
and `end` of a phase, `open`/`close` of a sampler, `note`), `rss_mib` (resident memory of this
process plus its children: shared pages of forked workers count once per process, so this is
an upper bound), one `gpu<i>_mib` column per GPU (device memory in use as NVML reports it, all
processes included, every GPU of the host whatever CUDA_VISIBLE_DEVICES says), and `note`.

Usage::

    with MemorySampler(run_dir, step="02_quantize", interval=0.5) as mem:
        with mem.phase("load"):
            ...
"""

from __future__ import annotations

import csv
import io
import logging
import os
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from ..atomic import write_text

log = logging.getLogger(__name__)

CSV_NAME = "memory.csv"
BASE_COLUMNS = ("wall_time", "unix_time", "session", "step", "phase", "event", "rss_mib")
MIB = 2**20


def gpu_column(i: int) -> str:
    return f"gpu{i}_mib"


def host_rss() -> int:
    """Resident bytes of this process and all its descendants (vanished children are skipped)."""
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


class _Nvml:
    """The few NVML calls the sampler makes; `count == 0` with `reason` when there is no GPU."""

    def __init__(self):
        self.handles, self.names, self.totals, self.reason = [], [], [], ""
        self._lib = None
        try:
            import pynvml
        except ImportError as e:  # nvidia-ml-py not installed
            self.reason = f"pynvml not importable ({e})"
            return
        try:
            pynvml.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound / DriverNotLoaded on GPU-less hosts
            self.reason = f"NVML unavailable ({type(e).__name__}: {e})"
            return
        self._lib = pynvml
        try:
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                self.handles.append(h)
                self.names.append(name.decode() if isinstance(name, bytes) else str(name))
                self.totals.append(pynvml.nvmlDeviceGetMemoryInfo(h).total)
        except Exception as e:
            self.reason = f"NVML device query failed ({type(e).__name__}: {e})"
            self.handles, self.names, self.totals = [], [], []
        if not self.handles and not self.reason:
            self.reason = "NVML reports no GPU"

    @property
    def count(self) -> int:
        return len(self.handles)

    def used(self) -> list[int | None]:
        out = []
        for h in self.handles:
            try:
                out.append(self._lib.nvmlDeviceGetMemoryInfo(h).used)
            except Exception:  # a GPU fallen off the bus must not kill the sampler
                out.append(None)
        return out

    def close(self) -> None:
        if self._lib is not None:
            try:
                self._lib.nvmlShutdown()
            except Exception:
                pass
            self._lib = None


def _ensure_header(path: Path, columns: list[str]) -> list[str]:
    """Make sure `path` starts with a header holding `columns`; return the header to write with.

    A file written by a host with fewer GPUs (step 01 on a CPU box, say) is rewritten once,
    atomically, with the extra GPU columns left empty in its old rows.
    """
    if not path.exists() or path.stat().st_size == 0:
        write_text(path, ",".join(columns) + "\n")
        return columns
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0] if rows else []
    missing = [c for c in columns if c not in header]
    if not missing:
        with open(path, "rb+") as f:  # a torn last line must not swallow our first row
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        return header
    merged = [c for c in header if c != "note"] + [c for c in missing if c != "note"] + ["note"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(merged)
    for r in rows[1:]:
        d = dict(zip(header, r))
        w.writerow([d.get(c, "") for c in merged])
    write_text(path, buf.getvalue())
    return merged


class MemorySampler:
    """Sample host RSS and per-GPU memory every `interval` seconds into `run_dir/memory.csv`.

    Use as a context manager; `phase(name)` marks spans (rows at start and end, and every
    sample in between carries the phase name). `peaks` holds the largest RSS and per-GPU values
    seen per phase, in MiB, for a notebook to print. `gpus` is 0 where no NVIDIA GPU is visible;
    the sampler then records RSS only and writes a note row saying why.
    """

    def __init__(self, run_dir: str | Path, step: str, interval: float = 0.5):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / CSV_NAME
        self.step = step
        self.interval = float(interval)
        self.session = f"{os.getpid()}-{int(time.time() * 1000):x}"
        self.peaks: dict[str, dict[str, float]] = {}
        self._phases: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._file = None
        self._writer = None
        self._header: list[str] = []
        self._nvml: _Nvml | None = None

    @property
    def gpus(self) -> int:
        return self._nvml.count if self._nvml else 0

    @property
    def current_phase(self) -> str:
        return self._phases[-1] if self._phases else ""

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "MemorySampler":
        if self._thread is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._nvml = _Nvml()
        columns = list(BASE_COLUMNS) + [gpu_column(i) for i in range(self.gpus)] + ["note"]
        self._header = _ensure_header(self.path, columns)
        self._file = open(self.path, "a", newline="", buffering=1)
        self._writer = csv.writer(self._file, lineterminator="\n")
        if self.gpus:
            gpus = "; ".join(f"GPU {i}: {n}, {t / 2**30:.1f} GiB"
                             for i, (n, t) in enumerate(zip(self._nvml.names, self._nvml.totals)))
            self.record("open", note=f"interval {self.interval}s; {gpus}")
        else:
            msg = f"no GPU memory recorded: {self._nvml.reason}; host RSS only"
            log.info("%s: %s", self.step, msg)
            self.record("open", note=f"interval {self.interval}s")
            self.record("note", note=msg)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"memory-sampler-{self.step}", daemon=True)
        self._thread.start()
        return self

    def stop(self, note: str = "") -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.record("close", note=note)
        with self._lock:
            self._file.close()
            self._file = self._writer = None
        self._nvml.close()

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(note=f"error: {exc_type.__name__}: {exc}" if exc_type else "")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.record("sample")
            except Exception as e:  # never let a sampling hiccup end the record silently
                log.warning("memory sampler %s: %s", self.step, e)

    # -- rows ----------------------------------------------------------------------------------
    def measure(self) -> tuple[int, list[int | None]]:
        """(host RSS bytes, [used bytes per GPU]) now."""
        return host_rss(), (self._nvml.used() if self._nvml else [])

    def record(self, event: str, note: str = "") -> dict:
        """Measure now and append one row (flushed at once); returns the row as a dict."""
        rss, gpu = self.measure()
        now = time.time()
        row = {
            "wall_time": datetime.fromtimestamp(now).astimezone().isoformat(timespec="milliseconds"),
            "unix_time": f"{now:.3f}",
            "session": self.session,
            "step": self.step,
            "phase": self.current_phase,
            "event": event,
            "rss_mib": f"{rss / MIB:.1f}",
            "note": note,
        }
        for i, b in enumerate(gpu):
            row[gpu_column(i)] = "" if b is None else f"{b / MIB:.1f}"
        self._track_peaks(row)
        with self._lock:
            if self._writer is not None:
                self._writer.writerow([row.get(c, "") for c in self._header])
                self._file.flush()
        return row

    def _track_peaks(self, row: dict) -> None:
        for key in {"", row["phase"]}:
            peak = self.peaks.setdefault(key or "(all)", {})
            for c, v in row.items():
                if (c == "rss_mib" or c.startswith("gpu")) and v != "":
                    peak[c] = max(peak.get(c, 0.0), float(v))

    @contextmanager
    def phase(self, name: str):
        """Mark a span: a `start` row, the phase name on every sample, an `end` row."""
        self._phases.append(name)
        self.record("start")
        try:
            yield self
        except BaseException as e:
            self.record("end", note=f"error: {type(e).__name__}: {e}")
            raise
        else:
            self.record("end")
        finally:
            self._phases.pop()

    def note(self, text: str) -> None:
        """Write a free-text row (e.g. 'batch size lowered to 8')."""
        self.record("note", note=text)


# -- reading and plotting -----------------------------------------------------------------------
def read_memory(run_dir_or_csv: str | Path) -> list[dict]:
    """Rows of a memory.csv as dicts, numbers parsed (`None` for an empty GPU cell)."""
    p = Path(run_dir_or_csv)
    if p.is_dir():
        p = p / CSV_NAME
    rows = []
    with open(p, newline="") as f:
        for r in csv.DictReader(f):
            if None in r or None in r.values() or not r.get("unix_time"):
                continue  # a torn line from a process killed mid-write
            try:
                out = dict(r)
                out["unix_time"] = float(r["unix_time"])
                out["rss_mib"] = float(r["rss_mib"]) if r.get("rss_mib") else None
                for c in r:
                    if c and c.startswith("gpu") and c.endswith("_mib"):
                        out[c] = float(r[c]) if r[c] not in ("", None) else None
            except ValueError:
                continue
            rows.append(out)
    return rows


def phase_spans(rows: list[dict]) -> list[tuple[str, str, float, float, str]]:
    """(session, phase, t_start, t_end, outcome) from start/end rows; an unclosed phase ends at
    the session's last row with outcome 'unfinished' (what a killed step leaves)."""
    spans, open_ = [], {}
    last = {}
    for r in rows:
        s = r["session"]
        last[s] = r["unix_time"]
        if r["event"] == "start":
            open_.setdefault(s, []).append((r["phase"], r["unix_time"]))
        elif r["event"] == "end" and open_.get(s):
            ph, t0 = open_[s].pop()
            spans.append((s, ph, t0, r["unix_time"], "error" if r.get("note", "").startswith("error") else "ok"))
    for s, stack in open_.items():
        for ph, t0 in stack:
            spans.append((s, ph, t0, last[s], "unfinished"))
    return spans


def _sessions(rows: list[dict]) -> list[tuple[str, str, list[dict]]]:
    order, by = [], {}
    for r in rows:
        if r["session"] not in by:
            order.append(r["session"])
            by[r["session"]] = []
        by[r["session"]].append(r)
    return [(s, by[s][0]["step"], by[s]) for s in order]


def _draw(ax, rows: list[dict], spans, t0: float, scale: float, unit: str, title: str) -> None:
    gpu_cols = sorted({c for r in rows for c in r if c.startswith("gpu") and c.endswith("_mib")
                       and r[c] is not None}, key=lambda c: int(c[3:-4]))
    t = [(r["unix_time"] - t0) / scale for r in rows]
    ax.plot(t, [r["rss_mib"] / 1024 if r["rss_mib"] is not None else float("nan") for r in rows],
            color="black", lw=1.5, label="host RSS")
    for c in gpu_cols:
        ax.plot(t, [r[c] / 1024 if r.get(c) is not None else float("nan") for r in rows],
                lw=1, label=f"GPU {c[3:-4]}")
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]
    for k, (_, ph, a, b, outcome) in enumerate(spans):
        color = "red" if outcome != "ok" else colors[k % len(colors)]
        ax.axvspan((a - t0) / scale, (b - t0) / scale, color=color, alpha=0.12, lw=0)
        # a number above the span, level, readable; the names in the key under the axis (long names and
        # many short phases used to be rotated 7-point labels clipped by the axes)
        ax.text(((a + b) / 2 - t0) / scale, 1.01, str(k + 1),
                transform=ax.get_xaxis_transform(), va="bottom", ha="center", fontsize=8, clip_on=False,
                color="darkred" if outcome != "ok" else "dimgray")
    ax.set_title(title, fontsize=9, loc="left", pad=14 if spans else None)
    ax.set_ylabel("GiB")
    ax.set_xlabel(f"time since start ({unit})")
    if spans:
        ax.text(0, -0.3, "\n".join(_key(spans)), transform=ax.transAxes, va="top", ha="left", fontsize=8,
                color="dimgray")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncol=min(5, 1 + len(gpu_cols)))


KEY_WIDTH = 150  # characters a line of the phase key


def _key(spans) -> list[str]:
    """The phase key under a panel: `1 load 0.5 s · 2 calibrate 30.0 s (error) · ...`, wrapped."""
    import textwrap

    items = [f"{k + 1} {ph} {b - a:.1f} s" + ("" if outcome == "ok" else f" ({outcome})")
             for k, (_, ph, a, b, outcome) in enumerate(spans)]
    return textwrap.wrap("phases: " + " · ".join(items), KEY_WIDTH, break_long_words=False) or [""]


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds > 3 * 3600:
        return 3600.0, "h"
    if seconds > 180:
        return 60.0, "min"
    return 1.0, "s"


def plot_memory(run_dir_or_csv: str | Path, ax=None, step: str | None = None):
    """Plot RSS and each GPU's memory over time with phase spans shaded and labelled.

    Without `ax`: one panel per sampler session (a step, or a retry of one) so a long pause
    between steps does not squash the curves; returns the figure. With `ax`: everything on
    that axis against time since the first row; returns the axis. `step` keeps one step's rows.
    Returns None (and plots nothing) when there are no rows.
    """
    import matplotlib.pyplot as plt

    rows = read_memory(run_dir_or_csv)
    if step is not None:
        rows = [r for r in rows if r["step"] == step]
    if not rows:
        return None
    spans = phase_spans(rows)
    if ax is not None:
        t0 = rows[0]["unix_time"]
        scale, unit = _time_unit(rows[-1]["unix_time"] - t0)
        _draw(ax, rows, spans, t0, scale, unit, step or "memory")
        return ax
    sessions = _sessions(rows)
    keys = [len(_key([s for s in spans if s[0] == sess])) if any(s[0] == sess for s in spans) else 0
            for sess, _, _ in sessions]
    fig, axes = plt.subplots(len(sessions), 1, figsize=(10, sum(3.2 + 0.18 * k for k in keys)), squeeze=False,
                             gridspec_kw={"height_ratios": [3.2 + 0.18 * k for k in keys]})
    for a, (sess, st, srows) in zip(axes[:, 0], sessions):
        t0 = srows[0]["unix_time"]
        scale, unit = _time_unit(srows[-1]["unix_time"] - t0)
        started = srows[0]["wall_time"][:19].replace("T", " ")
        peak = max((r["rss_mib"] or 0) for r in srows) / 1024
        _draw(a, srows, [s for s in spans if s[0] == sess], t0, scale, unit,
              f"{st} (started {started}; peak RSS {peak:.2f} GiB)")
    fig.tight_layout()
    return fig
