# %% [markdown]
# # Filling a held-out region of a spatio-temporal field: monthly ozone over Central America
#
# A Gaussian process with a product kernel over latitude × longitude × time on the
# **ASA Data Expo 2006 ozone grid** (NASA; 24 × 24 cells of 2.5°, 72 months, 1995–2000),
# shipped with kronegp. We hide a block of the grid (Central America and the Caribbean for
# all of 2000), fit `kronegp.GridGP`, and compare its predictions and their uncertainty with
# two simple baselines: a per-cell monthly climatology and a spatial linear interpolation.
#
# The covariance of the grid is `K = s² K_lat ⊗ K_lon ⊗ K_time`, never formed: every
# product with it is a `kronegp.kron_matmul`.
#
# **Size**: `KRONEGP_NOTEBOOK_SIZE=small` runs a 16 × 16 × 36 corner in seconds (CI);
# `medium` and `full` use the whole grid (it is small: 41,472 cells).

# %%
import os

SIZE = os.environ.get("KRONEGP_NOTEBOOK_SIZE", "medium")
if SIZE not in ("small", "medium", "full"):
    raise ValueError(f"KRONEGP_NOTEBOOK_SIZE={SIZE!r}: expected small, medium or full")

import time
import warnings

import gpytorch
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

import kronegp
from kronegp import datasets
from kronegp.baselines import climatology_baseline, spatial_interpolation_baseline
from kronegp.demo import demo_setup
from kronegp.models import GridGP, copy_hyperparameters, describe_hyperparameters

warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
torch.manual_seed(0)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ITERS = 30 if SIZE == "small" else 80
print(f"size {SIZE}, device {DEVICE}, kronegp {kronegp.__version__}, torch {torch.__version__}")

# %% [markdown]
# ## The data

# %%
setup = demo_setup(small=(SIZE == "small"))   # the same split as `kronegp demo`
ozone, held_out, n_train = setup.ozone, setup.held_out, setup.train_months
lat, lon, t = (ozone.coords[d] for d in ozone.dims)
print(ozone)
print("source: ", ozone.attrs["source"])
print("licence:", ozone.attrs["licence"])

# %% [markdown]
# Three views of the field: the 1995–2000 mean (ozone grows towards the subtropics), the
# zonal mean through time (a seasonal cycle whose phase flips across the equator), and the
# mean seasonal cycle in three latitude bands.

# %%
month = np.floor((t % 1) * 12).astype(int) + 1
half = 1.25
extent = [lon[0] - half, lon[-1] + half, lat[0] - half, lat[-1] + half]
fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), constrained_layout=True)
im = axes[0].imshow(ozone.values.mean(-1), origin="lower", extent=extent, cmap="viridis")
axes[0].set(title="mean ozone, whole period (DU)", xlabel="longitude (°E)", ylabel="latitude (°N)")
fig.colorbar(im, ax=axes[0])
im = axes[1].pcolormesh(t, lat, ozone.values.mean(1), cmap="viridis", shading="nearest")
axes[1].set(title="zonal mean (DU)", xlabel="year", ylabel="latitude (°N)")
fig.colorbar(im, ax=axes[1])
for name, sel in [("south of 5°S", lat < -5), ("5°S–5°N", np.abs(lat) <= 5), ("north of 25°N", lat > 25)]:
    cycle = [ozone.values[sel][..., month == m].mean() for m in range(1, 13)]
    axes[2].plot(range(1, 13), cycle, marker="o", label=name)
axes[2].set(title="mean seasonal cycle", xlabel="month", ylabel="DU", xticks=range(1, 13))
axes[2].legend()
plt.show()

# %% [markdown]
# ## The held-out block
#
# Every cell of the red box is hidden for all of its months (the last year). The GP's
# hyperparameters are learned on the complete years *before* the block (exact Kronecker
# inference, no CG), so nothing of the block leaks into them; the predictions then
# condition on every observed cell of the whole period (the masked CG path).

# %%
train = ozone.with_missing(held_out)
block_months = np.flatnonzero(held_out.any(axis=(0, 1)))
rows = np.flatnonzero(held_out.any(axis=(1, 2)))
cols = np.flatnonzero(held_out.any(axis=(0, 2)))
print(f"held out: {held_out.sum()} cells = {len(rows)} lat x {len(cols)} lon x {len(block_months)} months "
      f"({100 * held_out.mean():.1f} % of the grid); hyperparameters from the first {n_train} months")


