"""Selected inversion: the diagonal of the inverse of a sparse SPD matrix from its sparse factor.

Standardising the CAR covariance needs ``diag(M^-1)`` for a sparse precision
``M``.  With a fill-reducing ordering ``P M P' = L D L'`` (``L`` unit lower
triangular, ``D`` diagonal), the inverse ``Z = M^-1`` satisfies
``Z = D^-1 L^-1 + (I - L') Z`` (Takahashi, Fagan and Chen 1973), which read
column by column from the last gives, for ``I_j`` the rows of column ``j`` of
``L`` below the diagonal::

    Z_ij = - sum_{k in I_j} L_kj Z_ki        (i in I_j)
    Z_jj = 1 / D_j - sum_{k in I_j} L_kj Z_kj

Every ``Z_ki`` needed lies on the pattern of ``L`` (the rows of a column of a
Cholesky factor form a clique of the filled graph), so ``Z`` is only ever
computed on that pattern (closed by a symbolic factorisation first: SuperLU
drops entries that cancel to exactly zero, as they do on lattices): memory ``O(nnz(L))`` and time ``O(sum_j |I_j|^2)``,
about the cost of the factorisation itself, with no dense ``n x n`` array and
no solve per spot.

The factor comes from SuperLU (``scipy.sparse.linalg.splu``) with diagonal
pivoting on the symmetric structure, so ``P M P' = L U`` with ``U = D L'``.
The recurrence runs in numba.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from spatialscale.factor import FactorError, ldl_factor

__all__ = ["inverse_diagonal_selected", "SelectedInversionError"]


class SelectedInversionError(RuntimeError):
    """The factor did not have the structure selected inversion needs (the caller falls back)."""


def _kernel():
    from numba import njit

    @njit(cache=True, nogil=True)
    def takahashi_diagonal(indptr, indices, lval, d, work):  # pragma: no cover - compiled
        n = d.shape[0]
        z = np.zeros(lval.shape[0])
        zd = np.zeros(n)
        for j in range(n - 1, -1, -1):
            s = indptr[j]
            m = indptr[j + 1] - s
            for a in range(m):
                work[a] = 0.0
            for a in range(m):
                i = indices[s + a]
                work[a] += lval[s + a] * zd[i]
                # pairs (i, k), k > i, both rows of column j: Z_ki is stored in column i at row k
                p = indptr[i]
                pe = indptr[i + 1]
                for b in range(a + 1, m):
                    k = indices[s + b]
                    while p < pe and indices[p] < k:
                        p += 1
                    if p == pe or indices[p] != k:
                        return zd, False
                    zki = z[p]
                    work[a] += lval[s + b] * zki
                    work[b] += lval[s + a] * zki
            tot = 0.0
            for a in range(m):
                z[s + a] = -work[a]
                tot += lval[s + a] * z[s + a]
            zd[j] = 1.0 / d[j] - tot
        return zd, True

    @njit(cache=True, nogil=True)
    def close_pattern(indptr, indices, lval):  # pragma: no cover - compiled
        # Symbolic Cholesky of the strictly lower pattern: column j's rows are its own rows and those of its
        # children in the elimination tree (minus j).  SuperLU drops entries that cancel to exactly zero;
        # their Z values are still needed, so the recurrence runs on this closed pattern.
        n = indptr.shape[0] - 1
        cap = max(16, 2 * indices.shape[0])
        out_idx = np.empty(cap, np.int64)
        out_val = np.zeros(cap)
        out_ptr = np.zeros(n + 1, np.int64)
        mark = np.full(n, -1, np.int64)
        head = np.full(n, -1, np.int64)  # first child of each column
        nxt = np.full(n, -1, np.int64)  # next sibling
        buf = np.empty(n, np.int64)
        for j in range(n):
            m = 0
            for a in range(indptr[j], indptr[j + 1]):
                i = indices[a]
                if mark[i] != j:
                    mark[i] = j
                    buf[m] = i
                    m += 1
            c = head[j]
            while c != -1:
                for a in range(out_ptr[c], out_ptr[c + 1]):
                    i = out_idx[a]
                    if i != j and mark[i] != j:
                        mark[i] = j
                        buf[m] = i
                        m += 1
                c = nxt[c]
            rows = np.sort(buf[:m])
            start = out_ptr[j]
            if start + m > out_idx.shape[0]:
                new_cap = max(2 * out_idx.shape[0], start + m)
                grown = np.empty(new_cap, np.int64)
                grown[:start] = out_idx[:start]
                out_idx = grown
                grown_v = np.zeros(new_cap)
                grown_v[:start] = out_val[:start]
                out_val = grown_v
            out_idx[start : start + m] = rows
            # values of L where it has them (both sorted), zero elsewhere
            p = indptr[j]
            pe = indptr[j + 1]
            for a in range(m):
                out_val[start + a] = 0.0
                while p < pe and indices[p] < rows[a]:
                    p += 1
                if p < pe and indices[p] == rows[a]:
                    out_val[start + a] = lval[p]
            out_ptr[j + 1] = start + m
            if m:
                parent = rows[0]
                nxt[j] = head[parent]
                head[parent] = j
        return out_ptr, out_idx[: out_ptr[n]].copy(), out_val[: out_ptr[n]].copy()

    return takahashi_diagonal, close_pattern


_TAKAHASHI = None


def _takahashi():
    global _TAKAHASHI
    if _TAKAHASHI is None:
        _TAKAHASHI = _kernel()
    return _TAKAHASHI


def inverse_diagonal_selected(m: scipy.sparse.spmatrix) -> np.ndarray:
    """Exact ``diag(m^-1)`` of a sparse symmetric positive-definite matrix by selected inversion.

    Parameters
    ----------
    m
        Sparse SPD ``(n, n)`` matrix.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` diagonal of the inverse, in the order of ``m``.

    Raises
    ------
    SelectedInversionError
        If the factorisation pivoted off the diagonal or its pattern is not
        closed as a Cholesky fill (not expected for SPD input).
    """
    n = m.shape[0]
    try:
        f = ldl_factor(m)
    except FactorError as exc:
        raise SelectedInversionError(str(exc)) from None
    indptr, indices, lval, d, perm = f.indptr, f.indices, f.lval, f.d, f.perm
    del f
    takahashi, close_pattern = _takahashi()
    indptr, indices, lval = close_pattern(indptr, indices, lval)
    width = int(np.diff(indptr).max()) if n else 0
    zd, ok = takahashi(indptr, indices, lval, d, np.zeros(max(width, 1)))
    if not ok:
        raise SelectedInversionError("the factor's pattern is not closed")
    # SuperLU factors Pr m Pc with Pc[k, perm_c[k]] = 1: spot k of m is the factor's row perm_c[k]
    return zd[perm]
