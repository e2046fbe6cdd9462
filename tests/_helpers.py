"""Helpers shared by the test modules (imported as ``_helpers``: pytest puts this folder on
``sys.path``, and spawned worker processes inherit it)."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a − b‖ / ‖b‖`` in float64 (a zero ``b`` gives ``‖a‖ / 1e-300``, never a division by 0)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def dense_kron(mats: list[torch.Tensor]) -> torch.Tensor:
    """``M_1 ⊗ … ⊗ M_N`` with ``torch.kron`` (batch dimensions broadcast, looped over): a
    reference independent of kronegp's own code."""
    batch = torch.broadcast_shapes(*(m.shape[:-2] for m in mats))
    if not batch:
        out = mats[0]
        for m in mats[1:]:
            out = torch.kron(out, m)
        return out
    flat = [m.expand(*batch, *m.shape[-2:]).reshape(-1, *m.shape[-2:]) for m in mats]
    blocks = [dense_kron([f[b] for f in flat]) for b in range(flat[0].shape[0])]
    return torch.stack(blocks).reshape(*batch, *blocks[0].shape)


def benchmark_module(name: str):
    """A script of ``benchmarks/`` imported as a module (its own imports resolved there)."""
    import importlib
    import sys
    from pathlib import Path

    where = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, where)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(where)
