"""Property tests of Eq. 3 and Eq. 8 against independent float64 least-squares solves (QR, not normal equations)."""

from __future__ import annotations

import math

import pytest
import torch

from rece_lightning import closed_form
from rece_lightning.closed_form import (
    SharedState,
    apply_transform,
    compact_factors,
    derive_embedding,
    derive_embedding_from_state,
    derive_embedding_from_transform,
    erase_closed_form,
    gram_matrix,
    replace_edit,
    replace_transform,
)


def _embeddings(generator: torch.Generator, tokens: int, dim: int, spread: float = 1.0) -> torch.Tensor:
    """Rows with singular values spread over ``spread`` decades, like CLIP outputs (ill-conditioned)."""
    basis = torch.randn(tokens, dim, generator=generator, dtype=torch.float64)
    scales = torch.logspace(0, -spread, dim, dtype=torch.float64)
    return basis * scales * 5.0


def _lstsq_edit(weight, erase, targets, preserve, lamb, erase_scale, preserve_scale):
    """Eq. 2 as one stacked least-squares problem in W^T: rows sqrt(s)c_i, sqrt(p)c_j, sqrt(lamb)I."""
    old = weight.to(torch.float64)
    dim = old.shape[1]
    source = torch.cat(erase).to(torch.float64)
    target = torch.cat(targets).to(torch.float64)
    lhs = [math.sqrt(erase_scale) * source, math.sqrt(lamb) * torch.eye(dim, dtype=torch.float64)]
    rhs = [math.sqrt(erase_scale) * target @ old.T, math.sqrt(lamb) * old.T]
    if preserve:
        kept = torch.cat(preserve).to(torch.float64)
        lhs.append(math.sqrt(preserve_scale) * kept)
        rhs.append(math.sqrt(preserve_scale) * kept @ old.T)
    solution = torch.linalg.lstsq(torch.cat(lhs), torch.cat(rhs), driver="gelsd").solution
    return solution.T


def _lstsq_derive(new_weights, old_weights, concept, reg):
    """Eq. 7 as a stacked least-squares problem in c': rows W_new_i and sqrt(reg)I, targets W_old_i c."""
    dim = concept.shape[1]
    lhs = torch.cat([w.to(torch.float64) for w in new_weights] + [math.sqrt(reg) * torch.eye(dim, dtype=torch.float64)])
    rhs = torch.cat(
        [w.to(torch.float64) @ concept.to(torch.float64).T for w in old_weights]
        + [torch.zeros(dim, concept.shape[0], dtype=torch.float64)]
    )
    return torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution.T


CASES = [
    # (dim, out dims, erase token counts, preserve token counts, lamb, erase_scale, preserve_scale)
    (8, [5, 12], [3], [], 0.1, 1.0, 0.1),
    (16, [16, 32, 7], [4, 2], [5], 0.1, 1.0, 0.1),
    (24, [40], [77], [77, 77], 1e-3, 1.0, 0.1),
    (32, [64, 64, 96], [1, 6, 11], [3], 0.5, 2.0, 1.0),
    # fewer erase rows than d but not with the preserved ones (the thin edit through the d x d system), and no erase
    # term at all (the k x k form needs s > 0)
    (16, [20], [5], [9, 4], 0.2, 1.0, 0.5),
    (12, [9], [4], [3], 0.1, 0.0, 0.1),
]


@pytest.mark.parametrize("dim,outs,erase_tokens,preserve_tokens,lamb,erase_scale,preserve_scale", CASES)
def test_erase_matches_least_squares(dim, outs, erase_tokens, preserve_tokens, lamb, erase_scale, preserve_scale):
    generator = torch.Generator().manual_seed(dim)
    weights = [torch.randn(out, dim, generator=generator, dtype=torch.float64) for out in outs]
    erase = [_embeddings(generator, t, dim) for t in erase_tokens]
    targets = [_embeddings(generator, t, dim) for t in erase_tokens]
    preserve = [_embeddings(generator, t, dim) for t in preserve_tokens] or None
    ours = erase_closed_form(
        weights, erase, targets, preserve, lamb=lamb, erase_scale=erase_scale, preserve_scale=preserve_scale
    )
    for weight, edited in zip(weights, ours, strict=True):
        reference = _lstsq_edit(weight, erase, targets, preserve, lamb, erase_scale, preserve_scale)
        torch.testing.assert_close(edited, reference, rtol=1e-9, atol=1e-9)


