"""Plots of isoform stores and results (matplotlib, ``pip install spatialscale[plot]``).

Every function draws on the Axes it is given (``ax=``) or on a new figure,
and returns what it drew on, so that a plot can be placed in a layout of
one's own and adjusted afterwards:

- :func:`isoform_ratios`: a gene's isoform ratios in space, one panel per
  isoform (spots as points, raster bins as an image);
- :func:`qq`: a QQ plot of p-values with the genomic inflation factor
  (:func:`inflation`);
- :func:`volcano`: effect or statistic against ``-log10 p`` of SV or DU
  results, significant genes highlighted;
- :func:`sections` and :func:`section_counts`: a cohort's per-section
  against combined evidence (results of a cohort run, see
  :func:`spatialscale.cohort.run_cohort`).

matplotlib is imported only when a plot is drawn: ``spatialscale`` and this
module import without it.
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from spatialscale.errors import InputError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from spatialscale.store import IsoformStore

__all__ = ["gene_ratios", "inflation", "isoform_ratios", "qq", "qq_points", "section_counts", "sections", "volcano"]

#: p-value variables a plot picks by default, in this order (cohort results have all of their section's too)
PVALUE_VARIABLES = ("combined_pvalue", "sv_pvalue", "du_pvalue")


# --------------------------------------------------------------------------- helpers
def _pyplot() -> Any:
    """``matplotlib.pyplot``, or an ImportError that says how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("spatialscale.pl needs matplotlib: pip install spatialscale[plot]") from exc
    return plt


def _new_axes(ax: Axes | None, figsize: tuple[float, float] = (4.8, 4.2)) -> Axes:
    """``ax``, or the Axes of a new figure."""
    plt = _pyplot()
    if ax is not None:
        return ax
    return plt.subplots(figsize=figsize)[1]


def _neglog10(p: np.ndarray) -> np.ndarray:
    """``-log10 p``; p-values of 0 (underflow) are drawn at the smallest positive p-value given."""
    p = np.asarray(p, dtype=np.float64)
    positive = p[p > 0]
    floor = positive.min() if positive.size else np.finfo(np.float64).tiny
    return -np.log10(np.maximum(p, floor))


def _check_pvalues(p: np.ndarray, name: str) -> np.ndarray:
    """The finite entries of ``p`` (float64), which must lie in [0, 1]."""
    p = np.asarray(p, dtype=np.float64).ravel()
    p = p[np.isfinite(p)]
    if np.any((p < 0) | (p > 1)):
        raise InputError(f"{name} has values outside [0, 1]; is it a p-value?")
    return p


def _pvalue_array(ds: xr.Dataset | xr.DataArray, variable: str | None) -> xr.DataArray:
    """The p-values to plot: ``ds[variable]``, the first of :data:`PVALUE_VARIABLES` in ``ds``, or ``ds`` itself."""
    if isinstance(ds, xr.DataArray):
        if variable is not None:
            raise InputError("variable= selects a variable of a Dataset; a DataArray is plotted as it is.")
        return ds if ds.name is not None else ds.rename("pvalue")
    if not isinstance(ds, xr.Dataset):
        return xr.DataArray(np.asarray(ds, dtype=np.float64).ravel(), dims=["gene"], name="pvalue")
    if variable is None:
        variable = next((v for v in PVALUE_VARIABLES if v in ds), None)
        if variable is None:
            raise InputError(f"the results have none of {list(PVALUE_VARIABLES)}; pass variable= (variables: "
                             f"{sorted(map(str, ds.data_vars))}).")
    elif variable not in ds:
        raise InputError(f"the results have no variable {variable!r} (variables: {sorted(map(str, ds.data_vars))}).")
    return ds[variable]


def _select(da: xr.DataArray, **labels: Any) -> xr.DataArray:
    """``da`` at the given labels (one label or a list each) of its dimensions; ``None`` keeps a dimension."""
    for dim, value in labels.items():
        if value is None:
            continue
        if dim not in da.dims:
            raise InputError(f"{da.name} has no {dim} dimension; leave out {dim}=.")
        known = [str(v) for v in da[dim].values]
        wanted = [value] if isinstance(value, str) or np.ndim(value) == 0 else list(value)
        missing = [v for v in wanted if str(v) not in known]
        if missing:
            raise InputError(f"{dim} {missing} not in the results ({dim}s: {known}).")
        da = da.sel({dim: value})
    return da


