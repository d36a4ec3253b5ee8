"""The closed-form math of RECE (Gong et al., ECCV 2024), in plain torch.

Two equations do all the work:

* **Eq. 3** (UCE's edit, the minimiser of Eq. 2). For one K/V matrix ``W_old`` (d_out x d), source rows ``c_i``,
  destination rows ``c*_i`` and preserved rows ``c_j``, the minimiser of::

      s * sum_i ||W c_i - W_old c*_i||^2 + p * sum_j ||W c_j - W_old c_j||^2 + lamb * ||W - W_old||_F^2

  is ``W = W_old A B^-1`` with ``A = lamb I + s sum_i c*_i c_i^T + p sum_j c_j c_j^T`` (destination x source: the
  paper prints ``c*_i c*_i^T`` here, a typo) and ``B = lamb I + s sum_i c_i c_i^T + p sum_j c_j c_j^T``.

* **Eq. 8** (the derived embedding, the minimiser of Eq. 7)::

      c' = (reg I + sum_i W_new_i^T W_new_i)^-1 (sum_i W_new_i^T W_old_i) c

The structure that makes RECE cheap: with "replace" targets (values ``W_cur c*``), the edit of *every* K/V matrix is
the same right-multiplication ``W_new = W_cur X`` with ``X = A B^-1`` (d x d). After any number of edits the weights
are ``W_orig M`` for one d x d matrix ``M``, and Eq. 8 only needs ``G = sum_i W_orig_i^T W_orig_i``::

      sum_i W_new_i^T W_new_i = M^T G M,    sum_i W_new_i^T W_orig_i = M^T G.

So a whole UCE + RECE run is a handful of d x d solves. All solves run in float64 with a Cholesky factorisation
(never an explicit inverse: the reference code's fp32 ``torch.inverse`` is off by ~10 % on SD-1.4 shapes); results are
returned in the caller's dtype and device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rece_lightning.validation import check_non_negative, check_number, check_positive

__all__ = [
    "SharedState",
    "Workspace",
    "apply_transform",
    "derive_embedding",
    "derive_embedding_from_state",
    "derive_embedding_from_transform",
    "erase_closed_form",
    "gram_matrix",
    "compact_factors",
    "low_rank_update",
    "replace_edit",
    "replace_transform",
]

_SOLVE_DTYPE = torch.float64


def _rows(name: str, tensors: Sequence[Tensor] | None, dim: int | None, device: torch.device | None) -> Tensor | None:
    """Stack a list of (T_i, d) tensors into one float64 (sum T_i, d) matrix."""
    if not tensors:
        return None
    parts = []
    for index, tensor in enumerate(tensors):
        if tensor.ndim == 1:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 2:
            raise ValueError(f"{name}[{index}] has shape {tuple(tensor.shape)}; expected (tokens, d)")
        if dim is not None and tensor.shape[1] != dim:
            raise ValueError(f"{name}[{index}] has width {tensor.shape[1]}; expected d={dim}")
        parts.append(tensor.to(device=device, dtype=_SOLVE_DTYPE))
    return torch.cat(parts)


def _spd_solve(matrix: Tensor, rhs: Tensor, factor: Tensor | None = None) -> Tensor:
    """Solve ``matrix @ x = rhs`` for a symmetric positive-definite ``matrix`` (Cholesky; LU if it is not PD);
    ``factor``: a tensor of ``matrix``'s shape to hold the Cholesky factor instead of a fresh one."""
    if factor is None:
        factor, info = torch.linalg.cholesky_ex(matrix)
    else:
        info = torch.empty((), dtype=torch.int32, device=factor.device)
        torch.linalg.cholesky_ex(matrix, out=(factor, info))
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.solve(matrix, rhs)


def _eye(dim: int, device: torch.device | None) -> Tensor:
    return torch.eye(dim, dtype=_SOLVE_DTYPE, device=device)


@dataclass(frozen=True)
class _EditSolution:
    """Eq. 3's ``X = A B^-1`` in the cheaper of two forms.

    Few token rows (T < d): ``X = I + s D^T Z^T`` with ``D = C* - C`` (T x d) and ``Z = B^-1 C^T`` (d x T): ``A - B =
    s (C* - C)^T C`` (the lamb and preserve terms cancel), so X - I has rank <= T and every product downstream has only
    T columns. Many rows (T >= d, e.g. hundreds of concepts at once): the dense ``X = I + s (B^-1 C^T D)^T`` (d x d), as
    rank-T updates would then cost more than d x d products.
    """

    difference: Tensor | None = None
    solved: Tensor | None = None
    dense: Tensor | None = None