def test_the_papers_printed_eq3_is_not_the_minimiser():
    """The seed's Eq. 3 prints sum c*c*^T in the first factor; only target x source minimises Eq. 2."""
    generator = torch.Generator().manual_seed(1)
    dim, weight = 12, torch.randn(9, 12, generator=generator, dtype=torch.float64)
    erase, targets = [_embeddings(generator, 4, dim)], [_embeddings(generator, 4, dim)]
    reference = _lstsq_edit(weight, erase, targets, None, 0.1, 1.0, 0.0)
    source, target = erase[0], targets[0]
    eye = torch.eye(dim, dtype=torch.float64)
    typo = weight @ (0.1 * eye + target.T @ target) @ torch.linalg.inv(0.1 * eye + source.T @ source)
    ours = erase_closed_form([weight], erase, targets, lamb=0.1, preserve_scale=0.0)[0]
    assert torch.allclose(ours, reference, atol=1e-9)
    assert not torch.allclose(typo, reference, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_are_solved_in_float64_and_returned_in_their_dtype(dtype):
    generator = torch.Generator().manual_seed(7)
    dim = 32
    weights = [torch.randn(48, dim, generator=generator).to(dtype) for _ in range(3)]
    erase = [_embeddings(generator, 5, dim, spread=2).to(dtype)]
    targets = [_embeddings(generator, 5, dim, spread=2).to(dtype)]
    ours = erase_closed_form(weights, erase, targets, lamb=0.1)
    for weight, edited in zip(weights, ours, strict=True):
        assert edited.dtype == dtype and edited.device == weight.device
        reference = _lstsq_edit(weight, erase, targets, None, 0.1, 1.0, 0.1)
        # The only error left is rounding the float64 answer into the input dtype.
        eps = torch.finfo(dtype).eps
        assert (edited.to(torch.float64) - reference).abs().max() <= 2 * eps * reference.abs().max()


def test_fp32_stays_within_1e4_of_float64_on_ill_conditioned_sd_like_shapes():
    """77-token CLIP-like embeddings whose Gram matrix has a condition number near 1e5-1e6, as on SD 1.4."""
    generator = torch.Generator().manual_seed(3)
    dim = 96
    weights = [torch.randn(out, dim, generator=generator) * 0.05 for out in (64, 128, 128)]
    concept = _embeddings(generator, 77, dim, spread=2.5).float()
    guide = _embeddings(generator, 77, dim, spread=2.5).float()
    ours = erase_closed_form(weights, [concept], [guide], [guide], lamb=0.1)
    for weight, edited in zip(weights, ours, strict=True):
        reference = _lstsq_edit(weight, [concept], [guide], [guide], 0.1, 1.0, 0.1)
        relative = (edited.double() - reference).abs().max() / reference.abs().max()
        assert relative < 1e-4


@pytest.mark.parametrize("dim,outs,tokens,reg", [(8, [5, 12], 3, 0.1), (16, [32, 32, 8], 77, 1e-3), (24, [24], 1, 1.0)])
def test_derive_embedding_matches_least_squares(dim, outs, tokens, reg):
    generator = torch.Generator().manual_seed(tokens)
    old = [torch.randn(out, dim, generator=generator, dtype=torch.float64) for out in outs]
    new = [w + 0.3 * torch.randn(w.shape, generator=generator, dtype=torch.float64) for w in old]
    concept = _embeddings(generator, tokens, dim)
    ours = derive_embedding(new, old, concept, reg=reg)
    torch.testing.assert_close(ours, _lstsq_derive(new, old, concept, reg), rtol=1e-9, atol=1e-9)


def test_derive_embedding_keeps_dtype_and_tends_to_zero_with_large_reg():
    generator = torch.Generator().manual_seed(5)
    old = [torch.randn(20, 16, generator=generator) for _ in range(2)]
    new = [w * 0.5 for w in old]
    concept = torch.randn(77, 16, generator=generator).half()
    derived = derive_embedding(new, old, concept, reg=0.1)
    assert derived.dtype == torch.float16 and derived.shape == concept.shape
    reference = _lstsq_derive(new, old, concept.double(), 0.1)
    assert (derived.double() - reference).abs().max() <= 2e-3 * reference.abs().max()
    assert derive_embedding(new, old, concept.float(), reg=1e9).abs().max() < 1e-4  # Eq. 7's pull towards 0


def test_shared_transform_algebra_equals_the_per_matrix_computation():
    """W_new = W_orig M for every matrix: Eq. 8 from G = sum W^T W alone equals Eq. 8 on the matrices."""
    generator = torch.Generator().manual_seed(11)
    dim = 20
    originals = [torch.randn(out, dim, generator=generator, dtype=torch.float64) for out in (20, 40, 30)]
    concept, guide = _embeddings(generator, 77, dim), _embeddings(generator, 77, dim)
    transform = replace_transform([concept[:5]], [guide[:5]], [guide], lamb=0.1)
    step = erase_closed_form(originals, [concept[:5]], [guide[:5]], [guide], lamb=0.1)
    torch.testing.assert_close(step, [w @ transform for w in originals])
    for _ in range(3):  # several derive-erase rounds
        current = [w @ transform for w in originals]
        derived_fast = derive_embedding_from_transform(gram_matrix(originals), transform, concept, reg=0.1)
        derived_slow = derive_embedding(current, originals, concept, reg=0.1)
        torch.testing.assert_close(derived_fast, derived_slow, rtol=1e-8, atol=1e-8)
        edited = erase_closed_form(current, [derived_slow], [guide], [guide], lamb=0.1)
        transform = transform @ replace_transform([derived_fast], [guide], [guide], lamb=0.1)
        torch.testing.assert_close([w @ transform for w in originals], edited, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lamb": 0.0}, "lamb=0.0"),
        ({"lamb": -1.0}, "lamb=-1.0"),
        ({"lamb": float("nan")}, "lamb=nan"),
        ({"erase_scale": -0.5}, "erase_scale=-0.5"),
        ({"preserve_scale": float("inf")}, "preserve_scale=inf"),
    ],
)
def test_bad_scales_are_refused_with_their_value(kwargs, message):
    weight, rows = torch.randn(4, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=message):
        erase_closed_form([weight], [rows], [rows], **kwargs)