def _series(da: xr.DataArray) -> Iterator[tuple[str | None, np.ndarray]]:
    """One ``(label, values)`` per combination of ``da``'s dimensions other than ``gene`` (label None: only one)."""
    other = [d for d in da.dims if d != "gene"]
    if "gene" not in da.dims or not other:
        yield None, np.asarray(da.values, dtype=np.float64).ravel()
        return
    for index in itertools.product(*(range(da.sizes[d]) for d in other)):
        sub = da.isel(dict(zip(other, index)))
        label = ", ".join(str(da[d].values[i]) if d in da.coords else f"{d} {i}" for d, i in zip(other, index))
        yield label, np.asarray(sub.values, dtype=np.float64).ravel()


def _one_covariate(ds: xr.Dataset, name: str, covariate: Any) -> Any:
    """The covariate a one-covariate plot of ``ds[name]`` draws: as given, or the only one."""
    if covariate is not None or "covariate" not in ds[name].dims:
        return covariate
    names = [str(v) for v in ds["covariate"].values]
    if len(names) != 1:
        raise InputError(f"this plot draws one covariate; pass covariate= one of {names}.")
    return names[0]


# --------------------------------------------------------------------------- isoform ratios
def _gene_isoforms(store: IsoformStore, gene: str) -> list[str]:
    """Names of the gene's isoform columns, or an InputError naming close matches."""
    genes = store.genes
    if gene not in genes.index:
        close = difflib.get_close_matches(str(gene), [str(g) for g in genes.index], n=5)
        hint = f" Close matches: {close}." if close else ""
        raise InputError(f"gene {gene!r} is not in the store {store.path} (ingest drops genes left with fewer than "
                         f"two isoforms).{hint}")
    row = genes.loc[gene]
    return [str(v) for v in store.isoforms.index[int(row["start"]) : int(row["stop"])]]


def _pick_isoforms(gene: str, names: list[str], isoforms: Any) -> list[int]:
    """Column positions (within the gene) of the isoforms to draw: names or positions, all by default."""
    if isoforms is None:
        return list(range(len(names)))
    chosen = [isoforms] if isinstance(isoforms, str | int | np.integer) else list(isoforms)
    out = []
    for iso in chosen:
        if isinstance(iso, int | np.integer) and not isinstance(iso, bool) and -len(names) <= iso < len(names):
            out.append(int(iso) % len(names))
        elif str(iso) in names:
            out.append(names.index(str(iso)))
        else:
            raise InputError(f"gene {gene!r} has no isoform {iso!r} (its isoforms: {names}).")
    if not out:
        raise InputError("isoforms= selects no isoform.")
    return out