def _solve_edit(
    erase: Sequence[Tensor],
    targets: Sequence[Tensor],
    preserve: Sequence[Tensor] | None,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
    null_space: Tensor | None = None,
) -> _EditSolution:
    check_positive("lamb", lamb)
    check_non_negative("erase_scale", erase_scale)
    check_non_negative("preserve_scale", preserve_scale)
    if len(erase) != len(targets):
        raise ValueError(f"got {len(erase)} erase embeddings but {len(targets)} targets; they must pair up")
    if not erase:
        raise ValueError("erase is empty: give at least one (tokens, d) source embedding")
    device = erase[0].device
    dim = erase[0].shape[-1]
    sources = _rows("erase", erase, dim, device)
    destinations = _rows("targets", targets, dim, device)
    if sources.shape != destinations.shape:
        raise ValueError(
            f"erase has {sources.shape[0]} rows but targets has {destinations.shape[0]}; each source row needs "
            "exactly one destination row"
        )
    kept = _rows("preserve", preserve, dim, device)  # checked even when its scale leaves it out
    if preserve_scale == 0:
        kept = None
    rows = sources.shape[0] + (0 if kept is None else kept.shape[0])
    if null_space is not None:
        return _null_space_solution(sources, destinations, kept, null_space, lamb, erase_scale, preserve_scale)
    if erase_scale > 0 and rows < dim:
        # B = lamb I + U U^T with U = [sqrt(s) C; sqrt(p) P]^T (d x k, k < d), and C^T = U E / sqrt(s) for E the
        # first T columns of I_k: the push-through identity (lamb I + U U^T)^-1 U = U (lamb I + U^T U)^-1 gives
        # Z = B^-1 C^T = U (lamb I_k + U^T U)^-1 E / sqrt(s), a k x k Cholesky instead of d x d, with no cancellation.
        parts = [sources * math.sqrt(erase_scale)]
        if kept is not None:
            parts.append(kept * math.sqrt(preserve_scale))
        basis = torch.cat(parts).T  # (d, k)
        small = basis.T @ basis
        small.diagonal().add_(lamb)
        selector = torch.zeros(rows, sources.shape[0], dtype=_SOLVE_DTYPE, device=device)
        selector.diagonal().fill_(1.0 / math.sqrt(erase_scale))
        return _EditSolution(difference=destinations - sources, solved=basis @ _spd_solve(small, selector))
    # Built in place: on CPUs every fresh d x d float64 temporary costs page faults comparable to its arithmetic.
    source_gram = sources.T @ sources
    denominator = source_gram * erase_scale
    if kept is not None:
        denominator.addmm_(kept.T, kept, alpha=preserve_scale)
    denominator.diagonal().add_(lamb)
    if sources.shape[0] >= dim:
        # C^T D = C^T C* - C^T C, without a (T, d) difference in memory
        cross = torch.sub(sources.T @ destinations, source_gram)
        dense = _spd_solve(denominator, cross).T.mul_(erase_scale)
        dense.diagonal().add_(1.0)
        return _EditSolution(dense=dense)
    return _EditSolution(difference=destinations - sources, solved=_spd_solve(denominator, sources.T))


def null_space_basis(preserved: Sequence[Tensor], energy: float = 1.0, rtol: float = 1e-10) -> Tensor:
    """An orthonormal basis U (d x m) of the directions an edit may change while it keeps every preserved row's K/V
    outputs (hard preservation, in the spirit of AlphaEdit / SPEED): the complement of the span of ``preserved``.

    ``energy`` < 1 protects only the top principal directions of the preserved rows that hold that share of their
    energy (sum of squared singular values), so that an edit can still act when the rows span (nearly) all d; 1
    protects the whole span (eigenvalues of P^T P above ``rtol`` times the largest). Float64.
    """
    check_number("energy", energy, strictly_above=0, maximum=1)
    rows = _rows("preserve", preserved, None, None)
    if rows is None or rows.shape[0] == 0:
        raise ValueError("preserved is empty: hard preservation needs the rows whose outputs it keeps")
    dim = rows.shape[1]
    values, vectors = torch.linalg.eigh(rows.T @ rows)  # ascending
    values = values.clamp_min(0)
    significant = values > rtol * float(values[-1])
    if energy < 1:
        share = values.flip(0).cumsum(0) / values.sum()  # energy of the top k directions, k = 1..d
        protected = int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype, device=share.device))) + 1
        significant = torch.zeros_like(significant)
        significant[dim - protected :] = True
    free = vectors[:, ~significant]
    if free.shape[1] == 0:
        raise ValueError(
            f"the null space is empty: {rows.shape[0]} preserved rows span all d = {dim} directions, so no edit could "
            "change anything while keeping them. Preserve fewer prompts, or protect only their main directions with "
            "preserve_energy < 1 (e.g. 0.99)"
        )
    return free


