"""The memory timeline: rows flushed as sampled, phases marked, RSS real, NVML wired, plots drawn."""

import csv
import subprocess
import sys
import textwrap
import time
import types

import matplotlib
import pytest

matplotlib.use("Agg")

from quantbook.records import memory
from quantbook.records.memory import MemorySampler, phase_spans, plot_memory, read_memory


def _fake_pynvml(used_mib=None, fail_init=False):
    """A test double of pynvml's interface (wiring only: no claim about real GPUs)."""
    used_mib = used_mib or []
    m = types.ModuleType("pynvml")
    state = {"shutdown": 0, "calls": 0}

    class NVMLError(Exception):
        pass

    def init():
        if fail_init:
            raise NVMLError("NVML Shared Library Not Found")

    def info(h):
        state["calls"] += 1
        return types.SimpleNamespace(used=used_mib[h] * 2**20, total=80 * 2**30)

    m.NVMLError = NVMLError
    m.nvmlInit = init
    m.nvmlShutdown = lambda: state.__setitem__("shutdown", state["shutdown"] + 1)
    m.nvmlDeviceGetCount = lambda: len(used_mib)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetName = lambda h: b"Fake GPU"
    m.nvmlDeviceGetMemoryInfo = info
    m.state = state
    return m


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(fail_init=True))


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_rss_only_rows_phases_and_header_once(tmp_path, no_gpu):
    with MemorySampler(tmp_path, step="01_dequant", interval=0.05) as mem:
        assert mem.gpus == 0
        with mem.phase("load"):
            time.sleep(0.3)
            # rows are on disk while the step is still running
            assert any(r[5] == "sample" for r in _rows(tmp_path / "memory.csv")[1:])
        with mem.phase("write"):
            time.sleep(0.1)
    with MemorySampler(tmp_path, step="02_quantize", interval=0.05) as mem2:
        with mem2.phase("calibrate"):
            time.sleep(0.1)
    raw = _rows(tmp_path / "memory.csv")
    assert raw[0] == list(memory.BASE_COLUMNS) + ["note"]
    assert sum(r == raw[0] for r in raw) == 1  # header written once
    rows = read_memory(tmp_path)
    notes = [r["note"] for r in rows if r["event"] == "note"]
    assert any("host RSS only" in n and "NVML unavailable" in n for n in notes)
    assert {r["step"] for r in rows} == {"01_dequant", "02_quantize"}
    assert len({r["session"] for r in rows}) == 2
    load = [r for r in rows if r["phase"] == "load"]
    assert load[0]["event"] == "start" and load[-1]["event"] == "end"
    assert sum(r["event"] == "sample" for r in load) >= 2
    assert all(r["rss_mib"] > 10 for r in rows)
    spans = phase_spans(rows)
    assert [(s[1], s[4]) for s in spans] == [("load", "ok"), ("write", "ok"), ("calibrate", "ok")]
    assert spans[0][3] - spans[0][2] >= 0.3