def gene_ratios(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Isoform ratios ``count / gene total`` per spot (NaN where the total is 0) and the spots with counts."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=1)
    covered = total > 0
    ratios = np.full(counts.shape, np.nan)
    ratios[covered] = counts[covered] / total[covered, None]
    return ratios, covered


def _panel_axes(ax: Any, axes: Any, n: int, ncols: int | None, panel_size: float) -> tuple[list, bool]:
    """One Axes per panel (given, or a new grid of them) and whether they are new."""
    if ax is not None and axes is not None:
        raise InputError("give ax= or axes=, not both.")
    given = axes if axes is not None else ax
    if given is not None:
        flat = list(np.ravel(np.asarray(given, dtype=object)))
        if len(flat) != n:
            raise InputError(f"{n} isoform panel(s) need {n} Axes; got {len(flat)}.")
        return flat, False
    plt = _pyplot()
    ncols = max(1, min(n, ncols or 4))
    nrows = math.ceil(n / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(panel_size * ncols + 1.0, panel_size * nrows), squeeze=False)
    for extra in grid.ravel()[n:]:
        extra.remove()
    return list(grid.ravel()[:n]), True


def _layout(store: IsoformStore, gene: str) -> dict[str, Any]:
    """Where a gene's spots are drawn and its counts there: points (``xy``) or a raster's observed bins."""
    from spatialscale.store import read_count_columns

    row = store.genes.loc[gene]
    if store.kernel_kind == "fft":  # the observed bins only: a raster's grid may hold millions of empty bins
        params = store.kernel_attrs
        spacing = params.get("spacing", (1.0, 1.0))
        return {"kind": "raster", "bins": store.grid_index(),
                "shape": (int(params["shape"][0]), int(params["shape"][1])),
                "spacing": (float(spacing[0]), float(spacing[1])),
                "counts": read_count_columns(store.path, int(row["start"]), int(row["stop"]), grid=False)}
    xy = store.coords()
    if xy is None:
        raise InputError(f"the store {store.path} has no spot coordinates (obsm/spatial) to draw.")
    return {"kind": "points", "xy": xy, "counts": store.gene_counts(gene)}


def _draw_points(ax: Axes, xy: np.ndarray, ratio: np.ndarray, covered: np.ndarray, *, cmap: Any, norm: Any,
                 size: float, missing_color: str | None) -> Any:
    """Spots with counts coloured by ratio; the others in ``missing_color`` (left out with None)."""
    if missing_color is not None and not covered.all():
        ax.scatter(xy[~covered, 0], xy[~covered, 1], s=size, c=missing_color, linewidths=0, gid="no counts")
    return ax.scatter(xy[covered, 0], xy[covered, 1], c=ratio[covered], s=size, cmap=cmap, norm=norm, linewidths=0,
                      gid="ratio")


def _draw_bins(ax: Axes, layout: dict[str, Any], ratio: np.ndarray, covered: np.ndarray, *, cmap: Any, norm: Any,
               missing_color: str | None) -> Any:
    """A raster's bins as an image (row 0 at the bottom, as the store's coordinates): ratios where the gene has
    counts, ``missing_color`` at observed bins without counts, nothing at bins never observed."""
    from matplotlib.colors import ListedColormap

    (ny, nx), (dy, dx), bins = layout["shape"], layout["spacing"], layout["bins"]
    extent = (-dx / 2, (nx - 0.5) * dx, -dy / 2, (ny - 0.5) * dy)
    if missing_color is not None and not covered.all():
        empty = np.ma.masked_all(ny * nx)
        empty[bins[~covered]] = 0.0
        ax.imshow(empty.reshape(ny, nx), cmap=ListedColormap([missing_color]), origin="lower", extent=extent,
                  interpolation="nearest", gid="no counts")
    image = np.ma.masked_all(ny * nx)
    image[bins[covered]] = ratio[covered]
    return ax.imshow(image.reshape(ny, nx), cmap=cmap, norm=norm, origin="lower", extent=extent,
                     interpolation="nearest", gid="ratio")


def _colorbar(panels: list, gene: str, cmap: Any, norm: Any) -> Any:
    """One colorbar of the ratio scale for all panels."""
    from matplotlib.cm import ScalarMappable

    return panels[0].figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=panels, shrink=0.8,
                                     label=f"{gene}: isoform ratio")


