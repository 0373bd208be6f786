"""Decomposition math (cstar_dsl/model/decompose.py): truncated SVD, Tucker-2 (HOSVD/HOOI), projection, spectra.

Everything here is exact linear algebra, so the tests are too: full ranks reconstruct the weight,
a projection is idempotent, errors fall as ranks grow and as HOOI sweeps are added, and the spectra
carry the whole Frobenius energy of the weight.
"""

from __future__ import annotations

import pytest
import torch

from cstar_dsl.model.decompose import project, spectra, truncated_svd, tucker2, tucker2_to_dense, unfold

MATRIX_SHAPES = [(6, 6), (5, 9), (12, 4), (1, 7), (32, 20)]
CONV_SHAPES = [(8, 6, 3, 3), (4, 10, 1, 1), (16, 3, 3, 3), (5, 7, 3, 1), (12, 12, 5, 5)]


def _random(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype)


def _decaying(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A weight with a decaying spectrum on every mode (distinct singular values, like trained weights)."""
    weight = _random(shape, seed)
    scales = [0.7 ** torch.arange(size, dtype=weight.dtype) for size in shape[:2]]
    weight = weight * scales[0].reshape(-1, *([1] * (weight.dim() - 1)))
    return weight * scales[1].reshape(1, -1, *([1] * (weight.dim() - 2)))


def _svd_error(weight: torch.Tensor, rank: int) -> float:
    factors = truncated_svd(weight, rank)
    return float(torch.linalg.norm(weight - factors.left @ factors.right))


def _tucker_error(weight: torch.Tensor, ranks: tuple[int, int], sweeps: int = 0) -> float:
    return float(torch.linalg.norm(weight - tucker2_to_dense(tucker2(weight, ranks, sweeps))))


# ------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("shape", MATRIX_SHAPES)
def test_full_rank_svd_reconstructs_the_matrix(shape):
    weight = _random(shape)
    factors = truncated_svd(weight, min(shape))
    assert factors.left.shape == (shape[0], min(shape)) and factors.right.shape == (min(shape), shape[1])
    torch.testing.assert_close(factors.left @ factors.right, weight)


@pytest.mark.parametrize("shape", MATRIX_SHAPES)
def test_svd_splits_singular_values_evenly(shape):
    weight = _random(shape, seed=1)
    rank = max(1, min(shape) - 1)
    factors = truncated_svd(weight, rank)
    singular = torch.linalg.svdvals(weight)[:rank]
    torch.testing.assert_close(torch.linalg.norm(factors.left, dim=0), singular.sqrt())
    torch.testing.assert_close(torch.linalg.norm(factors.right, dim=1), singular.sqrt())


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_full_rank_tucker2_reconstructs_the_conv_weight(shape):
    weight = _random(shape)
    factors = tucker2(weight, (shape[0], shape[1]))
    assert factors.core.shape == shape
    assert factors.out_basis.shape == (shape[0], shape[0]) and factors.in_basis.shape == (shape[1], shape[1])
    torch.testing.assert_close(tucker2_to_dense(factors), weight)


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_tucker2_bases_are_orthonormal(shape):
    weight = _random(shape, seed=2)
    ranks = (max(1, shape[0] // 2), max(1, shape[1] // 2))
    factors = tucker2(weight, ranks, sweeps=2)
    for basis, rank in ((factors.out_basis, ranks[0]), (factors.in_basis, ranks[1])):
        assert basis.shape[1] == rank
        torch.testing.assert_close(basis.T @ basis, torch.eye(rank, dtype=basis.dtype))


def test_tucker2_recovers_a_weight_of_exactly_those_ranks():
    core = _random((3, 2, 3, 3), seed=3)
    out_basis = torch.linalg.qr(_random((8, 3), seed=4)).Q
    in_basis = torch.linalg.qr(_random((6, 2), seed=5)).Q
    weight = torch.einsum("abhw,oa,ib->oihw", core, out_basis, in_basis)
    torch.testing.assert_close(tucker2_to_dense(tucker2(weight, (3, 2))), weight)


def test_unfold_puts_the_mode_first():
    weight = _random((4, 3, 2, 2))
    assert unfold(weight, 0).shape == (4, 12) and unfold(weight, 1).shape == (3, 16)
    torch.testing.assert_close(unfold(weight, 1)[2], weight[:, 2].reshape(-1))


# ----------------------------------------------------------------- projection


@pytest.mark.parametrize(("shape", "ranks"), [
    ((12, 9), 3), ((9, 12), (4, 4)), ((10, 8, 3, 3), (4, 3)), ((10, 8, 3, 3), 5), ((6, 16, 1, 1), (2, 6)),
])
@pytest.mark.parametrize("sweeps", [0, 2])
def test_projection_is_idempotent(shape, ranks, sweeps):
    weight = _decaying(shape, seed=6)
    once = project(weight, ranks, sweeps)
    assert once.shape == weight.shape and once.dtype == weight.dtype
    torch.testing.assert_close(project(once, ranks, sweeps), once)


def test_projection_has_the_requested_rank():
    matrix = project(_random((12, 9)), 4)
    assert int(torch.linalg.matrix_rank(matrix)) == 4
    conv = project(_random((10, 8, 3, 3)), (4, 3))
    assert int(torch.linalg.matrix_rank(unfold(conv, 0))) == 4
    assert int(torch.linalg.matrix_rank(unfold(conv, 1))) == 3


def test_projection_at_full_rank_is_the_identity():
    matrix, conv = _random((7, 5)), _random((6, 4, 3, 3))
    torch.testing.assert_close(project(matrix, 5), matrix)
    torch.testing.assert_close(project(conv, (6, 4)), conv)


def test_svd_projection_is_the_eckart_young_optimum():
    weight = _random((10, 8), seed=7)
    singular = torch.linalg.svdvals(weight)
    for rank in range(1, 8):
        error = float(torch.linalg.norm(weight - project(weight, rank)))
        assert error == pytest.approx(float(singular[rank:].square().sum().sqrt()), rel=1e-9)


# ------------------------------------------------------- errors and the ranks


@pytest.mark.parametrize("shape", [(20, 14), (9, 30)])
def test_svd_error_is_non_increasing_in_rank(shape):
    weight = _random(shape, seed=8)
    errors = [_svd_error(weight, rank) for rank in range(1, min(shape) + 1)]
    assert all(later <= earlier + 1e-10 for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-10


@pytest.mark.parametrize("shape", [(10, 8, 3, 3), (6, 12, 1, 1), (12, 5, 3, 3)])
def test_tucker2_error_is_non_increasing_in_each_rank(shape):
    weight = _random(shape, seed=9)
    grid = {(r_out, r_in): _tucker_error(weight, (r_out, r_in))
            for r_out in range(1, shape[0] + 1) for r_in in range(1, shape[1] + 1)}
    for (r_out, r_in), error in grid.items():
        if r_out < shape[0]:
            assert grid[(r_out + 1, r_in)] <= error + 1e-10
        if r_in < shape[1]:
            assert grid[(r_out, r_in + 1)] <= error + 1e-10
    assert grid[(shape[0], shape[1])] < 1e-10


@pytest.mark.parametrize(("shape", "ranks", "seed"), [
    ((16, 12, 3, 3), (4, 3), 10), ((16, 12, 3, 3), (8, 2), 11), ((24, 8, 1, 1), (3, 5), 12),
    ((10, 10, 3, 3), (5, 5), 13), ((32, 16, 3, 3), (6, 6), 14),
])
def test_hooi_sweeps_never_increase_the_error(shape, ranks, seed):
    weight = _random(shape, seed=seed)
    errors = [_tucker_error(weight, ranks, sweeps) for sweeps in range(5)]
    assert all(later <= earlier + 1e-10 for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] <= errors[0] + 1e-10


def test_hooi_improves_on_hosvd_for_a_generic_weight():
    weight = _random((16, 12, 3, 3), seed=15)
    assert _tucker_error(weight, (4, 3), sweeps=3) < _tucker_error(weight, (4, 3), sweeps=0)


# -------------------------------------------------------------------- spectra


@pytest.mark.parametrize("shape", MATRIX_SHAPES + CONV_SHAPES)
def test_spectra_are_sorted_and_carry_the_whole_energy(shape):
    weight = _random(shape, seed=16)
    found = spectra(weight)
    assert len(found) == (1 if weight.dim() == 2 else 2)
    total = float(weight.double().square().sum())
    for values in found:
        assert bool((values[:-1] >= values[1:]).all()), "not sorted descending"
        assert bool((values >= 0).all())
        assert float(values.double().square().sum()) == pytest.approx(total, rel=1e-9)


def test_conv_spectra_have_one_value_per_channel():
    out_values, in_values = spectra(_random((10, 4, 3, 3)))
    assert (len(out_values), len(in_values)) == (10, 4)


def test_matrix_spectrum_is_the_singular_values():
    weight = _random((9, 6), seed=17)
    torch.testing.assert_close(spectra(weight)[0], torch.linalg.svdvals(weight))


# ---------------------------------------------------------------------- dtypes


def test_float64_is_preserved_with_float64_accuracy():
    matrix, conv = _random((12, 7)), _random((8, 5, 3, 3))
    factors = truncated_svd(matrix, 7)
    assert factors.left.dtype == factors.right.dtype == torch.float64
    assert float((factors.left @ factors.right - matrix).abs().max()) < 1e-12
    tucker = tucker2(conv, (8, 5), sweeps=1)
    assert {t.dtype for t in (tucker.core, tucker.out_basis, tucker.in_basis)} == {torch.float64}
    assert float((tucker2_to_dense(tucker) - conv).abs().max()) < 1e-12
    assert project(matrix, 3).dtype == project(conv, (3, 2)).dtype == torch.float64
    assert all(values.dtype == torch.float64 for values in spectra(conv))


def test_float32_is_preserved():
    conv = _random((8, 5, 3, 3), dtype=torch.float32)
    assert tucker2(conv, (3, 3)).core.dtype == torch.float32
    assert truncated_svd(conv[:, :, 0, 0], 2).left.dtype == torch.float32
    assert project(conv, 2).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_is_decomposed_in_float32_and_returned_in_its_dtype(dtype):
    matrix = _random((12, 8), seed=18).to(dtype)
    conv = _random((8, 6, 3, 3), seed=19).to(dtype)
    tolerance = {"rtol": 0.05, "atol": 0.05}

    factors = truncated_svd(matrix, 8)
    assert factors.left.dtype == factors.right.dtype == dtype
    torch.testing.assert_close((factors.left.float() @ factors.right.float()), matrix.float(), **tolerance)

    tucker = tucker2(conv, (8, 6), sweeps=1)
    assert {t.dtype for t in (tucker.core, tucker.out_basis, tucker.in_basis)} == {dtype}
    torch.testing.assert_close(tucker2_to_dense(tucker).float(), conv.float(), **tolerance)

    for ranks, weight in (((4,), matrix), ((3, 2), conv)):
        projected = project(weight, ranks if len(ranks) == 2 else ranks[0])
        assert projected.dtype == dtype and bool(torch.isfinite(projected).all())

    for values in spectra(conv):
        assert bool(torch.isfinite(values).all())
        assert float(values.double().square().sum()) == pytest.approx(float(conv.double().square().sum()), rel=1e-4)