def test_rss_sees_allocation_and_children(tmp_path, no_gpu):
    with MemorySampler(tmp_path, step="s", interval=0.05) as mem:
        with mem.phase("idle"):
            pass
        with mem.phase("alloc"):
            block = bytearray(300 * 2**20)
            block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page
            mem.record("sample")
            del block
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
            import sys, time
            b = bytearray(200 * 2**20); b[::4096] = b"y" * len(b[::4096])
            print("ready", flush=True); time.sleep(30)""")], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            with mem.phase("child"):
                mem.record("sample")
        finally:
            child.kill()
            child.wait()
    assert mem.peaks["alloc"]["rss_mib"] - mem.peaks["idle"]["rss_mib"] > 250
    assert mem.peaks["child"]["rss_mib"] - mem.peaks["idle"]["rss_mib"] > 150


def test_error_in_phase_is_recorded(tmp_path, no_gpu):
    with pytest.raises(RuntimeError):
        with MemorySampler(tmp_path, step="s", interval=1) as mem:
            with mem.phase("export"):
                raise RuntimeError("disk full")
    rows = read_memory(tmp_path)
    end = [r for r in rows if r["event"] == "end"][0]
    assert end["phase"] == "export" and end["note"] == "error: RuntimeError: disk full"
    assert rows[-1]["event"] == "close" and "disk full" in rows[-1]["note"]
    assert phase_spans(rows)[0][4] == "error"


def test_killed_step_leaves_rows_and_unfinished_phase(tmp_path):
    code = textwrap.dedent(f"""
        import os, time, sys
        sys.modules['pynvml'] = None  # import fails -> RSS only
        from quantbook.records.memory import MemorySampler
        mem = MemorySampler({str(tmp_path)!r}, step="02_quantize", interval=0.05).start()
        with mem.phase("calibrate"):
            time.sleep(0.4)
            os._exit(9)  # no cleanup, as the OOM killer would leave it
    """)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    rows = read_memory(tmp_path)
    assert sum(r["event"] == "sample" for r in rows) >= 3
    assert any("pynvml not importable" in r["note"] for r in rows)
    (span,) = phase_spans(rows)
    assert span[1:2] == ("calibrate",) and span[4] == "unfinished"
    fig = plot_memory(tmp_path)
    assert len(fig.axes) == 1


def test_nvml_wiring_and_header_widening(tmp_path, monkeypatch, no_gpu):
    # first a CPU-only step, then a step on a (fake) 2-GPU host appends to the same file
    with MemorySampler(tmp_path, step="01_dequant", interval=10):
        pass
    fake = _fake_pynvml(used_mib=[1000.0, 2500.0])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with MemorySampler(tmp_path, step="02_quantize", interval=0.05) as mem:
        assert mem.gpus == 2
        with mem.phase("load"):
            time.sleep(0.15)
    assert fake.state["shutdown"] == 1 and fake.state["calls"] >= 2 + 2 * 3
    raw = _rows(tmp_path / "memory.csv")
    assert raw[0] == list(memory.BASE_COLUMNS) + ["gpu0_mib", "gpu1_mib", "note"]
    assert sum(r == raw[0] for r in raw) == 1
    rows = read_memory(tmp_path)
    old = [r for r in rows if r["step"] == "01_dequant"]
    new = [r for r in rows if r["step"] == "02_quantize"]
    assert old and all(r["gpu0_mib"] is None for r in old)
    assert all(r["gpu0_mib"] == 1000.0 and r["gpu1_mib"] == 2500.0 for r in new)
    assert "GPU 1: Fake GPU, 80.0 GiB" in new[0]["note"]
    assert mem.peaks["load"]["gpu1_mib"] == 2500.0


def test_plot_memory_panels_axis_and_torn_line(tmp_path, no_gpu):
    import matplotlib.pyplot as plt

    for step in ("01_dequant", "02_quantize"):
        with MemorySampler(tmp_path, step=step, interval=0.02) as mem:
            with mem.phase("a"):
                time.sleep(0.05)
            with mem.phase("b"):
                time.sleep(0.05)
    with open(tmp_path / "memory.csv", "a") as f:
        f.write("2026-01-01T00:00:00,17")  # half a row: what a kill mid-write leaves
    fig = plot_memory(tmp_path)
    assert len(fig.axes) == 2
    titles = [a.get_title(loc="left") for a in fig.axes]
    assert titles[0].startswith("01_dequant") and titles[1].startswith("02_quantize")
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels[:2] == ["1", "2"] and labels[2].startswith("phases: 1 a ") and " · 2 b " in labels[2]
    assert fig.axes[0].get_legend().get_texts()[0].get_text() == "host RSS"
    # item 7 of issue 17: the phase labels were 7-point, rotated and clipped; now level, 8 points, inside the figure
    fig.canvas.draw()
    box = fig.bbox
    for a in fig.axes:
        for t in a.texts:
            e = t.get_window_extent()
            assert t.get_rotation() == 0 and t.get_fontsize() >= 8
            assert box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1, t.get_text()
    fig2, ax = plt.subplots()
    assert plot_memory(tmp_path / "memory.csv", ax=ax, step="02_quantize") is ax
    assert len(ax.lines) == 1 and [t.get_text() for t in ax.texts][:2] == ["1", "2"]
    assert plot_memory(tmp_path, step="03_export") is None
    plt.close("all")


def test_append_after_torn_line(tmp_path, no_gpu):
    with MemorySampler(tmp_path, step="01_dequant", interval=10):
        pass
    with open(tmp_path / "memory.csv", "a") as f:
        f.write("2026-01-01T00:00:00,17")
    with MemorySampler(tmp_path, step="02_quantize", interval=10):
        pass
    rows = read_memory(tmp_path)
    assert [r["step"] for r in rows].count("02_quantize") == 3  # open, note, close