def isoform_ratios(
    store: IsoformStore | str | os.PathLike,
    gene: str,
    *,
    isoforms: Sequence[str | int] | str | int | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    axes: Sequence[Axes] | None = None,
    cmap: str | Any = "viridis",
    point_size: float | None = None,
    ncols: int | None = None,
    missing_color: str | None = "lightgrey",
    colorbar: bool = True,
    panel_size: float = 3.2,
    ingest: dict[str, Any] | None = None,
) -> np.ndarray:
    """Draw a gene's isoform ratios in space, one panel per isoform.

    The ratio of an isoform in a spot is its count over the gene's total
    count there.  Spots (or raster bins) where the gene has no counts have no
    ratio: they are drawn in ``missing_color`` (or left out with ``None``).
    A raster store (``kernel="fft"``) is drawn as an image of its grid, with
    bins never observed left blank; other stores as points at their
    coordinates.  All panels share one colour scale from 0 to 1.

    Parameters
    ----------
    store
        An isoform store or its path, or an AnnData input (object, ``.h5ad``
        or zarr), ingested first into a temporary store with the ``ingest``
        keywords (as the tests do).
    gene
        The gene (a name in ``store.genes``).
    isoforms
        The isoforms to draw: names or positions within the gene (default:
        all, in store order).
    ax, axes
        Axes to draw on, one per isoform drawn (give one of the two; a single
        Axes for a single isoform).  Default: a new figure with ``ncols``
        panels a row.
    cmap
        Colormap of the ratios.
    point_size
        Marker area of a spot (points^2); default from the number of spots.
    ncols
        Panels per row of a new figure (default: up to 4).
    missing_color
        Colour of spots without counts of the gene; ``None`` leaves them out.
    colorbar
        Add one colorbar shared by the panels.
    panel_size
        Size (inches) of one panel of a new figure.
    ingest
        :func:`~spatialscale.store.ingest` keywords for an AnnData input
        (``{"layer": "X"}``...).

    Returns
    -------
    numpy.ndarray
        The Axes, one per isoform drawn, each titled with the isoform's name.

    Raises
    ------
    InputError
        If the gene is not in the store (naming close matches), an isoform
        is not the gene's, the number of Axes given does not match, or the
        store has no coordinates.
    """
    _pyplot()  # matplotlib, or how to install it
    from matplotlib.colors import Normalize

    from spatialscale.families.common import input_store
    from spatialscale.store import IsoformStore

    with input_store(store, ingest) as opened:
        if not isinstance(opened, IsoformStore):
            raise InputError("isoform_ratios draws one section: pass a section's store (cohort.store(section_id)).")
        names = _gene_isoforms(opened, gene)
        picked = _pick_isoforms(gene, names, isoforms)
        layout = _layout(opened, gene)
    panels, new = _panel_axes(ax, axes, len(picked), ncols, panel_size)
    norm = Normalize(vmin=0.0, vmax=1.0)
    ratios, covered = gene_ratios(layout["counts"])
    for panel, k in zip(panels, picked):
        if layout["kind"] == "raster":
            _draw_bins(panel, layout, ratios[:, k], covered, cmap=cmap, norm=norm, missing_color=missing_color)
        else:
            size = point_size if point_size is not None else float(np.clip(8000.0 / len(covered), 0.5, 40.0))
            _draw_points(panel, layout["xy"], ratios[:, k], covered, cmap=cmap, norm=norm, size=size,
                         missing_color=missing_color)
        panel.set_title(names[k])
        panel.set_aspect("equal")
        panel.set_xticks([])
        panel.set_yticks([])
    if colorbar:
        _colorbar(panels, gene, cmap, norm)
    if new:
        panels[0].figure.suptitle(gene)
    out = np.empty(len(panels), dtype=object)
    out[:] = panels
    return out


# --------------------------------------------------------------------------- QQ plot
def inflation(pvalues: Any) -> float:
    """Genomic inflation factor ``lambda_GC`` of a set of p-values.

    ``lambda_GC = median(chi2_1.isf(p)) / chi2_1.ppf(0.5)``: the median of
    the p-values' 1-df chi-square quantiles over its expected value under a
    uniform null (``0.4549``).  About 1 for calibrated p-values when most
    genes are null; above 1 for inflated, below 1 for conservative ones.

    Parameters
    ----------
    pvalues
        P-values (any shape); NaN entries are ignored.

    Returns
    -------
    float
        ``lambda_GC``; NaN when there is no finite p-value.

    Raises
    ------
    InputError
        If a value lies outside [0, 1].
    """
    from scipy import stats

    p = _check_pvalues(pvalues, "pvalues")
    if p.size == 0:
        return float("nan")
    return float(np.median(stats.chi2.isf(p, 1)) / stats.chi2.ppf(0.5, 1))


def qq_points(pvalues: Any) -> tuple[np.ndarray, np.ndarray]:
    """Expected and observed ``-log10 p`` of a QQ plot, largest first.

    The expected values are the uniform quantiles ``(i - 0.5) / n``,
    ``i = 1..n``, of the ``n`` finite p-values; p-values of 0 are drawn at
    the smallest positive one.
    """
    p = np.sort(_check_pvalues(pvalues, "pvalues"))
    n = p.size
    return -np.log10((np.arange(1, n + 1) - 0.5) / n), _neglog10(p)


def _lambda_text(lam: float) -> str:
    return rf"$\lambda_{{GC}}$ = {lam:.3f}"


