"""Unmodified GPyTorch models per training step, with and without ``kronegp.patch_gpytorch()``.

Cases (each in the chosen dtypes):

* ``grid``      exact GP, ``GridKernel(RBFKernel)`` on a full 3-D grid (default 128³), Gaussian
                noise: Kronecker eigendecomposition solves and log-determinants.
* ``multitask`` exact multitask GP, ``MultitaskKernel(GridKernel(RBFKernel) on a 2-D grid,
                num_tasks)`` (default 64 tasks × 400·250 = 10⁵ points), one noise level:
                a Kronecker product whose first factor is itself a Kronecker product.
* ``kiss``      KISS-GP, ``ScaleKernel(GridInterpolationKernel(RBFKernel))`` on a 3-D grid
                (default 64³ inducing points, 10⁵ scattered points): CG and stochastic
                Lanczos quadrature, every iteration a Kronecker product. The pivoted
                Cholesky preconditioner is off in both variants (its backward needs
                ``rank × n × 64 × 64`` index tensors, out of memory at this size).
* ``bilinear``  ``_bilinear_derivative`` alone for 3-D Kronecker products with ``T = 11``
                probe columns (GP-shaped): kronegp's closed form against
                linear_operator's autograd through its matmul loop.

A training step is ``loss = -mll(model(x), y); loss.backward()`` with
``gpytorch.settings.max_cholesky_size(0)`` (the structured path). Both runs of a model
start from the same parameters and the same random probes; the loss difference between
them is reported as a correctness check. Times are medians over ``--repeats`` timed runs
after ``--warmup`` runs (CUDA events on a GPU, ``perf_counter`` on the CPU).

    python benchmarks/gpytorch_models.py --out results.json               # GPU, full sizes
    python benchmarks/gpytorch_models.py --device cpu --small --out s.json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys

import gpytorch
import linear_operator
import torch
from linear_operator.operators import KroneckerProductLinearOperator, LinearOperator

import kronegp
from kronegp.operators import KroneckerOperator
from timing import time_call

SIZES = {
    "full": {
        "grid": (128, 128, 128),
        "multitask": {"grid": (400, 250), "tasks": 64},
        "kiss": {"grid": 64, "points": 100_000},
        "bilinear": [(64, 64, 64), (128, 128, 128), (64, 128, 365), (24, 24, 72)],
        "probes": 11,
    },
    "small": {
        "grid": (12, 9, 10),
        "multitask": {"grid": (20, 15), "tasks": 8},
        "kiss": {"grid": 12, "points": 2000},
        "bilinear": [(12, 9, 10), (24, 24, 7)],
        "probes": 11,
    },
}


# ------------------------------------------------------------------ models (unmodified GPyTorch)


class GridModel(gpytorch.models.ExactGP):
    def __init__(self, grid, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.GridKernel(gpytorch.kernels.RBFKernel(), grid=grid)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class MultitaskGridModel(gpytorch.models.ExactGP):
    def __init__(self, grid, x, y, likelihood, tasks):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(), num_tasks=tasks)
        data_kernel = gpytorch.kernels.GridKernel(gpytorch.kernels.RBFKernel(), grid=grid)
        self.covar_module = gpytorch.kernels.MultitaskKernel(data_kernel, num_tasks=tasks, rank=1)

    def forward(self, x):
        return gpytorch.distributions.MultitaskMultivariateNormal(self.mean_module(x), self.covar_module(x))


class KissModel(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, grid_size):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.GridInterpolationKernel(
                gpytorch.kernels.RBFKernel(), grid_size=grid_size, num_dims=3, grid_bounds=((0.0, 1.0),) * 3
            )
        )

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def build(kind: str, sizes: dict, dtype: torch.dtype, device: torch.device):
    torch.manual_seed(0)  # parameter initialisation (e.g. IndexKernel's covar_factor)
    gen = torch.Generator().manual_seed(0)
    if kind == "grid":
        grid = [torch.linspace(0, 1, n, dtype=dtype) for n in sizes["grid"]]
        x = gpytorch.utils.grid.create_data_from_grid(grid)
        y = torch.sin(6 * x.sum(-1)) + 0.1 * torch.randn(len(x), generator=gen, dtype=dtype)
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = GridModel([g.to(device) for g in grid], x, y, likelihood)
        shape = f"grid {'x'.join(map(str, sizes['grid']))} = {len(x)} points"
    elif kind == "multitask":
        cfg = sizes["multitask"]
        grid = [torch.linspace(0, 1, n, dtype=dtype) for n in cfg["grid"]]
        x = gpytorch.utils.grid.create_data_from_grid(grid)
        base = torch.sin(6 * x.sum(-1))
        y = torch.stack([base * math.cos(k) for k in range(cfg["tasks"])], -1)
        y = y + 0.1 * torch.randn(*y.shape, generator=gen, dtype=dtype)
        likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=cfg["tasks"], rank=0, has_task_noise=False)
        model = MultitaskGridModel([g.to(device) for g in grid], x, y, likelihood, cfg["tasks"])
        shape = f"{cfg['tasks']} tasks x grid {'x'.join(map(str, cfg['grid']))} = {len(x)} points"
    elif kind == "kiss":
        cfg = sizes["kiss"]
        x = torch.rand(cfg["points"], 3, generator=gen, dtype=dtype) * 0.9 + 0.05
        y = torch.sin(6 * x.sum(-1)) + 0.1 * torch.randn(len(x), generator=gen, dtype=dtype)
        likelihood = gpytorch.likelihoods.GaussianLikelihood()
        model = KissModel(x, y, likelihood, cfg["grid"])
        shape = f"{cfg['points']} points, inducing grid {cfg['grid']}^3"
    else:
        raise ValueError(kind)
    model = model.to(device=device, dtype=dtype)
    likelihood = likelihood.to(device=device, dtype=dtype)
    return model, likelihood, x.to(device), y.to(device), shape


def training_step_case(kind, sizes, dtype, device, timer, warmup, repeats):
    model, likelihood, x, y, shape = build(kind, sizes, dtype, device)
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    # KISS-GP: linear_operator's pivoted-Cholesky preconditioner differentiates through
    # rows of the interpolated operator, (rank × n × 4^d × 4^d) index tensors — 1 GB at
    # n = 2000, far beyond any GPU at 10^5 — so it is switched off, in both variants.
    precond_rank = 0 if kind == "kiss" else gpytorch.settings.max_preconditioner_size.value()

    def step():
        model.zero_grad()
        torch.manual_seed(0)  # the same SLQ probes for both variants
        with gpytorch.settings.max_cholesky_size(0), gpytorch.settings.max_preconditioner_size(precond_rank):
            loss = -mll(model(x), y)
        loss.backward()
        return loss.detach()

    row = {"case": kind, "shape": shape, "dtype": str(dtype).replace("torch.", "")}
    for variant in ("gpytorch", "kronegp"):
        model.load_state_dict(state)
        handle = kronegp.patch_gpytorch() if variant == "kronegp" else None
        try:
            loss = step()
            times = timer(step, warmup, repeats)
        except torch.cuda.OutOfMemoryError as err:  # report, keep going with the other cases
            row[variant] = {"error": f"out of memory: {err}".splitlines()[0]}
            torch.cuda.empty_cache()
            continue
        finally:
            if handle is not None:
                handle.undo()
        row[variant] = {"median_s": statistics.median(times), "times_s": times, "loss": loss.item()}
    if "median_s" in row["gpytorch"] and "median_s" in row["kronegp"]:
        row["speedup"] = row["gpytorch"]["median_s"] / row["kronegp"]["median_s"]
        lg, lk = row["gpytorch"]["loss"], row["kronegp"]["loss"]
        row["loss_rel_diff"] = abs(lg - lk) / max(abs(lg), 1e-30)
    return row


def bilinear_case(sizes3, probes, dtype, device, timer, warmup, repeats):
    gen = torch.Generator().manual_seed(1)
    factors = [
        torch.randn(n, n, generator=gen, dtype=dtype).to(device).requires_grad_(True) for n in sizes3
    ]
    n_total = math.prod(sizes3)
    left = torch.randn(n_total, probes, generator=gen, dtype=dtype).to(device)
    right = torch.randn(n_total, probes, generator=gen, dtype=dtype).to(device)
    ours = KroneckerOperator(*factors)
    theirs = KroneckerProductLinearOperator(*factors)
    assert type(theirs) is KroneckerProductLinearOperator  # no patch active here

    g_ours = ours._bilinear_derivative(left, right)
    g_theirs = LinearOperator._bilinear_derivative(theirs, left, right)
    err = max(((a - b).norm() / b.norm()).item() for a, b in zip(g_ours, g_theirs))
    row = {
        "case": "bilinear",
        "shape": f"{'x'.join(map(str, sizes3))}, T={probes}",
        "dtype": str(dtype).replace("torch.", ""),
        "grad_rel_diff": err,
    }
    for name, fn in (
        ("gpytorch", lambda: LinearOperator._bilinear_derivative(theirs, left, right)),
        ("kronegp", lambda: ours._bilinear_derivative(left, right)),
    ):
        try:
            times = timer(fn, warmup, repeats)
            row[name] = {"median_s": statistics.median(times), "times_s": times}
        except torch.cuda.OutOfMemoryError as err_oom:
            row[name] = {"error": f"out of memory: {err_oom}".splitlines()[0]}
            torch.cuda.empty_cache()
    if "median_s" in row["gpytorch"] and "median_s" in row["kronegp"]:
        row["speedup"] = row["gpytorch"]["median_s"] / row["kronegp"]["median_s"]
    return row


def _fmt(entry):
    if "median_s" in entry:
        return f"{entry['median_s'] * 1e3:10.2f}"
    return f"{'OOM' if 'memory' in entry.get('error', '') else 'error':>10}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--small", action="store_true", help="small sizes (a CPU smoke test)")
    parser.add_argument("--dtype", choices=["float32", "float64", "both"], default="both")
    parser.add_argument("--cases", default="grid,multitask,kiss,bilinear", help="comma-separated subset")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is visible; use --device cpu --small for a smoke test")
    sizes = SIZES["small" if args.small else "full"]
    dtypes = {"float32": [torch.float32], "float64": [torch.float64], "both": [torch.float32, torch.float64]}[args.dtype]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - {"grid", "multitask", "kiss", "bilinear"}
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}")
    def timer(fn, warmup, repeats):
        return time_call(fn, device, repeats, warmup)


    rows = []
    for dtype in dtypes:
        for case in cases:
            if case == "bilinear":
                for sizes3 in sizes["bilinear"]:
                    rows.append(bilinear_case(sizes3, sizes["probes"], dtype, device, timer, args.warmup, args.repeats))
                    print(_row_line(rows[-1]), flush=True)
            else:
                rows.append(training_step_case(case, sizes, dtype, device, timer, args.warmup, args.repeats))
                print(_row_line(rows[-1]), flush=True)

    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "backend": kronegp.backend_info(),
        "torch": torch.__version__,
        "gpytorch": gpytorch.__version__,
        "linear_operator": linear_operator.__version__,
        "python": sys.version.split()[0],
        "small": args.small,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "note": "times are per training step (forward + backward of -mll) or per _bilinear_derivative call",
    }
    print(f"\ndevice: {meta['device']}   backend: {meta['backend'].get('cuda')} ({meta['backend'].get('cuda_reason')})")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "results": rows}, fh, indent=1)
        print(f"wrote {args.out}")


def _row_line(row):
    head = f"{row['case']:<10} {row['dtype']:<8} {row['shape']:<46}"
    g, k = _fmt(row["gpytorch"]), _fmt(row["kronegp"])
    speed = f"{row['speedup']:7.2f}x" if "speedup" in row else "      - "
    check = row.get("loss_rel_diff", row.get("grad_rel_diff"))
    check = f"{check:9.1e}" if check is not None else "        -"
    if not hasattr(_row_line, "printed"):
        _row_line.printed = True
        print(f"{'case':<10} {'dtype':<8} {'shape':<46} {'gpytorch ms':>11} {'kronegp ms':>11} {'speedup':>8} {'rel diff':>9}")
    return f"{head} {g:>11} {k:>11} {speed} {check}"


if __name__ == "__main__":
    main()