def concept_projection(
    hessian: Tensor, free: Tensor, rows: Tensor, share: float = 0.9, jitter: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """An edit that takes a concept's directions out of every input, so that no input reaches its output (RECE-P).

    ``X = I - H^-1 V (V^T H^-1 V)^-1 V^T`` with ``H = M^T G M`` (Eq. 8's matrix in the current state M) and V (d x k)
    inside the free directions ``free`` (:func:`null_space_basis`). ``X`` is the H-orthogonal projection onto
    ``{y : V^T y = 0}``: idempotent, the identity on every input orthogonal to V (the hard-preserved span among them),
    and each input's new K/V output is the nearest, to its current one, of the outputs the new state can make. Eq. 3's
    edits are invertible, so any output stays reachable (Eq. 8 finds ``X^-1 c``, only costlier under its reg); after
    this one, the rows' current K/V energy ``sum_rows r^T V (V^T H^-1 V)^-1 V^T r`` is out of every input's reach.
    Given the derived embedding c' as rows (its current output is the concept's original one, Eq. 8), that is the
    concept's output.

    V holds the top-k directions of the generalized eigenproblem ``(U^T R^T R U) a = mu (U^T H^-1 U) a`` (U =
    ``free``, R = ``rows``): each direction's mu is the energy its removal puts out of reach, and k is the fewest
    directions holding ``share`` of the total. ``jitter`` (times H's mean diagonal) keeps H invertible after an earlier
    projection made it singular. Returns the factors ``(left, right)`` (d x k, float64) of ``X = I + left @ right^T``
    (``left = -H^-1 V (V^T H^-1 V)^-1``, ``right = V``): k directions, composed in O(d^2 k).
    """
    check_number("share", share, strictly_above=0, maximum=1)
    hessian = hessian.to(_SOLVE_DTYPE)
    dim = hessian.shape[0]
    if free.ndim != 2 or free.shape[0] != dim or free.shape[1] == 0:
        raise ValueError(f"free has shape {tuple(free.shape)}; expected (d={dim}, m) with m >= 1")
    free = free.to(device=hessian.device, dtype=_SOLVE_DTYPE)
    rows = rows.to(device=hessian.device, dtype=_SOLVE_DTYPE).reshape(-1, dim)
    regularised = hessian + jitter * float(hessian.diagonal().mean()) * _eye(dim, hessian.device)
    factor = torch.linalg.cholesky(regularised)
    metric = free.T @ torch.cholesky_solve(free, factor)  # U^T H^-1 U, m x m, SPD
    metric_factor = torch.linalg.cholesky(metric)
    # L^-1 (U^T R^T R U) L^-T = Z^T Z with Z = R U L^-T (rows x m): its right singular vectors, not an m x m eigh
    whitened = torch.linalg.solve_triangular(metric_factor, (rows @ free).T, upper=False).T
    _, singular, vectors_t = torch.linalg.svd(whitened, full_matrices=False)
    values, vectors = singular**2, vectors_t.T
    total = float(values.sum())
    if total <= 0:
        empty = torch.zeros(dim, 0, dtype=_SOLVE_DTYPE, device=hessian.device)
        return empty, empty.clone()
    threshold = torch.tensor(share, dtype=_SOLVE_DTYPE, device=values.device)  # on the values' device (a GPU's)
    kept = int(torch.searchsorted(values.cumsum(0) / total, threshold)) + 1
    kept = min(kept, values.shape[0])
    directions = free @ torch.linalg.solve_triangular(metric_factor.T, vectors[:, :kept], upper=True)
    directions, _ = torch.linalg.qr(directions)
    inverse_directions = torch.cholesky_solve(directions, factor)  # H^-1 V
    core = torch.linalg.cholesky(directions.T @ inverse_directions)
    return -torch.cholesky_solve(inverse_directions.T, core).T, directions


def compose_low_rank(state: SharedState, left: Tensor, right: Tensor) -> SharedState:
    """The state after ``X = I + left @ right^T`` (d x k factors): ``M X`` and ``X^T H X`` in O(d^2 k), not d^3."""
    left = left.to(device=state.transform.device, dtype=_SOLVE_DTYPE)
    right = right.to(device=state.transform.device, dtype=_SOLVE_DTYPE)
    transform = torch.addmm(state.transform, state.transform @ left, right.T)
    weighted = state.hessian @ left  # H L
    hessian = state.hessian + right @ weighted.T + weighted @ right.T + right @ (left.T @ weighted) @ right.T
    return SharedState(transform, _symmetric(hessian))


def _null_space_solution(
    sources: Tensor,
    destinations: Tensor,
    kept: Tensor | None,
    basis: Tensor,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
) -> _EditSolution:
    """Eq. 2's minimiser with the update confined to ``basis`` (U, d x m): ``X = I + s D^T Z^T`` as in the free case,
    with ``Z = U (U^T B U)^-1 U^T C^T`` instead of ``B^-1 C^T``. Then ``X p = p`` for every p orthogonal to U: the
    preserved rows' outputs do not move, whatever the erase term asks."""
    basis = basis.to(device=sources.device, dtype=_SOLVE_DTYPE)
    if basis.ndim != 2 or basis.shape[0] != sources.shape[1]:
        raise ValueError(f"null_space has shape {tuple(basis.shape)}; expected (d={sources.shape[1]}, m)")
    projected = sources @ basis  # C U (T x m)
    system = (projected.T @ projected).mul_(erase_scale)
    if kept is not None:
        kept_projected = kept @ basis
        system.addmm_(kept_projected.T, kept_projected, alpha=preserve_scale)
    system.diagonal().add_(lamb)
    return _EditSolution(difference=destinations - sources, solved=basis @ _spd_solve(system, projected.T))


def replace_transform(
    erase: Sequence[Tensor],
    targets: Sequence[Tensor],
    preserve: Sequence[Tensor] | None = None,
    *,
    lamb: float = 0.1,
    erase_scale: float = 1.0,
    preserve_scale: float = 0.1,
    null_space: Tensor | None = None,
) -> Tensor:
    """The d x d matrix ``X = A B^-1`` of Eq. 3, so that the edited weights are ``W_new = W_cur @ X`` (with
    ``null_space``, the update confined to it: :func:`null_space_basis`).

    ``erase`` and ``targets`` are lists of row-aligned (T_i, d) source / destination embeddings, ``preserve`` a list of
    (T_j, d) embeddings whose outputs are kept. Returned in float64 on the inputs' device.
    """
    edit = _solve_edit(erase, targets, preserve, lamb, erase_scale, preserve_scale, null_space)
    if edit.dense is not None:
        return edit.dense
    return _eye(edit.difference.shape[1], edit.difference.device) + erase_scale * edit.difference.T @ edit.solved.T


@dataclass(frozen=True)
class SharedState:
    """The state of every K/V matrix as ``W_orig @ transform``, with ``hessian = transform^T G transform``.

    ``hessian`` is Eq. 8's ``sum_i W_new_i^T W_new_i``; keeping it current costs a few rank-T products per edit
    instead of two d x d x d products per derivation. While the edits' total rank r stays below d / 2,
    ``transform = I + left @ right^T`` (d x r factors) is kept too: writing ``W + (W left) right^T`` then costs
    2r/d of the dense product (SDXL: 460 rows after UCE + 5 epochs against d = 2048); otherwise both are None.
    """

    transform: Tensor
    hessian: Tensor
    left: Tensor | None = None
    right: Tensor | None = None

    @classmethod
    def unedited(cls, gram: Tensor) -> SharedState:
        gram = gram.to(_SOLVE_DTYPE)
        dim = gram.shape[0]
        empty = torch.zeros(dim, 0, dtype=_SOLVE_DTYPE, device=gram.device)
        return cls(_eye(dim, gram.device), gram.clone(), empty, empty.clone())

    @classmethod
    def from_transform(cls, gram: Tensor, transform: Tensor) -> SharedState:
        gram = gram.to(_SOLVE_DTYPE)
        transform = transform.to(device=gram.device, dtype=_SOLVE_DTYPE)
        return cls(transform, _symmetric(transform.T @ (gram @ transform)))


@dataclass(frozen=True)
class Workspace:
    """Preallocated d x d float64 buffers that :func:`replace_edit` and :func:`derive_embedding_from_state` write into
    instead of fresh tensors.

    A run of edits allocates the same few d x d matrices again and again; on CPUs the allocator hands each back to the
    system and every new one costs its page faults (1,150 for d = 768), which measured as much as the arithmetic of a
    thin edit. A state returned into a workspace lives in its buffers: copy it out before the next call that uses them.
    """

    transform: Tensor
    hessian: Tensor
    scratch: Tensor
    factor: Tensor

    @classmethod
    def for_dim(cls, dim: int, device: torch.device | str | None = None) -> Workspace:
        return cls(*(torch.empty(dim, dim, dtype=_SOLVE_DTYPE, device=device) for _ in range(4)))

    def fits(self, matrix: Tensor) -> bool:
        return self.transform.shape == matrix.shape and self.transform.device == matrix.device


def _symmetric(matrix: Tensor) -> Tensor:
    # M^T G M is symmetric in exact arithmetic; keep it exactly so, whatever order the products summed in.
    return torch.add(matrix, matrix.T).mul_(0.5)


def replace_edit(
    state: SharedState,
    gram: Tensor,
    erase: Sequence[Tensor],
    targets: Sequence[Tensor],
    preserve: Sequence[Tensor] | None = None,
    *,
    lamb: float = 0.1,
    erase_scale: float = 1.0,
    preserve_scale: float = 0.1,
    null_space: Tensor | None = None,
    workspace: Workspace | None = None,
) -> SharedState:
    """The state after one more Eq. 3 edit, ``transform @ replace_transform(...)`` (``null_space``: hard
    preservation, :func:`null_space_basis`; ``workspace``: write the new transform and hessian into its buffers).

    Few rows: rank-T updates. With ``X = I + s D^T Z^T`` (see ``_EditSolution``) and ``A = s M D^T`` (d x T): the new
    transform is ``M + A Z^T`` and the new hessian ``H + K + K^T`` with ``K = Z R^T``, ``R = M^T G A + Z (A^T G A) / 2``
    (exactly symmetric as summed). Many rows (T >= d): ``M X`` and ``X^T H X`` with the dense X.
    """
    edit = _solve_edit(erase, targets, preserve, lamb, erase_scale, preserve_scale, null_space)
    device = (edit.dense if edit.dense is not None else edit.difference).device
    gram = gram.to(device=device, dtype=_SOLVE_DTYPE)
    transform = state.transform.to(device=device, dtype=_SOLVE_DTYPE)
    hessian = state.hessian.to(device=device, dtype=_SOLVE_DTYPE)
    if workspace is not None:
        if not workspace.fits(transform):
            raise ValueError(
                f"the workspace holds {tuple(workspace.transform.shape)} buffers on {workspace.transform.device}; "
                f"this state is {tuple(transform.shape)} on {transform.device}"
            )
        if {workspace.transform.data_ptr(), workspace.hessian.data_ptr()} & {transform.data_ptr(), hessian.data_ptr()}:
            raise ValueError("the workspace holds the state it would edit: give the edit a state of its own buffers")
    if edit.dense is not None:
        new_transform, new_hessian = transform @ edit.dense, _symmetric(edit.dense.T @ (hessian @ edit.dense))
        if workspace is None:
            return SharedState(new_transform, new_hessian)
        return SharedState(workspace.transform.copy_(new_transform), workspace.hessian.copy_(new_hessian))
    difference, solved = edit.difference, edit.solved
    # X = I + s D^T Z^T, so M X = M + (s M D^T) Z^T: only products with T columns.
    shift = (transform @ difference.T).mul_(erase_scale)  # (d, T)
    gram_shift = gram @ shift  # (d, T)
    cross = (transform.T @ gram_shift).addmm_(solved, shift.T @ gram_shift, alpha=0.5)  # (d, T)
    outer = torch.mm(solved, cross.T, out=None if workspace is None else workspace.scratch)  # K = Z R^T
    new_hessian = torch.add(outer, outer.T, out=None if workspace is None else workspace.hessian).add_(hessian)
    new_transform = torch.addmm(transform, shift, solved.T, out=None if workspace is None else workspace.transform)
    left = right = None
    if state.left is not None and state.left.shape[1] + shift.shape[1] < transform.shape[0] // 2:
        left = torch.cat([state.left.to(shift), shift], dim=1)
        right = torch.cat([state.right.to(solved), solved], dim=1)
    return SharedState(new_transform, new_hessian, left, right)


def erase_closed_form(
    weights: Sequence[Tensor],
    erase: Sequence[Tensor],
    targets: Sequence[Tensor],
    preserve: Sequence[Tensor] | None = None,
    *,
    lamb: float = 0.1,
    erase_scale: float = 1.0,
    preserve_scale: float = 0.1,
) -> list[Tensor]:
    """Eq. 3: the exact minimiser of Eq. 2 for every (d_out, d) matrix in ``weights``.

    Each matrix is edited independently towards the value targets ``W_old c*`` (the reference code's "replace"
    technique); the results keep each input's dtype and device.
    """
    if not weights:
        raise ValueError("weights is empty: give at least one (d_out, d) matrix")
    edit = _solve_edit(erase, targets, preserve, lamb, erase_scale, preserve_scale)
    dim = erase[0].shape[-1]
    edited = []
    for weight in weights:
        if weight.ndim != 2 or weight.shape[1] != dim:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not take d={dim} inputs")
        current = weight.to(dtype=_SOLVE_DTYPE, device=erase[0].device)
        if edit.dense is not None:
            product = current @ edit.dense
        else:
            product = current + erase_scale * (current @ edit.difference.T) @ edit.solved.T
        edited.append(product.to(device=weight.device, dtype=weight.dtype))
    return edited


def product_dtype(weight: Tensor) -> torch.dtype:
    """The dtype :func:`apply_transform` multiplies ``weight`` in: float32 on CPUs for float32/16 weights (within ~1e-6
    of float64 and twice as fast); float64 for float64 weights and on every GPU (where float64 is cheap and immune to
    a global TF32 switch)."""
    return _SOLVE_DTYPE if weight.dtype == _SOLVE_DTYPE or weight.device.type == "cuda" else torch.float32


def apply_transform(
    weight: Tensor,
    transform: Tensor,
    left: Tensor | None = None,
    right: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``weight @ transform`` in ``weight``'s dtype: the K/V matrix of a state described by its shared transform.

    Given the state's low-rank factors (``transform = I + left @ right^T``), computed as ``weight + (weight @ left) @
    right^T``. A plain product, not a solve, in :func:`product_dtype`; ``transform`` / ``left`` / ``right`` already in
    that dtype and on ``weight``'s device are used as they are (a caller writing many matrices converts them once).
    ``out`` (``weight``'s shape and dtype, not ``weight`` itself) receives the result without a further copy when the
    product runs in the weights' own dtype.
    """
    dtype = product_dtype(weight)
    as_dtype = weight.to(dtype)
    direct = out is not None and out.dtype == dtype
    if left is not None and right is not None:
        left, right = left.to(device=weight.device, dtype=dtype), right.to(device=weight.device, dtype=dtype)
        product = torch.addmm(as_dtype, as_dtype @ left, right.T, out=out if direct else None)
    else:
        product = torch.matmul(as_dtype, transform.to(device=weight.device, dtype=dtype), out=out if direct else None)
    if out is None:
        return product.to(weight.dtype)
    if not direct:
        out.copy_(product)
    return out


def compact_factors(left: Tensor, right: Tensor, rtol: float) -> tuple[Tensor, Tensor]:
    """``left @ right^T`` (d x r factors, float64) with its singular directions below ``rtol`` times the largest
    singular value left out: the factors of rank k <= r that :func:`apply_transform` then multiplies (cost ~k/r).

    ``left = Q_l R_l``, ``right = Q_r R_r`` (QR), ``R_l R_r^T = U S V^T`` (r x r SVD); the result is ``(Q_l U_k S_k,
    Q_r V_k)``. It differs from ``left @ right^T`` by at most ``rtol * sigma_1`` in spectral norm, so a weight written
    as ``W + (W left') right'^T`` moves by at most ``rtol * sigma_1 * ||W||``: with ``rtol`` the machine epsilon of the
    dtype the product runs in, less than that product's own rounding. The edits' stacked token rows are nearly
    dependent (a prompt's padding positions), so this drops many of the r columns (SDXL, UCE + 5 epochs: 460 -> 264 at
    float32's epsilon).
    """
    check_non_negative("rtol", rtol)
    if left.shape != right.shape or left.ndim != 2:
        raise ValueError(f"left {tuple(left.shape)} and right {tuple(right.shape)} must be two (d, r) matrices")
    if left.shape[1] == 0:
        return left, right
    left, right = left.to(_SOLVE_DTYPE), right.to(device=left.device, dtype=_SOLVE_DTYPE)
    left_basis, left_core = torch.linalg.qr(left)
    right_basis, right_core = torch.linalg.qr(right)
    singular_left, values, singular_right_t = torch.linalg.svd(left_core @ right_core.T)
    kept = int((values > rtol * float(values[0])).sum()) if float(values[0]) > 0 else 0
    return (
        left_basis @ (singular_left[:, :kept] * values[:kept]),
        right_basis @ singular_right_t[:kept].T,
    )


@dataclass(frozen=True)
class LowRankUpdate:
    """``transform - I ~ up @ down`` (``up``: d x r, ``down``: r x d, float64), the shared factor of a LoRA.

    ``full_rank``: the numerical rank of ``transform - I``; ``rank``: the rank kept (``full_rank`` unless truncated);
    ``kept_energy``: the share of ``||transform - I||_F^2`` the kept singular values hold (1 at full rank).
    """

    up: Tensor
    down: Tensor
    rank: int
    full_rank: int
    kept_energy: float


def low_rank_update(transform: Tensor, rank: int | None = None, rtol: float = 1e-10) -> LowRankUpdate:
    """The best rank-``rank`` factorisation (Eckart-Young: the truncated SVD) of the edit ``transform - I``.

    Every edited K/V matrix is ``W_orig @ transform = W_orig + (W_orig @ up) @ down``: a LoRA with ``lora_B = W_orig @
    up`` and one ``lora_A = down`` shared by every layer. ``rank=None`` keeps the numerical rank (singular values above
    ``rtol`` times the largest), which reproduces the edit exactly; a larger ``rank`` keeps no more than that. Float64.
    """
    dim = transform.shape[0]
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= dim):
        raise ValueError(f"rank={rank!r} is not allowed: a LoRA rank is a whole number in [1, d = {dim}], or None")
    delta = transform.to(_SOLVE_DTYPE) - _eye(dim, transform.device)
    left, values, right_t = torch.linalg.svd(delta)
    full_rank = int((values > rtol * float(values[0])).sum()) if float(values[0]) > 0 else 0
    kept = full_rank if rank is None else min(rank, full_rank)
    total = float((values[:full_rank] ** 2).sum())
    energy = float((values[:kept] ** 2).sum()) / total if total > 0 else 1.0
    return LowRankUpdate(left[:, :kept] * values[:kept], right_t[:kept].clone(), kept, full_rank, energy)


def gram_matrix(weights: Sequence[Tensor], block: int = 256) -> Tensor:
    """``G = sum_i W_i^T W_i`` in float64 (the only statistic of the original weights that Eq. 8 needs).

    Each matrix's product runs in :func:`product_dtype` (float32 for float32 / float16 weights on CPUs: half the time
    of float64 products, within ~1e-7 of them relative to ``||G||``, and well inside the ~1e-6 of the float32 K/V
    writes; float64 for float64 weights and on GPUs) and the sum over matrices in float64. Only the block-upper
    triangle is multiplied (G is symmetric): for d = 768, a third fewer flops than full products; then mirrored, so G
    is exactly symmetric.
    """
    if not weights:
        raise ValueError("weights is empty: give at least one (d_out, d) matrix")
    device = weights[0].device
    dim = weights[0].shape[1]
    gram = torch.zeros(dim, dim, dtype=_SOLVE_DTYPE, device=device)
    buffers: dict[torch.dtype, Tensor] = {}  # one conversion buffer per product dtype, for weights not already in it
    rows_needed = max(w.shape[0] for w in weights)
    for weight in weights:
        dtype = product_dtype(weight)
        rows = weight
        if weight.dtype != dtype:
            if dtype not in buffers:
                buffers[dtype] = torch.empty(rows_needed, dim, dtype=dtype, device=device)
            rows = buffers[dtype][: weight.shape[0]].copy_(weight)
        for start in range(0, dim, block):
            columns = rows[:, start : start + block]
            if dtype == _SOLVE_DTYPE:
                gram[start : start + block, start:].addmm_(columns.T, rows[:, start:])
            else:  # the float32 product of one matrix, summed into G in float64
                gram[start : start + block, start:] += columns.T @ rows[:, start:]
    return torch.triu(gram) + torch.triu(gram, 1).T


def derive_embedding(
    new_weights: Sequence[Tensor],
    old_weights: Sequence[Tensor],
    concept: Tensor,
    *,
    reg: float = 0.1,
) -> Tensor:
    """Eq. 8 for every row of ``concept`` (T, d): the embedding that makes the edited model reproduce ``W_old c``.

    ``new_weights`` and ``old_weights`` are the edited and original K/V matrices, paired by position. ``reg`` is the
    lambda of Eq. 7, which pulls c' towards 0 (Theorem 1). Returns (T, d) in ``concept``'s dtype and device.
    """
    check_positive("reg", reg)
    if len(new_weights) != len(old_weights) or not new_weights:
        raise ValueError(
            f"got {len(new_weights)} new and {len(old_weights)} old matrices; give the same non-zero number of each"
        )
    device = concept.device
    dim = concept.shape[-1]
    hessian = reg * _eye(dim, device)
    cross = torch.zeros(dim, dim, dtype=_SOLVE_DTYPE, device=device)
    for new, old in zip(new_weights, old_weights, strict=True):
        if new.shape != old.shape:
            raise ValueError(f"new weight {tuple(new.shape)} and old weight {tuple(old.shape)} differ in shape")
        new64 = new.to(device=device, dtype=_SOLVE_DTYPE)
        hessian.addmm_(new64.T, new64)
        cross.addmm_(new64.T, old.to(device=device, dtype=_SOLVE_DTYPE))
    rows = concept.reshape(-1, concept.shape[-1]).to(device=device, dtype=_SOLVE_DTYPE)
    derived = _spd_solve(hessian, cross @ rows.T).T
    return derived.reshape(concept.shape).to(device=concept.device, dtype=concept.dtype)


def derive_embedding_from_state(
    state: SharedState, gram: Tensor, concept: Tensor, *, reg: float = 0.1, workspace: Workspace | None = None
) -> Tensor:
    """Eq. 8 when every edited matrix is ``W_orig @ state.transform``: needs only ``gram = sum W_orig^T W_orig``.

    ``(reg I + M^T G M)^-1 (M^T G) c``. Few rows: ``M^T (G c)``, thin products only. As many rows as d or more (many
    concepts at once): the d x d map ``(reg I + M^T G M)^-1 M^T G`` once, then one product with all rows.
    ``workspace``: its ``scratch`` and ``factor`` buffers hold the regularised hessian and its Cholesky factor.
    """
    check_positive("reg", reg)
    gram = gram.to(_SOLVE_DTYPE)
    transform = state.transform.to(device=gram.device, dtype=_SOLVE_DTYPE)
    hessian = state.hessian.to(device=gram.device, dtype=_SOLVE_DTYPE)
    if workspace is not None and workspace.fits(hessian) and workspace.scratch.data_ptr() != hessian.data_ptr():
        hessian, factor = workspace.scratch.copy_(hessian), workspace.factor
    else:
        hessian, factor = hessian.clone(), None
    hessian.diagonal().add_(reg)
    rows = concept.reshape(-1, concept.shape[-1]).to(device=gram.device, dtype=_SOLVE_DTYPE)
    if rows.shape[0] >= rows.shape[1]:
        derived = rows @ _spd_solve(hessian, transform.T @ gram, factor).T
    else:
        derived = _spd_solve(hessian, transform.T @ (gram @ rows.T), factor).T
    return derived.reshape(concept.shape).to(device=concept.device, dtype=concept.dtype)


def derive_embedding_from_transform(gram: Tensor, transform: Tensor, concept: Tensor, *, reg: float = 0.1) -> Tensor:
    """Eq. 8 for ``W_new = W_orig @ transform``; equal to ``derive_embedding([W @ transform ...], originals, c)``."""
    return derive_embedding_from_state(SharedState.from_transform(gram, transform), gram, concept, reg=reg)


def kv_distances(gram: Tensor, transform: Tensor, candidates: Tensor, target: Tensor) -> Tensor:
    """How far each candidate embedding's K/V outputs in the edited model are from the target's in the original:
    ``sum_i ||W_orig_i M e - W_orig_i c||^2 = sum_rows (M e - c)^T G (M e - c)`` for each (T, d) ``e`` of
    ``candidates`` (N, T, d) against ``target`` c (T, d). Small: the candidate still brings the concept back."""
    gram = gram.to(_SOLVE_DTYPE)
    moved = candidates.to(device=gram.device, dtype=_SOLVE_DTYPE) @ transform.to(gram).T  # rows (M e)^T
    difference = moved - target.to(gram)
    return ((difference @ gram) * difference).sum(dim=(1, 2))
