"""The ``L D L'`` factor of a sparse SPD precision, and blocked triangular solves with it.

SuperLU (``scipy.sparse.linalg.splu``) with diagonal pivoting on the
symmetric structure factors ``P M P' = L U`` with ``U = D L'`` (``L`` unit
lower triangular).  Kept as ``L`` (strictly lower part, CSC), ``D`` and ``P``,
the factor gives

- ``M^-1 x = P' L'^-1 D^-1 L^-1 P x`` (:meth:`LDLFactor.solve`), and
- the *half solve* ``z = D^-1/2 L^-1 P x`` (:meth:`LDLFactor.half_solve`),
  with ``x' M^-1 y = z_x' z_y``: a kernel quadratic form ``Y' M^-1 Y`` needs
  one triangular solve instead of two.

SuperLU's own solve with a block of right-hand sides runs column by column
(some 5-10 ms per column at 10^5 spots); here each triangular sweep visits
the factor once for a whole block, the inner loop running over the block's
columns (contiguous rows of a C-ordered array), so the cost per column is a
small multiple of ``nnz(L)`` memory traffic amortised over the block.  The
sweeps run in numba; without numba the factor falls back to SuperLU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import scipy.sparse.linalg

__all__ = ["LDLFactor", "ldl_factor", "FactorError", "superlu_symmetric"]

#: right-hand-side columns per triangular sweep (a block of 10^5 spots x 128 columns is 100 MB)
BLOCK_COLUMNS = 128


class FactorError(RuntimeError):
    """The factorisation did not have the ``L D L'`` structure (pivoted off the diagonal, or not SPD)."""


def superlu_symmetric(m: scipy.sparse.spmatrix) -> scipy.sparse.linalg.SuperLU:
    """SuperLU of a symmetric matrix with a symmetric fill-reducing ordering and diagonal pivots."""
    return scipy.sparse.linalg.splu(scipy.sparse.csc_matrix(m, dtype=np.float64), permc_spec="MMD_AT_PLUS_A",
                                    diag_pivot_thresh=0.0, options={"SymmetricMode": True})