def box(ax):
    ax.add_patch(Rectangle((lon[cols[0]] - half, lat[rows[0]] - half), 2 * half * len(cols),
                           2 * half * len(rows), fill=False, edgecolor="red", linewidth=1.5))


show = int(block_months[len(block_months) // 2])
fig, ax = plt.subplots(figsize=(5, 4.2), constrained_layout=True)
im = ax.imshow(train.values[..., show], origin="lower", extent=extent, cmap="viridis")
box(ax)
ax.set(title=f"observed, {int(t[show])}-{month[show]:02d} (DU)", xlabel="longitude (°E)",
       ylabel="latitude (°N)")
fig.colorbar(im, ax=ax)
plt.show()

# %% [markdown]
# ## Two GPs
#
# * **Matérn**: GridGP's default, a Matérn-5/2 kernel per dimension.
# * **seasonal**: the same in space, and `Periodic × Matérn` in time, so the kernel knows that
#   a year later the seasonal cycle repeats (each dimension takes any 1-D GPyTorch kernel).
#
# Both are fitted with Adam on the exact path; the loss is the negative log marginal
# likelihood per cell.


# %%
def matern_kernels():
    return None  # GridGP's default: Matérn-5/2 per dimension, lengthscales from the axes


def seasonal_kernels():
    space = [gpytorch.kernels.MaternKernel(nu=2.5) for _ in range(2)]
    for k in space:
        k.lengthscale = 10.0                   # degrees
    periodic = gpytorch.kernels.PeriodicKernel()
    periodic.period_length = 1.0               # years
    periodic.lengthscale = 1.0
    drift = gpytorch.kernels.MaternKernel(nu=2.5)
    drift.lengthscale = 2.0                    # years: how fast the seasonal pattern changes
    return space + [periodic * drift]


models = {}
for name, make_kernels in [("Matérn", matern_kernels), ("seasonal", seasonal_kernels)]:
    fit_model = GridGP(ozone.values[..., :n_train], [lat, lon, t[:n_train]],
                       kernels=make_kernels(), device=DEVICE)
    start = time.perf_counter()
    fit_model.fit(iters=ITERS, progress=False)
    seconds = time.perf_counter() - start
    print(f"{name}: {len(fit_model.history)} Adam steps in {seconds:.1f} s ({fit_model.path} path, "
          f"{fit_model.n_cells} cells), loss {fit_model.history[0]:.3f} -> {fit_model.history[-1]:.3f}")
    for line in describe_hyperparameters(fit_model.hyperparameters(), ozone.dims, ozone.coord_units,
                                         ozone.units):
        print("   ", line)
    models[name] = fit_model

fig, ax = plt.subplots(figsize=(6, 3.5), constrained_layout=True)
for name, m in models.items():
    ax.plot(m.history, label=name)
ax.set(xlabel="Adam step", ylabel="−log p(y) per cell", title="training loss")
ax.legend()
plt.show()

# %% [markdown]
# ## Predictions with the block missing
#
# Each fitted model's hyperparameters go into a GridGP on the whole period with the block
# missing. Its predictive variance on a grid this size is estimated by Monte Carlo
# (posterior samples with the exact homoskedastic posterior as a control variate); we add
# the noise variance to get intervals for new observations.

# %%
predictions = {}
for name, fit_model in models.items():
    kernels = seasonal_kernels() if name == "seasonal" else matern_kernels()
    model = GridGP(train.values, [lat, lon, t], kernels=kernels, device=DEVICE, variance_samples=32)
    copy_hyperparameters(fit_model, model)
    start = time.perf_counter()
    mean, var = model.predict(variance="mc")
    noise = model.hyperparameters()["noise"]
    predictions[name] = (mean.cpu().numpy(), np.sqrt(var.cpu().numpy() + noise))
    print(f"{name}: predicted {ozone.size} cells in {time.perf_counter() - start:.1f} s "
          f"({model.cg_iterations} CG iterations)")

clim_mean, clim_sd = climatology_baseline(train.values, month)
interp = spatial_interpolation_baseline(train.values, lat, lon)

# %% [markdown]
# ## Maps for one held-out month

# %%
mean_s, sd_s = predictions["seasonal"]
lo, hi = ozone.values[..., show].min(), ozone.values[..., show].max()
panels = [(ozone.values[..., show], "truth", "viridis", lo, hi),
          (mean_s[..., show], "GP mean (seasonal)", "viridis", lo, hi),
          (sd_s[..., show], "GP predictive sd", "magma", None, None),
          (mean_s[..., show] - ozone.values[..., show], "GP mean − truth", "RdBu_r", -8, 8)]
fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), constrained_layout=True)
for ax, (field, title, cmap, vmin, vmax) in zip(axes, panels):
    im = ax.imshow(field, origin="lower", extent=extent, cmap=cmap, vmin=vmin, vmax=vmax)
    box(ax)
    ax.set(title=f"{title} (DU)", xlabel="longitude (°E)")
    fig.colorbar(im, ax=ax, shrink=0.85)