def test_bad_shapes_and_reg_are_refused():
    weight, rows = torch.randn(4, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="rows"):
        erase_closed_form([weight], [rows], [torch.randn(3, 3)])
    with pytest.raises(ValueError, match="width"):
        erase_closed_form([weight], [rows], [torch.randn(2, 5)])
    with pytest.raises(ValueError, match="reg=0"):
        derive_embedding([weight], [weight], rows, reg=0)
    with pytest.raises(ValueError, match="reg=-1"):
        derive_embedding_from_transform(torch.eye(3), torch.eye(3), rows, reg=-1)


@pytest.mark.parametrize("dim", [24, 96])  # 77 token rows: the dense d x d path at 24, rank-T updates at 96
def test_incremental_state_tracks_the_full_recomputation_over_many_rounds(dim):
    """replace_edit's updates of the transform and of M^T G M stay equal to recomputing them from scratch."""
    generator = torch.Generator().manual_seed(13)
    originals = [torch.randn(out, dim, generator=generator, dtype=torch.float64) * 0.2 for out in (24, 48)]
    gram = gram_matrix(originals)
    concept, guide = _embeddings(generator, 77, dim), _embeddings(generator, 77, dim)
    state = replace_edit(SharedState.unedited(gram), gram, [concept[3:]], [guide[:74]], [guide], lamb=0.1)
    transform = replace_transform([concept[3:]], [guide[:74]], [guide], lamb=0.1)
    for _ in range(6):
        torch.testing.assert_close(state.transform, transform, rtol=1e-10, atol=1e-10)
        full = SharedState.from_transform(gram, transform)
        torch.testing.assert_close(state.hessian, full.hessian, rtol=1e-10, atol=1e-10)
        assert torch.equal(state.hessian, state.hessian.T)
        derived = derive_embedding_from_state(state, gram, concept, reg=0.1)
        torch.testing.assert_close(derived, derive_embedding_from_transform(gram, transform, concept, reg=0.1))
        state = replace_edit(state, gram, [derived], [guide], [guide], lamb=0.1)
        transform = transform @ replace_transform([derived], [guide], [guide], lamb=0.1)


