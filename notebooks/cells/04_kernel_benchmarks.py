# %% [markdown]
# # Kron-Matmul kernel benchmarks: speedup over the anchors, time against the hardware floor
#
# Plots the JSON written by `benchmarks/kron_matmul.py` (`kronegp bench --out FILE`), which
# times kronegp's products on a GPU for the DESIGN.md case list in float32 and float64,
# both sides (`kron_matmul` = (⊗F)·x, `matmul_kron` = x·(⊗F)), against two anchors:
#
# * **linear_operator**: `KroneckerProductLinearOperator` (what GPyTorch users run today);
# * **torch loop**: `kronegp.reference`, one batched GEMM per factor.
#
# For each case the **floor** is `max(bytes / B, flops / R)`, with B the measured
# device-to-device copy bandwidth and R torch's GEMM rate in that dtype (same run), so
# `time / floor = 1` would be a kernel that moves every byte once at full bandwidth or does
# every FLOP at GEMM speed.
#
# The notebook reads every `benchmarks/results/kron_matmul*.json` (or the folder named by
# `KRONEGP_BENCH_RESULTS`): the summary covers every run, in order, and the per-case plots
# show the newest one. When there is none, it says so and stops plotting — the results come
# from a GPU run. The size parameter changes nothing here (plotting is instant).

# %%
import os

SIZE = os.environ.get("KRONEGP_NOTEBOOK_SIZE", "medium")
if SIZE not in ("small", "medium", "full"):
    raise ValueError(f"KRONEGP_NOTEBOOK_SIZE={SIZE!r}: expected small, medium or full")

import json
import math
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np


def results_folder() -> Path | None:
    if os.environ.get("KRONEGP_BENCH_RESULTS"):
        return Path(os.environ["KRONEGP_BENCH_RESULTS"])
    for parent in [Path.cwd(), *Path.cwd().parents]:   # the notebook runs from notebooks/
        if (parent / "benchmarks").is_dir():
            return parent / "benchmarks" / "results"
    return None


REQUIRED = {"case", "dtype", "side", "ours_ms", "floor_ms", "time_over_floor", "speedup_vs_lo",
            "speedup_vs_loop"}
folder = results_folder()
runs = []
for path in sorted(folder.glob("kron_matmul*.json")) if folder and folder.is_dir() else []:
    data = json.loads(path.read_text())
    rows = data.get("rows") if isinstance(data, dict) else None
    if not rows or not all(REQUIRED <= set(r) for r in rows):
        print(f"{path.name}: not a benchmarks/kron_matmul.py result (no rows with {sorted(REQUIRED)}); skipped")
        continue
    runs.append((path, data))


def run_order(run):
    """Date, then the file name with its numbers compared as numbers (round12 after round7)."""
    path, data = run
    parts = re.split(r"(\d+)", path.stem)
    return str(data.get("date", "")), [int(t) if t.isdigit() else t for t in parts]


runs.sort(key=run_order)
latest = runs[-1:]  # the per-case plots: the newest run
if not runs:
    print(f"No benchmark results found in {folder}: run `kronegp bench --out "
          f"benchmarks/results/kron_matmul_<gpu>_<date>.json` on a GPU, then re-run this notebook.")
else:
    for path, data in runs:
        print(f"{path.name}: {data.get('device', '?')}, {data.get('date', '?')}, torch {data.get('torch', '?')}, "
              f"{len(data['rows'])} timings; CUDA backend: {data.get('backend', {}).get('cuda_reason', '?')}")

# %% [markdown]
# ## Summary per dtype (geometric means over cases and sides), every run

