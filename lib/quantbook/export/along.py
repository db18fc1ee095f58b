"""Step 03's v4-serving export written during step 02's streaming pass (`quantize.export_along`).

A layer's shard depends on the release and on that layer's amax only (its experts' input amax, and
with `cast_mxfp4_to_nvfp4: false` their weight amax), unless an amax must be filled: the fill is the
largest of the whole model, known at the end. So while the streaming driver calibrates, each shard is
written as soon as its layers' amax are final, by the same writer step 03 uses (export.writer),
in background threads (`export.workers` shards at a time), while the next blocks are read and calibrated;
a shard whose release tensors are the block's is written from the pass's read buffer, which it holds
until written (the release is read once):

    at the start    the shards outside every block (embedding, head), and whatever an earlier,
                    killed pass recorded and still verifies is kept
    each block      its amax (reduced over processes) are final: every shard whose layers are all
                    final and need no fill is written (`.partial`, fsync, rename, then recorded in
                    `quantbook-layout.json` with the digest of the amax rows it used, and verify's
                    check 7 numbers of the expert tensors it checks, computed on the bytes written
                    while they are in memory: verify takes them instead of reading the export again)
    the end         `layout.write_serving_layout` with the run's `amax.safetensors`, the call step 03
                    makes: it adopts each recorded shard whose amax rows are its own (layout.adopt_along),
                    writes what is left (a shard that needed a fill, one a kill cut short), then the
                    index and configs

The export is byte for byte step 03's from the same amax (tests/test_along.py); step 03 then finds it
complete, verifies it and runs the gate.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .. import atomic
from ..release.resume import check_owner, verified
from . import layout, writer


class Along:
    """The export directory being written while blocks are calibrated (one per run, in the process
    that holds the reduced amax)."""

    def __init__(self, e: dict, progress: bool = True, pass_blocks: list[str] = ()):
        """`pass_blocks`: the blocks this pass reads from now on; a shard made only of one of their
        tensors (the MTP block's, its experts as released) waits for it, to be written from its buffer."""
        self.e, self.progress = e, progress
        self.src, self.dst = Path(e["source"]).resolve(), Path(e["dir"]).resolve()
        rp, self.reader = layout.open_release(self.src, self.dst, e["cast_mxfp4_to_nvfp4"], e["mtp_experts"])
        self.config, self.options = rp.config, layout.layout_options(e["cast_mxfp4_to_nvfp4"], e["mtp_experts"])
        self.jobs, _ = layout.shard_jobs(self.reader, e["mtp_experts"])
        self.layers = {j.name: layout.shard_layers(j) for j in self.jobs}
        self.names = {j.name: _release_names(j) for j in self.jobs}  # the release tensors each shard reads
        self.waits = {j.name: set(self.layers[j.name]) | _read_by_the_pass(self.names[j.name], pass_blocks)
                      for j in self.jobs}
        self.main = self.config["num_hidden_layers"]
        self.check = checked_in_pass(self.config, e)
        self.fresh = {"kind": "quantbook.layout", "layout": layout.LAYOUT, "source": str(self.src),
                      "source_id": rp.source_id, "options": self.options, "along": True, "complete": False}
        self.manifest = self._open()
        self.ea = layout.ExpertAmax()  # the final layers' expert amax, parsed once each
        self.final: set[tuple[str, int]] = set()
        self.pending = list(self.jobs)
        self.timeline: list[dict] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, e["workers"]), thread_name_prefix="quantbook-along")
        self._futures: list[Future] = []
        self._submit_ready()

    def _open(self) -> dict:
        """The manifest to carry on from: a killed pass's (same release and options), else a fresh one.
        Anything else in the directory is refused, with step 03's reasons."""
        def foreign(m):
            if not m.get("along"):
                return ("a finished export (step 03's, or an earlier run's pass): this pass calibrates anew, so its "
                        "amax may differ; remove it or set export.dir elsewhere")
            if m.get("source_id") != self.fresh["source_id"] or m.get("options") != self.options:
                return "another release's or other options' partial export"

        self.dst.mkdir(parents=True, exist_ok=True)
        m = check_owner(self.src, self.dst, layout.MANIFEST, foreign, what="export directory")
        for stale in [*self.dst.glob("*.partial"), *self.dst.glob(atomic.TEMP_GLOB)]:  # a killed pass's
            stale.unlink()
        m = m or {**self.fresh, "shards": {}}
        m["shards"] = {n: r for n, r in m.get("shards", {}).items() if verified(self.dst, n, r)}
        atomic.write_json(self.dst / layout.MANIFEST, m)
        return m

    def block_done(self, amax: dict, layers: list[tuple[str, int]], raw: dict | None = None, lease=None) -> None:
        """These layers' amax are final (snapshot names, as `amax.safetensors` holds them): write every
        shard they complete, in the background. `raw`: the block's release tensors, still in the pass's
        read buffer: a shard whose release tensors are all there is written from them (the release is
        not read again), holding `lease` (`blocks.Lease`) until it is written."""
        for f in self._futures:  # a shard that failed stops the pass at the next block, not at the end
            if f.done() and f.exception() is not None:
                raise f.exception()
        new = layout.expert_amax(amax, self.config, self.e["mtp_experts"])
        self.ea.weight.update(new.weight)
        self.ea.input.update(new.input)
        self.final.update(layers)
        self._submit_ready(raw, lease)

    def _submit_ready(self, raw: dict | None = None, lease=None) -> None:
        ready = [j for j in self.pending if self.waits[j.name] <= self.final]
        in_memory = set(raw or ())
        for job in ready:
            table = self._rows(self.ea, job)
            self.pending.remove(job)
            if table is None:
                continue
            from_block = bool(in_memory) and self.names[job.name] <= in_memory
            source = writer.BlockSource(self.reader, raw) if from_block else writer.FileSource(self.reader)
            held = from_block and lease is not None
            if held:
                lease.hold()
            future = self._pool.submit(self._write, job, table, source)
            if held:
                future.add_done_callback(lease.done)
            self._futures.append(future)

    def _rows(self, ea, job):
        """A table holding this shard's layers' rows (the rest zero), or None when one needs a fill."""
        import torch

        e, E = self.e, self.config["n_routed_experts"]
        mtp = layout.mtp_layers(self.config) if e["mtp_experts"] == "nvfp4" else 0
        table = torch.zeros(self.main + mtp, E, 4, dtype=torch.float32)
        for block, i in self.layers[job.name]:
            rows = layout.layer_rows_alone(ea, block, i, self.config, self.reader,
                                           use_weight_amax=not e["cast_mxfp4_to_nvfp4"])
            if rows is None:
                return None
            table[i if block == "layers" else self.main + i] = rows
        return table

    def _settings(self, table, check: bool = True) -> writer.Settings:
        """`check`: compute verify's numbers of `self.check`'s projections on the bytes (for a shard written)."""
        resolved = layout.Resolved(table, [], {}, self.main)
        carried = lambda prefix: self.options["cast_mxfp4_to_nvfp4"] or layout.expert_name(prefix).mtp  # noqa: E731
        check = self.check if check else frozenset()
        return writer.Settings(carried, resolved.amax, "cpu", threads=check_threads(os.cpu_count()) if check else None,
                               check=check)

    def block_tensors(self, raw: dict) -> tuple[dict | None, str | None]:
        """(the export's tensors of the block whose release tensors `raw` holds, computed in memory by
        the writer's own code: the fidelity gate's candidate; None and why when they are not known
        yet: a shard that needs a fill, or one that holds more than this block)."""
        names = set(raw)
        jobs = [j for j in self.jobs if self.names[j.name] & names]
        out = {}
        for job in jobs:
            if not self.names[job.name] <= names:
                return None, f"shard {job.name} holds tensors of more than one block"
            if not set(self.layers[job.name]) <= self.final:
                return None, f"shard {job.name}: the amax of {sorted(set(self.layers[job.name]) - self.final)} are not final"
            table = self._rows(self.ea, job)
            if table is None:
                return None, (f"shard {job.name}: an expert input amax of {self.layers[job.name]} must be filled with "
                              "the whole model's largest, known only at the end")
            out.update(writer.shard_tensors(job.entries, job.ops, writer.BlockSource(self.reader, raw),
                                            self._settings(table, check=False)))
        return out, None

    def _write(self, job, table, source) -> None:
        digest = layout.rows_digest(table, self.main, self.layers[job.name])
        rec = self.manifest["shards"].get(job.name)
        if rec and rec.get("amax_rows") == digest:
            return  # a killed pass wrote it from the same amax, and it still verifies
        s = self._settings(table)
        t0 = time.perf_counter()
        rec = writer.write_shard(self.dst / job.name, job.entries, job.ops, source, s)
        check_s = rec.pop("numbers_s", 0.0)
        with self._lock:
            self.manifest["shards"][job.name] = {**rec, "amax_rows": digest}
            atomic.write_json(self.dst / layout.MANIFEST, self.manifest)
            self.timeline.append({"shard": job.name, "bytes": rec["size"], "write_s": round(time.perf_counter() - t0, 3),
                                  "checked": len(rec.get("numbers", ())), "check_s": check_s,
                                  "layers": [f"{b}.{i}" for b, i in self.layers[job.name]],
                                  "from": "the pass's read buffer" if isinstance(source, writer.BlockSource)
                                  else "the release's files"})

    def wait(self) -> float:
        """Block until every submitted shard is written (raising a writer's error); seconds waited."""
        t0 = time.perf_counter()
        for f in self._futures:
            f.result()
        self._futures = []
        return time.perf_counter() - t0

    def close(self) -> None:
        """Stop: shards being written finish (complete and recorded), queued ones are dropped (their
        read buffers given back: a cancelled future runs its done-callbacks)."""
        for f in self._futures:
            f.cancel()
        self._pool.shutdown(wait=True)


