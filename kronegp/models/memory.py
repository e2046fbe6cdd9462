"""Memory plan of a :class:`~kronegp.GridGP`: how many bytes a training step, a prediction or a
sample holds at its peak, the chunk size of its temporaries, and a clear error before the work
starts when it cannot fit.

On a 1024³ float32 grid one grid vector is 4 GiB, so what matters is how many grid-sized
buffers are alive at once. Each count below is taken from the code that allocates them:

* **exact path, training step** (:func:`kronegp.models._exact.exact_lml`): ``α̃ = Qᵀα`` (one grid
  vector, computed in place from ``Qᵀy`` by :func:`kronegp.models._kron.kron_apply_into` and
  saved for the backward) plus first-axis slabs of at most ``chunk`` elements: two or three alive
  at once (the Kronecker product of a slab: its result and one intermediate, three on the
  transposed CUDA path; the backward's slab sums: eigenvalues, weights and one product). A user
  mean adds its grid vector and ``α = Qα̃`` (its gradient).
* **exact path, prediction on the grid**: mean and variance (two grid vectors, the results) and
  two slabs (the variance's Kronecker product); **sample**: the ``n`` draws, the posterior mean and slabs (draws are made one at a
  time, in place).
* **cg path** (missing cells or per-cell noise; :mod:`kronegp.models._masked`): block CG on
  ``c`` columns holds a fixed number of ``(c, N)`` blocks (:data:`CG_BLOCKS`) and a fixed number
  of grid vectors (:data:`CG_VECTORS`; with per-cell noise the probes are among the blocks).
  With missing cells and homoskedastic noise (the 20 %-missing grids) the peak is in the
  ``G`` system's CG: ``Qᵀ X [r, z/g]`` (kept for the gradient), the CG's ``x``, ``r`` (the
  right-hand side itself) and ``p``, and one product ``A p`` (its input ``Qᵀp``, one
  intermediate and its output): 7 blocks; the unfused CPU iteration adds ``z = M r`` (8). There the
  ``t = num_probes + 1`` columns may run in several CG runs of ``c`` columns
  (:func:`kronegp.models._masked.cg_lml_pieces`'s ``probe_chunk``; :attr:`MemoryPlan.chunk`), each
  drawing its own probes and reducing its gradient pairs before the next: the plan picks the
  largest ``c`` that fits (:func:`choose_cg_run`; on CUDA with one ``c``-column block to spare, for
  the caching allocator's fragments), ``t`` (one run, the probes drawn at once) when it all fits. Per-cell noise runs one CG on all ``t`` columns. The coefficients were measured
  on the CPU with :class:`LiveBytes` (every tensor the step creates, autograd's saved tensors
  included) and are checked against that measurement in ``tests/test_memory_plan.py``; on CUDA
  the fused CG iteration holds no ``z`` (:data:`CG_FUSED_SAVES` blocks fewer; checked against
  ``torch.cuda.max_memory_allocated`` by that file's CUDA test). With one-column runs the floor is
  the data column's refinement after the first run (:data:`CG_REFINE`): 1024³ float32 with 20 %
  missing and 16 probes needs 112 GiB in runs of 2 columns by this plan (an H200's 139 GiB),
  and 92 GiB at the least (more than an H100), where 896³ fits in 61 GiB.
  Holes and clouds add their two-level preconditioner's matrices (six ``|S_i|²`` per piece kept,
  and while one piece is built its gram or its box rows and a slab of eigen-coordinates:
  :func:`kronegp.models._two_level.coarse_bytes`).

* **exact-missing path, training step** (:mod:`kronegp.models._few_missing`; :func:`plan_few_missing_step`):
  :data:`FEW_MISSING_VECTORS` grid vectors (:data:`FEW_MISSING_BOX_VECTORS` through a box), ``G = X_MM``, its Cholesky factor and ``G⁻¹`` (``m × m``) and
  either the ``m × N`` rows ``U``, ``Y``, ``G⁻¹Y`` (scattered cells, :data:`FEW_MISSING_ROWS`: 180 MiB for
  216 cells of 30×28×26 in float64) or, through a compact hole's box of ``b`` cells, ``b × b`` matrices
  and the log det G gradient's modes summed directly (:data:`FEW_MISSING_BOX`; counted at their worst,
  short lengthscales). **separable-mask path** (:mod:`kronegp.models._separable_mask`;
  :func:`plan_separable_step`): ``K_S`` over the ``|S|`` observed points of the masked axes, its
  eigenvectors and the surrogate's ``|S| × |S|`` products (:data:`SEPARABLE_SQUARES`) and a few grid
  vectors. Both measured with :class:`LiveBytes` and checked in ``tests/test_memory_plan.py``; neither
  is chunked, so a step that cannot fit raises (naming the cg path where its step would fit).
* **exact-missing and separable-mask, prediction on the grid and sample** (:func:`plan_few_missing_predict`,
  :func:`plan_few_missing_sample`, :func:`plan_separable_predict`, :func:`plan_separable_sample`): the larger
  of two phases. Building the system: ``G``, its factor and the box's pair index, or the rows ``U`` with
  ``Y`` (and, through the box factors, two ``m × N`` intermediates: 4·m·N for 216 scattered cells); or
  ``K_S``, its symmetrised copy and its eigenvectors (3·|S|²). Then the variance's blocks (four
  ``N × c`` blocks of ``c = min(m, 2²⁶/N)`` columns of ``L⁻ᵀ``: 864 grid vectors for a 6³ hole; three
  blocks of ``K_A[a, S]``) or the draws' ``(N, n)`` blocks (nine per draw, eight on separable-mask) beside
  what the system holds (:data:`FEW_MISSING_PREDICT` and the constants after it). Measured with
  :class:`LiveBytes`; ``predict`` and ``sample`` check them before any work, as the exact path's.

Besides: the model's own buffers (values, mask, per-cell noise), factor-sized matrices
(``O(Σ n_k²)``) and :data:`RUNTIME_BYTES` for cuBLAS/cuSOLVER workspaces.

The chunk is chosen from the free memory of the device (:func:`free_memory`, or any number
passed in: tests fake it): the largest chunk, up to ``N`` elements and :data:`MAX_CHUNK`
(``N/8`` at 1024³), that leaves the predicted peak within :data:`HEADROOM` of what is free.

This module is the home of the byte counts; which count applies to a model is its inference path's
choice (:meth:`kronegp.models.paths.InferencePath.memory_plan`, called by :func:`plan_for_model`, which
adds what is common: the free memory, the budget, the checked ``operation``). Nothing here imports the
paths or asks which one a model holds.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "MemoryPlan", "MemoryPlanError", "LiveBytes", "free_memory", "plan_exact_step", "plan_exact_predict",
    "plan_exact_sample", "choose_exact_plan", "plan_cg_step", "plan_few_missing_step", "plan_few_missing_predict",
    "plan_few_missing_sample", "plan_separable_step", "plan_separable_predict", "plan_separable_sample", "choose_cg_run",
    "plan_cg_model", "plan_for_model", "operation_chunk", "check_plan", "OPERATIONS", "MAX_CHUNK", "HEADROOM",
]

GIB = 2**30
#: Largest chunk (elements) the plan picks: 2²⁷ (512 MiB in float32) keeps GEMMs large and
#: launches few on a billion cells; a smaller one costs launches, not memory.
MAX_CHUNK = 1 << 27
#: Share of the free memory a plan may use (the rest: allocator rounding and fragmentation).
HEADROOM = 0.92
#: cuBLAS/cuSOLVER workspaces and other small allocations of a step on CUDA.
RUNTIME_BYTES = 64 * 2**20
#: cg path: ``(c, N)`` blocks of a CG run on ``c`` columns and other grid vectors alive at the peak
#: of a training step (measured on the CPU with :class:`LiveBytes`; see the module docstring). With
#: per-cell noise the probes, drawn at once, are among the blocks. Several CG runs ("missing")
#: hold two more vectors (``α`` and ``Qᵀα``) beside each run.
CG_BLOCKS = {"missing": 8.0, "per-cell": 10.0, "both": 19.0}
CG_VECTORS = {"missing": 10.4, "per-cell": 3.5, "both": 6.4}
CG_RUN_VECTORS = 2.1
#: "missing": the data column's refinement after the first run (an unfused CG of one column, on the
#: CUDA too) holds ``(blocks per column of the run, grid vectors)``: the peak when runs are short
CG_REFINE = (3.0, 18.4)
#: Below float64, the refinement's mixed-precision rounds (:func:`kronegp.models._masked.refine_observed`)
#: add this many float64 grid vectors to it (measured with :class:`LiveBytes`, 28×24×20 float32, 2026-12-07:
#: 16.75 float32 vectors). They run only where they fit (on CUDA, the free memory when they start):
#: :func:`choose_cg_run` plans with them where they fit the budget, else without.
CG_REFINE_MIXED = 8.375
#: "per-cell" (a full grid), below float64: the data column's true-residual refinement after the run
#: (:func:`kronegp.models._masked.refine_full`) holds ``(blocks per column of the run, grid vectors)`` beside the
#: mixed rounds' :data:`CG_REFINE_MIXED` float64 vectors: the peak with one to three probes (28×24×20 float32,
#: :class:`LiveBytes`, 2026-12-07: 28.67 + 5 per probe float32 vectors against the run's 10 per column + 3.5).
CG_REFINE_CELL = (5.0, 6.92)
#: the cg plan's part for a hole's two-level preconditioner (:func:`kronegp.models._two_level.coarse_bytes`)
COARSE_PART = "two-level coarse space"
#: blocks the fused CUDA CG iteration does not hold (no ``z = M r`` block; two CGs nest in "both")
CG_FUSED_SAVES = {"missing": 1.0, "per-cell": 1.0, "both": 2.0}
#: exact-missing path, training step (:mod:`kronegp.models._few_missing`; measured with :class:`LiveBytes`,
#: 2026-12-07, nine holes and boxes on 24×20×18 to 50×30×20 and scattered cells, within 8 %): grid vectors
#: (``p``, ``λ``, the residual in eigen-coordinates, ``Qᵀα``, the surrogate's ``z``, the contractions...)
FEW_MISSING_VECTORS = 10.3
#: ... through the box (a compact hole): fewer since the hole step's third pass (exacthole branch: α's
#: values at the missing cells from ``G``, no gather/scatter around a filled box; measured with
#: :class:`LiveBytes` on 2026-12-07 after that merge: 3.9–5.3 on the plan tests' holes)
FEW_MISSING_BOX_VECTORS = 4.9
#: through the ``m × N`` rows (scattered cells): ``(rows, m × m matrices)`` (``U``, ``Y``, ``G⁻¹Y`` and the
#: gradient form's; ``G``, its factor ``L``, ``G⁻¹``)
FEW_MISSING_ROWS = (4.9, 5.8)
#: through the box of ``b`` cells (a compact hole): ``(m × m, b × b, b × b of 8 bytes)`` matrices (``G``, ``L``,
#: ``G⁻¹``; the gram spread over the box and ``G⁻¹`` zero-filled in it; a float32 step holds one ``b × b``
#: more than half the float64 one's: an index over the box's pairs, counted as 8 bytes). Besides, the log det G gradient's modes summed
#: directly (:meth:`kronegp.models._few_missing.FewMissing._axis_grad`) hold ``N·b_i·(3 + b_i/n_i)`` on the
#: axis where that is largest (``A_i ∘ p_j``, its weighted copy and ``S_j(A_i ∘ p_j)``, each
#: ``N/n_i × b_i × n_i``, and the spread ``S_j``) when every mode is summed so (short lengthscales: the
#: worst case, which the plan counts; at smooth ones the series takes most modes and the step holds
#: less, e.g. 6.1 MiB against the plan's 11.4 for a 6³ hole in 40×36×30 float64)
FEW_MISSING_BOX = (1.8, 1.6, 1.0)
#: separable-mask path, training step (:mod:`kronegp.models._separable_mask`): ``|S| × |S|`` matrices
#: (``K_S``, its symmetrised copy, ``V``, the surrogate's ``K_S`` and ``VᵀK_S`` with their gradients) and
#: grid vectors (the residual and ``α`` as ``|S| × n_B`` blocks, ``D``, ``P``...)
SEPARABLE_SQUARES = 7.0
SEPARABLE_VECTORS = 5.5
#: exact-missing path, ``predict()`` on the grid and ``sample(n)`` (:class:`kronegp.models._few_missing.FewMissing`;
#: measured with :class:`LiveBytes`, 2026-12-07, holes of 6³ and 8³ cells, two 4³ holes in an 8³ box and 54–216
#: scattered cells on 24×20×18 to 60×50×40, float64 and float32, within 2 %): the system holds ``G`` and its
#: factor ``L`` (``m × m``), and the box's pair index (``b²`` int64, kept between calls) or the rows ``U`` (``m × N``).
#: Building it holds besides: ``Y = U diag(p)`` and, where the products go through the box factors
#: (:func:`~kronegp.models._few_missing.rows_through_box`), two ``m × N`` intermediates of the Kronecker product
#: (scattered cells); the box's gram (``b²``) and its rows at the missing cells (``m × b``) where the missing
#: cells do not fill their box; and :data:`FEW_MISSING_BUILD_VECTORS` grid vectors (the residual, ``⊗λ_k``, ``λ``,
#: ``p``; a sample's ``ξ`` besides).
FEW_MISSING_BUILD_VECTORS = 4.0
#: ... predict: ``(N × c blocks, grid vectors)``: the variance's blocks of ``c`` columns
#: (:func:`~kronegp.models._few_missing.variance_columns`: the zero-filled ``L⁻ᵀ`` columns, their product and
#: its two intermediates) beside ``L⁻ᵀ`` (``m × m``), and the mean, ``α``, the variance, ``λ``, ``p``...
FEW_MISSING_PREDICT = (4.0, 7.0)
#: ... sample(n): ``(grid vectors per sample, grid vectors)``: the ``(N, n)`` blocks of Matheron's rule
#: (``ξ``, ``f₀``, ``ε``, the right-hand side, ``C_OO⁻¹`` applied with its products' intermediates)
FEW_MISSING_SAMPLE = (9.0, 5.3)
#: separable-mask path, ``predict()`` and ``sample(n)`` (:class:`kronegp.models._separable_mask.SeparableMask`;
#: measured with :class:`LiveBytes`, 2026-12-07, land masks of 331–1387 points on 20×24×60 to 50×40×8,
#: within 5 %): the system holds ``K_S`` and its eigenvectors ``V`` (``|S|²`` each) and ``D``, ``P``
#: (``|S| × n_B`` each); its ``eigh`` holds a third ``|S|²`` (the symmetrised ``K_S``) and
#: :data:`SEPARABLE_BUILD_VECTORS` grid vector (the residual; a sample's ``ξ`` besides).
SEPARABLE_BUILD_VECTORS = 1.0
#: ... predict: ``(rows × |S| blocks, grid vectors)``: the variance's blocks of ``K_A[a, S]`` for
#: :func:`~kronegp.models._separable_mask.variance_rows` points ``a`` (the cross-covariance, ``H = K_A[a, S] V``,
#: ``H ∘ H``), and the mean, the variance and the zero-filled ``α``
SEPARABLE_PREDICT = (3.0, 3.0)
#: ... sample(n): ``(grid vectors per sample, grid vectors)`` (as :data:`FEW_MISSING_SAMPLE`)
SEPARABLE_SAMPLE = (8.0, 2.0)
#: On CUDA, ``m × N`` blocks that the exact-missing rows' Kronecker product through the box does not hold
#: against the CPU counts above (the fused kernel's passes; H100, 2026-12-07, 216 scattered cells on
#: 96×90×80 float32, ``torch.cuda.max_memory_allocated``: step 4.49 and predict 3.55 blocks where the CPU
#: counts give 4.9 and 4.0, plans 10–13 % over). One measurement: rerun the cuda tests of tests/test_memory_plan.py.
FEW_MISSING_CUDA_SAVES = 0.4
#: On CUDA, ``|S|²`` elements that ``K_S``'s ``eigh`` holds beyond the CPU's count (the symmetrised input and
#: the eigenvectors): cuSOLVER's ``syevd`` workspace (its lwork ``1 + 6|S| + 2|S|²``) and torch's copies around it.
#: Traced on the H100 (``torch.cuda.memory`` history, 2026-12-07 16:17 UTC, land mask, |S| = 5336 float32): at the
#: predict's peak the ``eigh`` line held 6.03·|S|² and ``K_S`` one more (771 MiB measured; 2 here planned 615).
SEPARABLE_EIGH_CUDA = 4.0
#: On CUDA, ``N × c`` blocks more than :data:`FEW_MISSING_PREDICT`'s for the exact-missing variance: its
#: Kronecker product of ``(N, c)`` blocks runs through the axis GEMMs, which hold three of them at once (traced,
#: H100, same run: 216 cells on 120×110×90 float32, ``c`` = 56: five blocks live at the peak, 1310 MiB against
#: 1119 planned with four).
FEW_MISSING_CUDA_VARIANCE = 1.0
#: ... and ``(N, n)`` blocks per sample more than :data:`FEW_MISSING_SAMPLE`'s (same trace, sample(8): 10.6 blocks
#: per sample live at the peak, the Kronecker product's passes holding five).
FEW_MISSING_CUDA_DRAWS = 1.0


class MemoryPlanError(MemoryError):
    """A GridGP operation cannot fit in the device's free memory (raised before it starts)."""


