"""Compiled loops for the per-gene passes over ``(B, n, p)`` batches with few isoforms.

NumPy reduces over a last axis of 2-4 isoforms slowly (strided, one
temporary per step); on large sections these passes cost more than the
kernel products themselves. Each function here is one or two sequential
passes per gene. Sums over spots are accumulated in blocks of
:data:`BLOCK` (a partial sum per block, then the blocks), so their rounding
error grows like NumPy's pairwise sums rather than with ``n``.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["centred_ratios", "batch_gram", "sparse_centred_ratios", "dense_centred_ratios", "compiled_available",
           "BLOCK"]

#: spots per partial sum
BLOCK = 4096


@functools.cache
def compiled_available() -> bool:
    """Whether numba is importable (else callers use their NumPy expressions)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _compiled():
    from numba import njit

    @njit(cache=True, nogil=True)
    def ratios(c, y, covered, block):  # pragma: no cover - compiled
        nb, n, p = c.shape
        part = np.zeros(p)
        tot = np.zeros(p)
        for b in range(nb):
            tot[:] = 0.0
            part[:] = 0.0
            m = 0
            for i in range(n):
                t = 0.0
                for j in range(p):
                    t += c[b, i, j]
                if t > 0.0:
                    covered[b, i] = True
                    m += 1
                    for j in range(p):
                        r = c[b, i, j] / t
                        y[b, i, j] = r
                        part[j] += r
                else:
                    covered[b, i] = False
                    for j in range(p):
                        y[b, i, j] = 0.0
                if (i + 1) % block == 0:
                    for j in range(p):
                        tot[j] += part[j]
                        part[j] = 0.0
            if m == 0:
                continue
            for j in range(p):
                tot[j] = (tot[j] + part[j]) / m
            for i in range(n):
                if covered[b, i]:
                    for j in range(p):
                        y[b, i, j] -= tot[j]

    @njit(cache=True, nogil=True)
    def gram(y, out, block):  # pragma: no cover - compiled
        nb, n, d = y.shape
        part = np.zeros((d, d))
        for b in range(nb):
            part[:, :] = 0.0
            for i in range(n):
                for k in range(d):
                    v = y[b, i, k]
                    if v != 0.0:
                        for e in range(k, d):
                            part[k, e] += v * y[b, i, e]
                if (i + 1) % block == 0 or i == n - 1:
                    for k in range(d):
                        for e in range(k, d):
                            out[b, k, e] += part[k, e]
                            part[k, e] = 0.0
            for k in range(d):
                for e in range(k):
                    out[b, k, e] = out[b, e, k]

    @njit(cache=True, nogil=True)
    def sparse_simplex(data, rows, indptr, grid, p, cols, gram, covered, block):  # pragma: no cover - compiled
        nb = gram.shape[0]
        big = np.iinfo(np.int64).max
        longest = 0
        for b in range(nb):
            size = indptr[(b + 1) * p] - indptr[b * p]
            longest = max(longest, size)
        urow = np.empty(longest, dtype=np.int64)
        uval = np.empty((longest, p))
        ptr = np.empty(p, dtype=np.int64)
        mean = np.zeros(p)
        gpart = np.zeros((p, p))
        v = np.zeros(p)
        for b in range(nb):
            # merge the gene's p sorted columns: each bin with a stored count once, its p counts
            for j in range(p):
                ptr[j] = indptr[b * p + j]
            m = 0
            while True:
                r = big
                for j in range(p):
                    if ptr[j] < indptr[b * p + j + 1] and rows[ptr[j]] < r:
                        r = rows[ptr[j]]
                if r == big:
                    break
                t = 0.0
                for j in range(p):
                    x = 0.0
                    if ptr[j] < indptr[b * p + j + 1] and rows[ptr[j]] == r:
                        x = data[ptr[j]]
                        ptr[j] += 1
                    uval[m, j] = x
                    t += x
                if t > 0.0:  # covered: keep the ratios
                    for j in range(p):
                        uval[m, j] /= t
                    urow[m] = r
                    m += 1
            covered[b] = m
            if m == 0:
                continue
            # mean ratios over the covered bins (partial sums per block)
            mean[:] = 0.0
            for s0 in range(0, m, block):
                for j in range(p):
                    part = 0.0
                    for i in range(s0, min(s0 + block, m)):
                        part += uval[i, j]
                    mean[j] += part
            for j in range(p):
                mean[j] /= m
            # centred ratios of the first p - 1 isoforms into their grid columns; Gram of all p
            for s0 in range(0, m, block):
                gpart[:, :] = 0.0
                for i in range(s0, min(s0 + block, m)):
                    pos = grid[urow[i]]
                    for j in range(p):
                        v[j] = uval[i, j] - mean[j]
                    for j in range(p - 1):
                        cols[b * (p - 1) + j, pos] = v[j]
                    for j in range(p):
                        for e in range(j, p):
                            gpart[j, e] += v[j] * v[e]
                for j in range(p):
                    for e in range(j, p):
                        gram[b, j, e] += gpart[j, e]
            for j in range(p):
                for e in range(j):
                    gram[b, j, e] = gram[b, e, j]

    @njit(cache=True, nogil=True)
    def dense_simplex(c, p, order, cols, gram, covered, block):  # pragma: no cover - compiled
        # c: (n, B p) counts, gene-major columns; cols: (n, B (p - 1)) written at rows order[i]
        n = c.shape[0]
        nb = c.shape[1] // p
        d = p - 1
        mean = np.zeros((nb, p))
        part = np.zeros((nb, p))
        r = np.empty(p)
        # pass 1: each gene's mean ratio over its covered spots (partial sums over blocks of spots)
        for i in range(n):
            for b in range(nb):
                t = 0.0
                for k in range(p):
                    t += c[i, b * p + k]
                if t > 0.0:
                    covered[b] += 1
                    for k in range(p):
                        part[b, k] += c[i, b * p + k] / t
            if (i + 1) % block == 0:
                mean += part
                part[:, :] = 0.0
        mean += part
        for b in range(nb):
            if covered[b] > 0:
                for k in range(p):
                    mean[b, k] /= covered[b]
        # pass 2: centred ratios (zero where uncovered) into the output rows, and each gene's p x p Gram
        gpart = np.zeros((nb, p, p))
        for i in range(n):
            row = order[i]
            for b in range(nb):
                t = 0.0
                for k in range(p):
                    t += c[i, b * p + k]
                if t > 0.0:
                    for k in range(p):
                        r[k] = c[i, b * p + k] / t - mean[b, k]
                    for k in range(d):
                        cols[row, b * d + k] = r[k]
                    for k in range(p):
                        for e in range(k, p):
                            gpart[b, k, e] += r[k] * r[e]
                else:
                    for k in range(d):
                        cols[row, b * d + k] = 0.0
            if (i + 1) % block == 0 or i == n - 1:
                for b in range(nb):
                    for k in range(p):
                        for e in range(k, p):
                            gram[b, k, e] += gpart[b, k, e]
                            gpart[b, k, e] = 0.0
        for b in range(nb):
            for k in range(p):
                for e in range(k):
                    gram[b, k, e] = gram[b, e, k]

    return ratios, gram, sparse_simplex, dense_simplex


