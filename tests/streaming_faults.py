"""Faults injected into the streaming driver's processes (`gpus: N`), for tests: each function here
is a `streaming_driver.PROCESS_TARGET` that patches one process, then runs the real one."""

from __future__ import annotations


def calibrate_blocks_rank0_fails(job: dict, rank: int, world: int) -> dict:
    """Process 0's background save of layers.1 raises; every other process runs as usual (and goes on
    into the next block's collectives, where it waits for process 0)."""
    from quantbook.calibrate import block_checkpoint, streaming_driver

    if rank == 0:
        write = block_checkpoint.Saver._write

        def failing(self, finished, acts, ready, gate=None):
            if finished[-1]["block"] == "layers.1":
                raise OSError("injected: rank 0 cannot save layers.1")
            return write(self, finished, acts, ready, gate)

        block_checkpoint.Saver._write = failing
    return streaming_driver.calibrate_blocks(job, rank, world)