@dataclass
class MemoryPlan:
    """Predicted peak memory of one operation.

    Attributes:
        operation: what is planned (``"exact step"``, ``"exact predict"``, ``"cg step"``, ...).
        shape, dtype: the grid.
        chunk: elements per temporary slab; for a cg plan, columns per block CG run.
        model_bytes: the model's own buffers (values, mask, per-cell noise), held throughout.
        parts: bytes of each buffer alive at the operation's peak (besides ``model_bytes``).
        free_bytes: the free memory the plan was made for (``None``: unlimited, e.g. the CPU).
    """

    operation: str
    shape: tuple
    dtype: torch.dtype
    chunk: int
    model_bytes: int
    parts: dict = field(default_factory=dict)
    free_bytes: Optional[int] = None

    @property
    def peak_bytes(self) -> int:
        """Predicted peak of allocated memory (model buffers included)."""
        return self.model_bytes + sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.peak_bytes <= HEADROOM * self.free_bytes

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items() if v >= 2**20)
        free = "" if self.free_bytes is None else f" of {self.free_bytes / GIB:.2f} GiB free"
        return (f"{self.operation} on a {'×'.join(map(str, self.shape))} {str(self.dtype).replace('torch.', '')} grid: "
                f"peak {self.peak_bytes / GIB:.2f} GiB{free} (model {self.model_bytes / GIB:.2f} GiB; {parts} GiB; "
                f"{self._chunk_words()})")

    def _chunk_words(self) -> str:
        if self.operation.startswith("cg"):  # the chunk of a cg plan: columns per block CG run
            return f"CG runs of {self.chunk} columns"
        if self.operation.startswith(("exact-missing", "separable-mask")):
            return "not chunked"
        return f"chunk {self.chunk} elements"


