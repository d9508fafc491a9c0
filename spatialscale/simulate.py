"""Simulated tissue sections with isoform counts and known truth.

Each gene draws its own per-spot totals (gene-specific depth, independent
Poisson noise: no per-spot total is shared across genes), then isoform
counts from a multinomial with logits ``base_g + effect * f_g(x) * b_g`` for
spatially variable (SV) genes, where ``f_g`` is a smooth standardised
spatial pattern (gradient, blob or stripes), and ``base_g`` for null genes.

:func:`simulate_mixture` simulates spots that are mixtures of cell types
instead (known proportions, a single-cell-like reference of the types'
expression, and genes whose isoform usage differs by type), for deconvolution
and cell-type-aware DU tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse

__all__ = ["grid_coords", "spatial_pattern", "simulate_section", "simulate_stack", "simulate_raster",
           "simulate_transcriptome", "null_section", "truth",
           "smooth_fields", "simulate_mixture"]


def grid_coords(n_spots: int, geometry: str = "grid", seed: int = 0) -> np.ndarray:
    """``(n, 2)`` coordinates: ``grid`` (square lattice), ``hex`` or ``random`` (distinct points)."""
    side = int(np.ceil(np.sqrt(n_spots)))
    if geometry == "grid":
        ii, jj = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
        xy = np.stack([jj, ii], -1).reshape(-1, 2).astype(float)
    elif geometry == "hex":
        ii, jj = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
        xy = np.stack([jj + 0.5 * (ii % 2), ii * np.sqrt(3) / 2], -1).reshape(-1, 2)
    elif geometry == "random":
        rng = np.random.default_rng(seed)
        xy = np.unique(rng.uniform(0, side, (2 * n_spots, 2)), axis=0)
        xy = xy[rng.permutation(len(xy))]
    else:
        raise ValueError(f"unknown geometry {geometry!r}; choose grid, hex or random.")
    return np.ascontiguousarray(xy[:n_spots], dtype=np.float64)


def spatial_pattern(xy: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A smooth pattern over the spots, standardised to mean 0 and sd 1."""
    span = np.ptp(xy, axis=0).max() + 1e-9
    z = (xy - xy.min(axis=0)) / span
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        f = z @ np.array([np.cos(angle), np.sin(angle)])
    elif kind == "blob":
        centre = rng.uniform(0.2, 0.8, 2)
        f = np.exp(-np.sum((z - centre) ** 2, axis=1) / (2 * 0.2**2))
    else:
        angle = rng.uniform(0, np.pi)
        f = np.sin(2 * np.pi * 2.0 * (z @ np.array([np.cos(angle), np.sin(angle)])))
    return (f - f.mean()) / (f.std() + 1e-12)