def qq(
    ds: xr.Dataset | xr.DataArray | Any,
    *,
    variable: str | None = None,
    covariate: str | Sequence[str] | None = None,
    section: str | Sequence[str] | None = None,
    ax: Axes | None = None,
    **plot_kw: Any,
) -> Axes:
    """QQ plot of p-values against the uniform distribution, with the genomic inflation factor.

    Draws the observed ``-log10 p`` (sorted) against the expected uniform
    quantiles (see :func:`qq_points`), the line ``y = x``, and
    ``lambda_GC`` (:func:`inflation`) of each series: in the title for one
    series, in the legend for several.  A series is drawn for each
    combination of the variable's dimensions other than ``gene``: DU
    results give one per covariate, per-section cohort p-values one per
    section, group p-values one per group.

    Parameters
    ----------
    ds
        Results (:func:`spatialscale.sv_test`, :func:`spatialscale.du_test`
        or a cohort run), or p-values as a DataArray or array.
    variable
        The p-value variable; default ``combined_pvalue`` (cohort results),
        else ``sv_pvalue``, else ``du_pvalue``.
    covariate, section
        Draw only these covariates / sections (a label or a list).
    ax
        Axes to draw on (default: a new figure).
    **plot_kw
        Passed to ``Axes.plot`` for the points (e.g. ``markersize``).

    Returns
    -------
    matplotlib.axes.Axes
        The QQ points are the lines with gid ``qq``, ``y = x`` the one with gid
        ``identity``.
    """
    da = _select(_pvalue_array(ds, variable), covariate=covariate, section=section)
    name = str(da.name)
    series = []
    for label, values in _series(da):
        p = _check_pvalues(values, name)
        if p.size:
            series.append((label, *qq_points(p), _lambda_text(inflation(p))))
    if not series:
        raise InputError(f"{name} has no finite p-value to draw.")
    ax = _new_axes(ax)
    kw = {"marker": ".", "linestyle": "none", **plot_kw}
    for label, expected, observed, text in series:
        ax.plot(expected, observed, label=text if label is None else f"{label} ({text})", gid="qq", **kw)
    top = max(max(e.max(), o.max()) for _, e, o, _ in series)
    ax.plot([0.0, top], [0.0, top], color="black", linestyle="--", linewidth=0.8, gid="identity", label="_y = x")
    ax.set_xlabel(r"expected $-\log_{10}$ p")
    ax.set_ylabel(rf"observed $-\log_{{10}}$ p ({name})")
    if len(series) == 1:
        label, text = series[0][0], series[0][-1]
        ax.set_title(f"{name}: {text}" if label is None else f"{name} ({label}): {text}")
    else:
        ax.set_title(name)
        ax.legend(frameon=False, fontsize="small")
    return ax


# --------------------------------------------------------------------------- volcano
def _kind(ds: xr.Dataset) -> str:
    """``sv`` or ``du``: which test the results hold."""
    for kind in ("sv", "du"):
        if f"{kind}_pvalue" in ds:
            return kind
    raise InputError(f"the results have neither sv_pvalue nor du_pvalue (variables: {sorted(map(str, ds.data_vars))})"
                     "; a volcano plot needs SV or DU results.")


def _effect(ds: xr.Dataset, name: str, *, covariate: Any, section: Any) -> tuple[np.ndarray, str]:
    """The x values of a volcano plot (one per gene) and their axis label."""
    da = _select(ds[name], covariate=covariate, section=section if "section" in ds[name].dims else None)
    label = name
    if "contrast" in da.dims:  # signed coefficient of the contrast with the largest magnitude
        pick = abs(da).fillna(-1.0).argmax("contrast")
        da = da.isel(contrast=pick)
        label = f"{name} (contrast of largest |{name}|)"
    if "section" in da.dims:
        da = da.median("section", skipna=True)
        label = f"median {label} over sections"
    extra = [d for d in da.dims if d != "gene"]
    if extra:
        raise InputError(f"{name} has dimension(s) {extra} beside gene; select one label of each (covariate=...).")
    return np.asarray(da.transpose("gene").values, dtype=np.float64), label


def _significance(ds: xr.Dataset, name: str, p: np.ndarray, **labels: Any) -> np.ndarray:
    """Each gene's adjusted p-value: ``<name>_adj`` where the results have it, else BH over the genes shown."""
    from spatialscale.stats.multitest import bh_adjust

    adj_name = f"{name}_adj"
    if adj_name in ds:
        adj = _select(ds[adj_name], **{k: v for k, v in labels.items() if k in ds[adj_name].dims})
        return np.asarray(adj.transpose("gene").values, dtype=np.float64)
    return bh_adjust(p)


