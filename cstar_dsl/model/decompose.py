"""Decomposition math: truncated SVD, Tucker-2 (HOSVD, optional HOOI) and rank projection.

Pure tensor functions, shared by the factorized layers (initialization from a dense weight) and
by the optimizer's ADMM projection step, so both use exactly the same math.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class SvdFactors:
    """W (out x in) ~= left @ right with left (out x r) and right (r x in)."""

    left: Tensor
    right: Tensor


@dataclass(frozen=True)
class Tucker2Factors:
    """W (C_out x C_in x k x k) ~= core x_0 out_basis x_1 in_basis.

    ``core`` is (r_out x r_in x k x k), ``out_basis`` (C_out x r_out), ``in_basis`` (C_in x r_in),
    both bases with orthonormal columns.
    """

    core: Tensor
    out_basis: Tensor
    in_basis: Tensor


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run LAPACK on one thread: these small factorizations gain nothing from more, and with
    a busy second core MKL's threaded eigh slows down 20-200x (measured on the 2-core CI kind)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _as_float(weight: Tensor) -> Tensor:
    """Decompose in at least float32, whatever the layer's dtype (half-precision SVD is unreliable)."""
    return weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)


def truncated_svd(weight: Tensor, rank: int) -> SvdFactors:
    """Best rank-``rank`` factors of a matrix (Eckart-Young); singular values split evenly.

    >>> f = truncated_svd(torch.eye(3), 2); tuple(f.left.shape), tuple(f.right.shape)
    ((3, 2), (2, 3))
    """
    matrix = _as_float(weight)
    with _one_thread():
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return SvdFactors((u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype))


def unfold(weight: Tensor, mode: int) -> Tensor:
    """Mode-``mode`` unfolding of a 4-D conv weight: (size of that mode) x (product of the rest)."""
    return weight.movedim(mode, 0).reshape(weight.shape[mode], -1)


def leading_vectors(matrix: Tensor, rank: int) -> Tensor:
    """The ``rank`` leading left singular vectors of ``matrix``, as columns."""
    # Eigenvectors of the Gram matrix: the same left singular vectors as an SVD, much cheaper
    # when the matrix is wide, as conv unfoldings are. In float64: more accurate, and MKL's
    # float32 eigh is pathologically slow (9 s against 0.2 s for 512 x 512 here).
    wide = matrix.double()
    gram = wide @ wide.T
    with _one_thread():
        _, vectors = torch.linalg.eigh(gram)
    return vectors[:, -rank:].flip(-1).to(matrix.dtype)


def tucker2(weight: Tensor, ranks: tuple[int, int], sweeps: int = 0) -> Tucker2Factors:
    """Tucker-2 factors of a conv weight at ``ranks = (r_out, r_in)``.

    Initialized by truncated HOSVD (leading singular vectors of the two channel unfoldings);
    each HOOI sweep then refines one basis with the other fixed, never increasing the error.
    """
    tensor = _as_float(weight)
    r_out, r_in = ranks
    out_basis = leading_vectors(unfold(tensor, 0), r_out)
    in_basis = leading_vectors(unfold(tensor, 1), r_in)
    for _ in range(sweeps):
        out_basis = leading_vectors(unfold(_mode_product(tensor, in_basis.T, 1), 0), r_out)
        in_basis = leading_vectors(unfold(_mode_product(tensor, out_basis.T, 0), 1), r_in)
    core = _mode_product(_mode_product(tensor, out_basis.T, 0), in_basis.T, 1)
    dtype = weight.dtype
    return Tucker2Factors(core.to(dtype), out_basis.to(dtype), in_basis.to(dtype))


def _mode_product(tensor: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """tensor x_mode matrix: contracts ``tensor``'s mode with ``matrix``'s columns."""
    moved = tensor.movedim(mode, -1)
    return (moved @ matrix.T).movedim(-1, mode)


def tucker2_to_dense(factors: Tucker2Factors) -> Tensor:
    """The dense conv weight the factors stand for."""
    return _mode_product(_mode_product(factors.core, factors.out_basis, 0), factors.in_basis, 1)


def project(weight: Tensor, ranks: int | tuple[int, int], sweeps: int = 0) -> Tensor:
    """The nearest (HOSVD/HOOI) weight of the given ranks, same shape: the ADMM Z-step's projection."""
    if weight.dim() == 2:
        factors = truncated_svd(weight, int(ranks) if isinstance(ranks, int) else ranks[0])
        return factors.left @ factors.right
    pair = (ranks, ranks) if isinstance(ranks, int) else ranks
    return tucker2_to_dense(tucker2(weight, pair, sweeps))


def spectra(weight: Tensor) -> tuple[Tensor, ...]:
    """Singular values of a matrix, or of the output and input unfoldings of a conv weight.

    The global rank policy compares layers by the share of this spectral energy each rank keeps.
    """
    tensor = _as_float(weight)
    with _one_thread():
        if tensor.dim() == 2:
            return (torch.linalg.svdvals(tensor.double()),)
        grams = [u @ u.T for u in (unfold(tensor, mode).double() for mode in (0, 1))]
        return tuple(torch.linalg.eigvalsh(gram).clamp_min(0).flip(-1).sqrt() for gram in grams)