@pytest.mark.parametrize("dim", [24, 96])  # the dense path and the rank-T path
def test_a_workspace_gives_the_same_states_and_derivations_bit_for_bit_and_refuses_its_own_state(dim):
    generator = torch.Generator().manual_seed(5)
    gram = gram_matrix([torch.randn(40, dim, generator=generator, dtype=torch.float64) * 0.2])
    concept, guide = _embeddings(generator, 77, dim), _embeddings(generator, 77, dim)
    workspace = closed_form.Workspace.for_dim(dim)
    plain = own = SharedState.unedited(gram)
    for _ in range(4):
        derived = derive_embedding_from_state(plain, gram, concept, reg=0.1)
        assert torch.equal(derive_embedding_from_state(own, gram, concept, reg=0.1, workspace=workspace), derived)
        plain = replace_edit(plain, gram, [derived], [guide], [guide], lamb=0.1)
        into = replace_edit(own, gram, [derived], [guide], [guide], lamb=0.1, workspace=workspace)
        assert into.transform.data_ptr() == workspace.transform.data_ptr()  # written into the buffers
        assert torch.equal(into.transform, plain.transform) and torch.equal(into.hessian, plain.hessian)
        assert torch.equal(into.hessian, into.hessian.T)
        own = SharedState(into.transform.clone(), into.hessian.clone())  # copied out, as the module does
    with pytest.raises(ValueError, match="holds the state it would edit"):
        replace_edit(into, gram, [concept], [guide], lamb=0.1, workspace=workspace)
    with pytest.raises(ValueError, match=r"workspace holds \(8, 8\) buffers"):
        replace_edit(own, gram, [concept], [guide], lamb=0.1, workspace=closed_form.Workspace.for_dim(8))


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-13), (torch.float32, 1e-6), (torch.float16, 1e-6)])
def test_gram_matrix_is_exactly_symmetric_and_matches_the_plain_float64_sum(dtype, tolerance):
    # float32 / float16 weights multiply in float32 on CPUs (product_dtype): within float32 rounding of the float64 sum
    generator = torch.Generator().manual_seed(17)
    weights = [torch.randn(out, 300, generator=generator).to(dtype) for out in (100, 300, 50)]
    gram = gram_matrix(weights)
    plain = sum(w.double().T @ w.double() for w in weights)
    assert gram.dtype == torch.float64
    assert torch.equal(gram, gram.T)
    assert float((gram - plain).abs().max() / plain.abs().max()) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_apply_transform_returns_the_weight_dtype_within_rounding(dtype):
    generator = torch.Generator().manual_seed(19)
    weight = torch.randn(64, 32, generator=generator).to(dtype)
    transform = torch.eye(32, dtype=torch.float64) + 0.1 * torch.randn(32, 32, generator=generator, dtype=torch.float64)
    result = apply_transform(weight, transform)
    reference = weight.double() @ transform
    assert result.dtype == dtype
    assert (result.double() - reference).abs().max() <= 4 * torch.finfo(dtype).eps * reference.abs().max()


def _lstsq_edit_qr(weight, erase, targets, lamb, erase_scale):
    """Eq. 2 (no preserve term) by a QR least-squares solve: independent of the normal equations, cheap at d = 2048."""
    dim = weight.shape[1]
    lhs = torch.cat([math.sqrt(erase_scale) * erase, math.sqrt(lamb) * torch.eye(dim, dtype=torch.float64)])
    rhs = torch.cat([math.sqrt(erase_scale) * targets @ weight.T, math.sqrt(lamb) * weight.T])
    return torch.linalg.lstsq(lhs, rhs, driver="gels").solution.T


