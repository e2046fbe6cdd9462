"""Hyperparameter views shared by every grid GP (single-device and sharded)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import gpytorch
import torch
from gpytorch.constraints import GreaterThan, Positive
from torch import Tensor

from kronegp.kernels.stationary import stationary_factors


class GridHyperparameters:
    """Derived views of a grid GP's parameters.

    The class using it holds ``ndim``, ``axis_0 … axis_{d-1}`` buffers, ``kernels`` (one
    per dimension), ``raw_outputscale`` with ``outputscale_constraint``, ``raw_noise`` with
    ``noise_constraint``, ``learn_noise``, ``observed`` (``None`` on a full grid) and
    ``cell_noise`` (``None`` without per-cell noise), ``mean_module`` with ``user_mean``,
    and ``shift``/``scale`` (the model fits ``(y − shift) / scale``). On a sharded grid every
    one of these is replicated: the axes are whole on every rank.
    """

    #: what :meth:`hyperparameters` reports where a model has no such number to set
    _NOT_A_VALUE = {"noise": "per-cell (fixed)", "mean": "user"}

    def _init_hyperparameters(self, var0: float, mean0: float, learn_noise: bool, mean: Any,
                              dtype: torch.dtype, device: torch.device) -> None:
        """Create the output scale (``s² = var0``), the noise (``σ² = var0 / 10``, learned unless
        per-cell noise is given) and the mean (``mean``, a ``gpytorch.means.Mean``, or a learned
        constant ``mean0``), in model units."""
        self.outputscale_constraint = Positive()
        self.raw_outputscale = torch.nn.Parameter(
            self.outputscale_constraint.inverse_transform(torch.tensor(var0, dtype=dtype, device=device))
        )
        self.learn_noise = learn_noise
        if learn_noise:
            self.noise_constraint = GreaterThan(1e-6)
            self.raw_noise = torch.nn.Parameter(
                self.noise_constraint.inverse_transform(torch.tensor(0.1 * var0, dtype=dtype, device=device))
            )
        self.user_mean = mean is not None
        if mean is None:
            mean = gpytorch.means.ConstantMean()
            with torch.no_grad():
                mean.constant.fill_(mean0)
        elif not isinstance(mean, gpytorch.means.Mean):
            raise TypeError(f"mean must be a gpytorch.means.Mean or None, got {type(mean).__name__}")
        self.mean_module = mean.to(dtype=dtype, device=device)

    def set_hyperparameters(self, hyperparameters: Optional[Mapping[str, Any]] = None, /, **values: Any) -> None:
        """Set hyperparameters in data units: the inverse of :meth:`hyperparameters`.

        ``gp.set_hyperparameters(other.hyperparameters())`` gives ``gp`` the hyperparameters
        of ``other`` (same kernels, other data: a warm start), and
        ``gp.set_hyperparameters(lengthscales=[2.0, 0.5], noise=0.01)`` sets some from
        physical knowledge, leaving the others as they are. Values pass from data units to
        the model's standardised units (``θ / scale²`` for variances, ``(μ − shift) / scale``
        for the mean) and through each parameter's constraint; reading them back with
        :meth:`hyperparameters` returns them (to rounding).

        Args (a mapping, keyword arguments, or both; keywords win):
            lengthscales: one entry per dimension, in that axis's units: a number, a list
                for a kernel with several lengthscales, or ``None`` to keep it.
            outputscale: the variance ``s²`` of ``f`` (data units squared), positive.
            noise: the homoskedastic noise variance (data units squared), above the model's
                floor (1e-6 in standardised units). A model with per-cell noise has none to
                set; the string ``"per-cell (fixed)"`` that such a model reports is skipped.
            mean: the constant mean (data units); ``"user"`` (a user mean) is skipped.
            kernels: per dimension, ``{parameter: value}`` as :meth:`hyperparameters` lists
                them (e.g. ``{"lengthscale": 2.0, "period_length": 1.0}``), in the
                parameter's own units; ``None`` or a missing name keeps a parameter.
            path: ignored (it follows from the data, not from the hyperparameters).
        """
        if hyperparameters is not None and not isinstance(hyperparameters, Mapping):
            raise TypeError(f"hyperparameters must be a dict like hyperparameters() returns, got {type(hyperparameters).__name__}")
        merged = dict(hyperparameters or {})
        merged.update(values)
        known = ("lengthscales", "outputscale", "noise", "mean", "kernels", "path")
        unknown = sorted(set(merged) - set(known))
        if unknown:
            raise TypeError(f"set_hyperparameters: unknown hyperparameter(s) {unknown}; expected some of {list(known)}")
        for key, skip in self._NOT_A_VALUE.items():
            if isinstance(merged.get(key), str) and merged[key] == skip:
                del merged[key]
        like = self.raw_outputscale
        with torch.no_grad():
            if merged.get("kernels") is not None:
                self._set_kernel_parameters(merged["kernels"])
            if merged.get("lengthscales") is not None:
                self._set_lengthscales(merged["lengthscales"])
            if merged.get("outputscale") is not None:
                s2 = _positive_number("outputscale", merged["outputscale"]) / self.scale**2
                self.raw_outputscale.copy_(self.outputscale_constraint.inverse_transform(like.new_tensor(s2)))
            if merged.get("noise") is not None:
                if not self.learn_noise:
                    raise ValueError(
                        "noise: this model has fixed per-cell noise (given at construction), so there is "
                        "no noise variance to set"
                    )
                sigma2 = _positive_number("noise", merged["noise"]) / self.scale**2
                floor = float(self.noise_constraint.lower_bound)
                if sigma2 <= floor:
                    raise ValueError(
                        f"noise must be above the model's floor {floor:g} × scale² = {floor * self.scale**2:.3g} "
                        f"(data units), got {merged['noise']!r}"
                    )
                self.raw_noise.copy_(self.noise_constraint.inverse_transform(like.new_tensor(sigma2)))
            if merged.get("mean") is not None:
                if self.user_mean:
                    raise ValueError("mean: this model has a user mean module; set its parameters on gp.mean_module")
                mu = _finite_number("mean", merged["mean"])
                self.mean_module.constant.fill_((mu - self.shift) / self.scale)
        self._hyperparameters_chosen = True

    def _set_lengthscales(self, lengthscales: Any) -> None:
        if isinstance(lengthscales, (str, bytes)) or not hasattr(lengthscales, "__len__") or len(lengthscales) != self.ndim:
            raise ValueError(
                f"lengthscales must hold one entry per dimension ({self.ndim}), got {lengthscales!r}"
            )
        for k, (kern, value) in enumerate(zip(self.kernels, lengthscales)):
            if value is None:
                continue
            current = getattr(kern, "raw_lengthscale", None)
            if current is None:
                raise ValueError(f"lengthscales[{k}]: kernels[{k}] ({type(kern).__name__}) has no lengthscale")
            ls = _positive_tensor(f"lengthscales[{k}]", value, current)
            current.copy_(kern.raw_lengthscale_constraint.inverse_transform(ls))

    def _set_kernel_parameters(self, kernels: Any) -> None:
        if isinstance(kernels, Mapping) or not hasattr(kernels, "__len__") or len(kernels) != self.ndim:
            raise ValueError(f"kernels must hold one dict of parameters per dimension ({self.ndim}), got {kernels!r}")
        for k, (kern, params) in enumerate(zip(self.kernels, kernels)):
            if params is None:
                continue
            if not isinstance(params, Mapping):
                raise TypeError(f"kernels[{k}] must be a dict {{parameter: value}}, got {type(params).__name__}")
            named = {name.replace("raw_", ""): (raw, c) for name, raw, c in kern.named_parameters_and_constraints()}
            unknown = sorted(set(params) - set(named))
            if unknown:
                raise ValueError(f"kernels[{k}] ({type(kern).__name__}) has no parameter(s) {unknown}; it has {sorted(named)}")
            for name, value in params.items():
                if value is None:
                    continue
                raw, constraint = named[name]
                v = _finite_tensor(f"kernels[{k}][{name!r}]", value, raw)
                if constraint is not None:
                    if not bool(constraint.check(v)):
                        raise ValueError(
                            f"kernels[{k}][{name!r}] = {value!r} is outside its constraint {constraint}"
                        )
                    v = constraint.inverse_transform(v)
                raw.copy_(v)


    @property
    def path(self) -> str:
        """``"exact"`` on a full grid with one noise level, ``"cg"`` otherwise."""
        return "exact" if self.observed is None and self.cell_noise is None else "cg"

    def hyperparameters(self) -> dict[str, Any]:
        """Current hyperparameters in data units, for printing.

        Keys: ``lengthscales`` (one per dimension, axis units; ``None`` for a kernel
        without one), ``outputscale`` (variance of ``f``), ``noise`` (learned variance, or
        ``"per-cell (fixed)"``), ``mean`` (the constant, or ``"user"``), ``kernels`` (every
        constrained kernel parameter by dimension), ``path``.
        """
        with torch.no_grad():
            lengthscales, kern_params = [], []
            for kern in self.kernels:
                ls = getattr(kern, "lengthscale", None)
                lengthscales.append(ls.reshape(-1).tolist()[0] if isinstance(ls, Tensor) and ls.numel() == 1 else (ls.reshape(-1).tolist() if isinstance(ls, Tensor) else None))
                params = {}
                for name, raw, constraint in kern.named_parameters_and_constraints():
                    value = constraint.transform(raw) if constraint is not None else raw
                    params[name.replace("raw_", "")] = value.reshape(-1).tolist() if value.numel() > 1 else float(value)
                kern_params.append(params)
            return {
                "lengthscales": lengthscales,
                "outputscale": float(self.outputscale) * self.scale**2,
                "noise": float(self.noise) * self.scale**2 if self.learn_noise else self._NOT_A_VALUE["noise"],
                "mean": float(self.mean_module.constant) * self.scale + self.shift if not self.user_mean else self._NOT_A_VALUE["mean"],
                "kernels": kern_params,
                "path": self.path,
            }

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
        """``K_k = k_k(axis_k, axis_k)`` (:func:`kernel_factors` of the model's kernels and axes).

        While a :func:`kronegp.models._representation.watch_factors` block is open on the model, the
        factors are also appended to its list (``_factor_watch``): the likelihood's gradient with
        respect to them gives its representation error (:mod:`kronegp.models._representation`)."""
        out = kernel_factors(self.kernels, self.axes)
        watch = self.__dict__.get("_factor_watch")
        if watch is not None:
            # a factor without gradient (frozen kernels, or no_grad outside) becomes a leaf that has one
            out = [f if f.requires_grad else f.detach().requires_grad_() for f in out]
            watch.append(out)
        return out


def kernel_factors(kernels, axes: list[Tensor]) -> list[Tensor]:
    """``K_k = k_k(axis_k, axis_k)`` per axis, symmetrised (the eigendecomposition assumes it).

    Plain Matérn and RBF kernels with one lengthscale are computed in one fused step
    from the exact axis distances, all axes of one kind and size together
    (:func:`kronegp.kernels.stationary.stationary_factors`).
    Any other kernel without ``active_dims`` is evaluated through its ``forward`` on the
    ``(n_k, 1)`` axis: what ``Kernel.__call__`` ends up computing there, without the
    lazy kernel tensor and its checks (~0.2 ms of host time per factor on a GPU).
    """
    out = []
    for kern, ax, fast in zip(kernels, axes, stationary_factors(kernels, axes)):
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


def _finite_number(name: str, value: Any) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def _positive_number(name: str, value: Any) -> float:
    out = _finite_number(name, value)
    if out <= 0:
        raise ValueError(f"{name} must be positive, got {out}")
    return out


def _finite_tensor(name: str, value: Any, like: Tensor) -> Tensor:
    """``value`` as a tensor shaped like the raw parameter ``like`` (a number fills it)."""
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{name} must be a number or a list of numbers, got {value!r}")
    try:
        v = torch.as_tensor(value, dtype=like.dtype).to(like.device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a number or a list of numbers, got {value!r}") from None
    if v.numel() == 1:
        v = v.reshape(()).expand(like.shape)
    elif v.numel() == like.numel():
        v = v.reshape(like.shape)
    else:
        raise ValueError(f"{name} must hold 1 or {like.numel()} numbers, got {v.numel()}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def _positive_tensor(name: str, value: Any, like: Tensor) -> Tensor:
    v = _finite_tensor(name, value, like)
    if not bool((v > 0).all()):
        raise ValueError(f"{name} must be positive, got {value!r}")
    return v