# %%
def geomean(values):
    values = [v for v in values if v == v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


for path, data in runs:
    print(f"{path.stem}: {data.get('device', '?')} ({data.get('date', '')})")
    print(f"  {'dtype':8s} {'time/floor':>10s} {'LO time/floor':>14s} {'x vs LO':>8s} {'x vs loop':>10s} {'max rel err':>12s}")
    for dtype in sorted({r["dtype"] for r in data["rows"]}):
        sel = [r for r in data["rows"] if r["dtype"] == dtype]
        print(f"  {dtype:8s} {geomean(r['time_over_floor'] for r in sel):10.2f} "
              f"{geomean(r.get('lo_over_floor', float('nan')) for r in sel):14.2f} "
              f"{geomean(r['speedup_vs_lo'] for r in sel):8.2f} {geomean(r['speedup_vs_loop'] for r in sel):10.2f} "
              f"{max(r.get('rel_err', float('nan')) for r in sel):12.1e}")

# %% [markdown]
# How the geometric mean of time / floor moved from run to run (the kernel's development
# history; runs of the same code differ by a few per cent, more in the host-bound small cases).

# %%
if runs:
    fig, ax = plt.subplots(figsize=(9, 3.2), constrained_layout=True)
    names = [path.stem.replace("kron_matmul_", "") for path, _ in runs]
    for dtype, marker in (("float32", "o"), ("float64", "s")):
        ax.plot(range(len(runs)), [geomean(r["time_over_floor"] for r in data["rows"] if r["dtype"] == dtype)
                                   for _, data in runs], marker=marker, label=f"kronegp {dtype}")
        ax.plot(range(len(runs)), [geomean(r.get("lo_over_floor", float("nan")) for r in data["rows"]
                                           if r["dtype"] == dtype) for _, data in runs],
                marker=marker, ls=":", color="tab:gray", label=f"linear_operator {dtype}")
    ax.set(xticks=range(len(runs)), yscale="log", ylabel="geo-mean time / floor", title="runs in order")
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.axhline(1, color="k", lw=0.8)
    ax.legend(fontsize=8, ncol=2)
    plt.show()

# %% [markdown]
# ## Per case (newest run)
#
# Left: speedup over each anchor (log scale; right of the line at 1 is faster). Right:
# time / floor for kronegp and for linear_operator (log scale; 1 is the floor).

# %%
for path, data in latest:
    rows = data["rows"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    for dtype in sorted({r["dtype"] for r in rows}):
        fig, axes = plt.subplots(1, 2, figsize=(15, 0.45 * len(cases) * 2 + 1.5), constrained_layout=True)
        labels, lo, loop, ours_floor, lo_floor = [], [], [], [], []
        for case in cases:
            for side in ("matmul_kron", "kron_matmul"):
                match = [r for r in rows if r["case"] == case and r["dtype"] == dtype and r["side"] == side]
                if not match:
                    continue
                r = match[0]
                labels.append(f"{case}  {'x·(⊗F)' if side == 'matmul_kron' else '(⊗F)·x'}")
                lo.append(r["speedup_vs_lo"])
                loop.append(r["speedup_vs_loop"])
                ours_floor.append(r["time_over_floor"])
                lo_floor.append(r.get("lo_over_floor", np.nan))
        y = np.arange(len(labels))
        axes[0].barh(y - 0.2, lo, height=0.4, label="vs linear_operator")
        axes[0].barh(y + 0.2, loop, height=0.4, label="vs torch loop")
        axes[0].axvline(1, color="k", lw=0.8)
        axes[0].set(xscale="log", yticks=y, yticklabels=labels, xlabel="speedup (×)",
                    title=f"{data.get('device', '')} ({data.get('date', '')}), {dtype}: speedup over the anchors")
        axes[0].invert_yaxis()
        axes[0].legend(loc="lower right")
        axes[1].barh(y - 0.2, ours_floor, height=0.4, label="kronegp", color="tab:blue")
        axes[1].barh(y + 0.2, lo_floor, height=0.4, label="linear_operator", color="tab:gray")
        axes[1].axvline(1, color="k", lw=0.8)
        axes[1].set(xscale="log", yticks=y, yticklabels=[], xlabel="time / floor",
                    title="distance from the hardware floor")
        axes[1].invert_yaxis()
        axes[1].legend(loc="lower right")
        plt.show()

# %% [markdown]
# ## Where the time goes: floor against measured time (newest run)
#
# Each point is one case and side; the diagonal is the floor. Memory-bound cases (small
# factors) sit at the left, compute-bound ones (large factors) at the right.

# %%
for path, data in latest:
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 5.5), constrained_layout=True)
    for dtype, marker in (("float32", "o"), ("float64", "s")):
        sel = [r for r in rows if r["dtype"] == dtype]
        if sel:
            ax.scatter([r["floor_ms"] for r in sel], [r["ours_ms"] for r in sel], marker=marker,
                       label=f"kronegp {dtype}")
            ax.scatter([r["floor_ms"] for r in sel], [r.get("lo_ms", np.nan) for r in sel], marker=marker,
                       facecolors="none", edgecolors="tab:gray", label=f"linear_operator {dtype}")
    lim = [min(r["floor_ms"] for r in rows) / 2, max(max(r["ours_ms"], r.get("lo_ms", 0)) for r in rows) * 2]
    ax.plot(lim, lim, "k--", lw=0.8, label="floor")
    ax.set(xscale="log", yscale="log", xlabel="floor (ms)", ylabel="measured (ms)",
           title=f"{data.get('device', path.name)} ({data.get('date', '')})")
    ax.legend(fontsize=8)
    plt.show()