axes[0].set_ylabel("latitude (°N)")
fig.suptitle(f"{int(t[show])}-{month[show]:02d}")
plt.show()

# %% [markdown]
# ## A time series inside the block
#
# At the block's centre cell the seasonal GP carries the seasonal cycle through the
# missing year; its 95 % band widens there. The climatology repeats the mean cycle.

# %%
i, j = rows[len(rows) // 2], cols[len(cols) // 2]
fig, ax = plt.subplots(figsize=(12, 3.8), constrained_layout=True)
ax.axvspan(t[block_months[0]] - 1 / 24, t[block_months[-1]] + 1 / 24, color="0.9", label="held out")
ax.plot(t, ozone.values[i, j], "k.-", label="truth")
for name, color in [("Matérn", "tab:orange"), ("seasonal", "tab:blue")]:
    m, s = predictions[name]
    ax.plot(t, m[i, j], color=color, label=f"GP mean ({name})")
    if name == "seasonal":
        ax.fill_between(t, m[i, j] - 1.96 * s[i, j], m[i, j] + 1.96 * s[i, j], color=color,
                        alpha=0.25, label="95 % interval (seasonal)")
ax.plot(t, clim_mean[i, j], ":", color="tab:green", label="climatology")
ax.set(xlabel="year", ylabel="DU", title=f"ozone at {lat[i]:.2f}°N, {lon[j]:.2f}°E")
ax.legend(ncol=3, fontsize=8)
plt.show()

# %% [markdown]
# ## Scores on the held-out cells
#
# RMSE, and the fraction of held-out cells inside each method's 95 % interval (GP: mean ±
# 1.96 predictive sd; climatology: mean ± 1.96 sd of that month over the other years).

# %%
truth = ozone.values[held_out]


def score(pred, sd=None):
    rmse = float(np.sqrt(np.mean((pred[held_out] - truth) ** 2)))
    if sd is None:
        return rmse, None
    ok = np.isfinite(sd[held_out])
    cover = float(np.mean(np.abs(pred[held_out][ok] - truth[ok]) <= 1.96 * sd[held_out][ok]))
    return rmse, cover


scores = {f"GP ({name})": score(*predictions[name]) for name in predictions}
scores["monthly climatology"] = score(clim_mean, clim_sd)
scores["spatial linear interpolation"] = score(interp)
print(f"{'method':30s} {'RMSE (DU)':>10s} {'95% coverage':>13s}")
for name, (rmse, cover) in scores.items():
    print(f"{name:30s} {rmse:10.2f} {('%.1f %%' % (100 * cover)) if cover is not None else '—':>13s}")

fig, ax = plt.subplots(figsize=(7, 3), constrained_layout=True)
ax.barh(list(scores), [r for r, _ in scores.values()], color=["tab:blue", "tab:blue", "tab:green", "tab:gray"])
ax.invert_yaxis()
ax.set(xlabel="RMSE on held-out cells (DU)")
plt.show()
best_gp = min(scores["GP (Matérn)"][0], scores["GP (seasonal)"][0])
assert best_gp < scores["monthly climatology"][0], "the GP should beat the climatology"

# %% [markdown]
# **Reading the results.** The climatology knows each cell's seasonal cycle but not the
# year's anomaly; interpolation knows the month's neighbours but must bridge the whole
# block. The GP uses both — neighbours in space at the same month, and the same cell in
# other months — and says where it is unsure: its predictive sd peaks in the middle of the
# block and falls to the noise level outside it.