def centred_ratios(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Isoform ratios centred over the covered spots (zero elsewhere), and the coverage.

    Parameters
    ----------
    counts
        ``(B, n, p)`` non-negative counts.

    Returns
    -------
    y : numpy.ndarray
        ``(B, n, p)`` float64.
    covered : numpy.ndarray
        ``(B, n)`` boolean, spots with a positive gene total.
    """
    c = np.ascontiguousarray(counts, dtype=np.float64)
    y = np.empty_like(c)
    covered = np.empty(c.shape[:2], dtype=np.bool_)
    _compiled()[0](c, y, covered, BLOCK)
    return y, covered


def batch_gram(y: np.ndarray) -> np.ndarray:
    """``Y_g' Y_g`` of every gene of a batch, ``(B, n, d) -> (B, d, d)``."""
    y = np.ascontiguousarray(y, dtype=np.float64)
    out = np.zeros((y.shape[0], y.shape[2], y.shape[2]))
    _compiled()[1](y, out, BLOCK)
    return out


def sparse_centred_ratios(data: np.ndarray, rows: np.ndarray, indptr: np.ndarray, grid: np.ndarray,
                          n_genes: int, p: int, n: int,
                          cols: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred isoform ratios of a batch from its sparse counts, straight into grid columns.

    For ``hsic-ir`` with mean filling on a raster, a gene's centred ratios are
    zero wherever it has no counts, so they are built from the stored
    non-zero counts alone: ``O(nnz)`` apart from the output columns.

    Parameters
    ----------
    data, rows, indptr
        CSC of the batch's ``n_genes * p`` isoform columns (gene-major): counts,
        observed-bin row of each, column pointers.
    grid
        Each observed bin's position in the grid, ``(n_observed,)``.
    n_genes, p, n
        Genes, isoforms per gene, bins of the grid.
    cols
        A zeroed ``(n_genes * (p - 1), n)`` float64 array to write into (else one is allocated).

    Returns
    -------
    cols : numpy.ndarray
        ``(n_genes * (p - 1), n)``: the first ``p - 1`` centred ratio columns
        of each gene (gene-major), zero at bins without the gene.
    gram : numpy.ndarray
        ``(n_genes, p, p)``: ``Y_g' Y_g`` of all ``p`` centred ratios.
    covered : numpy.ndarray
        ``(n_genes,)`` bins with a positive gene total.
    """
    if cols is None:
        cols = np.zeros((n_genes * (p - 1), n))
    elif cols.shape != (n_genes * (p - 1), n) or cols.dtype != np.float64 or not cols.flags.c_contiguous:
        raise ValueError(f"cols must be a C-contiguous float64 array of shape {(n_genes * (p - 1), n)}")
    gram = np.zeros((n_genes, p, p))
    covered = np.zeros(n_genes, dtype=np.int64)
    _compiled()[2](np.ascontiguousarray(data, dtype=np.float64), np.ascontiguousarray(rows, dtype=np.int64),
                   np.ascontiguousarray(indptr, dtype=np.int64), np.ascontiguousarray(grid, dtype=np.int64),
                   int(p), cols, gram, covered, BLOCK)
    return cols, gram, covered


def dense_centred_ratios(counts: np.ndarray, p: int,
                         row_order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centred isoform ratios of a batch from its ``(n, B p)`` counts, as the operator's rows want them.

    The counts are read as stored (spots x gene-major isoform columns), in
    two passes over the rows, and never transposed: the first ``p - 1``
    centred ratio columns of each gene (zero where the gene has no counts)
    are written to row ``row_order[i]`` of the output (a kernel factor's
    ordering; identity if ``None``), with each gene's ``p x p`` Gram matrix.

    Parameters
    ----------
    counts
        ``(n, n_genes * p)`` non-negative counts (any numeric dtype).
    p
        Isoforms per gene (``>= 2``).
    row_order
        ``(n,)`` output row of each spot.

    Returns
    -------
    cols : numpy.ndarray
        ``(n, n_genes * (p - 1))`` float64.
    gram : numpy.ndarray
        ``(n_genes, p, p)``: ``Y_g' Y_g`` of all ``p`` centred ratios.
    covered : numpy.ndarray
        ``(n_genes,)`` spots with a positive gene total.
    """
    counts = np.ascontiguousarray(counts)
    n, m = counts.shape
    if p < 2 or m % p:
        raise ValueError(f"{m} columns are not whole genes of {p} >= 2 isoforms.")
    nb = m // p
    order = np.arange(n, dtype=np.int64) if row_order is None else np.ascontiguousarray(row_order, dtype=np.int64)
    cols = np.empty((n, nb * (p - 1)))
    gram = np.zeros((nb, p, p))
    covered = np.zeros(nb, dtype=np.int64)
    _compiled()[3](counts, int(p), order, cols, gram, covered, BLOCK)
    return cols, gram, covered