def _volcano_data(ds: xr.Dataset, *, covariate: Any, section: Any, x: str | None) -> tuple:
    """What a volcano plot draws: p-value name, covariate, p-values, adjusted p-values, x values and x label."""
    kind = _kind(ds)
    per = f"{kind}_pvalue"
    cohort = "section" in ds[per].dims
    if section is not None and not cohort:
        raise InputError("section= selects a section of cohort results; these results have no section dimension.")
    name = "combined_pvalue" if cohort and section is None and "combined_pvalue" in ds else per
    covariate = _one_covariate(ds, name, covariate)
    labels = {"covariate": covariate, "section": section if "section" in ds[name].dims else None}
    pv = _select(ds[name], **labels)
    if [d for d in pv.dims if d != "gene"]:
        raise InputError(f"{name} has dimensions {list(pv.dims)}; select one label of each beside gene"
                         + (" (section=...)." if "section" in pv.dims else "."))
    p = np.asarray(pv.transpose("gene").values, dtype=np.float64)
    _check_pvalues(p, name)
    if x is None:
        x = "beta" if kind == "du" and "beta" in ds else f"{kind}_statistic"
    if x not in ds:
        raise InputError(f"the results have no variable {x!r} (variables: {sorted(map(str, ds.data_vars))}).")
    xs, xlabel = _effect(ds, x, covariate=covariate if "covariate" in ds[x].dims else None, section=section)
    return name, covariate, p, _significance(ds, name, p, **labels), xs, xlabel