# ---------------------------------------------------------------------- counting


def _cells(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def slab_elements(shape: Sequence[int], chunk: int) -> int:
    """Elements of one first-axis slab for ``chunk`` (``kronegp.models._kron.slabs``): whole rows,
    at least one."""
    rest = _cells(shape[1:])
    rows = max(1, min(int(shape[0]), chunk // max(rest, 1)))
    return rows * rest


def model_bytes(shape: Sequence[int], dtype: torch.dtype, *, mask: bool = False, cell_noise: bool = False) -> int:
    """The model's grid buffers: values, the mask (and its complement, bool), per-cell noise."""
    n, item = _cells(shape), torch.finfo(dtype).bits // 8
    return n * item * (1 + int(cell_noise)) + (2 * n if mask else 0)


def _factor_bytes(shape: Sequence[int]) -> int:
    """Factor-sized matrices of a step (kernel matrices, eigenvectors in float64 and in the model's
    dtype, grams, gradients): two float64 matrices per factor at the peak (measured, LiveBytes)."""
    return 2 * 8 * sum(int(s) ** 2 for s in shape)


def _runtime(device_type: str) -> int:
    return RUNTIME_BYTES if device_type == "cuda" else 0


def plan_exact_step(shape: Sequence[int], dtype: torch.dtype, chunk: int, *, user_mean: bool = False,
                    device_type: str = "cuda") -> MemoryPlan:
    """A training step (likelihood and gradients) on the exact path."""
    n, item = _cells(shape), torch.finfo(dtype).bits // 8
    slab = slab_elements(shape, chunk) * item
    parts = {"alpha_t": n * item, "slabs": 3 * slab}
    if user_mean:
        parts["mean"] = n * item
        parts["alpha"] = n * item
    parts["factors"] = _factor_bytes(shape)
    parts["runtime"] = _runtime(device_type)
    return MemoryPlan("exact step", tuple(shape), dtype, chunk, model_bytes(shape, dtype), parts)


def plan_exact_predict(shape: Sequence[int], dtype: torch.dtype, chunk: int, *, user_mean: bool = False,
                       device_type: str = "cuda") -> MemoryPlan:
    """``predict()`` on the grid, exact path: the mean and variance (results) and slabs."""
    n, item = _cells(shape), torch.finfo(dtype).bits // 8
    slab = slab_elements(shape, chunk) * item
    # peak while the variance's Kronecker product runs: mean, var and the product's two slab
    # temporaries (the mean's slab loop before it holds one grid vector and three slabs: less)
    parts = {"mean": n * item, "var": n * item, "slabs": 2 * slab}
    if user_mean:
        parts["prior_mean"] = n * item
    parts["factors"] = _factor_bytes(shape)
    parts["runtime"] = _runtime(device_type)
    return MemoryPlan("exact predict", tuple(shape), dtype, chunk, model_bytes(shape, dtype), parts)


def plan_exact_sample(shape: Sequence[int], dtype: torch.dtype, chunk: int, samples: int, *,
                      user_mean: bool = False, device_type: str = "cuda") -> MemoryPlan:
    """``sample(samples)`` on the exact path: the draws (result), the posterior mean and slabs."""
    n, item = _cells(shape), torch.finfo(dtype).bits // 8
    slab = slab_elements(shape, chunk) * item
    # the draws, the mean, and two slabs (the slab loop's eigenvalue products, then a draw's product)
    parts = {"samples": samples * n * item, "mean": n * item, "slabs": 2 * slab}
    if user_mean:
        parts["prior_mean"] = n * item
    parts["factors"] = _factor_bytes(shape)
    parts["runtime"] = _runtime(device_type)
    return MemoryPlan(f"exact sample({samples})", tuple(shape), dtype, chunk, model_bytes(shape, dtype), parts)


def _factored(operation: str, shape: Sequence[int], dtype: torch.dtype, device_type: str, *phases: dict) -> MemoryPlan:
    """A plan of the exact-missing or separable-mask path (not chunked: its chunk is ``N``): the parts of
    the phase with the most bytes (the peak, not a sum of phases), the factors and the runtime besides."""
    parts = {**max(phases, key=lambda parts: sum(parts.values())), "factors": _factor_bytes(shape),
             "runtime": _runtime(device_type)}
    return MemoryPlan(operation, tuple(shape), dtype, _cells(shape), model_bytes(shape, dtype, mask=True), parts)


def _draws(held: dict, shape: Sequence[int], dtype: torch.dtype, samples: int, counts: tuple[float, float]) -> dict:
    """The parts of a factored path's sample while Matheron's rule runs: what the system holds, and
    ``counts = (grid vectors per sample, grid vectors)``."""
    n, item = _cells(shape), torch.finfo(dtype).bits // 8
    per_sample, vectors = counts
    return {**held, f"draws ({per_sample:g} × N × {samples})": int(per_sample * samples * n * item),
            "grid vectors": int(vectors * n * item)}


def plan_few_missing_step(shape: Sequence[int], dtype: torch.dtype, m: int, box_sizes: Sequence[int], *,
                          boxed: bool, device_type: str = "cuda") -> MemoryPlan:
    """A training step on the exact-missing path with ``m`` missing cells spanning a box of ``box_sizes``
    indices per axis (:attr:`~kronegp.models._few_missing.MissingBox.box_sizes`): through the box when
    ``boxed`` (:func:`~kronegp.models._few_missing.box_pays`), else through the ``m × N`` rows. Its
    :attr:`MemoryPlan.chunk` is ``N`` (nothing is chunked)."""
    n, item = _cells(shape), torch.finfo(dtype).bits // 8
    parts = {"grid vectors": int((FEW_MISSING_BOX_VECTORS if boxed else FEW_MISSING_VECTORS) * n * item)}
    if boxed:
        box = math.prod(box_sizes)
        squares, box_squares, box_index = FEW_MISSING_BOX
        parts[f"G, its factor and inverse ({squares:g} × {m}², {box_squares + box_index:g} × {box}²)"] = \
            int((squares * m * m + box_squares * box * box) * item + box_index * box * box * 8)
        parts["log det G gradient's modes"] = int(max(n * b * (3 + b / k) for b, k in zip(box_sizes, shape)) * item)
    else:
        rows, squares = FEW_MISSING_ROWS
        rows -= FEW_MISSING_CUDA_SAVES if device_type == "cuda" else 0.0
        parts[f"G, its factor and inverse ({squares:g} × {m}²)"] = int(squares * m * m * item)
        parts[f"rows ({rows:g} × {m} × N)"] = int(rows * m * n * item)
    return _factored(f"exact-missing step ({m} missing cells)", shape, dtype, device_type, parts)


def plan_separable_step(shape: Sequence[int], dtype: torch.dtype, points: int, *,
                        device_type: str = "cuda") -> MemoryPlan:
    """A training step on the separable-mask path with ``points`` observed points ``|S|`` of the masked
    axes (the dense ``K_S`` and its eigenvectors). Its :attr:`MemoryPlan.chunk` is ``N`` (nothing is chunked)."""
    n, item = _cells(shape), torch.finfo(dtype).bits // 8
    parts = {"grid vectors": int(SEPARABLE_VECTORS * n * item),
             f"K_S and its eigenvectors ({SEPARABLE_SQUARES:g} × {points}²)": int(SEPARABLE_SQUARES * points**2 * item)}
    return _factored(f"separable-mask step ({points} points)", shape, dtype, device_type, parts)


def _few_missing_phases(shape: Sequence[int], dtype: torch.dtype, m: int, box_sizes: Sequence[int], *, boxed: bool,
                        through_box: bool, vectors: float, device_type: str) -> tuple[dict, dict]:
    """``(held, build)``: the parts the exact-missing system holds once built, and those of its build's
    peak (``held`` included; ``vectors`` grid vectors of the caller beside)."""
    n, item = _cells(shape), torch.finfo(dtype).bits // 8
    box = math.prod(box_sizes)
    held = {f"G and its factor (2 × {m}²)": 2 * m * m * item}
    if boxed:
        held[f"the box's pair index ({box}² int64)"] = box * box * 8
        extra = {} if box == m else {f"the box's gram and its rows ({box}² + {m} × {box})": (box * box + m * box) * item}
    else:
        held[f"rows U ({m} × N)"] = m * n * item
        # Y, and the Kronecker product's two intermediates (fewer on CUDA)
        blocks = 3 - (FEW_MISSING_CUDA_SAVES if device_type == "cuda" else 0.0) if through_box else 1
        extra = {f"Y{' and a product through the box' if through_box else ''} ({blocks:g} × {m} × N)": int(blocks * m * n * item)}
    build = {**held, **extra, "grid vectors": int((FEW_MISSING_BUILD_VECTORS + vectors) * n * item)}
    return held, build


def plan_few_missing_predict(shape: Sequence[int], dtype: torch.dtype, m: int, box_sizes: Sequence[int], *,
                             boxed: bool, through_box: bool, columns: int, device_type: str = "cuda") -> MemoryPlan:
    """``predict()`` on the grid, exact-missing path: ``G``'s build (:func:`plan_few_missing_step`'s ``boxed``;
    ``through_box``: :func:`~kronegp.models._few_missing.rows_through_box`) or the variance's blocks of ``columns``
    (:func:`~kronegp.models._few_missing.variance_columns`), whichever holds more. :attr:`MemoryPlan.chunk`: ``N``."""
    n, item = _cells(shape), torch.finfo(dtype).bits // 8
    held, build = _few_missing_phases(shape, dtype, m, box_sizes, boxed=boxed, through_box=through_box, vectors=0,
                                      device_type=device_type)
    blocks, vectors = FEW_MISSING_PREDICT
    blocks += FEW_MISSING_CUDA_VARIANCE if device_type == "cuda" else 0.0
    variance = {**held, f"L⁻ᵀ ({m}²)": m * m * item,
                f"variance blocks ({blocks:g} × N × {columns} columns)": int(blocks * n * columns * item),
                "grid vectors": int(vectors * n * item)}
    return _factored(f"exact-missing predict ({m} missing cells)", shape, dtype, device_type, build, variance)


def plan_few_missing_sample(shape: Sequence[int], dtype: torch.dtype, m: int, box_sizes: Sequence[int], samples: int, *,
                            boxed: bool, through_box: bool, device_type: str = "cuda") -> MemoryPlan:
    """``sample(samples)``, exact-missing path: ``G``'s build (beside the draws' ``ξ``) or Matheron's rule
    on ``(N, samples)`` blocks, whichever holds more (:func:`plan_few_missing_predict`'s arguments)."""
    held, build = _few_missing_phases(shape, dtype, m, box_sizes, boxed=boxed, through_box=through_box,
                                      vectors=samples, device_type=device_type)
    per_sample, vectors = FEW_MISSING_SAMPLE
    per_sample += FEW_MISSING_CUDA_DRAWS if device_type == "cuda" else 0.0
    return _factored(f"exact-missing sample({samples}) ({m} missing cells)", shape, dtype, device_type, build,
                     _draws(held, shape, dtype, samples, (per_sample, vectors)))


def _separable_phases(shape: Sequence[int], dtype: torch.dtype, points: int, n_b: int, vectors: float,
                      device_type: str) -> tuple[dict, dict]:
    """``(held, build)`` of the separable-mask system (as :func:`_few_missing_phases`)."""
    n, item = _cells(shape), torch.finfo(dtype).bits // 8
    held = {f"K_S and its eigenvectors (2 × {points}²)": 2 * points**2 * item,
            f"D and P (2 × {points} × {n_b})": 2 * points * n_b * item}
    # K_S is decomposed in float64 whatever the model's dtype (SeparableMask): below it, eigh's input is a float64
    # copy of the symmetrised K_S and its eigenvectors float64 too (rounded to the model's dtype after)
    wide = 8
    if item >= wide:
        build = {f"K_S, its symmetrised copy and eigenvectors (3 × {points}²)": 3 * points**2 * item}
    else:
        build = {f"K_S and its symmetrised copy (2 × {points}²)": 2 * points**2 * item,
                 f"their float64 copy and eigenvectors (2 × {points}², float64)": 2 * points**2 * wide}
    build["grid vectors"] = int((SEPARABLE_BUILD_VECTORS + vectors) * n * item)
    if device_type == "cuda":
        build[f"eigh workspace ({SEPARABLE_EIGH_CUDA:g} × {points}², float64)"] = int(SEPARABLE_EIGH_CUDA * points**2 * max(item, wide))
    return held, build


def plan_separable_predict(shape: Sequence[int], dtype: torch.dtype, points: int, n_b: int, rows: int, *,
                           device_type: str = "cuda") -> MemoryPlan:
    """``predict()`` on the grid, separable-mask path with ``points`` observed points ``|S|`` of the masked
    axes and ``n_b`` cells of the free ones: ``K_S``'s ``eigh`` or the variance's blocks of ``rows`` points
    of the masked axes (:func:`~kronegp.models._separable_mask.variance_rows`, at most their count),
    whichever holds more. :attr:`MemoryPlan.chunk`: ``N``."""
    n, item = _cells(shape), torch.finfo(dtype).bits // 8
    held, build = _separable_phases(shape, dtype, points, n_b, 0, device_type)
    blocks, vectors = SEPARABLE_PREDICT
    variance = {**held, f"variance blocks ({blocks:g} × {rows} × {points})": int(blocks * rows * points * item),
                "grid vectors": int(vectors * n * item)}
    return _factored(f"separable-mask predict ({points} points)", shape, dtype, device_type, build, variance)


def plan_separable_sample(shape: Sequence[int], dtype: torch.dtype, points: int, n_b: int, samples: int, *,
                          device_type: str = "cuda") -> MemoryPlan:
    """``sample(samples)``, separable-mask path: ``K_S``'s ``eigh`` (beside the draws' ``ξ``) or Matheron's
    rule on ``(N, samples)`` blocks, whichever holds more (:func:`plan_separable_predict`'s arguments)."""
    held, build = _separable_phases(shape, dtype, points, n_b, samples, device_type)
    return _factored(f"separable-mask sample({samples}) ({points} points)", shape, dtype, device_type, build,
                     _draws(held, shape, dtype, samples, SEPARABLE_SAMPLE))


def _cg_kind(missing: bool, per_cell: bool) -> str:
    return "both" if missing and per_cell else "missing" if missing else "per-cell"


def plan_cg_step(shape: Sequence[int], dtype: torch.dtype, probes: int, *, missing: bool, per_cell: bool,
                 device_type: str = "cuda", run: Optional[int] = None, coarse: int = 0,
                 mixed: Optional[bool] = None) -> MemoryPlan:
    """A training step on the cg path with ``probes`` probe vectors (``probes + 1`` CG columns), in
    CG runs of ``run`` columns (default all in one; several runs only with missing cells and
    homoskedastic noise, see the module docstring). :attr:`MemoryPlan.chunk` is the run. ``coarse``:
    the bytes of a hole's two-level preconditioner (:func:`kronegp.models._two_level.coarse_bytes`,
    alive through the whole step)."""
    n, item = _cells(shape), torch.finfo(dtype).bits // 8
    kind = _cg_kind(missing, per_cell)
    cols = probes + 1
    run = cols if run is None or kind != "missing" else max(1, min(cols, int(run)))
    blocks = CG_BLOCKS[kind] - (CG_FUSED_SAVES[kind] if device_type == "cuda" else 0.0)
    vectors = CG_VECTORS[kind] + (CG_RUN_VECTORS if run < cols else 0.0)
    if mixed is None:  # ``mixed``: the refinement's mixed-precision rounds (default: below float64)
        mixed = item < 8
    refine = CG_REFINE[1] + (CG_REFINE_MIXED * 8 / item if mixed else 0.0)
    cell_refine = CG_REFINE_CELL[1] + CG_REFINE_MIXED * 8 / item
    if kind == "missing" and CG_REFINE[0] * run + refine > blocks * run + vectors:
        blocks, vectors, phase = CG_REFINE[0], refine, "refine, "  # the data column's refinement
    elif kind == "per-cell" and mixed and CG_REFINE_CELL[0] * run + cell_refine > blocks * run + vectors:
        blocks, vectors, phase = CG_REFINE_CELL[0], cell_refine, "refine, "  # few probes: the data column's check
    else:
        phase = ""
    runs = -(-cols // run)
    parts = {f"cg blocks ({phase}{blocks:g} × {run} columns{f', {runs} runs' if runs > 1 else ''})":
             int(blocks * run * n * item)}
    parts["grid vectors"] = int(vectors * n * item)
    parts["factors"] = _factor_bytes(shape)
    parts["runtime"] = _runtime(device_type)
    if coarse:
        parts[COARSE_PART] = int(coarse)
    return MemoryPlan(f"cg step ({probes} probes)", tuple(shape), dtype, run,
                      model_bytes(shape, dtype, mask=missing, cell_noise=per_cell), parts)


def choose_cg_run(shape: Sequence[int], dtype: torch.dtype, probes: int, *, missing: bool, per_cell: bool,
                  device_type: str = "cuda", budget: Optional[float] = None, coarse: int = 0) -> MemoryPlan:
    """The cg step's plan with the longest CG run within ``budget`` bytes: all ``probes + 1``
    columns in one run when they fit (or with no budget), else the longest shorter run (missing
    cells with homoskedastic noise only), else the one-column run's plan (the caller reports it).
    The longest that fits, not the shortest: each run repeats the iterations of the whole CG."""
    block = _cells(shape) * (torch.finfo(dtype).bits // 8)  # one grid vector: a column of a run's blocks

    def fits(plan: MemoryPlan) -> bool:
        # On CUDA a run's blocks are single allocations of `run` grid vectors, which the caching
        # allocator's fragments may not hold: measured on the H100 (2026-12-07), 768³ float32 with 20 %
        # missing planned at 70.96 GiB in runs of 4 against a 72.2 GiB budget died asking for one 4-column
        # block (6.75 GiB) with 4.98 GiB reserved but unallocated. Keep one such block spare.
        spare = plan.chunk * block if device_type == "cuda" else 0
        return plan.peak_bytes + spare <= budget

    # with the mixed-precision rounds where they fit (below float64), else without: they run only then
    for mixed in ((True, False) if torch.finfo(dtype).bits < 64 else (False,)):
        plan = plan_cg_step(shape, dtype, probes, missing=missing, per_cell=per_cell, device_type=device_type,
                            coarse=coarse, mixed=mixed)
        if budget is None or fits(plan):
            return plan
        if _cg_kind(missing, per_cell) != "missing":
            continue
        for run in range(probes, 0, -1):
            plan = plan_cg_step(shape, dtype, probes, missing=missing, per_cell=per_cell, device_type=device_type,
                                run=run, coarse=coarse, mixed=mixed)
            if fits(plan):
                return plan
    return plan


# ---------------------------------------------------------------------- choosing and checking


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes a new allocation can get on ``device``: the driver's free memory plus what torch's
    caching allocator holds unused; ``None`` off CUDA (no limit is planned for)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + cached)


def _choose_chunk(planner: Callable[[int], MemoryPlan], n: int, budget: Optional[float]) -> MemoryPlan:
    """The plan with the largest chunk (``min(N, MAX_CHUNK)``, halved while over ``budget`` bytes)
    within ``budget``; the one-row slab's plan when none is (the caller reports it). The largest
    that fits, not the smallest: each slab costs launches (a 128³ step in one slab launches about
    as many kernels as before slabs existed)."""
    chunk = max(1, min(MAX_CHUNK, n))
    plan = planner(chunk)
    while budget is not None and plan.peak_bytes > budget and chunk > 1:
        smaller = planner(chunk // 2)
        if smaller.peak_bytes >= plan.peak_bytes:  # one slab is the floor: no gain below it
            return smaller
        chunk, plan = chunk // 2, smaller
    return plan


def choose_exact_plan(shape: Sequence[int], dtype: torch.dtype, operation: str, *, samples: int = 1,
                      user_mean: bool = False, device_type: str = "cuda", budget: Optional[float] = None) -> MemoryPlan:
    """The exact path's plan of ``operation`` (:data:`OPERATIONS`: :func:`plan_exact_step`,
    :func:`plan_exact_predict` or :func:`plan_exact_sample`) with the largest chunk within ``budget``
    bytes (:func:`_choose_chunk`)."""
    kw = dict(user_mean=user_mean, device_type=device_type)
    planners = {"step": lambda c: plan_exact_step(shape, dtype, c, **kw),
                "predict": lambda c: plan_exact_predict(shape, dtype, c, **kw),
                "sample": lambda c: plan_exact_sample(shape, dtype, c, samples, **kw)}
    return _choose_chunk(planners[operation], _cells(shape), budget)


#: what :func:`plan_for_model` plans: a training step, ``predict()`` on the grid, ``sample(samples)``
OPERATIONS = ("step", "predict", "sample")


def plan_for_model(model, operation: str = "step", *, samples: int = 1,
                   free_bytes: Optional[int] = None,
                   free: Callable[[torch.device], Optional[int]] = free_memory) -> MemoryPlan:
    """The plan of ``operation`` (``"step"``, ``"predict"`` or ``"sample"``) for a GridGP ``model``,
    made by its inference path (:meth:`kronegp.models.paths.InferencePath.memory_plan`: which counts
    apply, and the chunk or CG run).

    ``free_bytes``: the memory available (default ``free(device)`` plus the model's own buffers,
    which the plan counts: they are already allocated). The path's chunk is the largest within
    :data:`HEADROOM` of it.
    """
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be 'step', 'predict' or 'sample', got {operation!r}")
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    shape, dtype, dev = tuple(model.shape), model.y.dtype, model.y.device
    own = model_bytes(shape, dtype, mask=model.observed is not None, cell_noise=model.cell_noise is not None)
    if free_bytes is None:
        avail = free(dev)
        free_bytes = None if avail is None else avail + own
    budget = None if free_bytes is None else HEADROOM * free_bytes
    plan = model.inference.memory_plan(model, operation, samples, budget)
    plan.free_bytes = free_bytes
    return plan


def operation_chunk(model, operation: str = "step", samples: int = 1) -> int:
    """The chunk of ``operation`` for a GridGP ``model``, after checking that it fits
    (:class:`MemoryPlanError` before any work otherwise). A training step's is kept (in the
    model) until the next ``fit`` drops it (``model.__dict__["_step_chunk"]``)."""
    if operation != "step":
        return check_plan(model.memory_plan(operation, samples=samples), model).chunk
    key = (model.y.dtype, model.y.device, model.path, model.num_probes, model.shape)
    cached = model.__dict__.get("_step_chunk")
    if cached is None or cached[0] != key:
        cached = model.__dict__["_step_chunk"] = (key, check_plan(model.memory_plan("step"), model).chunk)
    return cached[1]


def plan_cg_model(model, probes: int, budget: Optional[float], coarse: Optional[int] = None) -> MemoryPlan:
    """The cg path's step plan for ``model`` with ``probes`` (:func:`choose_cg_run`): runs only where its
    cg path can split them (the preconditioned estimator; :func:`choose_cg_run` says which noise).
    ``coarse``: the two-level preconditioner's bytes when already known (they do not depend on
    ``probes``; else measured from the mask)."""
    missing, per_cell = model.observed is not None, model.cell_noise is not None
    if coarse is None:
        coarse = _coarse(model) if missing else 0
    args = dict(missing=missing, per_cell=per_cell, device_type=model.y.device.type, coarse=coarse)
    if model.precondition:
        return choose_cg_run(tuple(model.shape), model.y.dtype, probes, budget=budget, **args)
    return plan_cg_step(tuple(model.shape), model.y.dtype, probes, **args)


def _coarse(model) -> int:
    """:func:`kronegp.models._two_level.coarse_bytes` of ``model``'s mask, kept (in the model) while the
    mask's pieces are the same :class:`~kronegp.models._two_level.PieceSet` of
    :func:`~kronegp.models._two_level.cached_pieces` (the one the preconditioner reads: same mask, same
    version, same piece rules) and the dtype and ``ENABLED`` are: a plan is made at every ``fit`` and
    ``memory_plan``, and finding the pieces reads the whole mask on the host (``scipy.ndimage``: 47 ms at
    128³ on the CPU machine, growing with the grid)."""
    from kronegp.models import _two_level

    shape, item = tuple(model.shape), torch.finfo(model.y.dtype).bits // 8
    pieces = _two_level.cached_pieces(model.observed, shape)
    key = (shape, item, _two_level.ENABLED)
    kept = model.__dict__.get("_coarse_bytes")
    if kept is None or kept[0] is not pieces or kept[1] != key:
        kept = model.__dict__["_coarse_bytes"] = (pieces, key, _two_level.coarse_bytes(model.observed.logical_not(),
                                                                                           shape, item, pieces))
    return kept[2]


def check_plan(plan: MemoryPlan, model=None) -> MemoryPlan:
    """Raise :class:`MemoryPlanError` when ``plan`` does not fit, saying what it needs and what
    would fit (fewer probes, float32, a sharded model over several GPUs); return it otherwise."""
    if plan.fits:
        return plan
    need, free = plan.peak_bytes, plan.free_bytes
    hints = []
    if plan.operation.startswith("cg") and model is not None:
        coarse = plan.parts.get(COARSE_PART, 0)  # the mask's box, measured once for the plan
        fitting = [p for p in range(model.num_probes - 1, 0, -1)
                   if plan_cg_model(model, p, HEADROOM * free, coarse).peak_bytes <= HEADROOM * free]
        if fitting:
            hints.append(f"num_probes={fitting[0]} fits")
        else:
            hints.append("no probe count fits (not even CG runs of one column)" if plan.chunk == 1
                         else "no probe count fits")
    if plan.operation.startswith(("exact-missing step", "separable-mask step")) and model is not None:
        cg = plan_cg_model(model, model.num_probes, HEADROOM * free)
        if cg.peak_bytes <= HEADROOM * free:
            hints.append(f"path='cg' fits ({cg.peak_bytes / GIB:.2f} GiB, {cg._chunk_words()})")
    if plan.dtype == torch.float64:
        hints.append("float32 halves every grid buffer")
    if " sample(" in plan.operation:
        hints.append("fewer samples per call")
    gpus = max(2, math.ceil(need / (HEADROOM * free)))
    hints.append(f"kronegp.distributed.DistributedGridGP splits the grid over ranks (about {gpus} such GPUs)")
    raise MemoryPlanError(
        f"GridGP: not enough device memory: {plan.describe()}; needs {need / GIB:.2f} GiB but "
        f"{HEADROOM:.0%} of {free / GIB:.2f} GiB free is {HEADROOM * free / GIB:.2f} GiB. What would fit: "
        + "; ".join(hints) + "."
    )


# ---------------------------------------------------------------------- measuring (CPU)


class LiveBytes:
    """Peak bytes of tensor storage alive while it is active, counted at every torch operation
    (a ``TorchDispatchMode``): every tensor an operation returns — autograd's saved tensors and
    the backward's included — until its storage is freed. Storages that existed before count
    from the first operation that returns them, or from the start if passed as ``existing``
    (:attr:`baseline` is their total). For checking a plan on the CPU, where
    ``torch.cuda.max_memory_allocated`` has no counterpart::

        with LiveBytes(existing=model.buffers()) as live:
            model.loss_backward()
        live.peak - live.baseline  # bytes the step added at its peak
    """

    def __init__(self, existing=()):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.peak = 0
        self.now = 0
        self._live: dict = {}
        for t in existing:
            if isinstance(t, Tensor):
                s = t.untyped_storage()
                self._live[s._cdata] = (StorageWeakRef(s), s.nbytes())
        self.baseline = self.now = self.peak = sum(b for _, b in self._live.values())

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                live = tracker._live
                for t in tree_flatten(out)[0]:
                    if isinstance(t, Tensor) and t.device.type != "meta":
                        s = t.untyped_storage()
                        key = s._cdata
                        if key not in live or live[key][0].expired():
                            live[key] = (StorageWeakRef(s), s.nbytes())
                for key in [k for k, (ref, _) in live.items() if ref.expired()]:
                    del live[key]
                tracker.now = sum(b for _, b in live.values())
                tracker.peak = max(tracker.peak, tracker.now)
                return out

        self._mode = _Mode()

    def __enter__(self) -> "LiveBytes":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)
