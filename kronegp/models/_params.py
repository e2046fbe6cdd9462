"""Hyperparameter views shared by every grid GP (single-device and sharded)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from kronegp.kernels.stationary import stationary_factors


class GridHyperparameters:
    """Derived views of a grid GP's parameters.

    The class using it holds ``ndim``, ``axis_0 … axis_{d-1}`` buffers, ``kernels`` (one
    per dimension), ``raw_outputscale`` with ``outputscale_constraint``, ``raw_noise`` with
    ``noise_constraint``, ``learn_noise``, ``observed`` (``None`` on a full grid) and
    ``cell_noise`` (``None`` without per-cell noise). On a sharded grid every one of these
    is replicated: the axes are whole on every rank.
    """

    @property
    def path(self) -> str:
        """``"exact"`` on a full grid with one noise level, ``"cg"`` otherwise."""
        return "exact" if self.observed is None and self.cell_noise is None else "cg"

    @property
    def axes(self) -> list[Tensor]:
        return [getattr(self, f"axis_{k}") for k in range(self.ndim)]

    @property
    def outputscale(self) -> Tensor:
        """``s²`` in model (standardised) units."""
        return self.outputscale_constraint.transform(self.raw_outputscale)

    @property
    def noise(self) -> Optional[Tensor]:
        """Learned homoskedastic ``σ²`` in model units (``None`` with per-cell noise)."""
        return self.noise_constraint.transform(self.raw_noise) if self.learn_noise else None

    def _factors(self) -> list[Tensor]:
        """``K_k = k_k(axis_k, axis_k)``, symmetrised (the eigendecomposition assumes it).

        Plain Matérn and RBF kernels with one lengthscale are computed in one fused step
        from the exact axis distances, all axes of one kind and size together
        (:func:`kronegp.kernels.stationary.stationary_factors`).
        Any other kernel without ``active_dims`` is evaluated through its ``forward`` on the
        ``(n_k, 1)`` axis: what ``Kernel.__call__`` ends up computing there, without the
        lazy kernel tensor and its checks (~0.2 ms of host time per factor on a GPU).
        """
        out = []
        axes = self.axes
        for kern, ax, fast in zip(self.kernels, axes, stationary_factors(self.kernels, axes)):
            if fast is not None:  # exactly symmetric already
                out.append(fast)
                continue
            x = ax.unsqueeze(-1)
            if getattr(kern, "active_dims", None) is None:
                mat = kern.forward(x, x)
                mat = mat if isinstance(mat, Tensor) else mat.to_dense()
            else:
                mat = kern(x, x).to_dense()
            out.append(0.5 * (mat + mat.mT))
        return out