def volcano(
    ds: xr.Dataset,
    *,
    covariate: str | None = None,
    section: str | None = None,
    x: str | None = None,
    alpha: float = 0.05,
    label_top: int = 0,
    ax: Axes | None = None,
    **scatter_kw: Any,
) -> Axes:
    """Volcano plot: each gene's effect or statistic against ``-log10`` of its p-value.

    What is drawn, by default:

    - SV results: ``sv_statistic`` against ``sv_pvalue``;
    - DU results: for one covariate, ``beta`` when the results have it (a
      GLMM fit merged in; a gene has one coefficient per logit contrast,
      so its signed coefficient of largest magnitude, a log-odds change
      per unit of the covariate), else ``du_statistic``, against
      ``du_pvalue``;
    - cohort results: with ``section``, that section's results as above;
      without, ``combined_pvalue`` against the statistic's median over the
      sections that tested the gene.

    Genes whose adjusted p-value (the results' ``<p>_adj``, else
    Benjamini-Hochberg over the genes drawn) is below ``alpha`` are
    highlighted, with a dashed line at the largest of their p-values.
    Genes without a p-value or an x value are left out.

    Parameters
    ----------
    ds
        Results of :func:`spatialscale.sv_test` or :func:`spatialscale.du_test`
        (of a section or a cohort).
    covariate
        DU: the covariate (may be left out when there is one).
    section
        Cohort results: draw this section's results.
    x
        The variable on the x axis instead of the default (over ``gene``,
        or with ``covariate``, ``contrast`` or ``section`` dimensions reduced
        as above).
    alpha
        Significance level of the adjusted p-values.
    label_top
        Label this many genes of smallest p-value with their names.
    ax
        Axes to draw on (default: a new figure).
    **scatter_kw
        Passed to ``Axes.scatter`` (e.g. ``s``).

    Returns
    -------
    matplotlib.axes.Axes
        Not significant genes are the collection with gid ``not significant``,
        significant ones the one with gid ``significant``.
    """
    name, covariate, p, adj, xs, xlabel = _volcano_data(ds, covariate=covariate, section=section, x=x)
    genes = np.asarray(ds["gene"].values).astype(str)
    ok = np.isfinite(p) & np.isfinite(xs)
    ys = _neglog10(np.where(ok, p, 1.0))
    sig = ok & (np.nan_to_num(adj, nan=1.0) < alpha)
    ax = _new_axes(ax)
    kw = {"s": 10, **scatter_kw}
    ax.scatter(xs[ok & ~sig], ys[ok & ~sig], c="lightgrey", gid="not significant", label="_not significant", **kw)
    ax.scatter(xs[sig], ys[sig], c="tab:red", gid="significant", label=f"adj. p < {alpha:g} ({int(sig.sum())})", **kw)
    if sig.any():
        ax.axhline(float(ys[sig].min()), color="black", linestyle="--", linewidth=0.8)
    for i in np.argsort(np.where(ok, p, np.inf), kind="stable")[: max(0, min(int(label_top), int(ok.sum())))]:
        ax.annotate(genes[i], (xs[i], ys[i]), textcoords="offset points", xytext=(3, 3), fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(rf"$-\log_{{10}}$ {name}")
    ax.set_title(name if covariate is None else f"{name}: {covariate}")
    ax.legend(frameon=False, fontsize="small")
    return ax


# --------------------------------------------------------------------------- cohorts
def _cohort_pvalues(ds: xr.Dataset, covariate: Any, group: str | None) -> tuple[xr.DataArray, xr.DataArray, str]:
    """Per-section p-values (section x gene), combined p-values (gene) and the per-section variable's name."""
    kind = _kind(ds)
    per = f"{kind}_pvalue"
    if "section" not in ds[per].dims or "combined_pvalue" not in ds:
        raise InputError("per-section against combined evidence needs cohort results (a section dimension and "
                         "combined_pvalue); run sv_test / du_test on a cohort.")
    covariate = _one_covariate(ds, per, covariate)
    sections = _select(ds[per], covariate=covariate)
    if group is None:
        combined = _select(ds["combined_pvalue"], covariate=covariate)
    else:
        if "group_combined_pvalue" not in ds:
            raise InputError("group= needs results of a cohort run with group_by.")
        combined = _select(ds["group_combined_pvalue"], group=group, covariate=covariate)
        sections = sections.sel(section=_group_sections(ds, group))
    return sections.transpose("section", "gene"), combined.transpose("gene"), per


def _group_sections(ds: xr.Dataset, group: str) -> list[str]:
    """The sections of one group of a cohort run with ``group_by``."""
    col = str(ds.attrs.get("group_by", ""))
    coord = next((c for c in (col, f"section_{col}") if c and c in ds.coords and ds[c].dims == ("section",)), None)
    if coord is None:
        raise InputError(f"the results do not say which sections form group {group!r} (no group_by coordinate).")
    return [str(s) for s, g in zip(ds["section"].values, ds[coord].values) if str(g) == str(group)]


def _combined_adjusted(ds: xr.Dataset, comb: np.ndarray, covariate: Any, group: str | None) -> np.ndarray:
    """Adjusted combined p-values (of a group): the results' own, else Benjamini-Hochberg of ``comb``."""
    from spatialscale.stats.multitest import bh_adjust

    name = "combined_pvalue_adj" if group is None else "group_combined_pvalue_adj"
    if name not in ds:
        return bh_adjust(comb)
    adj = _select(ds[name], group=group, covariate=_one_covariate(ds, name, covariate))
    return adj.transpose("gene").values.astype(np.float64)


def sections(
    ds: xr.Dataset,
    *,
    covariate: str | None = None,
    group: str | None = None,
    highlight: Sequence[str] | None = None,
    highlight_label: str | None = None,
    alpha: float = 0.05,
    ax: Axes | None = None,
    **scatter_kw: Any,
) -> Axes:
    """Per-section against combined evidence of a cohort: each gene's best single-section p against its combined p.

    Each gene is a point at ``-log10`` of its smallest p-value over the
    sections that tested it (x) and ``-log10`` of its combined p-value (y),
    with the line ``y = x``: genes above it gain from combining sections.
    (The smallest of several p-values is not itself a p-value: read the x
    axis as the strongest single section, not as a test.)

    Parameters
    ----------
    ds
        Results of a cohort run (:func:`spatialscale.sv_test` or
        :func:`spatialscale.du_test` on a cohort).
    covariate
        DU: the covariate (may be left out when there is one).
    group
        With results of a run with ``group_by``: the group's combined
        p-values against its own sections' p-values.
    highlight
        Genes to highlight (e.g. known true positives); default: genes whose
        combined adjusted p-value is below ``alpha``.
    highlight_label
        Legend entry of the highlighted genes.
    alpha
        Significance level of the default highlight.
    ax
        Axes to draw on (default: a new figure).
    **scatter_kw
        Passed to ``Axes.scatter`` (e.g. ``s``).

    Returns
    -------
    matplotlib.axes.Axes
        The highlighted genes are the collection with gid ``highlighted``, the
        others the one with gid ``other``; ``y = x`` the line with gid
        ``identity``.
    """
    per, combined, per_name = _cohort_pvalues(ds, covariate, group)
    genes = np.asarray(ds["gene"].values).astype(str)
    p_sec = per.values.astype(np.float64)
    best = np.min(np.where(np.isfinite(p_sec), p_sec, np.inf), axis=0)
    best[~np.isfinite(p_sec).any(axis=0)] = np.nan
    comb = combined.values.astype(np.float64)
    ok = np.isfinite(best) & np.isfinite(comb)
    if highlight is None:
        marked = np.nan_to_num(_combined_adjusted(ds, comb, covariate, group), nan=1.0) < alpha
        highlight_label = highlight_label or f"combined adj. p < {alpha:g}"
    else:
        marked = np.isin(genes, np.asarray(list(highlight)).astype(str))
        highlight_label = highlight_label or "highlighted"
    xs, ys = _neglog10(np.where(ok, best, 1.0)), _neglog10(np.where(ok, comb, 1.0))
    ax = _new_axes(ax)
    kw = {"s": 10, **scatter_kw}
    ax.scatter(xs[ok & ~marked], ys[ok & ~marked], c="grey", gid="other", label="other genes", **kw)
    ax.scatter(xs[ok & marked], ys[ok & marked], c="tab:orange", gid="highlighted",
               label=f"{highlight_label} ({int((ok & marked).sum())})", **kw)
    top = float(max(xs[ok].max(initial=0.0), ys[ok].max(initial=0.0))) * 1.05 or 1.0
    ax.plot([0.0, top], [0.0, top], color="black", linestyle="--", linewidth=0.8, gid="identity", label="_y = x")
    how = ds.attrs.get("combine", "")
    ax.set_xlabel(rf"$-\log_{{10}}$ best single-section {per_name}")
    ax.set_ylabel(r"$-\log_{10}$ combined p" + (f" ({how})" if how else ""))
    ax.set_title("per-section vs combined" + (f": {group}" if group is not None else ""))
    ax.legend(frameon=False, fontsize="small")
    return ax


def section_counts(
    ds: xr.Dataset,
    *,
    genes: Sequence[str] | None = None,
    covariate: str | None = None,
    alpha: float = 0.05,
    groups: bool = False,
    ax: Axes | None = None,
) -> Axes:
    """Bar chart of the genes each section finds on its own and the genes the combination finds.

    A bar per section counts the genes whose section-level adjusted p-value
    (``sv_pvalue_adj`` / ``du_pvalue_adj``) is below ``alpha``; the last bar
    (``combined``) those whose ``combined_pvalue_adj`` is; with ``groups``,
    one more bar per group of a ``group_by`` run.

    Parameters
    ----------
    ds
        Results of a cohort run.
    genes
        Count only these genes (e.g. known true positives); default: all.
    covariate
        DU: the covariate (may be left out when there is one).
    alpha
        Significance level.
    groups
        Add a bar per group (``group_combined_pvalue_adj``).
    ax
        Axes to draw on (default: a new figure).

    Returns
    -------
    matplotlib.axes.Axes
        With one bar (Rectangle patch) per section, then ``combined`` (and
        the groups), labelled on the x axis.
    """
    kind = _kind(ds)
    adj_name = f"{kind}_pvalue_adj"
    if adj_name not in ds or "section" not in ds[adj_name].dims or "combined_pvalue_adj" not in ds:
        raise InputError("section_counts needs cohort results (per-section adjusted p-values and "
                         "combined_pvalue_adj); run sv_test / du_test on a cohort.")
    covariate = _one_covariate(ds, adj_name, covariate)
    subset = None
    if genes is not None:
        wanted = [str(g) for g in genes]
        known = set(np.asarray(ds["gene"].values).astype(str))
        subset = [g for g in wanted if g in known]

    def count(da: xr.DataArray) -> np.ndarray:
        da = _select(da, covariate=covariate)
        if subset is not None:
            da = da.sel(gene=subset)
        return (da.fillna(1.0) < alpha).sum("gene").values
    names = [str(s) for s in ds["section"].values] + ["combined"]
    values = [*count(ds[adj_name].transpose("section", ...)).tolist(), int(count(ds["combined_pvalue_adj"]))]
    colours = ["tab:blue"] * (len(names) - 1) + ["tab:orange"]
    if groups and "group_combined_pvalue_adj" in ds:
        for g, v in zip(ds["group"].values, count(ds["group_combined_pvalue_adj"].transpose("group", ...))):
            names.append(f"combined: {g}")
            values.append(int(v))
            colours.append("tab:green")
    ax = _new_axes(ax, figsize=(max(4.0, 0.6 * len(names) + 1.5), 3.6))
    ax.bar(names, values, color=colours)
    ax.set_ylabel(f"genes at adj. p < {alpha:g}" + (f" (of {len(subset)})" if subset is not None else ""))
    if len(names) > 8 or max(len(n) for n in names) > 8:
        ax.tick_params(axis="x", labelrotation=40)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
    return ax
