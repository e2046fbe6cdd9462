"""A two-level preconditioner for the missing cells' system ``G = X_MM`` of holes and clouds.

Notation of :mod:`kronegp.models._masked`: ``X ≈ C⁻¹`` applied as ``Q diag(p) Qᵀ`` (``p = 1/(λ + σ²)``,
exact for homoskedastic noise; ``P⁻¹`` of the Kronecker preconditioner with per-cell noise),
``M`` the ``m`` missing cells, ``J = diag(X)_M`` (the Jacobi scaling the cg path always had).

**Why a hole is slow.** ``G⁻¹`` is the conditional covariance of the missing values given the
observed ones. Scattered cells are pinned by their observed neighbours: ``J⁻¹G`` has eigenvalues
within a small factor of 1 and CG takes ~5 iterations. In a hole, a mode that is smooth over
the hole (prior variance ``s²Πμ ≫ σ²``) is not pinned: ``vᵀGv / vᵀJv`` falls towards
``σ²/(s²Πμ)``, and CG needs ~``√(s²/σ²)``-many more iterations (measured, 40³ grid, hole of
19³ cells: 95 against 5 for the same number of scattered cells).

**Pieces.** The missing cells are cut into their connected components (cells sharing a face,
:func:`pieces_of`): a hole is one piece, three holes three, merged cloud blobs one piece with a
large, partly observed box; components of fewer than :data:`MIN_MISSING` cells (scattered
cells) get none. Each piece ``i`` gets its own coarse space ``W_i`` on its own cells, so the
pieces' corrections act on disjoint cells and ``M`` below is block diagonal over them: every
formula of this docstring holds per piece, and the log determinants and probes add up.

**Coarse space.** Those modes are, to a good approximation, the leading eigenvectors of the
kernel restricted to the piece's bounding box, which is a Kronecker product: with
``K_k[I_k, I_k] = V_k diag(μ_k) V_kᵀ`` (``I_k`` the box's indices on axis ``k``), the columns of
``W = E_M (⊗V_k) S`` are the tensor modes ``(j_1, …, j_d)`` with ``s² Π_k μ_k[j_k] ≥`` :data:`MODE_SCORE`
``· σ²`` (``S`` selects them, at most :data:`MAX_MODES`, :data:`MAX_TOTAL_MODES` over all pieces;
``E_M`` restricts the box to the piece's cells). The preconditioner is two-level (Jacobi plus a
Galerkin coarse solve per piece), with Jacobi's own share of the coarse space taken out::

    M = J⁻¹ + Σ_i W_i (E_i⁻¹ − F_i⁻¹) W_iᵀ,   E = Wᵀ G W = Sᵀ (⊗R_k) diag(p) (⊗R_k)ᵀ S,   F = Wᵀ J W,
                                                R_k = V_kᵀ Q_k[I_k, :]

that is ``M = Π J⁻¹ Πᵀ + W E⁻¹ Wᵀ`` with ``Π = I − W F⁻¹ Wᵀ J`` (the ``J``-orthogonal projector off
``span W``): balancing Neumann–Neumann (Mandel 1993) with ``J`` standing in for ``G`` in the projector,
which needs no product with ``G``. The additive form ``J⁻¹ + W E⁻¹ Wᵀ`` (before 2026-12-07) counted the
smooth directions twice, by Jacobi and by the coarse solve: ``M G``'s spectrum [0.63, 1.79] against this
one's [0.60, 1.25] on a 24³ grid's 10 % hole, 9–10 → 7–8 CG iterations on 5 % and 10 % holes of 24³–64³
grids, 11 → 8–9 on clouds (NOTES.md, "Balanced two-level"). Balancing with ``G`` itself (``Y = G W``
formed per build) took 5–6 but costs ``m × k`` dense products per iteration and ``k`` grid products per
build, and stale (a frozen preconditioner) 7–9: not built.

``E`` costs one Kronecker matmul of ``n_1`` grid slabs with factors of ``r_k² × n_k`` (the
Khatri–Rao squares of ``R_k``, :func:`kronegp.models._few_missing.khatri_gram`, axis 1 summed
directly: :func:`selected_gram`) when the piece fills its box. Otherwise (a ragged hole, a cloud)
``W`` is not a Kronecker product, and ``E`` comes from ``X = I/σ² − Q diag(ω) Qᵀ`` (``ω = 1/σ² − p``)
with the eigen-coordinates of prior variance below ``ϑ`` dropped (:func:`truncated_galerkin`):
``E ⪯ Ẽ ⪯ (1 +`` :data:`GALERKIN_TOL` ``) E``, any SPD ``Ẽ`` being correct (``ϑ`` certified a
posteriori where it can, else a priori). It costs the ``|S|`` box rows of ``W``, their Kronecker
matmul with the kept coordinates' ``Q_k[I_k, J_k]`` and ``|S|²`` flops per kept eigen-coordinate (on
clouds about a sixth of the grid's: the Matérn spectrum decays slowly), so such a piece takes at most
:data:`MAX_TRUNCATED_MODES` modes, its box rows formed :data:`MAX_BOX_ELEMENTS` elements at a time. (Forming
``X W`` through the grid, as the first version did, costs ``|S|`` grid products: as much as
``|S|/(s+1)`` CG iterations of ``s + 1`` columns.)
Applying ``M`` to a block costs two Kronecker products over the pieces' boxes with ``b_k × r_k``
factors and a ``|S_i| × |S_i|`` triangular solve pair, batched over pieces of similar boxes
(:class:`PieceSet`: their boxes and modes zero-padded, ``L`` identity-padded), so the ops per CG
iteration do not grow with the number of pieces. ``M`` is symmetric positive definite whatever
the ``E_i`` are (exact or not), so CG stays correct; its quality only sets the iterations.

**Host work.** The pieces depend on the mask alone and are found once per mask
(:func:`cached_pieces`); a step's setup reads the device once for ``s²/σ²``, once per piece for its
box eigenvalues (the modes it keeps set the shapes) and once per piece for its Cholesky check (twice
for a piece that does not fill its box: :func:`truncated_galerkin`'s a posteriori check)
(``benchmarks/holeops.py``: a 64³ hole's setup 17 → 3 host reads, 201 → 129 ops; the apply 11 ops
and two products per batch). That setup runs only when the model's kept preconditioner must be
rebuilt (below); a step that reuses it reads the device once, for its drift.

**Frozen across steps** (:class:`FrozenTwoLevel`). A model keeps its preconditioner, with the
hyperparameters it was built at, and reuses it until CG slows past :data:`REFRESH_ITERATIONS` or, in a
CUDA graph's step or a posterior's solves, the hyperparameters drift past :data:`REFRESH_DRIFT`: any fixed
SPD ``M`` keeps CG, the SLQ estimate (its
``log det P`` and probes from the same ``M``) and the gradient's trace estimate exact, and nothing
differentiates through it, so a stale one costs iterations, never accuracy. Each step applies ``κM``
(:meth:`TwoLevel.scaled`) with ``κ`` keeping the Jacobi part on the current ``diag(G)``. A CUDA graph's
step reads its tensors as static buffers (before, it fell back to Jacobi: a 128³ float32 fit with a
5 % hole hit CG's 1000-iteration cap on an H100), and a stale one is refreshed into them between
replays (:func:`two_level`'s ``like`` keeps the shapes). Measured (2-core CPU, loaded, one thread,
2026-12-07, ``benchmarks/gaps.py --holes``, process CPU time, steady-state step / rebuilt step / as
many scattered cells): 48³ 5 % hole 1.42 / 1.33 / 0.77 s and 64³ 4.62 / 4.71 / 2.47 s (a hole's
setup is lost in a CPU step's noise); ``clouds-20`` 48³ 3.68 / 5.51 / 0.67 s and 64³ 37.2 / 44.9 /
3.10 s (a third and a sixth off, with the cap at 256 then; at 512, below, 3.3× / 5.8–6.6×). Fits from the initial
hyperparameters (48³, ``--hole-fit``) rebuilt it at 3 of 8 Adam evaluations and 5–6 of 12 L-BFGS
ones (the first line search's long steps; none after), the reused steps taking 0–2 iterations more
for holes (9–11), 5–6 more for clouds (23 against 17). The GPU, where the setup was 9–16 ms of a
16–28 ms step at 128³, is not measured yet (NOTES.md).

**Exact log det and probes.** The SLQ estimate of ``log det G`` (:mod:`kronegp.solvers.lanczos`)
needs ``log det P`` of ``P = M⁻¹`` exactly and probes ``z ~ N(0, P)``. With
``B = J^{½} W L⁻ᵀ`` (``E = L Lᵀ``) and ``T = BᵀB = L⁻¹ F L⁻ᵀ`` (``|S| × |S|``, ``F = WᵀJW`` again one
Khatri–Rao gram over the box) ``= U diag(s) Uᵀ``, the columns of ``B̂ = B U diag(s)^{−½}`` are orthonormal
and ``J^{½} M J^{½} = I + B U diag(1 − 1/s) Uᵀ Bᵀ = I + B̂ diag(s − 1) B̂ᵀ``: eigenvalues ``s`` on the
coarse space (``s = vᵀJv / vᵀẼv``, between ~0.3 and ``s²/σ²``-large), 1 elsewhere. So::

    M's coarse part   W L⁻ᵀ U diag(g(s)) Uᵀ L⁻¹ Wᵀ,   g(s) = 1 − 1/s
    log det P = Σ_M log J − Σ log s
    z = J^{½} ξ + J W L⁻ᵀ U diag(f(s)) Uᵀ L⁻¹ Wᵀ J^{½} ξ,   f(s) = (s^{−½} − 1) / s

(``(I + B̂ diag(s − 1) B̂ᵀ)^{−½} = I + B U diag(f(s)) Uᵀ Bᵀ``, so ``Cov z = M⁻¹``). With unit probes
``ξ = √S e_i`` the trace estimates stay exact.

**Measured** (2-core CPU, loaded, one thread, 2026-12-07, Jacobi → two-level CG iterations on
``G`` with 17 columns, model at GridGP's initial hyperparameters, ``σ²/s² = 0.1``): 40³ grid,
hole 15³: 49 → 9 (132 modes at score ≥ 1); hole 19³: 95 → 9 (250 modes); same number of
scattered cells: 5. Scores 0.3 / 3 / 10 gave 8 / 12 / 17 iterations on the 19³ hole with
379 / 177 / 120 modes: 1 balances the modes' cost against the iterations. Training step
(``benchmarks/gaps.py --holes``, same machine, median of 2) against as many scattered cells:
1.6× / 2.8× at 40³ (Jacobi: 5× / 11×); 1.8× / 2.4× / 1.9× for the 1 / 5 / 10 % holes of 64³
(8 / 9 / 10 iterations with 87 / 319 / 584 modes, scatter 4–5). More in NOTES.md.

**Measured, pieces** (same machine and method, 2026-12-07, Jacobi → two-level): three 1 % holes
(``holes3-1``) 16 → 9 / 22 → 9 / 40 → 8 iterations at 32³ / 48³ / 64³, step 1.9× / 2.0× / 1.75×
the scatter's (Jacobi 3–6×). Clouds (``clouds-20``: the blobs merge into one component spanning the
grid, plus a dozen blobs) 45 → 14 / 83 → 28 / 135 → 63 iterations, but the step is 4.2× / 7.9× /
9–14× the scatter's: even with Jacobi at 32³, 1.7× faster at 48³, 0.9–1.4× at 64³, where the
merged component's modes are capped by :data:`MAX_BOX_ELEMENTS` (128) and setup (16 s) plus
applies (11 s) of a 70 s step eat most of the saving. Issue 22's ≤ 3× target holds for holes,
not clouds.

**Measured, clouds** (cloudsplit branch, same machine and method, 2026-12-07; ``benchmarks/cloud_pieces.py``
and NOTES.md "Clouds split into sub-box pieces"): cutting the merged component into sub-box pieces
(tiles of its box, overlapping or not, or cuts at its necks) never took fewer iterations than the one
component (48³: 46–63 against 49 on ``G`` at tol 1e-8; 32³: 24–58 against 23): the coupling between
the parts matters, and the pieces' log determinants need them disjoint. More modes on the merged
component do: caps of 256 / 512 / 1024 take 49 / 30 / 19 iterations on ``G`` at 48³ (28 / 18 / 11 in
the training step), but the step, which rebuilt the coarse space then, takes 4.8–5.7 / 6.4–6.7 / 15–16 s
(same process, alternating), so the cap stayed at 256 there (6.0× the scatter's at 48³; at 64³, where the
box-row cap gave the merged cloud 150 modes before, 64 → 50 iterations and 65–73 → 37–49 s a step: 13.7×
the scatter's). :func:`truncated_galerkin`'s a posteriori threshold keeps half the eigen-coordinates
(setup 2.15 → 1.75 s at 48³).

**Measured, clouds with the frozen preconditioner** (clouds2 branch, ``benchmarks/gaps.py --holes
--hole-patterns clouds-20 --hole-fit --no-jacobi``, one thread, process CPU time, load 2–4, 2026-12-07;
NOTES.md "Clouds with the frozen preconditioner"). Caps 256 / 512 / 1024 on the merged component's modes:
iterations; steady step / rebuilt step / as many scattered cells (s), steady ÷ scatter, a short fit (8 Adam
steps and one L-BFGS step of 12 evaluations, 8 of the 20 rebuilding, 9 at 64³; 1024 at 64³ estimated):

- 32³ (256 / 512): 14 / 11 its; 0.53 / 0.44 s, 0.98 / 1.47 s, 0.19 s; 2.8× / 2.4×; fit 21 / 23 s.
- 48³: 28 / 18 / 11 its; 2.83 / 2.24 / 1.79 s, 5.2 / 6.6 / 16.0 s, 0.58–0.69 s; 4.1× / 3.3× / 2.6–3.1×;
  fit 109 / 109 / 187 s.
- 64³: 50 / 30 / 17 its; 29.5 / 19.2 / 11.2 s, 39.1 / 37.7 / 110.8 s, 2.8–3.0 s; 10.2× / 6.6× / 3.9×;
  fit 799 / 701 / ≥ 1020 s (a second run: steady 28.9 / 18.0 s, rebuilt 39.0 / 36.1 s, scatter 2.7–3.1 s).

A fit's early evaluations rebuild it (Adam ``BrrrrBrB``, L-BFGS ``BBBBBrrrrrrr``): 1024's setup (64³:
~100 s) pays only after ~9 (64³) to ~21 (48³) reused steps per rebuild. So :data:`MAX_TRUNCATED_MODES`
is 512: the cheapest short fits at 48³ and 64³, +11 % at 32³, and the fastest step short of 1024. The
≤ 3× target holds at 32³; at 48³ only 1024 reaches it (2.6–3.1×), at 64³ no cap does (1024: 3.9×).

**Mass filter** (:func:`mass_filter`). A piece that does not fill its box takes up to :data:`MAX_CANDIDATE_MODES`
(:data:`MAX_CANDIDATE_MODES_CUDA` on a CUDA device) box modes and keeps only the directions of their span with at least :data:`MASS_SHARE` of their mass on its
cells: restricted to a ragged piece the box modes are very redundant, and the kept count follows the piece's
unpinned directions (about the wanted modes times the share of the box that is missing) instead of the box's.
``W = E_M (⊗V_k) S U`` with ``U`` from the candidates' gram over the piece (orthonormal on its cells); the
apply multiplies by ``Uᵀ`` / ``U`` beside the Kronecker products. Measured in the constants' comments and
NOTES.md: at 64³ (CPU) 30 → 15 iterations and a 1.7× faster steady step; at 128³ on an H100 146 → 45
iterations and 2.37 → 0.50 s a step with 4096 candidates (RESULTS.md round 17).

Applies to a grid held whole (the rows layout of :mod:`kronegp.models._masked`), to each piece of
:func:`pieces_of`: scattered cells (no piece) keep plain Jacobi, which already pins them.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import Tensor

from kronegp.models._few_missing import MissingBox, khatri_gram, khatri_square, pair_maps
from kronegp.linalg import kron_vector
from kronegp.models._kron import KronEigen
from kronegp.ops import kron_matmul, matmul_kron

__all__ = ["COARSE_DTYPE", "coarse_dtype", "CoarseBasis", "CoarsePiece", "FrozenTwoLevel", "TwoLevel", "two_level", "pieces_of", "selected_gram", "truncated_galerkin",
           "coarse_bytes", "ENABLED", "MODE_SCORE", "MAX_MODES", "MAX_TOTAL_MODES", "MAX_PIECES", "MAX_GRAM_ELEMENTS",
           "GALERKIN_TOL", "GALERKIN_TRIAL_C", "MAX_TRUNCATED_MODES", "MAX_CANDIDATE_MODES", "MAX_CANDIDATE_MODES_CUDA", "candidate_modes", "MASS_SHARE", "mass_filter", "MAX_BOX_ELEMENTS", "MIN_MISSING", "MIN_INTERIOR", "FREEZE",
           "REFRESH_DRIFT", "REFRESH_DRIFT_EAGER", "REFRESH_ITERATIONS", "REFRESH_MODES"]

#: Use the two-level preconditioner where it applies (tests and benchmarks switch it off to compare).
ENABLED = True
#: The coarse solves of a float32 (or narrower) grid are built in this dtype, and their small matrices (``E⁻¹ − F⁻¹``,
#: the probes') applied in it: ``E`` of a piece that does not fill its box is a difference (:func:`truncated_galerkin`)
#: whose small eigenvalues float32 loses, and a cloud's ``E`` fails its Cholesky there (measured, ``clouds-20`` 48³
#: float32, 2-core CPU, 2026-12-07: 670 modes and 97 iterations a step in float32, 1182 and 18 with the coarse solves
#: in float64, as a float64 grid gets; 4.7 → 1.4 s a step. At 128³ on an H100 the float32 step took 618 iterations,
#: 9.0 s). The basis' products (``V_k``, ``U``) run in the grid's dtype (:class:`TwoLevel`). ``None``: the grid's.
COARSE_DTYPE: Optional[torch.dtype] = torch.float64
#: A box mode enters the coarse space when its prior variance ``s²Πμ`` is at least this times ``σ²``.
MODE_SCORE = 1.0
#: At most this many coarse modes (the largest scores first). The mode rule asks 584 / 1212 / 1569 / 1966 for the
#: 10 % hole of 64³ / 96³ / 112³ / 128³ (``gaps.py``'s ``block-10``, GridGP's initial hyperparameters); 1024 (and
#: ``MAX_GRAM_ELEMENTS`` 2²⁴, which cut it to 768) left 128³ at 25 CG iterations on an H100 (RESULTS round 15/16).
#: 96³ float32, 2-core CPU, 2026-12-07: 768 / 1024 / 1212 modes took 14 / 11 / 10 iterations, 13.7 / 11.0 / 9.6 s a
#: steady step (rebuilt 14.5 / 11.9 / 12.8 s).
MAX_MODES = 2048
#: At most this many elements in the partial gram ``H`` (``n_1 · (Π_{k>1} r_k)²``, see :func:`selected_gram`):
#: 0.5 GiB in float64, transient, during a build.
MAX_GRAM_ELEMENTS = 1 << 26
#: At most this many coarse modes over all pieces together (the largest pieces first).
MAX_TOTAL_MODES = 4096
#: At most this many pieces get a coarse space (the largest first; the others keep Jacobi).
MAX_PIECES = 256
#: A piece that does not fill its box forms its Galerkin matrix from X's eigen-expansion truncated so
#: that ``E ⪯ Ẽ ⪯ (1 + GALERKIN_TOL) E`` (:func:`truncated_galerkin`).
GALERKIN_TOL = 0.1
#: :func:`truncated_galerkin` first tries the threshold that certifies its bound if the smallest eigenvalue of
#: ``E`` against ``WᵀW/σ²`` is at least this (measured 0.003–0.05 on clouds' pieces, 48³, 2026-12-07; the
#: a priori one assumes ``1/(1 + top)``, 3e-5–2e-4 there), checks it with one Cholesky, and else falls back.
GALERKIN_TRIAL_C = 2e-3
#: At most this many modes for a piece that does not fill its box (:func:`truncated_galerkin` costs
#: ``|S|²`` per kept eigen-coordinate). 512 gave the cheapest short fits of ``clouds-20`` with the frozen
#: preconditioner at 48³ and 64³ (256: as cheap / 14 % dearer, 1024: 1.7× / ≥ 1.5×) and a steady step 20–35 %
#: under 256's (measured 2026-12-07: the module docstring's "clouds with the frozen preconditioner").
MAX_TRUNCATED_MODES = 512
#: A piece that does not fill its box takes up to this many candidate box modes (score ≥ :data:`MODE_SCORE`) and
#: keeps the directions of their span whose share of mass on the piece's cells is at least :data:`MASS_SHARE`
#: (:func:`mass_filter`), at most :data:`MAX_TRUNCATED_MODES` of them.
#: Training step, ``clouds-20`` float32, one thread, same process (2-core CPU, 2026-12-07; iterations, steady /
#: rebuilt step): 48³ 512 candidates unfiltered (the span before the filter) 18, 1.80 / 5.4 s; 1024 / 2048 / 4096
#: filtered at 0.3: 17, 2.31 / 3.9 s; 10, 1.48 / 11.1 s; 9, 1.87 / 21.4 s. 64³: 30, 10.6 / 25.0 s; 27, 9.9 / 16.4 s;
#: 15, 6.3 / 29.7 s; 11, 7.1 / 51.0 s. 2048: the steady step 1.7× faster at 64³, the rebuild 1.2–2× dearer (a
#: short fit rebuilds at ~3 of 8 evaluations: even at 64³, dearer at 48³; a second run at 48³: 2048 10 its,
#: 1.53 / 11.1 s, 4096 9 its, 1.71 / 19.9 s). A CUDA device takes :data:`MAX_CANDIDATE_MODES_CUDA`.
MAX_CANDIDATE_MODES = 2048
#: The same on a CUDA device (:func:`candidate_modes`), where an iteration's grid products dominate and the rebuild's
#: grams are cheap. Measured (128³ ``clouds-20`` float32, one H100, ``gaps.py --holes``, 2026-12-07, RESULTS.md round 17;
#: candidates: iterations, steady / rebuilt step): 512 unfiltered 146, 2.37 / 3.49 s; 2048: 68, 0.99 / 1.75 s; 4096:
#: 45, 0.50 / 1.57 s; 8192: 40, 0.45 / 1.49 s. 4096 halves the step; 8192 adds 10 % for a gram four times larger
#: (``(index + 3)·candidates²`` float64 elements in the build's plan, :func:`coarse_bytes`).
MAX_CANDIDATE_MODES_CUDA = 4096
#: The smallest share of a kept direction's mass (over the box, where the candidates are orthonormal) that lies
#: on the piece's cells. Measured (``benchmarks/scratch/cloud_union.py``, NOTES.md "Clouds: which coarse space",
#: CG on ``G`` for ``clouds-20``'s merged component, float64, 2026-12-07): 0.3 kept 181 / 436 / 649 of 1201 / 2593
#: / 4209 candidates at 32³ / 48³ / 64³ and took 17 / 14 / 15 iterations, where the 512 best candidates took
#: 17 / 30 / 51; 0.5 kept 124 / 315 / 486 for 17 / 17 / 17. 0 keeps the candidates' whole span (as before the filter).
MASS_SHARE = 0.3
#: ... whose ``|S|`` box rows :func:`truncated_galerkin` holds at most this many elements of at a time (it
#: capped ``|S|`` at ``MAX_BOX_ELEMENTS / box`` before: 150 modes for the merged cloud of 64³, whose step took
#: 65–73 s and 64 iterations against 43–49 s and 50 with 256 modes, same process, 2026-12-07).
MAX_BOX_ELEMENTS = 1 << 25
#: Fewer missing cells than this keep plain Jacobi (the coarse space would cost more than it saves).
MIN_MISSING = 64
#: A piece needs at least this many interior cells (all face neighbours missing): clusters of
#: scattered cells (20 % of a 48³ grid has some of over 64 cells) keep Jacobi, which pins them.
MIN_INTERIOR = 8
#: Keep a model's two-level preconditioner across its steps (:class:`FrozenTwoLevel`); off: a new one
#: at every step, as before (benchmarks and tests switch it off to compare).
FREEZE = True
#: A frozen preconditioner is rebuilt once the hyperparameters have moved by more than this since it
#: was built (:meth:`FrozenTwoLevel.drift`: the largest relative change of a kernel factor's entries,
#: or of ``s²/σ²`` in log). Measured (32³, 5 % hole, 93 modes, 2026-12-07): a stale preconditioner took
#: 8 / 9 / 11 / 14 iterations at drifts 0.06 / 0.11 / 0.20 / 0.34 of the lengthscales (fresh: 9), and
#: 8–9 / 11 with σ² doubled / halved (drift 0.69); a rebuild costs about as much as a few iterations.
REFRESH_DRIFT = 0.2
#: The same for an eager training step (no CUDA graph): ``inf``, so that only :data:`REFRESH_ITERATIONS` rebuilds it.
#: An eager step notes its own iterations, and a stale preconditioner costs iterations, never accuracy; a graph's
#: replays run a recorded number of iterations, and a posterior's solves note none, so they keep
#: :data:`REFRESH_DRIFT`. Measured (``clouds-20`` 48³ float32, 2-core CPU, one thread, process time, 2026-12-08;
#: ``benchmarks/scratch/refresh_fit.py``, the same fits, same losses):
#: 16 Adam steps 60.2 / 44.0 / 32.3 s with 6 / 4 / 3 builds at 0.2 / 0.5 / inf (the later rebuilds at drift 0.2
#: changed nothing: 7 iterations before and after); 3 L-BFGS steps 100.6 / 66.6 / 52.7 s (30 / 27 / 25 evaluations,
#: 6 / 3 / 2 builds) at 0.2 / 1.0 / inf, where one evaluation at drift 4.2 took 27 iterations stale against 13
#: after a rebuild that costs ~10× a step there.
REFRESH_DRIFT_EAGER = math.inf
#: ... or once the missing cells' CG needs more than this many times (plus 2) the iterations of the
#: first step it served.
REFRESH_ITERATIONS = 1.25
#: A refresh between CUDA-graph replays keeps a piece's count of modes (and so the buffers the graph
#: reads) while the count the mode rule picks now is within this fraction of it (:func:`two_level`'s ``like``).
REFRESH_MODES = 0.25


def _tensor_modes(mus: list[Tensor], scale: float, limit: int, first: int,
                  like: Optional[tuple[int, list[int]]] = None, cap: Optional[int] = None) -> Optional[tuple[Tensor, list[int]]]:
    """Flat indices (row-major over ``Π r_k``, the leading ``r_k`` modes per axis) of the tensor modes
    with ``scale·Πμ ≥ MODE_SCORE``, best first, at most :data:`MAX_MODES` and ``limit``, fewer where
    their gram over ``first`` cells of axis 1 would pass :data:`MAX_GRAM_ELEMENTS`, and per axis how
    many leading modes they use; ``None`` if none. ``mus`` on the host (the choice sets shapes: one
    read of the device per piece, :func:`two_level`); the indices are returned on the host too.

    ``like = (count, ranks)``: instead the ``count`` best modes among the leading ``ranks`` per axis
    (a frozen preconditioner refreshed into its own buffers, :class:`FrozenTwoLevel`), whatever their
    scores."""
    if like is not None:
        mus = [mu[:r] for mu, r in zip(mus, like[1])]
    else:
        # An axis's mode j can only enter with every other axis at its largest μ: the scores are formed
        # over those candidates only (not over the whole box, which may hold 10⁸ cells).
        top = [float(mu[0]) for mu in mus]
        mus = [mu[: max(1, int((scale * mu * math.prod(top[:k] + top[k + 1:]) >= MODE_SCORE).sum()))]
               for k, mu in enumerate(mus)]
    score = mus[0]
    for mu in mus[1:]:
        score = (score.unsqueeze(-1) * mu).reshape(-1)
    score = scale * score
    order = torch.argsort(score, descending=True)
    count = min(int((score >= MODE_SCORE).sum()), MAX_MODES if cap is None else cap, limit) if like is None \
        else min(like[0], score.numel())
    sizes = [m.numel() for m in mus]
    while count > 0:
        sel = order[:count]
        per_axis, rest = [], sel
        for n in reversed(sizes):
            per_axis.append(rest % n)
            rest = torch.div(rest, n, rounding_mode="floor")
        per_axis.reverse()
        used = list(like[1]) if like is not None else [int(a.max()) + 1 for a in per_axis]
        if first * math.prod(used[1:]) ** 2 <= MAX_GRAM_ELEMENTS:
            flat = torch.zeros_like(sel)  # the same modes, flat over Π used (the truncated axes)
            for a, r in zip(per_axis, used):
                flat = flat * r + a
            return flat, used
        count = count * 3 // 4
    return None


def selected_gram(mats: list[Tensor], w: Tensor, sel: Tensor, sizes: list[int], chunk: Optional[int] = None) -> Tensor:
    """``(⊗A_k)[sel] diag(w) (⊗A_k)[sel]ᵀ`` (``(|sel|, |sel|)``) for ``A_k`` of shape ``(r_k, n_k)``
    (``sizes = [r_k]``), grid weights ``w`` (length ``Πn_k``) and ``sel`` flat row-major over ``Πr_k``.

    Axes 2…d by one Kronecker matmul of the ``n_1`` slabs of ``w`` with their Khatri–Rao squares
    (:func:`kronegp.models._few_missing.khatri_gram`): ``H[j] = (⊗_{k>1}A_k) diag(w[j]) (⊗_{k>1}A_k)ᵀ``
    (``n_1 · R'²`` elements, ``R' = Π_{k>1}r_k``); axis 1 by one GEMM over the pairs ``c ≤ c'`` of its
    modes, ``F[(c, c'), (a', b')] = Σ_j A_1[c, j] A_1[c', j] H[j][a', b']`` (``r_1(r_1+1)/2 · R'²``
    elements, in blocks of pairs of at most :data:`MAX_GRAM_ELEMENTS`, or ``chunk`` pairs), and
    ``E[a, b] = F[(a_1, b_1), (a', b')]`` gathered: the gram of the few selected tensor modes without
    the ``(Πr_k)²`` one of them all, and without reading ``H`` once per pair of selected modes
    (``n_1·|sel|²``, the first version's chunked loop)."""
    n1 = mats[0].shape[1]
    rest = math.prod(sizes[1:])
    a1 = torch.div(sel, rest, rounding_mode="floor")
    ar = sel % rest
    if len(mats) == 1:
        H = w.reshape(n1, 1)
    else:
        H = khatri_gram([khatri_square(a) for a in mats[1:]], sizes[1:], w.reshape(n1, -1).mT.contiguous())  # (n1, R', R')
        H = H.reshape(n1, rest * rest)
    pairs = khatri_square(mats[0])  # (P_1, n1): A_1[c, j] A_1[c', j], c ≤ c'
    index = pair_maps(mats[0].shape[0], sel.device)[2]
    pair = index[a1.unsqueeze(-1), a1.unsqueeze(0)]  # (k, k): the pair (a_1, b_1)
    col = ar.unsqueeze(-1) * rest + ar.unsqueeze(0)  # (k, k): (a', b') flat
    step = max(1, chunk if chunk is not None else MAX_GRAM_ELEMENTS // max(1, rest * rest))
    if step >= pairs.shape[0]:
        return (pairs @ H).reshape(-1)[pair * (rest * rest) + col]
    E = w.new_zeros(sel.numel(), sel.numel())
    for p0 in range(0, pairs.shape[0], step):
        F = pairs[p0 : p0 + step] @ H  # (c, R'²)
        inside = (pair >= p0) & (pair < p0 + F.shape[0])
        E = torch.where(inside, F.reshape(-1)[((pair - p0).clamp(0, F.shape[0] - 1)) * (rest * rest) + col], E)
    return E


def pieces_of(missing: Tensor, sizes) -> list[MissingBox]:
    """The pieces of the missing cells (bool grid, flat) that get a coarse space each: the connected
    components (cells sharing a face) of at least :data:`MIN_MISSING` cells, :data:`MIN_INTERIOR` of
    them interior (all face neighbours missing: a cluster of scattered cells has hardly any, and
    its modes are pinned already), at most
    :data:`MAX_PIECES` (the largest first), each a :class:`~kronegp.models._few_missing.MissingBox`
    of its own cells (so their cells are disjoint). Scattered cells form no piece. One read of the
    mask on the host (``scipy.ndimage.label``)."""
    import scipy.ndimage

    mask = missing.reshape(list(sizes)).cpu().numpy()
    labels, count = scipy.ndimage.label(mask)
    if count == 0:
        return []
    # interior cells: every face neighbour missing too (beyond the grid's edge counts as missing)
    inner = torch.from_numpy(scipy.ndimage.binary_erosion(mask, border_value=1)).reshape(-1)
    labels = torch.from_numpy(labels).reshape(-1)
    cells = torch.bincount(labels, minlength=count + 1)[1:]
    interior = torch.bincount(labels[inner], minlength=count + 1)[1:]
    big = torch.nonzero((cells >= MIN_MISSING) & (interior >= MIN_INTERIOR)).reshape(-1)
    big = big[torch.argsort(cells[big], descending=True, stable=True)][:MAX_PIECES] + 1
    return [MissingBox((labels == int(k)).to(missing.device), sizes) for k in big]


class CoarseBasis:
    """``W = E_M (⊗V_k) S``: the coarse modes over one piece's box, restricted to its missing cells."""

    def __init__(self, hole: MissingBox, vecs: list[Tensor], sel: Tensor, full: list[int],
                 mix: Optional[Tensor] = None, piece_gram: Optional[Tensor] = None):
        self.hole = hole
        self.vecs = vecs  # V_k (b_k, r_k)
        self.vecs_t = [v.mT.contiguous() for v in vecs]
        self.sel, self.full = sel, full
        #: ``U`` (``|S| × k``): the basis is ``E_M (⊗V_k) S U`` (:func:`mass_filter`), or ``None``: ``U = I``
        self.mix = mix
        self.modes = sel.numel() if mix is None else mix.shape[1]
        self._piece_gram = piece_gram

    def piece_gram(self) -> Tensor:
        """``WᵀW`` (``k × k``): the basis' gram over the piece's cells (:func:`mass_filter` hands its own in)."""
        if self._piece_gram is None:
            self._piece_gram = self.project(selected_gram([v.mT for v in self.vecs], self.inside(), self.sel, self.full))
        return self._piece_gram

    def inside(self) -> Tensor:
        """The piece's cells on its box: 1 there, 0 at the box's observed cells (``(box,)``, the basis' dtype)."""
        out = torch.zeros(self.hole.box, dtype=self.vecs[0].dtype, device=self.sel.device)
        out[self.hole.pos] = 1.0
        return out

    def project(self, gram: Tensor) -> Tensor:
        """``Uᵀ A U`` for a gram ``A`` over the selected modes (``A`` itself without a mix)."""
        return gram if self.mix is None else self.mix.mT @ gram @ self.mix

    def box_rows(self, coef: Tensor) -> Tensor:
        """``(⊗V_k) S U c`` over the whole box for coefficients ``(t, k)``: ``(t, box)``."""
        if self.mix is not None:
            coef = coef @ self.mix.mT
        full = coef.new_zeros(coef.shape[0], math.prod(self.full))
        full[:, self.sel] = coef
        return matmul_kron(full, self.vecs_t)

    def add_w(self, coef: Tensor, out: Tensor) -> Tensor:
        """``out += W c`` for coefficients ``(t, |S|)`` and rows ``out`` ``(t, N)`` (in place: only
        this piece's cells are touched, so the pieces of one preconditioner add into one block)."""
        h = self.hole
        box = self.box_rows(coef)
        out[:, h.idx] += box if h.fills else box[:, h.pos]
        return out

    def w(self, coef: Tensor, n: int) -> Tensor:
        """``W c`` for coefficients ``(t, |S|)``: rows ``(t, N)`` (``N = n``) zero off the piece's cells."""
        return self.add_w(coef, coef.new_zeros(coef.shape[0], n))


class CoarsePiece:
    """One piece's coarse solve: its basis ``W_i``, ``E_i = L Lᵀ`` and ``L⁻¹ (W_iᵀ J W_i) L⁻ᵀ = U diag(s) Uᵀ``;
    ``g = 1 − 1/s`` weighs the coarse correction ``W L⁻ᵀ U diag(g) Uᵀ L⁻¹ Wᵀ = W (E⁻¹ − (WᵀJW)⁻¹) Wᵀ`` and
    ``f = (s^{−½} − 1)/s`` the probes' (module docstring)."""

    def __init__(self, basis: CoarseBasis, E: Tensor, EJ: Tensor):
        self.basis, self.hole, self.modes = basis, basis.hole, basis.modes
        self.L = torch.linalg.cholesky(0.5 * (E + E.mT))
        linv_ej = torch.linalg.solve_triangular(self.L, EJ, upper=False)
        T = torch.linalg.solve_triangular(self.L, linv_ej.mT, upper=False)  # L⁻¹ EJ L⁻ᵀ
        s, self.U = torch.linalg.eigh(0.5 * (T + T.mT))
        # s = vᵀJv / vᵀẼv over the coarse directions: bounded below by 1/λ_max(J⁻¹G)/(1 + GALERKIN_TOL) (~0.3);
        # the floor only keeps a rounding-level s finite in 1/s
        self.s = s.clamp_min(torch.finfo(s.dtype).eps * s.abs().max().clamp_min(1))  # no host read
        self.g = 1 - 1 / self.s
        root = torch.sqrt(self.s)  # f(s) = (s^{-½} − 1)/s = (1 − √s) / (s √s)
        self.f = (1 - root) / (self.s * root)


class PieceBatch:
    """Pieces of similar boxes applied together (hyperparameter-free index maps, kept per model with
    :class:`PieceSet`): their boxes padded to the largest extent per axis, ``B`` of them side by side
    as ``(B, Πb, t)``; ``cells`` the pieces' missing cells on the grid and ``slots`` their positions in
    that padded block (row-major per box, each box after the one before)."""

    def __init__(self, members: list[int], boxes: list[MissingBox]):
        self.members = members
        d = len(boxes[members[0]].box_sizes)
        self.extent = [max(boxes[i].box_sizes[k] for i in members) for k in range(d)]
        self.size = math.prod(self.extent)
        cells, slots = [], []
        for at, i in enumerate(members):
            h = boxes[i]
            pos = torch.zeros_like(h.idx)
            for c, ax, e in zip(h.coords, h.axes, self.extent):  # the piece's cells over the padded box
                pos = pos * e + torch.searchsorted(ax, c)
            cells.append(h.idx)
            slots.append(pos + at * self.size)
        self.cells, self.slots = torch.cat(cells), torch.cat(slots)


class PieceSet:
    """The pieces of one mask (:func:`pieces_of`) and their batches: what does not depend on the
    hyperparameters, found once per mask (:func:`cached_pieces`). A batch takes pieces (the largest
    boxes first) while its padded block stays within twice their boxes' cells, so equal pieces (three
    equal holes) make one batch and a dozen cloud blobs a few, whatever their number."""

    def __init__(self, pieces: list[MissingBox]):
        self.pieces = pieces
        order = sorted(range(len(pieces)), key=lambda i: -pieces[i].box)
        self.batches: list[PieceBatch] = []
        group: list[int] = []
        for i in order:
            trial = group + [i]
            extent = [max(pieces[j].box_sizes[k] for j in trial) for k in range(len(pieces[i].box_sizes))]
            if group and len(trial) * math.prod(extent) > 2 * sum(pieces[j].box for j in trial):
                self.batches.append(PieceBatch(group, pieces))
                trial = [i]
            group = trial
        if group:
            self.batches.append(PieceBatch(group, pieces))


#: :func:`cached_pieces`' entries, oldest first: ``id(mask) → (weak reference, version, key, piece set)``
#: (an entry leaves with its mask: a dead model's pieces are not kept)
_PIECE_CACHE: dict = {}
#: How many masks :func:`cached_pieces` keeps (one per live model is the common case).
PIECE_CACHE_SIZE = 8


def cached_pieces(observed: Tensor, sizes) -> PieceSet:
    """The :class:`PieceSet` of ``~observed`` (bool grid, flat; a model's mask), found once per mask:
    kept while ``observed`` is the same tensor at the same version (an in-place change bumps it, and
    ``GridGP.to`` makes a new one) with the same grid and the same piece rules (:data:`MIN_MISSING`,
    :data:`MIN_INTERIOR`, :data:`MAX_PIECES`). :func:`pieces_of` reads the whole mask on the host
    (``scipy.ndimage``: 47 ms a step at 128³ on the CPU machine, plus the device reads of the pieces'
    boxes), and the mask is fixed while a model trains."""
    import weakref

    key = (tuple(sizes), observed.device, observed._version, MIN_MISSING, MIN_INTERIOR, MAX_PIECES)
    entry = _PIECE_CACHE.get(id(observed))
    if entry is not None and entry[0]() is observed and entry[1] == key:
        return entry[2]
    found = PieceSet(pieces_of(observed.logical_not(), sizes))
    if entry is None or entry[0]() is not observed:
        weakref.finalize(observed, _PIECE_CACHE.pop, id(observed), None)
    _PIECE_CACHE.pop(id(observed), None)
    while len(_PIECE_CACHE) >= PIECE_CACHE_SIZE:
        _PIECE_CACHE.pop(next(iter(_PIECE_CACHE)))
    _PIECE_CACHE[id(observed)] = (weakref.ref(observed), key, found)
    return found


class _Padded:
    """One :class:`PieceBatch` at this step's modes: the pieces' ``V_k`` (zero-padded to ``(B, b_k, r_k)``),
    their selections flat over the padded ``Πr_k`` (``(B, S)``, ``S`` the most modes of a piece; a
    missing mode points at 0 and is masked), and the pieces' ``E⁻¹ − F⁻¹`` and probe matrices, formed from their ``L``,
    ``U`` padded with the identity, ``g`` with 1 and ``f`` with 0 (``s`` with 1: ``log s = 0``), so the padding stays
    zero through every product."""

    def __init__(self, batch: PieceBatch, built: dict, like: Tensor, at_least: Optional["_Padded"] = None,
                 basis_dtype: Optional[torch.dtype] = None):
        members = [built.get(i) for i in batch.members]
        d = len(batch.extent)
        dt, dev = like.dtype, like.device
        # the basis (V_k, U) in the rows' dtype (``basis_dtype``), the small (B, S, S) matrices and s in ``like``'s
        bt = dt if basis_dtype is None else basis_dtype
        ranks = [max([pc.basis.full[k] for pc in members if pc is not None] + [1]) for k in range(d)]
        S = max([pc.modes for pc in members if pc is not None] + [1])
        picked = max([pc.basis.sel.numel() for pc in members if pc is not None] + [1])
        mixed = any(pc is not None and pc.basis.mix is not None for pc in members)
        if at_least is not None:  # padded to a frozen preconditioner's shapes (FrozenTwoLevel.refresh)
            ranks = [max(r, v.shape[-1]) for r, v in zip(ranks, at_least.vecs)]
            S, picked = max(S, at_least.e_inv.shape[-1]), max(picked, at_least.sel.shape[-1])
            mixed = mixed or at_least.mix is not None
        B = len(members)
        self.batch, self.full = batch, math.prod(ranks)
        self.vecs = [like.new_zeros(B, e, r, dtype=bt) for e, r in zip(batch.extent, ranks)]
        # the selected candidates (picked of them) and, where a piece filters them (mass_filter), U: (B, picked, S)
        self.sel = torch.zeros(B, picked if mixed else S, dtype=torch.long, device=dev)
        self.mix = like.new_zeros(B, picked, S, dtype=bt) if mixed else None
        self.mask = like.new_zeros(B, S, 1, dtype=bt)
        eye = torch.eye(S, dtype=dt, device=dev).expand(B, S, S)
        L, U = eye.clone(), eye.clone()  # only to form e_inv and f_mat below: not kept
        f, g = like.new_zeros(B, S, 1), like.new_ones(B, S, 1)
        self.s = like.new_ones(B, S)  # log s = 0 on the padding
        for at, pc in enumerate(members):
            if pc is None:  # no coarse space this step: its cells keep Jacobi (coefficients masked to 0)
                continue
            basis, k = pc.basis, pc.modes
            for v, V in zip(basis.vecs, self.vecs):
                V[at, : v.shape[0], : v.shape[1]] = v
            flat, rest = torch.zeros_like(basis.sel), basis.sel  # the selection over the padded ranks
            digits = []
            for r in reversed(basis.full):
                digits.append(rest % r)
                rest = torch.div(rest, r, rounding_mode="floor")
            for digit, r in zip(reversed(digits), ranks):
                flat = flat * r + digit
            self.sel[at, : flat.numel()] = flat
            self.mask[at, :k] = 1.0
            if self.mix is not None:
                self.mix[at, : flat.numel(), :k] = basis.mix if basis.mix is not None else torch.eye(k, dtype=bt, device=dev)
            L[at, :k, :k], U[at, :k, :k] = pc.L, pc.U
            f[at, :k, 0], g[at, :k, 0], self.s[at, :k] = pc.f, pc.g, pc.s
        self.vecs_t = [v.mT.contiguous() for v in self.vecs]
        # The apply's E⁻¹ − (WᵀJW)⁻¹ = L⁻ᵀ U diag(g) Uᵀ L⁻¹ and the probes' L⁻ᵀ U diag(f) Uᵀ L⁻¹, formed once per
        # build: each CG iteration then multiplies by one (B, S, S) matrix. Two triangular solves per apply (cuBLAS
        # trsm, latency-bound at a few columns) took 24.6 of a 128³ block-10 step's 80 ms of GPU time (H100,
        # 2026-12-07, 1474 modes, 58 solves); the padding stays zero (identity in the first, zero in the second).
        l_inv = torch.linalg.solve_triangular(L, eye, upper=False)
        self.e_inv = l_inv.mT @ (U @ (g * U.mT)) @ l_inv
        self.f_mat = l_inv.mT @ (U @ (f * U.mT)) @ l_inv
        del l_inv, L, U, f, g

    def wt(self, rows: Tensor) -> Tensor:
        """``W_iᵀ v`` of every piece for rows ``(t, N)``: ``(B, S, t)`` (zero past each piece's modes), in the
        coarse solves' dtype; the products with the basis run in the basis' own (the rows')."""
        t, b = rows.shape[0], self.batch
        box = rows.new_zeros(len(b.members) * b.size, t, dtype=self.vecs[0].dtype)
        box[b.slots] = rows[:, b.cells].mT.to(box.dtype)
        y = kron_matmul(self.vecs_t, box.view(len(b.members), b.size, t))  # (B, Πr, t): (⊗V_kᵀ) box
        y = torch.gather(y, 1, self.sel.unsqueeze(-1).expand(-1, -1, t))
        y = y * self.mask if self.mix is None else self.mix.mT @ y  # U's padding is zero
        return y.to(self.e_inv.dtype)

    def add_w(self, coef: Tensor, out: Tensor) -> Tensor:
        """``out += Σ_i W_i c_i`` for coefficients ``(B, S, t)`` (zero past each piece's modes) and rows
        ``out`` ``(t, N)``, in place (the pieces' cells are disjoint)."""
        t, b = coef.shape[-1], self.batch
        coef = coef.to(self.vecs[0].dtype)
        if self.mix is not None:
            coef = self.mix @ coef  # (B, picked, t), zero past each piece's candidates
        full = coef.new_zeros(coef.shape[0], self.full, t).scatter_add_(1, self.sel.unsqueeze(-1).expand(-1, -1, t), coef)
        box = kron_matmul(self.vecs, full).reshape(-1, t)  # (B·Πb, t): (⊗V_k) S c over each box
        return out.index_add_(1, b.cells, box[b.slots].mT.to(out.dtype))


class TwoLevel:
    """``M = J⁻¹ + Σ_i W_i (E_i⁻¹ − F_i⁻¹) W_iᵀ`` on blocks of rows ``(t, N)`` that vanish off the missing cells
    (module docstring), from the pieces' coarse solves and ``J`` on the grid. The pieces' cells are
    disjoint, so ``M`` is block diagonal over them. Build with :func:`two_level`.

    The pieces are applied a batch at a time (:class:`PieceSet`: one batch for equal holes): per batch
    a gather, a Kronecker product of ``(B, b_k, r_k)`` factors, one batched product with ``E⁻¹ − F⁻¹`` (formed at the build), a product back
    and a scatter, whatever the number of pieces in it (a dozen ops and two products; the first
    version's loop over pieces took as many per piece)."""

    def __init__(self, pieces: list[CoarsePiece], g_diag: Tensor, piece_set: Optional[PieceSet] = None,
                 like: Optional["TwoLevel"] = None, dtype: Optional[torch.dtype] = None):
        self.pieces = pieces
        #: the coarse solves' dtype (:func:`coarse_dtype` of ``g_diag``'s; the rows keep theirs)
        self.dtype = coarse_dtype(g_diag.dtype) if dtype is None else dtype
        self.modes = sum(pc.modes for pc in pieces)
        self.g_diag = g_diag
        self.j_inv = 1.0 / g_diag
        #: ``log κ`` (0-dim) of :meth:`scaled`, or ``None``: ``M`` as built
        self.log_scale: Optional[Tensor] = None
        if piece_set is None:
            piece_set = PieceSet([pc.hole for pc in pieces])
            built = dict(enumerate(pieces))
        else:
            built = {piece_set.pieces.index(pc.hole): pc for pc in pieces}
        #: the coarse pieces by their index in the piece set (what :func:`two_level`'s ``like`` follows)
        self.by_piece = built
        old = {id(pb.batch): pb for pb in like.batches} if like is not None else {}
        # The basis' products run in the grid's dtype (the rows'), its small matrices in the coarse one: rounding
        # V_k and U to float32 perturbs M by ~eps32 relative where J^{½}MJ^{½}'s eigenvalues are ≥ ~0.3, so M
        # stays SPD, while E, its Cholesky and L⁻ᵀU diag(g) UᵀL⁻¹ need float64 (COARSE_DTYPE). On a 2-core CPU
        # the float64 batched products took most of a 48³ cloud's step (NOTES.md, twenty-first session).
        self.batches = [_Padded(b, built, g_diag.new_zeros((), dtype=self.dtype), old.get(id(b)), basis_dtype=g_diag.dtype)
                        for b in piece_set.batches if any(i in built for i in b.members)]

    def scaled(self, log_scale: Tensor) -> "TwoLevel":
        """``κ M`` (``κ = exp(log_scale)``, a 0-dim device tensor: nothing read), sharing this one's
        tensors: the apply scales by ``κ``, the probes by ``κ^{−½}``, ``log det P`` moves by ``−m log κ``.
        Any ``κ > 0`` leaves CG's iterates unchanged; :class:`FrozenTwoLevel` picks it to keep the
        Jacobi part on the current ``diag(G)``, which centres the SLQ log-spectrum."""
        out = copy.copy(self)
        out.log_scale = log_scale
        return out

    def apply(self, rows: Tensor) -> Tensor:
        """``M v`` for rows ``(t, N)`` zero off the missing cells (the result is too)."""
        out = rows * self.j_inv
        for pb in self.batches:
            pb.add_w(pb.e_inv @ pb.wt(rows), out)  # E⁻¹ − (WᵀJW)⁻¹, formed at the build (_Padded)
        return out if self.log_scale is None else out.mul_(torch.exp(self.log_scale))

    def sample(self, xi: Tensor) -> Tensor:
        """Probes ``z = P^{½}ξ`` with ``Cov z = M⁻¹`` for rows ``ξ`` (``(S, N)``, zero off the missing cells)."""
        a = self.g_diag.sqrt() * xi
        corr = torch.zeros_like(a)
        for pb in self.batches:
            pb.add_w(pb.f_mat @ pb.wt(a), corr)  # W L⁻ᵀ U diag(f) Uᵀ L⁻¹ Wᵀ J^{½} ξ
        out = a.add_(corr.mul_(self.g_diag))
        return out if self.log_scale is None else out.mul_(torch.exp(-0.5 * self.log_scale))

    def logdet_p(self, missing: Tensor) -> Tensor:
        """``log det P = −log det M`` over the missing cells (``missing``: 0/1 grid vector)."""
        out = (missing * torch.log(self.g_diag)).sum() - sum(torch.log(pb.s).sum() for pb in self.batches).to(self.g_diag.dtype)
        return out if self.log_scale is None else out - missing.sum() * self.log_scale

    def _buffers(self) -> list[Tensor]:
        """Every tensor an apply, a probe or ``log det P`` reads (what a CUDA graph's recording holds)."""
        out = [self.g_diag, self.j_inv]
        for pb in self.batches:
            out += pb.vecs + pb.vecs_t + [pb.sel, pb.mask, pb.s, pb.e_inv, pb.f_mat] + ([] if pb.mix is None else [pb.mix])
        return out

    def copy_(self, other: "TwoLevel") -> bool:
        """Take ``other``'s values into this one's tensors, in place (a recorded CUDA graph reads them
        there), where every tensor has the same shape and the batches are the same; else change
        nothing and return ``False``."""
        mine, theirs = self._buffers(), other._buffers()
        if ([id(pb.batch) for pb in self.batches] != [id(pb.batch) for pb in other.batches]
                or [(t.shape, t.dtype) for t in mine] != [(t.shape, t.dtype) for t in theirs]):
            return False
        for a, b in zip(mine, theirs):
            a.copy_(b)
        self.pieces, self.modes, self.by_piece = other.pieces, other.modes, other.by_piece
        return True


def candidate_modes(device) -> int:
    """How many candidate box modes a ragged piece takes on ``device`` (:data:`MAX_CANDIDATE_MODES`, or
    :data:`MAX_CANDIDATE_MODES_CUDA` on a CUDA device)."""
    return MAX_CANDIDATE_MODES_CUDA if torch.device(device).type == "cuda" else MAX_CANDIDATE_MODES


def mass_filter(basis: CoarseBasis, limit: int, count: Optional[int] = None) -> Optional[CoarseBasis]:
    """The basis ``E_M (⊗V_k) S U`` of a piece that does not fill its box, ``U`` (``|S| × k``) the eigenvectors of
    the candidates' (``basis``) gram
    over the piece's cells, ``Vᵀ diag(1_M) V`` (the candidates are orthonormal over the box, so an eigenvalue is
    the share of that direction's mass on the piece), with eigenvalue at least :data:`MASS_SHARE`, at most
    ``limit`` (the largest first), scaled to be orthonormal on the piece's cells; or the ``count`` largest
    (a refresh that keeps the shapes). ``None`` where none is kept. The candidates' span restricted to a ragged
    piece is very redundant (the 2593 candidates of 48³'s merged cloud keep 436 at 0.3, NOTES.md), and the
    Galerkin matrix costs ``k²`` per eigen-coordinate (:func:`truncated_galerkin`). The new basis keeps its
    gram over the piece, ``UᵀAU``, for :func:`truncated_galerkin`. One read of the device."""
    gram = basis.piece_gram()
    share, vecs = torch.linalg.eigh(gram)
    share, vecs = share.flip(0), vecs.flip(-1)
    k = min(int((share >= MASS_SHARE).sum()), limit) if count is None else min(count, share.numel())
    if k <= 0 or float(share[k - 1]) <= 0:
        return None
    mix = vecs[:, :k] / torch.sqrt(share[:k])
    return CoarseBasis(basis.hole, basis.vecs, basis.sel, basis.full, mix, mix.mT @ gram @ mix)


def coarse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the coarse solves for a grid of ``dtype``: :data:`COARSE_DTYPE` where it is wider."""
    if COARSE_DTYPE is None or torch.finfo(dtype).bits >= torch.finfo(COARSE_DTYPE).bits:
        return dtype
    return COARSE_DTYPE


def _box_eigs(factors: list[Tensor], piece: MissingBox) -> tuple[list[Tensor], list[Tensor]]:
    """``(μ_k, V_k)`` of each ``K_k[I_k, I_k]`` over the piece's box, largest first."""
    mus, vecs = [], []
    for f, ax in zip(factors, piece.axes):
        mu, v = torch.linalg.eigh(f.detach()[ax][:, ax])
        mus.append(mu.flip(0).clamp_min(0))
        vecs.append(v.flip(-1))
    return mus, vecs


def truncated_galerkin(basis: CoarseBasis, eig: KronEigen, outputscale: Tensor, level: Tensor, top: float) -> Tensor:
    """``Ẽ = Wᵀ X̃ W`` for a piece that does not fill its box, with ``X = I/σ² − Q diag(ω) Qᵀ``
    (``ω = 1/σ² − p``) truncated to the eigen-coordinates whose prior variance ``λ`` is at least a
    threshold ``ϑ``, chosen so that ``E ⪯ Ẽ ⪯ (1 + GALERKIN_TOL) E``.

    The dropped part is ``D = Σ ω_j Wᵀq_j q_jᵀW ⪯ (ϑ/σ²) WᵀW/σ²`` (``ω_j ≤ λ_j/σ⁴``) and ``E = Ẽ − D ⪯ Ẽ``.
    A priori, ``E ⪰ WᵀW / (σ²(1 + top))`` (Cauchy–Schwarz: ``vᵀXv ≥ |v|⁴ / vᵀCv`` and
    ``vᵀCv ≤ (s²Πμ_1 + σ²)|v|²`` on the box; ``top``: the box's largest score ``s²Πμ/σ²``), so
    ``ϑ₀ = GALERKIN_TOL · σ² / (1 + top)`` certifies the bound. That assumes a mode smooth over the
    whole box, which a ragged piece does not hold (measured on clouds, 48³: the smallest eigenvalue
    ``c`` of ``Ẽ`` against ``WᵀW/σ²`` is 0.003–0.05 where ``1/(1 + top)`` is 3e-5–2e-4). So first
    ``ϑ₁ = t σ² ·`` :data:`GALERKIN_TRIAL_C` (``t = GALERKIN_TOL / (1 + GALERKIN_TOL)``), with fewer
    coordinates, and a posteriori: if ``Ẽ₁ ⪰ (ϑ₁/(σ² t)) WᵀW/σ²`` (one Cholesky), then
    ``E ⪰ Ẽ₁ − (ϑ₁/σ²) WᵀW/σ² ⪰ (1 − t) Ẽ₁``, i.e. ``Ẽ₁ ⪯ (1 + GALERKIN_TOL) E``: done. Else the
    coordinates between ``ϑ₀`` and ``ϑ₁`` are subtracted too (the a priori bound holds).

    The kept coordinates are a Kronecker sub-box (per axis, the ``j`` that can reach ``ϑ``) and the ones
    in it reaching ``ϑ``: per pass one matmul of the ``|S|`` box rows with factors ``Q_k[I_k, J_k]`` and a
    gram over them (``|S|²`` flops per kept coordinate: on clouds about a third of the grid's at ``ϑ₀``,
    half of that at ``ϑ₁``). The box rows are formed once where ``|S|·box ≤`` :data:`MAX_BOX_ELEMENTS`,
    else that many elements at a time, again for each block of coordinates."""
    h = basis.hole
    work = eig.vecs[0].dtype
    level_f = float(level)
    t = GALERKIN_TOL / (1.0 + GALERKIN_TOL)
    floor = GALERKIN_TOL * level_f / (1.0 + top)  # ϑ₀, certified a priori
    trial = t * level_f * GALERKIN_TRIAL_C  # ϑ₁, certified a posteriori
    inside = basis.inside()
    ww = basis.piece_gram() / level  # WᵀW / σ²
    E = ww.clone()
    eye = torch.eye(basis.modes, dtype=work, device=basis.sel.device)
    if basis.modes * h.box <= MAX_BOX_ELEMENTS:  # W over the box, formed once
        whole = basis.box_rows(eye).mul_(inside)
        wbox = lambda: (whole,)  # noqa: E731
    else:  # at most MAX_BOX_ELEMENTS of it at a time, formed again per block of eigen-coordinates
        rows = max(1, MAX_BOX_ELEMENTS // h.box)
        wbox = lambda: (basis.box_rows(eye[a : a + rows]).mul_(inside) for a in range(0, basis.modes, rows))  # noqa: E731
    if trial > floor:
        _subtract_band(E, wbox, basis, eig, outputscale, level, trial, math.inf)
        try:  # Ẽ₁ − (ϑ₁/(σ² t)) WᵀW/σ² ≻ 0 certifies Ẽ₁ ⪯ (1 + GALERKIN_TOL) E
            torch.linalg.cholesky(E - (trial / (level_f * t)) * ww)
            return E
        except torch.linalg.LinAlgError:
            pass
        _subtract_band(E, wbox, basis, eig, outputscale, level, floor, trial)
    else:
        _subtract_band(E, wbox, basis, eig, outputscale, level, floor, math.inf)
    return E


def _subtract_band(E: Tensor, wbox, basis: CoarseBasis, eig: KronEigen, outputscale: Tensor, level: Tensor,
                   lo: float, hi: float) -> None:
    """``E −= Σ_j ω_j (Wᵀq_j)(Wᵀq_j)ᵀ`` over the eigen-coordinates ``j`` with prior variance ``lo ≤ λ_j < hi``
    (in place; ``wbox()``: ``W``'s ``|S|`` box rows, in blocks of modes)."""
    h = basis.hole
    s2 = float(outputscale)
    tops = [float(v.max()) for v in eig.vals]
    keep = [torch.nonzero(s2 * v * math.prod(tops[:k] + tops[k + 1:]) >= lo).reshape(-1) for k, v in enumerate(eig.vals)]
    if any(k.numel() == 0 for k in keep):
        return
    rest = math.prod(k.numel() for k in keep[1:])
    step = max(1, MAX_GRAM_ELEMENTS // (basis.modes * rest))  # axis-1 coordinates per block of Y
    lam_rest = s2 * kron_vector([v[k] for v, k in zip(eig.vals[1:], keep[1:])]) if len(keep) > 1 else None
    mats = [q[ax][:, k] for q, ax, k in zip(eig.vecs[1:], h.axes[1:], keep[1:])]
    q1 = eig.vecs[0][h.axes[0]]
    for a in range(0, keep[0].numel(), step):
        k1 = keep[0][a : a + step]
        lam = (eig.vals[0][k1].unsqueeze(-1) * (lam_rest if lam_rest is not None else s2)).reshape(-1)
        chosen = torch.nonzero((lam >= lo) & (lam < hi)).reshape(-1)
        if chosen.numel() == 0:
            continue
        Y = torch.cat([matmul_kron(w, [q1[:, k1]] + mats)[:, chosen] for w in wbox()])  # (|S|, kept): Wᵀ q_j
        lam = lam[chosen]
        omega = lam / (level * (lam + level))  # 1/σ² − p, without the cancellation of a difference
        E -= (Y * omega) @ Y.mT


def two_level(eig: KronEigen, factors: list[Tensor], outputscale: Tensor, level: Tensor, p: Tensor,
              g_diag: Tensor, missing: Optional[Tensor] = None, *, observed: Optional[Tensor] = None,
              like: Optional[TwoLevel] = None) -> Optional[TwoLevel]:
    """The two-level preconditioner for the missing cells (bool grid, flat) of a whole grid, or ``None``
    where it does not apply (:data:`ENABLED` off, no piece of :func:`pieces_of`, no mode scoring
    :data:`MODE_SCORE`): then Jacobi alone, as before. A piece whose Galerkin matrix is not positive
    definite in this dtype keeps Jacobi on its cells.

    Args:
        eig: ``⊗K_k = Q diag(λ̂) Qᵀ``. factors: the ``K_k``. outputscale: ``s²``.
        level: ``σ²`` (or ``σ̄²``, per-cell noise). p: ``1/(λ + σ²)`` on the grid (``X``'s eigenvalues).
        g_diag: ``J`` on the grid (``diag(X)`` at missing cells, 1 elsewhere).
        missing: the missing cells (bool grid, flat), cut into pieces by :func:`pieces_of`; or
            ``observed``: a model's mask, whose pieces :func:`cached_pieces` finds once.
        like: a preconditioner of the same mask whose shapes to keep (:meth:`TwoLevel.copy_`): each
            of its pieces keeps its count of modes, taken among its ranks per axis, where the count
            the rule above picks now is within :data:`REFRESH_MODES` of it (else the rule's, and the
            shapes differ); the batches are padded to its shapes at least.

    Host reads: ``s²/σ²`` once, and per piece its box's eigenvalues (one transfer: the modes it keeps
    set the shapes) and the Cholesky factor's check.
    """
    if not ENABLED:
        return None
    pieces = cached_pieces(observed, eig.sizes) if observed is not None else PieceSet(pieces_of(missing, eig.sizes))
    if not pieces.pieces:
        return None
    built, budget = [], MAX_TOTAL_MODES
    scale = float(outputscale / level)
    work = coarse_dtype(g_diag.dtype)
    if work != g_diag.dtype:  # the coarse solve in float64 (COARSE_DTYPE); the grid's vectors stay as they are
        factors = [f.detach().to(work) for f in factors]
        eig = KronEigen(factors)
        outputscale = torch.as_tensor(outputscale, device=g_diag.device).to(work)
        level = torch.as_tensor(level, device=g_diag.device).to(work)
    for index, hole in enumerate(pieces.pieces):
        if budget <= 0:
            break
        mus, vecs = _box_eigs(factors, hole)
        mus = torch.cat(mus).cpu().split([v.shape[-1] for v in vecs])  # one read: the choice below is the host's
        limit = min(MAX_MODES, budget) if hole.fills else min(MAX_TRUNCATED_MODES, budget)
        first = eig.sizes[0] if hole.fills else hole.box_sizes[0]
        # a ragged piece: candidates, filtered below by their mass on the piece (mass_filter)
        most = candidate_modes(g_diag.device)
        cap, candidates = (None, limit) if hole.fills else (most, most)
        chosen = _tensor_modes(mus, scale, candidates, first, cap=cap) if limit > 0 else None
        old = like.by_piece.get(index) if like is not None else None
        kept = None if old is None else old.basis.sel.numel()
        if old is not None and old.modes <= limit and chosen is not None \
                and abs(chosen[0].numel() - kept) <= REFRESH_MODES * kept:
            chosen = _tensor_modes(mus, scale, candidates, first, like=(kept, old.basis.full), cap=cap)
        else:
            old = None
        if chosen is None:
            continue
        sel, full = chosen
        sel = sel.to(g_diag.device)
        basis = CoarseBasis(hole, [v[:, :r].contiguous() for v, r in zip(vecs, full)], sel, full)
        if not hole.fills:
            basis = mass_filter(basis, limit, None if old is None else old.modes)
            if basis is None:
                continue
        # Wᵀ J W over the box (J at the missing cells, 0 at the box's observed cells)
        jbox = torch.zeros(hole.box, dtype=work, device=g_diag.device)
        jbox[hole.pos] = g_diag[hole.idx].to(work)
        EJ = basis.project(selected_gram([v.mT for v in basis.vecs], jbox, sel, full))
        if hole.fills:
            R = [v.mT @ q[ax] for v, q, ax in zip(basis.vecs, eig.vecs, hole.axes)]  # R_k = V_kᵀ Q_k[I_k, :]
            E = selected_gram(R, p.to(work), sel, full)
        else:
            E = truncated_galerkin(basis, eig, outputscale, level, scale * math.prod(float(mu[0]) for mu in mus))
        try:
            built.append(CoarsePiece(basis, E, EJ))
        except torch.linalg.LinAlgError:
            continue
        budget -= basis.modes
    return TwoLevel(built, g_diag, pieces, like=like, dtype=work) if built else None


class FrozenTwoLevel:
    """A model's two-level preconditioner, kept across its training steps and rebuilt on drift.

    **Why it may be kept.** Block CG is exact for any fixed SPD preconditioner ``M``, and the SLQ
    estimate of ``log det G`` stays unbiased as long as ``log det P``, the probes ``z ~ N(0, P)`` and
    the solves come from the same ``M`` (``P = M⁻¹``: :meth:`TwoLevel.logdet_p`, :meth:`TwoLevel.sample`,
    :meth:`TwoLevel.apply` of one object). The gradient's trace estimate
    ``E[(X G⁻¹z)ᵀ ∂C (X P⁻¹z)] = tr(G⁻¹[X ∂C X]_MM)`` holds for any ``P`` too, and ``M`` is built and
    applied under ``no_grad`` from detached factors: nothing differentiates through it. So a
    preconditioner built at other hyperparameters changes the result only within the CG tolerance;
    it costs iterations as it drifts from ``G``.

    **What is kept.** The :class:`TwoLevel` (its ``J``, bases, ``L``, ``U``, ``f``, ``s``), the kernel
    factors ``K_k⁰`` and ``log(s²/σ²)⁰`` it was built at, ``Σ_M log J⁰`` and the mask, grid size, dtype,
    device and piece rules it belongs to (any change of those: a new one). Each step applies ``κM``
    with ``log κ = mean_M(log J⁰ − log J)`` (:meth:`TwoLevel.scaled`, on the device): a scale leaves
    CG unchanged but keeps the Jacobi part on the current ``diag(G)``, so the probes' log-spectrum
    stays centred (a uniform shift ``c`` of it adds ``c²·2m/S`` to the SLQ variance).

    **When it is rebuilt** (:meth:`needs_refresh`): the hyperparameters moved by more than :data:`REFRESH_DRIFT`
    (:meth:`drift`; in an eager training step :data:`REFRESH_DRIFT_EAGER`, by default never), or the missing cells'
    CG took more than
    :data:`REFRESH_ITERATIONS` times the iterations of the first step it served (plus 2), or
    :data:`FREEZE` is off. An eager step decides at its start (one read of the drift); a CUDA graph's
    step computes the drift on the device and reports it, and the refresh happens eagerly between two
    replays (:meth:`refresh`: into the same buffers where the shapes match, else the graph is recorded
    again; ``kronegp.models._graph``). ``GridGP.last_solve.preconditioner_reused`` says which a step did.
    """

    def __init__(self):
        #: preconditioners built (the first included), and of those, refreshed into the same buffers
        self.builds = self.refreshes = 0
        self._forget()

    def _forget(self) -> None:
        self.pre: Optional[TwoLevel] = None
        self.key = None
        self.observed: Optional[Tensor] = None
        self.factors: Optional[list[Tensor]] = None
        self.log_ratio: Optional[Tensor] = None
        self.log_j: Optional[Tensor] = None  # Σ log J⁰ over the missing cells (0-dim: no grid vector kept)
        self.missing = 0
        #: the missing cells' CG iterations at the first step this preconditioner served
        self.iterations: Optional[int] = None
        #: why it must be rebuilt at the next chance (its iterations grew), or ``None``
        self.stale: Optional[str] = None
        #: whether the last step that could build (not a fixed schedule's) built it
        self.rebuilt = False
        #: counts the builds that gave new tensors (what a CUDA graph's recording checks it still holds)
        self.version = getattr(self, "version", 0) + 1

    def __getstate__(self):  # a copy of the model builds its own (its mask is another tensor)
        return {}

    def __setstate__(self, state) -> None:
        self.__init__()

    @staticmethod
    def _key(observed: Tensor, g_diag: Tensor) -> tuple:
        return (observed._version, g_diag.shape, g_diag.dtype, g_diag.device, ENABLED, MODE_SCORE, MAX_MODES,
                MAX_TOTAL_MODES, MAX_PIECES, MAX_GRAM_ELEMENTS, GALERKIN_TOL, MAX_TRUNCATED_MODES, MAX_BOX_ELEMENTS,
                MAX_CANDIDATE_MODES, MAX_CANDIDATE_MODES_CUDA, MASS_SHARE,
                MIN_MISSING, MIN_INTERIOR, COARSE_DTYPE)

    def holds(self, observed: Tensor, g_diag: Tensor) -> bool:
        """Whether it was built for this mask (the same tensor, unchanged), grid, dtype, device and rules."""
        return self.key is not None and self.observed is observed and self.key == self._key(observed, g_diag)

    def drift(self, factors: list[Tensor], outputscale, level) -> Tensor:
        """How far the hyperparameters moved since the build (0-dim, on the device, not read):
        ``max(max_k max|K_k − K_k⁰| / max|K_k⁰|, |log(s²/σ²) − log(s²/σ²)⁰|)``. The factors carry the
        lengthscales of any kernel; a common scale of ``s²`` and ``σ²`` is no drift (``κ`` follows it)."""
        parts = [(f - f0).abs().amax() / f0.abs().amax().clamp_min(torch.finfo(f0.dtype).tiny)
                 for f, f0 in zip(factors, self.factors)]
        parts.append((self._log_ratio(outputscale, level) - self.log_ratio).abs())
        return torch.stack([p.to(self.log_ratio.dtype) for p in parts]).max()

    @staticmethod
    def _log_ratio(outputscale, level: Tensor) -> Tensor:
        return torch.log(torch.as_tensor(outputscale, device=level.device) / level).to(level.dtype).reshape(())

    def needs_refresh(self, drift, *, training: bool = False) -> Optional[str]:
        """Why the kept preconditioner must be rebuilt before the next step (``drift``: :meth:`drift`'s
        value, a number), or ``None``; ``training``: for an eager training step (:data:`REFRESH_DRIFT_EAGER`),
        else for a CUDA graph's step or a posterior's solves (:data:`REFRESH_DRIFT`)."""
        if not FREEZE:
            return "FREEZE is off"
        if self.stale is not None:
            return self.stale
        limit, name = (REFRESH_DRIFT_EAGER, "REFRESH_DRIFT_EAGER") if training else (REFRESH_DRIFT, "REFRESH_DRIFT")
        if drift is not None and drift > limit:
            return f"the hyperparameters moved by {drift:.3g} > {name} = {limit}"
        return None

    def note_iterations(self, iterations: int) -> None:
        """The missing cells' CG iterations of a step that used it (a number): the first is its
        baseline; one more than :data:`REFRESH_ITERATIONS` times that (plus 2) marks it stale."""
        if self.pre is None:
            return
        if self.iterations is None:
            self.iterations = int(iterations)
        elif iterations > REFRESH_ITERATIONS * self.iterations + 2:
            self.stale = f"CG took {int(iterations)} iterations, {self.iterations} at the first step after its setup"

    def _keep(self, pre: Optional[TwoLevel], observed: Tensor, g_diag: Tensor, factors: list[Tensor],
              outputscale, level) -> None:
        self._forget()
        self.pre, self.observed, self.key = pre, observed, self._key(observed, g_diag)
        self.factors = [f.detach().clone() for f in factors]
        self.log_j = torch.log(pre.g_diag if pre is not None else g_diag).sum()
        self.log_ratio = self._log_ratio(outputscale, level).detach().clone()
        self.missing = max(1, observed.numel() - int(observed.sum()))
        self.builds += 1

    def get(self, build, observed: Tensor, g_diag: Tensor, factors: list[Tensor], outputscale, level,
            schedule, report: dict, *, training: bool = False) -> Optional[TwoLevel]:
        """The preconditioner of this step (``κM``, :meth:`TwoLevel.scaled`; ``None``: Jacobi), rebuilt
        first by ``build()`` (→ :class:`TwoLevel` or ``None``) where it must be (:meth:`needs_refresh`).
        ``g_diag``: this step's ``diag(G)``; ``training``: a training step's (eager, it notes its iterations:
        :data:`REFRESH_DRIFT_EAGER`; else :data:`REFRESH_DRIFT`). Under a fixed :class:`~kronegp.solvers.CGSchedule` (a CUDA
        graph's step) nothing is read or rebuilt: the recording pass's preconditioner is used, and the
        drift goes to ``report`` as a device tensor. ``report`` gets ``two_level_reused`` (and
        ``two_level_drift``) where a two-level preconditioner applies."""
        fixed = schedule is not None and schedule.is_fixed
        holds = self.holds(observed, g_diag)
        rebuilt = False
        if fixed:
            if not holds or schedule.next_plan("two_level") != self.version:
                raise RuntimeError("FrozenTwoLevel: a fixed CG schedule's step does not find the preconditioner its "
                                   "recording pass used (it was rebuilt or dropped in between)")
            drift = self.drift(factors, outputscale, level) if self.pre is not None else None
            rebuilt = self.rebuilt  # the recording pass's (a replay's report comes from between_replays)
        else:
            drift = float(self.drift(factors, outputscale, level)) if holds else None
            if not holds or self.needs_refresh(drift, training=training and schedule is None) is not None:
                self.pre = None  # the old one's tensors go before the new one is built
                self._keep(build(), observed, g_diag, factors, outputscale, level)
                rebuilt, drift = True, 0.0
            if schedule is not None:
                schedule.note_plan("two_level", self.version)
            self.rebuilt = rebuilt
        if self.pre is None:
            return None
        report["two_level_reused"] = not rebuilt
        report["two_level_drift"] = drift
        return self.pre.scaled(self.scale(g_diag))

    def scale(self, g_diag: Tensor) -> Tensor:
        """``log κ = mean_M(log J⁰ − log J)`` (0-dim, on the device; ``log J`` is 0 at observed cells)."""
        return (self.log_j - torch.log(g_diag).sum()) / self.missing

    def refresh(self, build, observed: Tensor, g_diag: Tensor, factors: list[Tensor], outputscale, level) -> bool:
        """Rebuild now (between two CUDA-graph replays): ``build(like)`` (:func:`two_level`'s ``like``, to
        keep the shapes) goes into the kept tensors in place where every shape matches (``True``: a
        recorded graph reads the new values), else replaces them (``False``: record again)."""
        new = build(self.pre)
        if self.pre is not None and new is not None and self.holds(observed, g_diag) and self.pre.copy_(new):
            for a, b in zip(self.factors, factors):
                a.copy_(b.detach())
            self.log_ratio.copy_(self._log_ratio(outputscale, level))
            self.log_j.copy_(torch.log(self.pre.g_diag).sum())
            self.iterations = self.stale = None
            self.builds += 1
            self.refreshes += 1
            return True
        self._keep(new, observed, g_diag, factors, outputscale, level)
        return False


def coarse_bytes(missing: Optional[Tensor], sizes, itemsize: int, pieces: Optional[PieceSet] = None) -> int:
    """Bytes the two-level preconditioner may hold for ``missing`` (bool grid, flat) at its peak, 0 where
    it does not apply (for :mod:`kronegp.models.memory`): per piece of :func:`pieces_of`, six
    ``|S_i| × |S_i|`` matrices kept (between steps too: :class:`FrozenTwoLevel`; the old one is dropped
    before a new one is built) and eight more while it is built, plus the partial gram ``H`` of
    :func:`selected_gram`, its block of axis-1 pairs and its three ``|S_i|²`` index maps (a box it
    fills) or the ``|S_i|`` box rows (:data:`MAX_BOX_ELEMENTS` at a time), eigen-coordinates and three
    more ``|S_i|²`` (``WᵀW/σ²``, the a posteriori check and its factor) of :func:`truncated_galerkin`
    (one that it does not); per batch of :class:`PieceSet`, the apply's ``E⁻¹ − F⁻¹`` and the probes' matrix padded to its largest
    ``|S_i|`` and the boxes' padded block; ``|S_i|`` at most the box and the budgets. ``pieces``: the
    :class:`PieceSet` of ``missing`` where the caller has it (:func:`cached_pieces`), else found here.
    All of it in :func:`coarse_dtype`'s elements (float64 for a float32 grid), which for a piece that fills
    its box adds a grid vector of ``p`` in that dtype to the build."""
    if not ENABLED or missing is None:
        return 0
    widened = torch.finfo(coarse_dtype({2: torch.float16, 4: torch.float32, 8: torch.float64}[itemsize])).bits // 8
    grid = math.prod(sizes) if widened > itemsize else 0
    itemsize = widened
    kept, peak, budget = 0, 0, MAX_TOTAL_MODES
    if pieces is None:
        pieces = PieceSet(pieces_of(missing, sizes))
    count: dict[int, int] = {}
    cand: dict[int, int] = {}  # a ragged piece's candidates (mass_filter's U: candidates × modes, kept)
    index = 3 * 8 // itemsize  # selected_gram's three long (k, k) index maps, in elements
    for i, piece in enumerate(pieces.pieces):
        if budget <= 0:
            break
        if piece.fills:
            modes = min(piece.box, MAX_MODES, budget)
            work = 2 * min(sizes[0] * piece.box**2, MAX_GRAM_ELEMENTS) + index * modes * modes + grid
        else:  # the box rows (MAX_BOX_ELEMENTS at a time), their gram's partial H, truncated_galerkin's blocks
            # of Y (an axis-1 slab at least), and its WᵀW/σ² with the a posteriori check's matrix and factor;
            # before them mass_filter's gram of the candidates, its eigenvectors and eigh's workspace
            modes = min(piece.box, MAX_TRUNCATED_MODES, budget)
            cand[i] = min(piece.box, candidate_modes(missing.device))
            rows = min(modes, max(1, MAX_BOX_ELEMENTS // piece.box))
            work = rows * piece.box + 2 * min(piece.box_sizes[0] * piece.box**2, MAX_GRAM_ELEMENTS) \
                + (index + 3) * cand[i] ** 2 + 3 * modes * modes + max(MAX_GRAM_ELEMENTS, modes * math.prod(sizes[1:]))
        count[i] = modes
        budget -= modes
        kept += 6 * modes * modes
        peak = max(peak, work + 8 * modes * modes)
    for batch in pieces.batches:
        most = max([count.get(i, 0) for i in batch.members])
        picked = max([cand.get(i, 0) for i in batch.members])
        kept += len(batch.members) * (2 * most * most + batch.size + picked * most)
    return (kept + peak) * itemsize