# SD 2.x's OpenCLIP width and SDXL's two encoders concatenated (the dense path of more rows than d is checked at
# d = 24 in CASES and on 40 concepts in test_architectures.py).
@pytest.mark.parametrize("dim,tokens", [(1024, 77), pytest.param(2048, 77, marks=pytest.mark.slow)])
def test_eq3_and_eq8_hold_at_sd2_and_sdxl_widths(dim, tokens):
    generator = torch.Generator().manual_seed(dim + tokens)
    weight = torch.randn(96, dim, generator=generator, dtype=torch.float64) * dim**-0.5
    erase, targets = _embeddings(generator, tokens, dim, spread=2), _embeddings(generator, tokens, dim, spread=2)
    edited = erase_closed_form([weight], [erase], [targets], lamb=0.1, preserve_scale=0.0)[0]
    reference = _lstsq_edit_qr(weight, erase, targets, 0.1, 1.0)
    assert (edited - reference).abs().max() <= 1e-8 * reference.abs().max()
    transform = replace_transform([erase], [targets], lamb=0.1, preserve_scale=0.0)
    assert (weight @ transform - reference).abs().max() <= 1e-8 * reference.abs().max()
    concept = _embeddings(generator, 77, dim)
    derived = derive_embedding([edited], [weight], concept, reg=0.1)
    torch.testing.assert_close(derived, _lstsq_derive([edited], [weight], concept, 0.1), rtol=1e-7, atol=1e-8)


def test_low_rank_factors_track_the_transform_until_dense_is_cheaper():
    """transform = I + left right^T while the edits' total rank is below d/2; writing through the factors equals the
    dense product; past d/2 the factors are dropped."""
    generator = torch.Generator().manual_seed(23)
    dim = 64
    weight = torch.randn(40, dim, generator=generator, dtype=torch.float64)
    gram = gram_matrix([weight])
    state = SharedState.unedited(gram)
    ranks = []
    for _ in range(5):
        erase, target = _embeddings(generator, 9, dim), _embeddings(generator, 9, dim)
        state = replace_edit(state, gram, [erase], [target], lamb=0.1)
        if state.left is None:
            break
        ranks.append(state.left.shape[1])
        eye = torch.eye(dim, dtype=torch.float64)
        torch.testing.assert_close(state.transform, eye + state.left @ state.right.T, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            apply_transform(weight, state.transform, state.left, state.right), weight @ state.transform
        )
    assert ranks == [9, 18, 27] and state.left is None  # 36 >= 64 / 2: dense from the fourth edit on


def test_compact_factors_drop_exactly_the_directions_below_the_tolerance():
    """Against an independent truncated SVD of the dense d x d product: the kept rank, the product, and the error
    bound rtol * sigma_1 in spectral norm."""
    generator = torch.Generator().manual_seed(29)
    dim, rank = 48, 12
    left_basis = torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=torch.float64))[0]
    right_basis = torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=torch.float64))[0]
    values = torch.tensor([3.0, 1.0, 0.5, 1e-2, 1e-4, 1e-6, 2e-8, 5e-9, 1e-10, 1e-12, 1e-14, 0.0], dtype=torch.float64)
    mixing = torch.linalg.qr(torch.randn(rank, rank, generator=generator, dtype=torch.float64))[0]
    # the same product with its directions mixed across the columns, as edits accumulate them
    left, right = (left_basis * values) @ mixing, right_basis @ mixing
    dense = left @ right.T
    u, s, vh = torch.linalg.svd(dense)
    for rtol, expected_rank in ((1e-8, 6), (1e-3, 4), (1e-15, 11)):  # kept: above rtol * 3
        compact_left, compact_right = compact_factors(left, right, rtol=rtol)
        assert compact_left.shape == compact_right.shape == (dim, expected_rank)
        truncated = (u[:, :expected_rank] * s[:expected_rank]) @ vh[:expected_rank]
        torch.testing.assert_close(compact_left @ compact_right.T, truncated, rtol=0, atol=1e-13)
        error = torch.linalg.matrix_norm(compact_left @ compact_right.T - dense, ord=2)
        assert error <= rtol * s[0]
    empty = torch.zeros(dim, 0, dtype=torch.float64)
    assert compact_factors(empty, empty, rtol=1e-7)[0].shape == (dim, 0)
    with pytest.raises(ValueError, match="rtol=-1"):
        compact_factors(left, right, rtol=-1)
    with pytest.raises(ValueError, match=r"left \(48, 12\) and right \(48, 11\)"):
        compact_factors(left, right[:, :11], rtol=1e-7)