def strictly_lower(l_factor: scipy.sparse.spmatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``indptr, indices, data`` (int64, int64, float64) of the strictly lower part of a CSC factor, explicit
    zeros kept, rows sorted within each column."""
    l_factor = scipy.sparse.csc_matrix(l_factor)
    l_factor.sort_indices()
    indptr, indices, data = l_factor.indptr, l_factor.indices, l_factor.data
    cols = np.repeat(np.arange(l_factor.shape[1]), np.diff(indptr))
    keep = indices > cols
    counts = np.bincount(cols[keep], minlength=l_factor.shape[1])
    new_ptr = np.zeros(l_factor.shape[1] + 1, dtype=np.int64)
    np.cumsum(counts, out=new_ptr[1:])
    return new_ptr, indices[keep].astype(np.int64), data[keep].astype(np.float64)


@dataclass
class LDLFactor:
    """``P M P' = L D L'``: ``L``'s strictly lower part (CSC arrays), ``D`` and the ordering.

    ``perm[k]`` is the factor's row of the matrix's row ``k``.
    """

    indptr: np.ndarray
    indices: np.ndarray
    lval: np.ndarray
    d: np.ndarray
    perm: np.ndarray

    @property
    def n(self) -> int:
        return int(self.d.shape[0])

    def work(self) -> float:
        """``sum_j |I_j|^2`` over the columns of ``L``: the cost of a selected inversion."""
        counts = np.diff(self.indptr).astype(np.float64)
        return float(np.sum(counts**2))

    def _blocks(self, x: np.ndarray, fn) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        one = x.ndim == 1
        x2 = x.reshape(self.n, -1)
        out = np.empty((self.n, x2.shape[1]))
        for s in range(0, x2.shape[1], BLOCK_COLUMNS):
            out[:, s : s + BLOCK_COLUMNS] = fn(x2[:, s : s + BLOCK_COLUMNS])
        return out.ravel() if one else out

    def half_solve(self, x: np.ndarray) -> np.ndarray:
        """``D^-1/2 L^-1 P x`` for an ``(n,)`` or ``(n, m)`` block: ``x' M^-1 y`` is the product of two of them.

        The rows of the result are in the factor's order.
        """
        forward, _ = _sweeps()
        scale = 1.0 / np.sqrt(self.d)[:, None]

        def one(block: np.ndarray) -> np.ndarray:
            z = np.empty(block.shape)
            z[self.perm] = block
            forward(self.indptr, self.indices, self.lval, z)
            return z * scale

        return self._blocks(x, one)

    def gene_quadratics(self, y: np.ndarray) -> np.ndarray:
        """``Y_g' M^-1 Y_g`` of every gene of a batch: ``(B, n, d)`` -> ``(B, d, d)``.

        Genes go through the sweep in blocks of about :data:`BLOCK_COLUMNS`
        columns: each block is scattered into the factor's order, swept
        forward once, and its per-gene Gram matrices are summed with the
        weights ``1 / D`` (partial sums over blocks of spots), without
        forming ``M^-1 Y``.
        """
        forward, _ = _sweeps()
        scatter, gram = _gene_kernels()
        y = np.asarray(y, dtype=np.float64)
        b, n, d = y.shape
        out = np.empty((b, d, d))
        inv_d = 1.0 / self.d
        step = max(1, BLOCK_COLUMNS // max(d, 1))
        for s in range(0, b, step):
            e = min(s + step, b)
            z = scatter(y, self.perm, s, e)
            forward(self.indptr, self.indices, self.lval, z)
            out[s:e] = gram(z, inv_d, d)
        return out

    def ordered_quadratics(self, z: np.ndarray, d: int) -> np.ndarray:
        """:meth:`gene_quadratics` of columns already in the factor's row order, ``(n, B d) -> (B, d, d)``.

        ``z`` (C-contiguous float64, gene-major columns, row ``perm[i]``
        holding spot ``i``) is overwritten by ``L^-1 z``.
        """
        forward, _ = _sweeps()
        _, gram = _gene_kernels()
        if z.dtype != np.float64 or not z.flags.c_contiguous or z.shape[0] != self.n or z.shape[1] % d:
            raise ValueError(f"z must be a C-contiguous float64 (n, B * {d}) array with n = {self.n}")
        forward(self.indptr, self.indices, self.lval, z)
        return gram(z, 1.0 / self.d, d)

    def solve(self, x: np.ndarray) -> np.ndarray:
        """``M^-1 x`` for an ``(n,)`` or ``(n, m)`` block (rows in the matrix's order)."""
        forward, backward = _sweeps()
        inv_d = (1.0 / self.d)[:, None]

        def one(block: np.ndarray) -> np.ndarray:
            z = np.empty(block.shape)
            z[self.perm] = block
            forward(self.indptr, self.indices, self.lval, z)
            z *= inv_d
            backward(self.indptr, self.indices, self.lval, z)
            return z[self.perm]

        return self._blocks(x, one)


def ldl_factor(m: scipy.sparse.spmatrix, lu: scipy.sparse.linalg.SuperLU | None = None) -> LDLFactor:
    """The ``L D L'`` factor of a sparse SPD matrix (from SuperLU; pass ``lu`` to reuse a factorisation).

    Raises
    ------
    FactorError
        If the factorisation pivoted off the diagonal or ``D`` is not positive.
    """
    if lu is None:
        lu = superlu_symmetric(m)
    if not np.array_equal(lu.perm_r, lu.perm_c):
        raise FactorError("the factorisation pivoted off the diagonal")
    d = lu.U.diagonal().astype(np.float64)
    if not np.all(d > 0):
        raise FactorError("the matrix is not positive definite")
    indptr, indices, lval = strictly_lower(lu.L)
    return LDLFactor(indptr, indices, lval, d, np.asarray(lu.perm_c, dtype=np.int64))


@functools.cache
def _sweeps():
    from numba import njit

    @njit(cache=True, nogil=True)
    def forward(indptr, indices, lval, x):  # pragma: no cover - compiled
        # L z = x in place (unit diagonal): column j of L updates the rows below j
        m = x.shape[1]
        for j in range(x.shape[0]):
            for a in range(indptr[j], indptr[j + 1]):
                i = indices[a]
                v = lval[a]
                for c in range(m):
                    x[i, c] -= v * x[j, c]

    @njit(cache=True, nogil=True)
    def backward(indptr, indices, lval, x):  # pragma: no cover - compiled
        # L' z = x in place: row j of L' is column j of L
        m = x.shape[1]
        for j in range(x.shape[0] - 1, -1, -1):
            for a in range(indptr[j], indptr[j + 1]):
                i = indices[a]
                v = lval[a]
                for c in range(m):
                    x[j, c] -= v * x[i, c]

    return forward, backward


@functools.cache
def _gene_kernels():
    from numba import njit

    @njit(cache=True, nogil=True)
    def scatter(y, perm, s, e):  # pragma: no cover - compiled
        # genes s:e of a (B, n, d) batch as (n, (e - s) d) columns, rows in the factor's order
        n, d = y.shape[1], y.shape[2]
        z = np.empty((n, (e - s) * d))
        for g in range(s, e):
            for i in range(n):
                r = perm[i]
                for k in range(d):
                    z[r, (g - s) * d + k] = y[g, i, k]
        return z

    @njit(cache=True, nogil=True)
    def gram(z, w, d):  # pragma: no cover - compiled
        # per gene (d consecutive columns): sum_i w_i z_i z_i', in partial sums over blocks of 4096 rows
        n, m = z.shape
        b = m // d
        out = np.zeros((b, d, d))
        part = np.empty((b, d, d))
        for s in range(0, n, 4096):
            part[:] = 0.0
            for i in range(s, min(s + 4096, n)):
                wi = w[i]
                for g in range(b):
                    c = g * d
                    for k in range(d):
                        v = wi * z[i, c + k]
                        for j in range(d):
                            part[g, k, j] += v * z[i, c + j]
            out += part
        return out

    return scatter, gram