def _softmax(eta: np.ndarray) -> np.ndarray:
    e = np.exp(eta - eta.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def simulate_section(
    n_spots: int = 900,
    n_genes: int = 200,
    *,
    n_sv: int = 40,
    isoforms: tuple[int, int] = (2, 4),
    geometry: str = "grid",
    mean_depth: float = 8.0,
    effect: float = 1.0,
    n_du: int = 0,
    zero_spot_frac: float = 0.0,
    library_sd: float = 0.0,
    sparse: bool = True,
    seed: int = 0,
    sv_mask: np.ndarray | None = None,
    logit_sd: float = 0.0,
):
    """Simulate one section as an AnnData.

    Parameters
    ----------
    n_spots, n_genes
        Section size.
    n_sv
        Genes whose isoform ratios vary smoothly in space.
    isoforms
        Inclusive range of isoforms per gene.
    geometry
        ``grid``, ``hex`` or ``random``.
    mean_depth
        Typical gene total per spot (each gene scales it by a log-normal factor).
    effect
        Strength of the spatial (and DU) effect on the logits.
    n_du
        Non-SV genes whose usage depends on ``obs["celltype"] == "ct1"``.
    zero_spot_frac
        Fraction of spots with zero coverage, per gene.
    library_sd
        SD of a log-normal per-spot size factor shared by all genes (0: none).
        A shared factor correlates every gene's totals with one random field,
        so gene-count tests over many genes then reflect that one draw.
    sparse
        Store counts as CSR (else dense).
    seed
        Random seed; the same seed gives the same section.
    sv_mask
        ``(n_genes,)`` booleans: exactly these genes are spatially variable
        (instead of ``n_sv`` random ones), e.g. the genes shared by the
        sections of a cohort (:func:`simulate_cohort`); no DU genes then.
    logit_sd
        SD of independent per-spot noise on every isoform logit: usage varies
        from spot to spot beyond the multinomial (overdispersion), with no
        spatial or covariate structure (0: none; the other draws are then
        unchanged).

    Returns
    -------
    anndata.AnnData
        ``layers["counts"]`` (integer-valued float32), ``obsm["spatial"]``,
        ``var`` with ``gene_symbol``, ``is_sv``, ``is_du``; ``obs`` with
        ``region`` (A/B halves), ``celltype`` (3 random levels), ``rbp`` (a
        smooth covariate); ``uns["simulation"]`` holds the parameters.
    """
    import anndata as ad

    if n_sv + n_du > n_genes:
        raise ValueError("n_sv + n_du must not exceed n_genes.")
    rng = np.random.default_rng(seed)
    xy = grid_coords(n_spots, geometry, seed)
    n = len(xy)
    p_of = rng.integers(isoforms[0], isoforms[1] + 1, n_genes)
    is_sv = np.zeros(n_genes, bool)
    is_sv[:n_sv] = True
    is_du = np.zeros(n_genes, bool)
    is_du[n_sv : n_sv + n_du] = True
    order = rng.permutation(n_genes)
    is_sv, is_du, p_of = is_sv[order], is_du[order], p_of[order]
    if sv_mask is not None:
        is_sv = np.asarray(sv_mask, dtype=bool).copy()
        if is_sv.shape != (n_genes,):
            raise ValueError("sv_mask must have one entry per gene.")
        is_du[:] = False
    celltype = rng.choice(["ct0", "ct1", "ct2"], n)
    size = rng.lognormal(0.0, library_sd, n) if library_sd > 0 else np.ones(n)
    kinds = np.array(["gradient", "blob", "stripes"])
    blocks = []
    for g in range(n_genes):
        p = int(p_of[g])
        eta = np.broadcast_to(rng.normal(0, 0.5, p), (n, p)).copy()
        b = rng.normal(0, 1, p)
        b -= b.mean()
        if is_sv[g]:
            eta += effect * np.outer(spatial_pattern(xy, str(kinds[rng.integers(3)]), rng), b)
        if is_du[g]:
            eta += effect * np.outer(celltype == "ct1", b)
        depth = mean_depth * rng.lognormal(0.0, 0.5)
        totals = rng.poisson(depth * size * rng.lognormal(0.0, 0.2, n))
        totals[rng.random(n) < zero_spot_frac] = 0
        if logit_sd > 0:
            eta += rng.normal(0.0, logit_sd, eta.shape)
        blocks.append(rng.multinomial(totals, _softmax(eta)))
    counts = np.concatenate(blocks, axis=1).astype(np.float32)
    names = [f"gene{g:04d}" for g in range(n_genes)]
    gene_col = np.repeat(names, p_of)
    iso_names = [f"{g}-iso{k}" for g, p in zip(names, p_of) for k in range(p)]
    var = pd.DataFrame({"gene_symbol": gene_col, "is_sv": np.repeat(is_sv, p_of),
                        "is_du": np.repeat(is_du, p_of)}, index=iso_names)
    rbp = spatial_pattern(xy, "blob", rng) + rng.normal(0, 0.5, n)
    obs = pd.DataFrame({
        "region": pd.Categorical(np.where(xy[:, 0] > np.median(xy[:, 0]), "A", "B")),
        "celltype": pd.Categorical(celltype),
        "rbp": rbp,
    }, index=[f"spot{i:05d}" for i in range(n)])
    x = scipy.sparse.csr_matrix(counts) if sparse else counts
    adata = ad.AnnData(X=x.copy(), obs=obs, var=var)
    adata.layers["counts"] = x
    adata.obsm["spatial"] = xy
    adata.uns["simulation"] = {"n_spots": int(n), "n_genes": int(n_genes), "n_sv": int(n_sv), "n_du": int(n_du),
                               "isoforms": [int(v) for v in isoforms], "geometry": geometry,
                               "mean_depth": float(mean_depth), "effect": float(effect),
                               "zero_spot_frac": float(zero_spot_frac), "library_sd": float(library_sd),
                               "logit_sd": float(logit_sd), "seed": int(seed)}
    return adata


def simulate_raster(
    shape: tuple[int, int] = (100, 100),
    n_genes: int = 50,
    *,
    n_sv: int = 10,
    isoforms: tuple[int, int] = (2, 4),
    tissue_frac: float = 0.7,
    mean_depth: float = 1.0,
    effect: float = 1.0,
    seed: int = 0,
):
    """Simulate binned raster data (Visium HD-like) as an AnnData of the bins with tissue.

    Bins cover an elliptical tissue region of about ``tissue_frac`` of the
    ``shape`` grid; bins outside it are absent (as in a binned Visium HD
    table). Counts are drawn gene by gene as in :func:`simulate_section`
    (gene-specific depth around ``mean_depth``, multinomial isoform split),
    keeping only the bins a gene has counts in, so memory follows the
    non-zero counts, not ``bins x isoforms``.

    Returns
    -------
    anndata.AnnData
        Sparse ``layers["counts"]`` (CSR, float32), ``obs`` with integer
        ``array_row`` / ``array_col`` and a three-level ``celltype`` (sectors
        of the tissue), ``var`` with ``gene_symbol`` and ``is_sv``.
    """
    import anndata as ad

    ny, nx = (int(v) for v in shape)
    rng = np.random.default_rng(seed)
    rr, cc = np.divmod(np.arange(ny * nx), nx)
    ry, rx = ny / 2 * np.sqrt(tissue_frac / (np.pi / 4)), nx / 2 * np.sqrt(tissue_frac / (np.pi / 4))
    inside = ((rr + 0.5 - ny / 2) / ry) ** 2 + ((cc + 0.5 - nx / 2) / rx) ** 2 <= 1.0
    rr, cc = rr[inside], cc[inside]
    n = len(rr)
    xy = np.c_[cc, rr].astype(np.float64)
    p_of = rng.integers(isoforms[0], isoforms[1] + 1, n_genes)
    is_sv = np.zeros(n_genes, bool)
    is_sv[rng.permutation(n_genes)[:n_sv]] = True
    kinds = np.array(["gradient", "blob", "stripes"])
    rows, cols, vals = [], [], []
    col0 = 0
    for g in range(n_genes):
        p = int(p_of[g])
        base, b = rng.normal(0, 0.5, p), rng.normal(0, 1, p)
        b -= b.mean()
        totals = rng.poisson(mean_depth * rng.lognormal(0.0, 0.5), n)
        hit = np.flatnonzero(totals)
        eta = np.broadcast_to(base, (len(hit), p))
        if is_sv[g]:
            eta = eta + effect * np.outer(spatial_pattern(xy, str(kinds[rng.integers(3)]), rng)[hit], b)
        split = rng.multinomial(totals[hit], _softmax(eta))
        r, k = np.nonzero(split)
        rows.append(hit[r])
        cols.append(col0 + k)
        vals.append(split[r, k])
        col0 += p
    x = scipy.sparse.csr_matrix((np.concatenate(vals).astype(np.float32),
                                 (np.concatenate(rows), np.concatenate(cols))), shape=(n, col0))
    names = [f"gene{g:04d}" for g in range(n_genes)]
    var = pd.DataFrame({"gene_symbol": np.repeat(names, p_of), "is_sv": np.repeat(is_sv, p_of)},
                       index=[f"{g}-iso{k}" for g, p in zip(names, p_of) for k in range(p)])
    # a cell-type label in patches of the tissue (for DU examples on rasters): three levels by angle
    angle = np.arctan2(rr + 0.5 - ny / 2, cc + 0.5 - nx / 2)
    celltype = pd.Categorical(np.array(["ct0", "ct1", "ct2"])[((angle + np.pi) / (2 * np.pi / 3)).astype(int) % 3])
    obs = pd.DataFrame({"array_row": rr, "array_col": cc, "celltype": celltype},
                       index=pd.RangeIndex(n).astype(str))
    adata = ad.AnnData(obs=obs, var=var)
    adata.layers["counts"] = x
    adata.uns["simulation"] = {"shape": [ny, nx], "n_genes": int(n_genes), "n_sv": int(n_sv),
                               "tissue_frac": float(tissue_frac), "mean_depth": float(mean_depth),
                               "effect": float(effect), "seed": int(seed)}
    return adata


def simulate_transcriptome(
    n_spots: int = 10_000,
    n_genes: int = 20_000,
    *,
    n_sv: int | None = None,
    isoforms: tuple[int, int] = (2, 4),
    geometry: str = "grid",
    umis_per_spot: float = 2000.0,
    gene_sd: float = 1.5,
    effect: float = 1.0,
    seed: int = 0,
):
    """Simulate a whole-transcriptome section sparsely: memory follows the counts, not ``spots x isoforms``.

    For sections too large for :func:`simulate_section` (which draws every
    gene densely), e.g. 10^5 spots x 20,000 genes.  Each isoform's counts are
    independent Poisson draws with mean ``depth_g * pi_gk(spot)`` (the same
    law as a Poisson gene total split multinomially between its isoforms),
    drawn by scattering the isoform's Poisson total over the spots in
    proportion to ``pi_gk``: the cost is the number of counts, not of spots.
    Gene depths are log-normal (sd ``gene_sd`` on the log scale) and scaled
    so that a spot holds ``umis_per_spot`` counts on average; SV genes'
    isoform logits follow one of the smooth patterns of
    :func:`simulate_section`.

    Parameters
    ----------
    n_spots, n_genes
        Section size.
    n_sv
        Spatially variable genes (default ``n_genes // 5``).
    isoforms
        Inclusive range of isoforms per gene.
    geometry
        ``grid``, ``hex`` or ``random``.
    umis_per_spot
        Mean total count of a spot over all genes (Visium spots hold some
        10^3 - 10^4, 8-16 um Visium HD bins and long-read spots fewer).
    gene_sd
        Log-scale SD of the genes' expression levels.
    effect
        Strength of the spatial effect on the logits.
    seed
        Random seed.

    Returns
    -------
    anndata.AnnData
        CSR ``layers["counts"]`` (float32), ``obsm["spatial"]``, ``var``
        with ``gene_symbol`` and ``is_sv``; ``uns["simulation"]``.
    """
    import anndata as ad

    n_sv = n_genes // 5 if n_sv is None else int(n_sv)
    if not 0 <= n_sv <= n_genes:
        raise ValueError("n_sv must lie in [0, n_genes].")
    rng = np.random.default_rng(seed)
    xy = grid_coords(n_spots, geometry, seed)
    n = len(xy)
    p_of = rng.integers(isoforms[0], isoforms[1] + 1, n_genes)
    is_sv = np.zeros(n_genes, bool)
    is_sv[rng.permutation(n_genes)[:n_sv]] = True
    level = rng.lognormal(0.0, gene_sd, n_genes)
    depth = umis_per_spot * level / level.sum()  # mean count of gene g in a spot
    kinds = np.array(["gradient", "blob", "stripes"])
    rows, counts, ptr = [], [], [0]

    def scatter(hits: np.ndarray) -> None:  # one isoform's counts: the spots its Poisson total fell in
        spots, k = np.unique(hits, return_counts=True)
        rows.append(spots.astype(np.int32))
        counts.append(k.astype(np.float32))
        ptr.append(ptr[-1] + spots.size)

    for g in range(n_genes):
        p = int(p_of[g])
        base, b = rng.normal(0, 0.5, p), rng.normal(0, 1, p)
        b -= b.mean()
        if is_sv[g]:
            pi = _softmax(base + effect * np.outer(spatial_pattern(xy, str(kinds[rng.integers(3)]), rng), b))
            cum = np.cumsum(pi, axis=0)
            for k in range(p):
                u = rng.random(rng.poisson(depth[g] * cum[-1, k])) * cum[-1, k]
                scatter(np.minimum(np.searchsorted(cum[:, k], u, side="right"), n - 1))
        else:
            pi = _softmax(base)
            for k in range(p):
                scatter(rng.integers(0, n, rng.poisson(depth[g] * pi[k] * n)))
    x = scipy.sparse.csc_matrix((np.concatenate(counts), np.concatenate(rows), np.asarray(ptr, dtype=np.int64)),
                                shape=(n, len(ptr) - 1)).tocsr()
    names = [f"gene{g:05d}" for g in range(n_genes)]
    var = pd.DataFrame({"gene_symbol": np.repeat(names, p_of), "is_sv": np.repeat(is_sv, p_of)},
                       index=[f"{g}-iso{k}" for g, p in zip(names, p_of) for k in range(p)])
    obs = pd.DataFrame(index=[f"spot{i:06d}" for i in range(n)])
    adata = ad.AnnData(obs=obs, var=var)
    adata.layers["counts"] = x
    adata.obsm["spatial"] = xy
    adata.uns["simulation"] = {"n_spots": int(n), "n_genes": int(n_genes), "n_sv": int(n_sv),
                               "isoforms": [int(v) for v in isoforms], "geometry": geometry,
                               "umis_per_spot": float(umis_per_spot), "gene_sd": float(gene_sd),
                               "effect": float(effect), "seed": int(seed)}
    return adata


def null_section(n_spots: int = 900, n_genes: int = 2000, **kw):
    """A section with no spatial or DU effect (for calibration)."""
    return simulate_section(n_spots, n_genes, n_sv=0, n_du=0, **kw)


def truth(adata) -> pd.Series:
    """Gene -> whether it was simulated as spatially variable."""
    return adata.var.groupby("gene_symbol", sort=False, observed=True)["is_sv"].first().astype(bool)


def simulate_cohort(
    out_dir: str | os.PathLike,
    n_sections: int = 4,
    n_genes: int = 200,
    *,
    n_shared: int = 20,
    n_specific: int = 10,
    spots: tuple[int, int] = (900, 1600),
    depth: tuple[float, float] = (4.0, 12.0),
    effect: float = 0.5,
    isoforms: tuple[int, int] = (2, 4),
    seed: int = 0,
) -> tuple[Path, pd.DataFrame]:
    """Simulate a cohort of sections and write them with a manifest.

    Sections differ in geometry (grid, hex, random in turn), size (spots
    drawn in ``spots``) and depth (``depth``).  The same ``n_shared`` genes are
    spatially variable in every section, and each section has ``n_specific``
    further SV genes of its own; with a weak ``effect`` single sections miss
    many shared genes that combining sections finds.

    Returns
    -------
    manifest, truth
        The manifest path (``out_dir/manifest.csv``: section, path, geometry,
        n_spots, depth) and a gene x section table of which genes are SV
        (column ``shared`` marks the shared ones).
    """
    if n_shared + n_specific > n_genes:
        raise ValueError("n_shared + n_specific must not exceed n_genes.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    genes = np.array([f"gene{g:04d}" for g in range(n_genes)])
    shared = np.zeros(n_genes, bool)
    shared[rng.choice(n_genes, n_shared, replace=False)] = True
    geometries = ("grid", "hex", "random")
    rows, truth_cols = [], {}
    for s in range(n_sections):
        sid = f"S{s + 1:02d}"
        mask = shared.copy()
        mask[rng.choice(np.flatnonzero(~shared), n_specific, replace=False)] = True
        n = int(rng.integers(spots[0], spots[1] + 1))
        d = float(rng.uniform(*depth))
        adata = simulate_section(n, n_genes, n_sv=0, isoforms=isoforms, geometry=geometries[s % 3], mean_depth=d,
                                 effect=effect, seed=seed * 1000 + s + 1, sv_mask=mask)
        adata.write_h5ad(out / f"{sid}.h5ad")
        rows.append({"section": sid, "path": f"{sid}.h5ad", "geometry": geometries[s % 3], "n_spots": adata.n_obs,
                     "depth": round(d, 2)})
        truth_cols[sid] = mask
    manifest = out / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    truth_table = pd.DataFrame(truth_cols, index=pd.Index(genes, name="gene"))
    truth_table["shared"] = shared
    return manifest, truth_table


def simulate_stack(
    n_sections: int = 6,
    spots_per_section: int = 225,
    n_genes: int = 100,
    *,
    n_z: int = 10,
    n_xyz: int = 10,
    n_du: int = 0,
    isoforms: tuple[int, int] = (2, 4),
    geometry: str = "grid",
    z_spacing: float = 1.0,
    mean_depth: float = 8.0,
    effect: float = 1.0,
    sparse: bool = True,
    seed: int = 0,
):
    """Simulate a stack of parallel 2-D sections as one AnnData with 3-D coordinates.

    Every section has the same layout (``grid_coords(spots_per_section,
    geometry)``, spot spacing 1) and lies at ``z = s * z_spacing`` (``s = 0 ..
    n_sections - 1``), as serial sections of one tissue block. Counts are
    drawn gene by gene as in :func:`simulate_section` (gene-specific depth,
    multinomial isoform split with logits ``base_g + effect * f_g * b_g``),
    with three kinds of spatially variable genes:

    - ``n_z`` genes vary along z only: ``f_g`` is a smooth function of the
      section's depth (a linear gradient or a half cosine over the stack),
      constant within every section, so a 2-D test of any single section
      cannot see them while a 3-D kernel over the stack can;
    - ``n_xyz`` genes vary smoothly in 3-D (a gradient in a random 3-D
      direction, or a Gaussian blob in the block);
    - the others are null (plus ``n_du`` null-in-space genes whose usage
      depends on ``obs["celltype"] == "ct1"``, for DU tests).

    Parameters
    ----------
    n_sections, spots_per_section
        Stack size: ``n_sections * spots_per_section`` spots in all
        (``spots_per_section`` rounded down to the layout's count).
    n_genes
        Genes in all.
    n_z, n_xyz, n_du
        Genes varying along z only, in 3-D, and with the cell type.
    isoforms
        Inclusive range of isoforms per gene.
    geometry
        Layout within a section: ``grid``, ``hex`` or ``random`` (see
        :func:`grid_coords`; one layout shared by every section).
    z_spacing
        Distance between consecutive sections, in the units of the in-section
        spot spacing (1). It decides which neighbours the 3-D kNN graph joins
        across sections: below 1 each spot's nearest neighbours include the
        spots above and below it; at 1 on a ``grid`` layout they tie with the
        in-plane ones; well above 1 (with the default ``k_neighbors = 4``)
        few edges join the sections.
    mean_depth, effect, sparse, seed
        As in :func:`simulate_section`.

    Returns
    -------
    anndata.AnnData
        ``layers["counts"]`` (integer-valued float32), ``obsm["spatial"]`` of
        shape ``(n, 3)`` (x, y, z), the same in ``obs`` columns ``x``, ``y``,
        ``z``, ``obs["section"]`` (``Z00``, ``Z01``, ...; categorical) and a
        random three-level ``obs["celltype"]``; ``var`` with ``gene_symbol``,
        ``is_sv``, ``is_du`` and ``pattern`` (``z``, ``xyz``, ``du`` or
        ``none``); ``uns["simulation"]`` holds the parameters.
    """
    import anndata as ad

    if n_sections < 1:
        raise ValueError(f"n_sections must be at least 1, got {n_sections}.")
    if not (np.isfinite(z_spacing) and z_spacing > 0):
        raise ValueError(f"z_spacing must be a finite number > 0, got {z_spacing!r}.")
    if n_z + n_xyz + n_du > n_genes:
        raise ValueError("n_z + n_xyz + n_du must not exceed n_genes.")
    rng = np.random.default_rng(seed)
    plane = grid_coords(spots_per_section, geometry, seed)
    m = len(plane)
    level = np.repeat(np.arange(n_sections), m)
    xyz = np.c_[np.tile(plane, (n_sections, 1)), level * float(z_spacing)]
    n = len(xyz)
    p_of = rng.integers(isoforms[0], isoforms[1] + 1, n_genes)
    pattern = np.array(["none"] * n_genes, dtype=object)
    pattern[:n_z], pattern[n_z:n_z + n_xyz], pattern[n_z + n_xyz:n_z + n_xyz + n_du] = "z", "xyz", "du"
    pattern = pattern[rng.permutation(n_genes)]
    celltype = rng.choice(["ct0", "ct1", "ct2"], n)
    depth_frac = level / max(n_sections - 1, 1)  # 0 .. 1 through the stack
    unit = (xyz - xyz.min(axis=0)) / (np.ptp(xyz, axis=0).max() + 1e-9)
    blocks = []
    for g in range(n_genes):
        p = int(p_of[g])
        eta = np.broadcast_to(rng.normal(0, 0.5, p), (n, p)).copy()
        b = rng.normal(0, 1, p)
        b -= b.mean()
        if pattern[g] == "z":
            f = depth_frac if rng.random() < 0.5 else np.cos(np.pi * depth_frac)
        elif pattern[g] == "xyz":
            if rng.random() < 0.5:
                direction = rng.normal(size=3)
                f = unit @ (direction / np.linalg.norm(direction))
            else:
                centre = rng.uniform(0.2, 0.8, 3) * np.ptp(unit, axis=0)
                f = np.exp(-np.sum((unit - centre) ** 2, axis=1) / (2 * 0.25**2))
        elif pattern[g] == "du":
            f = (celltype == "ct1").astype(float)
        else:
            f = None
        if f is not None:
            f = np.asarray(f, dtype=np.float64)
            f = (f - f.mean()) / (f.std() + 1e-12) if pattern[g] != "du" else f
            eta += effect * np.outer(f, b)
        depth = mean_depth * rng.lognormal(0.0, 0.5)
        totals = rng.poisson(depth * rng.lognormal(0.0, 0.2, n))
        blocks.append(rng.multinomial(totals, _softmax(eta)))
    counts = np.concatenate(blocks, axis=1).astype(np.float32)
    names = [f"gene{g:04d}" for g in range(n_genes)]
    is_sv = np.isin(pattern, ["z", "xyz"])
    var = pd.DataFrame({"gene_symbol": np.repeat(names, p_of), "is_sv": np.repeat(is_sv, p_of),
                        "is_du": np.repeat(pattern == "du", p_of), "pattern": np.repeat(pattern.astype(str), p_of)},
                       index=[f"{g}-iso{k}" for g, p in zip(names, p_of) for k in range(p)])
    sections = [f"Z{s:02d}" for s in range(n_sections)]
    obs = pd.DataFrame({"section": pd.Categorical(np.array(sections)[level], categories=sections),
                        "x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "celltype": pd.Categorical(celltype)},
                       index=[f"spot{i:06d}" for i in range(n)])
    x = scipy.sparse.csr_matrix(counts) if sparse else counts
    adata = ad.AnnData(X=x.copy(), obs=obs, var=var)
    adata.layers["counts"] = x
    adata.obsm["spatial"] = np.ascontiguousarray(xyz)
    adata.uns["simulation"] = {"n_sections": int(n_sections), "spots_per_section": int(m), "n_genes": int(n_genes),
                               "n_z": int(n_z), "n_xyz": int(n_xyz), "n_du": int(n_du),
                               "isoforms": [int(v) for v in isoforms], "geometry": geometry,
                               "z_spacing": float(z_spacing), "mean_depth": float(mean_depth),
                               "effect": float(effect), "seed": int(seed)}
    return adata


def smooth_fields(xy: np.ndarray, n_fields: int, length_scale: float, rng: np.random.Generator,
                  n_features: int = 256) -> np.ndarray:
    """``(n, n_fields)`` smooth random fields over the spots, each standardised to mean 0 and sd 1.

    Each field is a draw of a Gaussian process with a squared-exponential
    kernel, approximated by ``n_features`` random Fourier features; the
    coordinates are scaled to the unit square first, so ``length_scale`` is a
    fraction of the section's largest extent (small: patchy, large: gradients).
    """
    if length_scale <= 0:
        raise ValueError(f"the length scale must be positive, got {length_scale}.")
    span = np.ptp(xy, axis=0).max() + 1e-9
    z = (xy - xy.min(axis=0)) / span
    freq = rng.normal(0.0, 1.0 / length_scale, (n_fields, n_features, 2))
    phase = rng.uniform(0.0, 2 * np.pi, (n_fields, 1, n_features))
    amp = rng.normal(0.0, 1.0, (n_fields, n_features, 1))
    f = (np.cos(np.einsum("nd,tmd->tnm", z, freq) + phase) @ amp)[..., 0].T  # n x n_fields
    return (f - f.mean(axis=0)) / (f.std(axis=0) + 1e-12)


def _type_profiles(n_types: int, n_genes: int, rng: np.random.Generator, marker_frac: float = 0.4) -> np.ndarray:
    """``(n_types, n_genes)`` relative expression, each row with mean 1 (the same total for every type).

    A shared log-normal baseline, type-specific log-normal variation, and a
    disjoint set of marker genes per type (``marker_frac`` of all genes split
    among the types) raised several-fold in that type.
    """
    log_mu = rng.normal(0.0, 1.0, n_genes)[None, :] + rng.normal(0.0, 0.3, (n_types, n_genes))
    n_markers = max(1, int(marker_frac * n_genes) // n_types)
    genes = rng.permutation(n_genes)
    for t in range(n_types):
        marked = genes[t * n_markers:(t + 1) * n_markers]
        log_mu[t, marked] += rng.normal(1.5, 0.3, len(marked))
    prof = np.exp(log_mu)
    return prof / prof.mean(axis=1, keepdims=True)


def _gene_totals(mean: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson (``noise == 0``) or negative binomial counts with variance ``mean + noise * mean**2``."""
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}.")
    if noise == 0:
        return rng.poisson(mean)
    return rng.poisson(mean * rng.gamma(1.0 / noise, noise, mean.shape))


def simulate_mixture(
    n_spots: int = 2000,
    n_genes: int = 300,
    n_types: int = 4,
    *,
    isoforms: tuple[int, int] = (2, 4),
    du_fraction: float = 0.2,
    smoothness: float = 0.2,
    noise: float = 0.1,
    depth: float = 10.0,
    du_effect: float = 1.5,
    sharpness: float = 2.0,
    seed: int = 0,
    geometry: str = "grid",
):
    """Simulate spots that are mixtures of cell types, with type-specific isoform usage.

    Every cell type has a gene-expression profile and an isoform usage per
    gene; a spot holds a spatially smooth mixture of the types. Its expected
    gene count is ``depth * size_s * sum_t p_st * profile_tg``, its counts are
    Poisson / negative binomial around that, and each gene's count is split
    into isoforms by a multinomial with the spot's usage, the
    expression-weighted mixture of the types' usages::

        u_sgk = sum_t p_st profile_tg u_tgk / sum_t p_st profile_tg

    For the DU genes (``du_fraction`` of them) ``u_tgk`` differs by type, so
    the spot's usage follows its composition; for the other (null) genes it
    is the same in every type and the spot's usage is that one usage.

    Parameters
    ----------
    n_spots, n_genes, n_types
        Section size and number of cell types (named ``type_1`` ...).
    isoforms
        Inclusive range of isoforms per gene.
    du_fraction
        Fraction of genes whose isoform usage depends on the cell type.
    smoothness
        Length scale of the random fields behind the proportions, as a
        fraction of the section's largest extent (larger: smoother).
    noise
        Overdispersion of the gene counts (variance ``mu + noise * mu**2``);
        0 gives Poisson counts.
    depth
        Mean count per gene per spot (before the per-spot size factor, a
        log-normal with sd 0.2 kept in ``obs["size_factor"]``).
    du_effect
        SD of the type-specific shifts of the isoform logits of DU genes.
    sharpness
        Proportions are ``softmax(sharpness * f_t)`` of standardised smooth
        fields ``f_t``: larger values give purer spots.
    seed
        Random seed; the same arguments give the same data.
    geometry
        ``grid``, ``hex`` or ``random`` (see :func:`grid_coords`).

    Returns
    -------
    adata, reference
        ``adata`` (spots x isoforms): integer ``layers["counts"]`` (CSR,
        int32; ``X`` a float32 copy), ``obsm["spatial"]``,
        ``obsm["proportions"]`` (DataFrame, one column per type, rows sum to
        1), ``obs["celltype"]`` (the dominant type, categorical),
        ``obs["size_factor"]``, ``var["gene_symbol"]``, ``var["du_truth"]``
        (the isoform's gene has type-dependent usage),
        ``varm["type_usage"]`` (DataFrame: each isoform's share of its gene in
        each type), ``uns["cell_types"]`` and ``uns["simulation"]`` (the
        parameters). ``reference`` (types x genes): each type's mean
        gene-level expression per cell, as averaged from 50 simulated cells
        of that type (so not exact), on the scale of ``depth``.
    """
    import anndata as ad

    if n_types < 2:
        raise ValueError(f"a mixture needs at least 2 cell types, got {n_types}.")
    if not 0.0 <= du_fraction <= 1.0:
        raise ValueError(f"du_fraction must be in [0, 1], got {du_fraction}.")
    if depth <= 0:
        raise ValueError(f"depth must be positive, got {depth}.")
    if isoforms[0] < 1 or isoforms[1] < isoforms[0]:
        raise ValueError(f"isoforms must be a range (low, high) with 1 <= low <= high, got {isoforms}.")
    rng = np.random.default_rng(seed)
    xy = grid_coords(n_spots, geometry, seed)
    n = len(xy)
    types = [f"type_{t + 1}" for t in range(n_types)]
    props = _softmax(sharpness * smooth_fields(xy, n_types, smoothness, rng))  # n x T
    profiles = _type_profiles(n_types, n_genes, rng)  # T x G, rows with mean 1
    size = rng.lognormal(0.0, 0.2, n)
    p_of = rng.integers(isoforms[0], isoforms[1] + 1, n_genes)
    is_du = np.zeros(n_genes, bool)
    is_du[rng.permutation(n_genes)[: int(round(du_fraction * n_genes))]] = True
    gene_mean = depth * size[:, None] * (props @ profiles)  # n x G
    totals = _gene_totals(gene_mean, noise, rng)
    blocks, usages = [], []
    for g in range(n_genes):
        p = int(p_of[g])
        eta = np.broadcast_to(rng.normal(0.0, 0.5, p), (n_types, p))
        if is_du[g]:
            eta = eta + du_effect * rng.normal(0.0, 1.0, (n_types, p))
        usage = _softmax(eta)  # T x p
        weight = props * profiles[:, g]  # n x T: each type's share of the gene's expression in the spot
        spot_usage = (weight @ usage) / weight.sum(axis=1, keepdims=True)
        blocks.append(rng.multinomial(totals[:, g], spot_usage))
        usages.append(usage.T)
    counts = scipy.sparse.csr_matrix(np.concatenate(blocks, axis=1).astype(np.int32))
    names = [f"gene{g:04d}" for g in range(n_genes)]
    iso_names = [f"{g}-iso{k}" for g, p in zip(names, p_of) for k in range(p)]
    var = pd.DataFrame({"gene_symbol": np.repeat(names, p_of), "du_truth": np.repeat(is_du, p_of)}, index=iso_names)
    obs_names = [f"spot{i:05d}" for i in range(n)]
    obs = pd.DataFrame({"celltype": pd.Categorical(np.array(types)[props.argmax(axis=1)], categories=types),
                        "size_factor": size}, index=obs_names)
    adata = ad.AnnData(X=counts.astype(np.float32), obs=obs, var=var)
    adata.layers["counts"] = counts
    adata.obsm["spatial"] = xy
    adata.obsm["proportions"] = pd.DataFrame(props, index=obs_names, columns=types)
    adata.varm["type_usage"] = pd.DataFrame(np.concatenate(usages, axis=0), index=iso_names, columns=types)
    adata.uns["cell_types"] = list(types)
    adata.uns["simulation"] = {"n_spots": int(n), "n_genes": int(n_genes), "n_types": int(n_types),
                               "isoforms": [int(v) for v in isoforms], "du_fraction": float(du_fraction),
                               "smoothness": float(smoothness), "noise": float(noise), "depth": float(depth),
                               "du_effect": float(du_effect), "sharpness": float(sharpness), "seed": int(seed),
                               "geometry": geometry}
    n_cells = 50
    signature = rng.poisson(depth * profiles * rng.lognormal(0.0, 0.05, profiles.shape) * n_cells) / n_cells
    reference = ad.AnnData(X=signature.astype(np.float64), obs=pd.DataFrame({"n_cells": n_cells}, index=types),
                           var=pd.DataFrame(index=names))
    return adata, reference


def write_example(path: str | os.PathLike, kind: str = "section", *, n_spots: int = 900, n_genes: int = 100,
                  n_sections: int = 3, seed: int = 0) -> Path:
    """Write a simulated example input: what ``spatialscale simulate`` writes.

    Parameters
    ----------
    path
        ``section`` and ``raster``: the ``.h5ad`` to write; ``cohort``: a folder
        (section files and ``manifest.csv``); ``sections``: one ``.h5ad`` of
        several sections, ``obs["library_id"]`` naming each spot's section and
        ``obs["condition"]`` constant within a section (as squidpy keeps them);
        ``mixture``: the ``.h5ad`` of the spots, with the cell-type reference
        written next to it as ``<stem>.reference.h5ad``.
    kind
        ``section`` (obs ``region``, ``celltype``, ``rbp``; SV genes and genes
        whose usage depends on ``celltype``), ``raster`` (bins of a square grid
        of about ``n_spots`` bins, obs ``array_row``, ``array_col``,
        ``celltype``), ``cohort``, ``sections`` or ``mixture`` (spots that
        mix four cell types, :func:`simulate_mixture`).
    n_spots, n_genes, n_sections, seed
        Size and seed.

    Returns
    -------
    Path
        What was written (the manifest for ``cohort``, the spots' ``.h5ad``
        for ``mixture``).
    """
    import anndata as ad

    out = Path(path)
    reference = None
    if kind == "section":
        adata = simulate_section(n_spots, n_genes, n_sv=max(1, n_genes // 5), n_du=max(1, n_genes // 10), seed=seed)
    elif kind == "raster":
        side = max(4, int(round(np.sqrt(n_spots / 0.7))))
        adata = simulate_raster((side, side), n_genes, n_sv=max(1, n_genes // 5), mean_depth=4.0, seed=seed)
    elif kind == "cohort":
        manifest, _ = simulate_cohort(out, n_sections, n_genes, n_shared=max(1, n_genes // 10),
                                      n_specific=max(1, n_genes // 20), spots=(n_spots, int(n_spots * 1.5)),
                                      seed=seed)
        return manifest
    elif kind == "sections":
        parts = {}
        for s in range(n_sections):
            part = simulate_section(n_spots, n_genes, n_sv=max(1, n_genes // 5), geometry=("grid", "hex")[s % 2],
                                    seed=seed * 1000 + s + 1)
            part.obs_names = [f"S{s + 1}-{i}" for i in part.obs_names]
            part.obs["condition"] = "control" if s % 2 == 0 else "treated"
            parts[f"S{s + 1}"] = part
        adata = ad.concat(parts, label="library_id", merge="same")
        adata.obs["library_id"] = adata.obs["library_id"].astype("category")
        adata.obs["condition"] = adata.obs["condition"].astype("category")
    elif kind == "mixture":
        adata, reference = simulate_mixture(n_spots, n_genes, seed=seed)
    else:
        raise ValueError(f"unknown example kind {kind!r}; choose section, raster, cohort, sections or mixture.")
    if out.suffix != ".h5ad":
        raise ValueError(f"write the {kind} example to an .h5ad file, got {out}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out)
    if reference is not None:
        reference.write_h5ad(out.with_suffix(".reference.h5ad"))
    return out