def _kkt_constrained_edit(weight, erase, targets, preserve, hard, lamb, erase_scale, preserve_scale):
    """Eq. 2 with the equality constraints W' h = W h for every row h of ``hard``, by its KKT system (lstsq, so
    rank-deficient constraints are fine): [[2B, H^T], [H, 0]] [w'; mu] = [2b; H w] for every output row w."""
    old = weight.to(torch.float64)
    dim = old.shape[1]
    source, target = torch.cat(erase).double(), torch.cat(targets).double()
    system = erase_scale * source.T @ source + lamb * torch.eye(dim, dtype=torch.float64)
    rhs = erase_scale * source.T @ (target @ old.T) + lamb * old.T  # (d, out)
    if preserve:
        kept = torch.cat(preserve).double()
        system += preserve_scale * kept.T @ kept
        rhs += preserve_scale * kept.T @ (kept @ old.T)
    constraints = torch.cat(hard).double()  # (h, d)
    count = constraints.shape[0]
    kkt = torch.zeros(dim + count, dim + count, dtype=torch.float64)
    kkt[:dim, :dim], kkt[:dim, dim:], kkt[dim:, :dim] = 2 * system, constraints.T, constraints
    full_rhs = torch.cat([2 * rhs, constraints @ old.T])
    return torch.linalg.lstsq(kkt, full_rhs, driver="gelsd").solution[:dim].T


@pytest.mark.parametrize("dim,rows", [(24, 5), (24, 40), (64, 16)])
def test_hard_preservation_is_the_constrained_minimiser_and_keeps_the_preserved_outputs(dim, rows):
    generator = torch.Generator().manual_seed(dim + rows)
    weight = torch.randn(48, dim, generator=generator, dtype=torch.float64)
    erase = [torch.randn(rows, dim, generator=generator, dtype=torch.float64)]
    targets = [torch.randn(rows, dim, generator=generator, dtype=torch.float64)]
    preserved = [torch.randn(6, dim, generator=generator, dtype=torch.float64)]
    soft = [torch.randn(3, dim, generator=generator, dtype=torch.float64)]
    basis = closed_form.null_space_basis(preserved)
    assert basis.shape == (dim, dim - 6)
    transform = closed_form.replace_transform(
        erase, targets, soft, lamb=0.1, erase_scale=1.0, preserve_scale=0.1, null_space=basis
    )
    edited = weight @ transform
    expected = _kkt_constrained_edit(weight, erase, targets, soft, preserved, 0.1, 1.0, 0.1)
    torch.testing.assert_close(edited, expected, rtol=1e-8, atol=1e-9)
    # the preserved rows' outputs do not move, to float64 rounding; the free edit moves them
    kept = preserved[0]
    assert (edited @ kept.T - weight @ kept.T).abs().max() < 1e-10 * weight.abs().max()
    free = weight @ closed_form.replace_transform(erase, targets, soft, lamb=0.1, erase_scale=1.0, preserve_scale=0.1)
    assert (free @ kept.T - weight @ kept.T).abs().max() > 1e-3
    # the shared-state path (rank-T updates of M and H) gives the same transform
    gram = closed_form.gram_matrix([weight])
    state = closed_form.replace_edit(
        closed_form.SharedState.unedited(gram), gram, erase, targets, soft, lamb=0.1, null_space=basis
    )
    torch.testing.assert_close(state.transform, transform, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state.hessian, transform.T @ gram @ transform, rtol=1e-9, atol=1e-9)


