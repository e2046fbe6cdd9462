"""Running a test's worker function in one process per rank (gloo or NCCL), bounded in time.

A worker is ``worker(rank, world, port, backend, out_dir, what)``: it joins the process
group at ``tcp://127.0.0.1:port`` and writes the list of its failures as JSON to
``out_dir/rank{rank}.json`` (:func:`run_rank` does all but the checks themselves).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
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


def run_rank(rank: int, world: int, port: int, backend: str, out_dir: str,
             checks: Callable[[torch.device, list], None]) -> None:
    """A worker's frame: join the group (NCCL: this rank's GPU, NVLink multicast off; gloo: the
    CPU), run ``checks(device, fail)`` (which appends what went wrong to ``fail``), leave the
    group, write the failures (an exception's traceback among them) and exit the process."""
    fail: list[str] = []
    try:
        if backend == "nccl":
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
            torch.cuda.set_device(rank)
            device = torch.device("cuda", rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
        checks(device, fail)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        fail.append(traceback.format_exc())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(fail))
    # gloo (torch 2.13, CPU) sometimes aborts in a static destructor at interpreter exit,
    # after the group is torn down; the results are written, so skip the destructors.
    os._exit(0)
