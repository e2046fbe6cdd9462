"""Running a test's worker function in one process per rank (gloo or NCCL), bounded in time.

A worker is ``worker(rank, world, port, backend, out_dir, what)``: it joins the process
group at ``tcp://127.0.0.1:port`` and writes the list of its failures as JSON to
``out_dir/rank{rank}.json``.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(worker, world: int, backend: str, out_dir: Path, what, timeout: float) -> None:
    """Start ``world`` workers, wait at most ``timeout`` s, and fail with every rank's failures."""
    ctx = mp.start_processes(worker, args=(world, free_port(), backend, str(out_dir), what),
                             nprocs=world, join=False, start_method="spawn")
    start = time.monotonic()
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() - start > timeout:
                pytest.fail(f"distributed workers did not finish within {timeout:.0f} s")
    finally:
        for proc in ctx.processes:  # only the processes this test started
            if proc.is_alive():
                proc.kill()
    failures = []
    for rank in range(world):
        failures += [f"rank {rank}: {f}" for f in json.loads(Path(out_dir, f"rank{rank}.json").read_text())]
    assert not failures, "\n".join(failures)