def check_threads(cpus: int | None) -> int:
    """Compute threads per shard when the pass checks its numbers (~0.25 s a Pro expert tensor): a shard
    holds its block's read buffer until written, so its checks run in parallel, not one after another."""
    return max(1, min(8, (cpus or 2) // 2))


def checked_in_pass(config: dict, e: dict) -> frozenset[str]:
    """The projections verify's check 7 computes for these export settings (`export.verify_sample`):
    the pass computes their numbers on the bytes it writes, so verify does not read them again."""
    from .verify import converted_prefixes, sampled

    return frozenset(sampled(converted_prefixes(config, e["mtp_experts"]), e.get("verify_sample")))


def _read_by_the_pass(names: set[str], pass_blocks) -> set[tuple[str, int]]:
    """{(kind, index)} of the pass's block that holds every one of these release tensors, or nothing."""
    from ..release.format import split_block

    owners = {split_block(n)[:2] for n in names}
    if len(owners) != 1:
        return set()
    kind, index = owners.pop()
    return {(kind, int(index))} if kind is not None and f"{kind}.{index}" in pass_blocks else set()


def _release_names(job) -> set[str]:
    """The release tensors a shard job reads: its copied tensors and its experts' `.weight` / `.scale`."""
    out = set()
    for kind, what in job.ops:
        out |= {what.name} if kind == "copy" else {f"{what}.weight", f"{what}.scale"}
    return out


__all__ = ["Along", "check_threads", "checked_in_pass"]