def test_an_empty_null_space_is_refused_saying_what_to_do_and_energy_protects_the_main_directions():
    generator = torch.Generator().manual_seed(0)
    wide = [torch.randn(40, 16, generator=generator, dtype=torch.float64)]
    with pytest.raises(ValueError, match="null space is empty: 40 preserved rows span all d = 16.*preserve_energy"):
        closed_form.null_space_basis(wide)
    # two strong directions and weak noise: energy 0.99 protects the two, leaves 14 free
    strong = torch.zeros(40, 16, dtype=torch.float64)
    strong[:20, 0], strong[20:, 1] = 10.0, 10.0
    noisy = [strong + 1e-3 * torch.randn(40, 16, generator=generator, dtype=torch.float64)]
    basis = closed_form.null_space_basis(noisy, energy=0.99)
    assert basis.shape == (16, 14) and basis[:2].abs().max() < 1e-3
    with pytest.raises(ValueError, match="energy=0 is not allowed"):
        closed_form.null_space_basis(noisy, energy=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_finds_a_single_nan_or_inf_anywhere(dtype):
    from rece_lightning.validation import all_finite

    weight = torch.randn(64, 48).to(dtype)
    assert all_finite(weight) and all_finite(weight[:0])
    for position in [(0, 0), (17, 33), (63, 47)]:
        for bad in (float("nan"), float("inf"), float("-inf")):
            broken = weight.clone()
            broken[position] = bad
            assert not all_finite(broken), (position, bad)


def test_the_concept_projection_is_the_h_orthogonal_projection_that_puts_the_most_energy_out_of_reach():
    torch.manual_seed(0)
    dim = 12
    factor = torch.randn(dim, dim, dtype=torch.float64)
    hessian = factor @ factor.T + 0.5 * torch.eye(dim, dtype=torch.float64)  # SPD, as M^T G M of an invertible state
    preserved = torch.randn(3, dim, dtype=torch.float64)
    free = closed_form.null_space_basis([preserved])  # 9 free directions
    rows = torch.randn(5, dim, dtype=torch.float64)
    left, right = closed_form.concept_projection(hessian, free, rows, share=0.9)
    update, removed = torch.eye(dim, dtype=torch.float64) + left @ right.T, right.shape[1]
    assert 1 <= removed <= free.shape[1]
    # composed into a state in O(d^2 k): the same transform and Eq. 8 matrix as the dense products
    state = closed_form.SharedState.from_transform(hessian, torch.eye(dim, dtype=torch.float64) + 0.1 * factor)
    composed = closed_form.compose_low_rank(state, left, right)
    dense = closed_form.SharedState.from_transform(hessian, state.transform @ update)
    assert torch.allclose(composed.transform, dense.transform, atol=1e-10)
    assert torch.allclose(composed.hessian, dense.hessian, rtol=1e-9, atol=1e-8)
    assert torch.allclose(update @ update, update, atol=1e-10)  # idempotent
    assert torch.allclose(update @ preserved.T, preserved.T, atol=1e-10)  # the preserved span is left as it is
    # each input goes to the H-nearest point of the range: an independent least squares over a basis of that range
    left, values, _ = torch.linalg.svd(update)
    basis = left[:, : int((values > 1e-8).sum())]
    assert basis.shape[1] == dim - removed
    probe = torch.randn(dim, 4, dtype=torch.float64)
    nearest = basis @ torch.linalg.solve(basis.T @ hessian @ basis, basis.T @ hessian @ probe)
    assert torch.allclose(update @ probe, nearest, atol=1e-9)

    def out_of_reach(transform: torch.Tensor) -> float:
        moved = rows.T - transform @ rows.T
        return float(torch.einsum("in,ij,jn->", moved, hessian, moved))

    # the energy put out of reach: the top generalized eigenvalues (numpy, independently), `share` of their total
    import numpy as np

    metric = (free.T @ torch.linalg.solve(hessian, free)).numpy()
    energy = (free.T @ rows.T @ rows @ free).numpy()
    mus = np.sort(np.linalg.eigvals(np.linalg.solve(metric, energy)).real)[::-1].clip(min=0)
    assert out_of_reach(update) == pytest.approx(mus[:removed].sum(), rel=1e-8)
    assert mus[:removed].sum() >= 0.9 * mus.sum() > mus[: removed - 1].sum()
    for _ in range(10):  # any other `removed` free directions put less out of reach
        other = free @ torch.linalg.qr(torch.randn(free.shape[1], removed, dtype=torch.float64))[0]
        inverse = torch.linalg.solve(hessian, other)
        rival = torch.eye(dim, dtype=torch.float64) - inverse @ torch.linalg.solve(other.T @ inverse, other.T)
        assert out_of_reach(rival) < out_of_reach(update)
    with pytest.raises(ValueError, match="share=1.5 is not allowed"):
        closed_form.concept_projection(hessian, free, rows, share=1.5)
