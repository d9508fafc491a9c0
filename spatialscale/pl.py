"""Plots of isoform stores and results (matplotlib, ``pip install spatialscale[plot]``).

- :func:`isoform_ratios`: a gene's isoform ratios in space, one panel per
  isoform (spots as points, raster bins as an image);
- :func:`qq`: a QQ plot of p-values with a pointwise confidence band and the
  genomic inflation factor (:func:`inflation`, :func:`qq_points`,
  :func:`qq_band`);
- :func:`volcano`: effect or statistic against ``-log10 p`` of SV or DU
  results, significant genes highlighted and the top ones labelled;
- :func:`sections` and :func:`section_counts`: a cohort's per-section
  against combined evidence (results of a cohort run, see
  :func:`spatialscale.designs.cohort_run.run_cohort`).

Every plot of results takes the results Dataset or an AnnData annotated by
:func:`spatialscale.to_anndata` (``key=`` picks the results in
``adata.uns`` when there are several).  Like scanpy's plotting functions,
each draws on the Axes it is given (``ax=``) or on a new figure, takes
``show=`` and ``save=``, and returns what it drew on unless it showed the
figure.  Titles and axis labels name the test and its method (from the
results' ``test`` and ``method`` attributes) and, for differential usage,
the covariate.  Data without anything to draw (no finite p-value, no gene
left) gives a figure with a message in the axes and a warning, not an error.

matplotlib is imported only when a plot is drawn: ``spatialscale`` and this
module import without it.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from spatialscale.errors import InputError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from spatialscale.store import IsoformStore

__all__ = ["gene_ratios", "inflation", "isoform_ratios", "qq", "qq_band", "qq_points", "section_counts", "sections",
           "volcano"]

#: p-value variables a plot picks by default, in this order (cohort results have all of their section's too)
PVALUE_VARIABLES = ("combined_pvalue", "sv_pvalue", "du_pvalue")

#: how titles name the tests (the results' ``test`` attribute)
TEST_NAMES = {"spatial_variability": "Spatial variability", "differential_usage": "Differential usage"}
#: how titles name the methods (the results' ``method`` attribute); others are shown as they are
METHOD_NAMES = {"hsic-ir": "HSIC-IR", "hsic-ic": "HSIC-IC", "hsic-gc": "HSIC-GC", "hsic": "HSIC", "hsic-gp": "HSIC-GP",
                "t-fisher": "t-test, Fisher", "t-tippett": "t-test, Tippett", "glmm-score": "GLMM score",
                "glmm-wald": "GLMM Wald", "glmm-llr": "GLMM LRT", "spark-x": "SPARK-X"}
#: the statistic each method reports (``sv_statistic`` / ``du_statistic``)
STATISTIC_NAMES = {"hsic-ir": "HSIC statistic", "hsic-ic": "HSIC statistic", "hsic-gc": "HSIC statistic",
                   "hsic": "HSIC statistic", "hsic-gp": "HSIC statistic", "t-fisher": "Fisher statistic",
                   "t-tippett": "Smallest isoform p (Tippett)", "glmm-score": "Score statistic",
                   "glmm-wald": "Wald statistic", "glmm-llr": "Likelihood-ratio statistic",
                   "spark-x": "SPARK-X statistic"}
#: how cohort p-values were combined (the results' ``combine`` attribute)
COMBINE_NAMES = {"cauchy": "Cauchy", "fisher": "Fisher", "stouffer": "Stouffer", "pooled": "pooled HSIC"}

NEGLOG10 = r"$-\log_{10}$"


# --------------------------------------------------------------------------- helpers
#: the display keywords every plot shares, in its docstring as ``{display}``
_DISPLAY_DOC = """ax
        Axes to draw on (default: a new figure).
    show
        Show the figure; default: only a new figure, when matplotlib is
        interactive.
    save
        Write the figure to this path (format from the suffix)."""


def _display_doc(fn: Any) -> Any:
    """Put the shared ``ax`` / ``show`` / ``save`` entries into ``fn``'s docstring."""
    fn.__doc__ = (fn.__doc__ or "").replace("{display}", _DISPLAY_DOC)
    return fn


def _pyplot() -> Any:
    """``matplotlib.pyplot``, or an ImportError that says how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("spatialscale.pl needs matplotlib: pip install spatialscale[plot]") from exc
    return plt


def _as_dataset(data: Any, key: str | None) -> Any:
    """Results to plot: a Dataset (or DataArray, array) as it is, or the Dataset rebuilt from an annotated AnnData.

    Parameters
    ----------
    data
        A results Dataset, or an AnnData annotated by :func:`spatialscale.to_anndata`
        (anything with ``.uns`` and ``.var``); p-value arrays pass through.
    key
        The AnnData's results (``key_added`` of :func:`spatialscale.to_anndata`);
        ``None``: the only results it holds.
    """
    if isinstance(data, xr.Dataset | xr.DataArray):
        if key is not None:
            raise InputError("key= picks results stored in an AnnData; these are results already (a Dataset).")
        return data
    if hasattr(data, "uns") and hasattr(data, "var"):
        try:
            from spatialscale.results import dataset_from_anndata
        except ImportError as exc:  # pragma: no cover - an older spatialscale.results
            raise InputError("this spatialscale cannot read results back from an AnnData; plot the results "
                             "Dataset.") from exc
        return dataset_from_anndata(data, key=key)
    if key is not None:
        raise InputError(f"key= picks results stored in an AnnData; got {type(data).__name__}.")
    return data


def _new_axes(ax: Axes | None, figsize: tuple[float, float] | None = None) -> tuple[Axes, bool]:
    """``ax`` (and False), or the Axes of a new figure (and True) of ``figsize`` (default rcParams)."""
    plt = _pyplot()
    if ax is not None:
        return ax, False
    fig, new = plt.subplots(figsize=figsize, layout="constrained")
    return new, True


def _finish(result: Any, figure: Figure, *, own: bool, show: bool | None,
            save: str | os.PathLike | None) -> Any:
    """Save and show the figure as asked; ``result`` unless the figure was shown (then None).

    ``show=None`` shows only a figure the plot made itself (``own``), and only
    when matplotlib is interactive.  ``save`` writes the whole figure (format
    from the suffix, dpi from ``rcParams["savefig.dpi"]``, tight bounding box).
    """
    import matplotlib

    if save is not None:
        figure.savefig(os.fspath(save), bbox_inches="tight")
    if show is None:
        show = own and matplotlib.is_interactive()
    if show:
        _pyplot().show()
        return None
    return result


def _message(ax: Axes, text: str, *, where: str = "center") -> None:
    """Write ``text`` in the axes (centre: the plot has no data, ticks removed; top: a note) and warn."""
    if where == "center":
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.35", wrap=True,
                gid="message")
    else:
        ax.text(0.5, 0.97, text, transform=ax.transAxes, ha="center", va="top", color="0.35", fontsize="small",
                style="italic", gid="message")
    warnings.warn(text, UserWarning, stacklevel=3)


def _clean(ax: Axes) -> None:
    """Open axes: no top and right spines."""
    ax.spines[["top", "right"]].set_visible(False)


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


def _check_fdr(fdr: float) -> float:
    """The FDR level, which must lie in (0, 1)."""
    if not 0 < float(fdr) < 1:
        raise InputError(f"fdr must lie between 0 and 1 (a false-discovery-rate level such as 0.05), got {fdr!r}.")
    return float(fdr)


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


# --------------------------------------------------------------------------- names in titles and labels
def _kind_of(ds: Any, name: str | None = None) -> str | None:
    """``sv``, ``du`` or None: the test behind the results (their ``test`` attribute, else their variables)."""
    attrs = getattr(ds, "attrs", {}) or {}
    test = attrs.get("test")
    if test == "spatial_variability":
        return "sv"
    if test == "differential_usage":
        return "du"
    for kind in ("sv", "du"):
        if (name or "").startswith(f"{kind}_") or (isinstance(ds, xr.Dataset) and f"{kind}_pvalue" in ds):
            return kind
    return None


def _title(ds: Any, kind: str | None, covariate: Any = None, detail: str | None = None) -> str:
    """A plot's title: the test (against the covariate), the method in parentheses, and ``detail`` below."""
    attrs = getattr(ds, "attrs", {}) or {}
    test = TEST_NAMES.get(str(attrs.get("test", "")), {"sv": TEST_NAMES["spatial_variability"],
                                                        "du": TEST_NAMES["differential_usage"]}.get(kind or "", ""))
    if test and kind == "du" and covariate is not None:
        test = f"{test} vs {covariate}"
    elif not test and covariate is not None:
        test = str(covariate)
    method = attrs.get("method")
    if method:
        test = f"{test} ({METHOD_NAMES.get(str(method), str(method))})" if test else METHOD_NAMES.get(str(method),
                                                                                                       str(method))
    return "\n".join(part for part in (test, detail) if part)


def _combine_name(ds: Any) -> str:
    how = str((getattr(ds, "attrs", {}) or {}).get("combine", ""))
    return COMBINE_NAMES.get(how, how)


def _cohort_detail(ds: xr.Dataset, section: Any = None, group: Any = None) -> str:
    """Second title line of cohort results: the section drawn, or how many sections were combined, and how."""
    if section is not None:
        return f"section {section}"
    n = len(_group_sections(ds, group)) if group is not None else ds.sizes.get("section", ds.attrs.get("n_sections"))
    how = _combine_name(ds)
    what = f"{n} sections combined" if n else "sections combined"
    if group is not None:
        by = ds.attrs.get("group_by")
        what = f"{by} {group}: {what}" if by else f"group {group}: {what}"
    return f"{what} ({how})" if how else what


def _statistic_label(ds: xr.Dataset, name: str) -> str:
    """Axis label of a variable on a volcano's x axis."""
    method = str(ds.attrs.get("method", ""))
    if name in ("sv_statistic", "du_statistic"):
        return STATISTIC_NAMES.get(method, "Test statistic")
    if name == "beta":
        return r"Effect size $\beta$ (log-odds, largest $|\beta|$)"
    return name


def _pvalue_label(name: str, ds: Any) -> str:
    """What a p-value variable is, for axis labels: ``p-value``, ``combined p-value (Cauchy)``..."""
    adjusted = name.endswith("_adj")
    what = "adjusted p-value" if adjusted else "p-value"
    if "combined" in name:
        how = _combine_name(ds)
        what = f"combined {what}" + (f" ({how})" if how else "")
    return what


# --------------------------------------------------------------------------- gene labels that do not overlap
def _conflicts(centres: np.ndarray, half: np.ndarray, anchors: np.ndarray,
               point_radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (centres, half sizes) overlapping each other (n x n) and covering anchor points (n x n)."""
    n = len(centres)
    hit = (half[:, None, :] + half[None, :, :] - np.abs(centres[:, None, :] - centres[None, :, :]) > 0).all(-1)
    covers = (half[:, None, :] + point_radius - np.abs(centres[:, None, :] - anchors[None, :, :]) > 0).all(-1)
    return hit & ~np.eye(n, dtype=bool), covers


def _repel(sizes: np.ndarray, anchors: np.ndarray, bounds: tuple[float, float, float, float], *,
           gap: float = 4.0, pad: float = 2.0, point_radius: float = 3.0,
           max_iter: int = 200) -> tuple[np.ndarray, bool]:
    """Place label boxes near their points without overlaps (display units, e.g. pixels).

    Each box starts beside its anchor point (to its right, or to its left
    where it would leave ``bounds``).  Then, for up to ``max_iter`` rounds,
    every overlapping pair of boxes is pushed apart along the axis of their
    smaller overlap (half each way), every box off the anchor points it
    covers, and boxes are kept inside ``bounds`` (fewer rounds when the
    conflicts stop decreasing).  Boxes still in conflict
    after that are moved one at a time (the one with most conflicts first)
    to the free place nearest their start, on a grid over ``bounds``.
    Deterministic: boxes with the same centre part by their order, and
    earlier boxes (pass the most important first) keep their places.

    Parameters
    ----------
    sizes
        ``(n, 2)`` widths and heights of the boxes.
    anchors
        ``(n, 2)`` the points the boxes label.
    bounds
        ``(x0, y0, x1, y1)``: the area the boxes stay in.
    gap
        Distance from a point to its box at the start.
    pad
        Space kept between boxes.
    point_radius
        Half-size of the square kept free around each anchor point.
    max_iter
        Most rounds of pushes.

    Returns
    -------
    centres, placed
        ``(n, 2)`` box centres, and whether no box overlaps another or covers
        an anchor point (False only when ``bounds`` has no room left).
    """
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    anchors = np.asarray(anchors, dtype=np.float64).reshape(-1, 2)
    n = len(sizes)
    x0, y0, x1, y1 = (float(b) for b in bounds)
    half = sizes / 2 + pad / 2
    right = anchors[:, 0] + gap + sizes[:, 0] <= x1
    start = anchors + np.c_[np.where(right, gap + half[:, 0], -gap - half[:, 0]), np.zeros(n)]
    order = np.arange(n)
    tie = np.where(order[:, None] < order[None, :], -1.0, 1.0)  # identical centres: the first goes down / left
    lo = np.c_[x0 + half[:, 0], y0 + half[:, 1]]
    hi = np.c_[x1 - half[:, 0], y1 - half[:, 1]]
    lo, hi = np.minimum(lo, (lo + hi) / 2), np.maximum(hi, (lo + hi) / 2)  # a box larger than bounds: centred
    centres = np.clip(start, lo, hi)
    best, since = n * n + 1, 0
    for _ in range(max_iter):
        hit, covers = _conflicts(centres, half, anchors, point_radius)
        count = int(hit.sum() + covers.sum())
        if count == 0:
            return centres, True
        best, since = (count, 0) if count < best else (best, since + 1)
        if since > 20:  # pushing does not help any more
            break
        push = np.zeros_like(centres)
        for others, other_half, share, ties in ((centres, half, 0.5, tie), (anchors, point_radius, 1.0, 1.0)):
            d = centres[:, None, :] - others[None, :, :]
            overlap = half[:, None, :] + other_half - np.abs(d) if np.ndim(other_half) == 0 else (
                half[:, None, :] + other_half[None, :, :] - np.abs(d))
            along_x = overlap[..., 0] < overlap[..., 1]
            sign = np.where(d != 0, np.sign(d), np.asarray(ties)[..., None] if np.ndim(ties) else ties)
            step = np.where(np.stack([along_x, ~along_x], -1), overlap * share + 0.5, 0.0) * sign
            push += np.where((hit if share < 1 else covers)[..., None], step, 0.0).sum(1)
        centres = np.clip(centres + push, lo, hi)
    # what pushing left: one box at a time to the nearest free place
    step = max(float(np.min(sizes[:, 1])) / 3, 1.0) if n else 1.0
    for _ in range(n):
        hit, covers = _conflicts(centres, half, anchors, point_radius)
        bad = hit.sum(1) + covers.sum(1)
        if not bad.any():
            return centres, True
        i = n - 1 - int(np.argmax(bad[::-1]))  # most conflicts; of equals, the last
        gx, gy = np.meshgrid(*(np.unique(np.minimum(np.arange(lo[i, k], hi[i, k] + step, step), hi[i, k]))
                               for k in (0, 1)))
        cand = np.c_[gx.ravel(), gy.ravel()]
        cand = cand[np.argsort(np.hypot(*(cand - start[i]).T), kind="stable")]  # nearest first
        others = np.delete(np.arange(n), i)
        bounds_of_chunks = [0, *(64 * 2 ** k for k in range(int(np.log2(max(len(cand), 64) / 64)) + 2))]
        for first, last in zip(bounds_of_chunks[:-1], bounds_of_chunks[1:]):  # growing chunks, nearest first
            c = cand[first:last]
            if not len(c):
                break
            free = ~((half[i] + half[others][None, :, :] - np.abs(c[:, None, :] - centres[others][None, :, :])
                      > 0).all(-1).any(1))
            free &= ~((half[i] + point_radius - np.abs(c[:, None, :] - anchors[None, :, :]) > 0).all(-1).any(1))
            if free.any():
                centres[i] = c[int(np.argmax(free))]
                break
        else:
            break
    hit, covers = _conflicts(centres, half, anchors, point_radius)
    return centres, not (hit.any() or covers.any())


#: resolutions a figure is commonly drawn or saved at
COMMON_DPI = (60, 72, 80, 96, 100, 120, 144, 150, 200, 300, 600)


def _hinting_margin(texts: Sequence[str], font: Any, dpi: float) -> np.ndarray:
    """How much larger (``(n, 2)``, >= 1) each text may be at a common resolution than at ``dpi``, in points.

    Hinted glyphs make a text's size in points depend on the resolution (by
    up to about 15% at small sizes), so labels placed apart on screen could
    touch in a file saved at another dpi.  Placing the largest size keeps
    them apart at any of :data:`COMMON_DPI`.
    """
    from matplotlib.backends.backend_agg import RendererAgg

    def size(d: float) -> np.ndarray:
        renderer = RendererAgg(1, 1, d)
        return np.array([renderer.get_text_width_height_descent(t, font, ismath=False)[:2] for t in texts],
                        dtype=np.float64).reshape(-1, 2) * 72.0 / d

    here = size(dpi)
    largest = np.max([size(d) for d in COMMON_DPI], axis=0)
    return np.maximum(largest / np.maximum(here, 1e-9), 1.0)


def _renderer(figure: Figure) -> Any:
    """A renderer of the figure, after its layout engine (if any) has placed the Axes."""
    engine = figure.get_layout_engine()
    if engine is not None:
        engine.execute(figure)
    get = getattr(figure.canvas, "get_renderer", None)
    return get() if get is not None else figure._get_renderer()


def _label_points(ax: Axes, xy: np.ndarray, names: Sequence[str], **text_kw: Any) -> list:
    """Label points of ``ax`` (data coordinates) with names that do not overlap, leader lines where moved.

    The labels are placed for the figure's current size and layout (in
    points from their anchor, so they keep their places at any dpi).

    Returns
    -------
    list of matplotlib.text.Annotation
        One per name, with gid ``label``.
    """
    if not len(names):
        return []
    figure = ax.figure
    ax.autoscale_view()
    ax.set_xlim(ax.get_xlim())  # the labels are placed for these limits: keep them
    ax.set_ylim(ax.get_ylim())
    kw = {"fontsize": "small", **text_kw, "ha": "center", "va": "center"}
    probes = [ax.text(0.0, 0.0, str(name), **kw) for name in names]
    renderer = _renderer(figure)
    sizes = np.array([[b.width, b.height] for b in (t.get_window_extent(renderer) for t in probes)])
    sizes *= _hinting_margin([str(n) for n in names], probes[0].get_fontproperties(), figure.dpi)
    for probe in probes:
        probe.remove()
    anchors = ax.transData.transform(np.asarray(xy, dtype=np.float64))
    box = ax.get_window_extent(renderer)
    px = figure.dpi / 72.0  # pixels per point
    centres, _ = _repel(sizes, anchors, (box.x0, box.y0, box.x1, box.y1), gap=3.0 * px, pad=1.5 * px,
                        point_radius=2.5 * px)
    leader = {"arrowstyle": "-", "color": "0.35", "linewidth": 0.6, "shrinkA": 0.5, "shrinkB": 2.0}
    texts = []
    for name, (x, y), centre, anchor, size in zip(names, xy, centres, anchors, sizes):
        beside = abs(centre[1] - anchor[1]) < 0.5 and abs(centre[0] - anchor[0]) - size[0] / 2 <= 4.5 * px + 0.5
        texts.append(ax.annotate(str(name), xy=(float(x), float(y)), xytext=tuple((centre - anchor) / px),
                                 textcoords="offset points", arrowprops=None if beside else leader, gid="label",
                                 **kw))
    return texts


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
    fig, grid = plt.subplots(nrows, ncols, figsize=(panel_size * ncols + 1.0, panel_size * nrows + 0.4),
                             squeeze=False, layout="constrained")
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
    if xy.shape[1] != 2:
        raise InputError(f"the store {store.path} has {xy.shape[1]}-D coordinates; plots draw one 2-D section: "
                         "ingest the section's spots (one z) into a store of their own to draw them.")
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


def _colorbar(panels: list, cmap: Any, norm: Any) -> Any:
    """One colorbar of the ratio scale for all panels."""
    from matplotlib.cm import ScalarMappable

    return panels[0].figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=panels, shrink=0.8,
                                     label="Isoform ratio")


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
    show: bool | None = None,
    save: str | os.PathLike | None = None,
) -> np.ndarray | None:
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
        or zarr), ingested with the ``ingest`` keywords once per process (the
        store of an earlier call on the same data and options is reused).
    gene
        The gene (a name in ``store.genes``).
    isoforms
        The isoforms to draw: names or positions within the gene (default:
        all, in store order).
    ax, axes
        Axes to draw on, one per isoform drawn (give one of the two; a single
        Axes for a single isoform).  Default: a new figure with ``ncols``
        panels a row, titled with the gene.
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
    show
        Show the figure (``plt.show()``); default: only a new figure, and
        only when matplotlib is interactive.
    save
        Write the figure to this path (format from the suffix).

    Returns
    -------
    numpy.ndarray or None
        The Axes, one per isoform drawn, each titled with the isoform's name;
        None when the figure was shown.

    Raises
    ------
    InputError
        If the gene is not in the store (naming close matches), an isoform
        is not the gene's, the number of Axes given does not match, or the
        store has no coordinates.
    """
    _pyplot()  # matplotlib, or how to install it
    from matplotlib.colors import Normalize

    from spatialscale.cohort import is_cohort
    from spatialscale.families.common import input_store
    from spatialscale.store import IsoformStore

    with input_store(store, ingest, cohort=is_cohort(store)) as opened:
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
        panel.set_title(names[k], fontsize="medium")
        panel.set_aspect("equal")
        panel.set_xticks([])
        panel.set_yticks([])
        if not covered.any():
            _message(panel, f"No counts of {gene}")
    if colorbar:
        _colorbar(panels, cmap, norm)
    if new:
        panels[0].figure.suptitle(gene)
    out = np.empty(len(panels), dtype=object)
    out[:] = panels
    return _finish(out, panels[0].figure, own=new, show=show, save=save)


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

    Parameters
    ----------
    pvalues
        P-values (any shape); NaN entries are left out.

    Returns
    -------
    expected, observed
        ``-log10`` of the uniform quantiles and of the sorted p-values.
    """
    p = np.sort(_check_pvalues(pvalues, "pvalues"))
    n = p.size
    return -np.log10((np.arange(1, n + 1) - 0.5) / n), _neglog10(p)


def qq_band(n: int, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pointwise confidence band of a QQ plot of ``n`` p-values, on the ``-log10`` scale, largest first.

    Under the null the ``i``-th smallest of ``n`` uniform p-values follows
    ``Beta(i, n - i + 1)``; the band holds its central ``level`` interval at
    each expected value of :func:`qq_points`.

    Parameters
    ----------
    n
        Number of p-values.
    level
        Coverage of the interval at each point (e.g. 0.95).

    Returns
    -------
    expected, lower, upper
        ``-log10`` of the expected quantiles ``(i - 0.5) / n`` and of the
        interval's bounds: ``lower = -log10 Beta.ppf((1 + level) / 2)``,
        ``upper = -log10 Beta.ppf((1 - level) / 2)``.
    """
    from scipy import stats

    if not 0 < float(level) < 1:
        raise InputError(f"the band's level must lie between 0 and 1 (e.g. 0.95), got {level!r}.")
    i = np.arange(1, int(n) + 1, dtype=np.float64)
    tail = (1.0 - float(level)) / 2.0
    low_p = stats.beta.ppf(tail, i, n - i + 1)
    high_p = stats.beta.ppf(1.0 - tail, i, n - i + 1)
    return -np.log10((i - 0.5) / n), -np.log10(high_p), -np.log10(low_p)


def _lambda_text(lam: float) -> str:
    return rf"$\lambda_{{GC}}$ = {lam:.3f}"


@_display_doc
def qq(
    data: Any,
    *,
    key: str | None = None,
    variable: str | None = None,
    covariate: str | Sequence[str] | None = None,
    section: str | Sequence[str] | None = None,
    band: float | None = 0.95,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    **plot_kw: Any,
) -> Axes | None:
    """QQ plot of p-values against the uniform distribution, with a confidence band and ``lambda_GC``.

    Draws the observed ``-log10 p`` (sorted) against the expected uniform
    quantiles (see :func:`qq_points`), the line ``y = x`` over the range of
    the expected values, a shaded pointwise confidence band of the null
    (:func:`qq_band`) and ``lambda_GC`` (:func:`inflation`) of each series in
    the legend.  A series is drawn for each combination of the variable's
    dimensions other than ``gene``: DU results give one per covariate,
    per-section cohort p-values one per section, group p-values one per
    group.  The title names the test, its method and (one covariate) the
    covariate.

    Parameters
    ----------
    data
        Results (:func:`spatialscale.sv_test`, :func:`spatialscale.du_test`
        or a cohort run), an AnnData annotated with them
        (:func:`spatialscale.to_anndata`), or p-values as a DataArray or
        array.
    key
        AnnData input: the results' key in ``adata.uns`` (default: the only
        ones).
    variable
        The p-value variable; default ``combined_pvalue`` (cohort results),
        else ``sv_pvalue``, else ``du_pvalue``.
    covariate, section
        Draw only these covariates / sections (a label or a list).
    band
        Coverage of the confidence band (``None``: no band).
    {display}
    **plot_kw
        Passed to ``Axes.plot`` for the points (e.g. ``markersize``, ``alpha``).

    Returns
    -------
    matplotlib.axes.Axes or None
        The QQ points are the lines with gid ``qq``, ``y = x`` the one with gid
        ``identity``, the band the collection(s) with gid ``band``.  None when
        the figure was shown.
    """
    ds = _as_dataset(data, key)
    raw = _pvalue_array(ds, variable)
    da = _select(raw, covariate=covariate, section=section)
    name = str(da.name)
    source = ds if isinstance(ds, xr.Dataset) else da
    kind = _kind_of(source, name)
    one_cov = None
    if "covariate" in da.dims and da.sizes["covariate"] == 1:
        one_cov = str(da["covariate"].values[0])
    elif "covariate" not in da.dims and "covariate" in da.coords and da["covariate"].ndim == 0:
        one_cov = str(da["covariate"].values)
    by = source.attrs.get("group_by") if "group" in da.dims else None
    if by:  # a series per group: "condition a", not "a"
        da = da.assign_coords(group=[f"{by} {g}" for g in da["group"].values])
    series = []
    for label, values in _series(da):
        p = _check_pvalues(values, name)
        if p.size:
            series.append((label, *qq_points(p), inflation(p)))
    ax, own = _new_axes(ax)
    detail = None
    if isinstance(ds, xr.Dataset) and "section" in ds.dims:  # cohort results
        if "section" in raw.dims:
            detail = f"section {section}" if section is not None and np.ndim(section) == 0 else "per section"
        elif "group" in raw.dims:
            how = _combine_name(ds)
            detail = f"sections combined per {ds.attrs.get('group_by') or 'group'}" + (f" ({how})" if how else "")
        else:
            detail = _cohort_detail(ds)
    ax.set_title(_title(source, kind, one_cov, detail))
    if not series:
        _message(ax, "No genes with finite p-values")
        return _finish(ax, ax.figure, own=own, show=show, save=save)
    if band is not None:
        for n in sorted({len(e) for _, e, _, _ in series}):
            expected, lower, upper = qq_band(n, band)
            ax.fill_between(expected, lower, upper, color="0.85", linewidth=0, gid="band",
                            label=f"{band:.0%} band" if n == max(len(e) for _, e, _, _ in series) else None)
    low = min(float(e.min()) for _, e, _, _ in series)
    high = max(float(e.max()) for _, e, _, _ in series)
    ax.plot([low, high], [low, high], color="0.2", linestyle="--", linewidth=0.9, gid="identity", label="_y = x")
    kw = {"marker": "o", "markersize": 3.0, "markeredgewidth": 0.0, "linestyle": "none", **plot_kw}
    for label, expected, observed, lam in series:
        text = _lambda_text(lam)
        ax.plot(expected, observed, label=text if label is None else f"{label} ({text})", gid="qq", **kw)
    ax.set_xlim(0.0, high * 1.04 if high > 0 else 1.0)
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel(f"Expected {NEGLOG10} p-value")
    ax.set_ylabel(f"Observed {NEGLOG10} {_pvalue_label(name, source)}")
    ax.legend(frameon=False, fontsize="small", loc="upper left", handletextpad=0.3)
    _clean(ax)
    return _finish(ax, ax.figure, own=own, show=show, save=save)


# --------------------------------------------------------------------------- volcano
def _kind(ds: xr.Dataset) -> str:
    """``sv`` or ``du``: which test the results hold."""
    if not isinstance(ds, xr.Dataset):
        raise InputError(f"this plot draws results (a Dataset or an annotated AnnData), got {type(ds).__name__}.")
    for kind in ("sv", "du"):
        if f"{kind}_pvalue" in ds:
            return kind
    raise InputError(f"the results have neither sv_pvalue nor du_pvalue (variables: {sorted(map(str, ds.data_vars))})"
                     "; this plot needs SV or DU results.")


def _effect(ds: xr.Dataset, name: str, *, covariate: Any, section: Any) -> tuple[np.ndarray, str]:
    """The x values of a volcano plot (one per gene) and their axis label."""
    da = _select(ds[name], covariate=covariate, section=section if "section" in ds[name].dims else None)
    label = _statistic_label(ds, name)
    if "contrast" in da.dims:  # signed coefficient of the contrast with the largest magnitude
        pick = abs(da).fillna(-1.0).argmax("contrast")
        da = da.isel(contrast=pick)
    if "section" in da.dims:
        da = da.median("section", skipna=True)
        label = f"Median {label[0].lower() if label[1:2].islower() else label[0]}{label[1:]} over sections"
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
    """What a volcano plot draws: p-value name, covariate, p-values, adjusted p-values, x values, label and name."""
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
    return name, covariate, p, _significance(ds, name, p, **labels), xs, xlabel, x


@_display_doc
def volcano(
    data: Any,
    *,
    key: str | None = None,
    covariate: str | None = None,
    section: str | None = None,
    x: str | None = None,
    fdr: float = 0.05,
    label_top: int = 0,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    **scatter_kw: Any,
) -> Axes | None:
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
    Benjamini-Hochberg over the genes drawn) is below ``fdr`` are
    highlighted, with a dashed line at the largest of their p-values.
    Genes without a p-value or an x value are left out.  A signed effect
    (``beta``) is drawn on an x axis symmetric about 0.  ``label_top``
    names the most significant of the highlighted genes, their labels
    pushed apart so that none overlap (leader lines to their points); the
    labels are placed for the Axes' size and limits at that moment, so
    the limits are fixed then (set a layout, e.g. ``layout="constrained"``,
    before drawing rather than calling ``tight_layout`` afterwards).

    Parameters
    ----------
    data
        Results of :func:`spatialscale.sv_test` or :func:`spatialscale.du_test`
        (of a section or a cohort), or an AnnData annotated with them.
    key
        AnnData input: the results' key in ``adata.uns`` (default: the only
        ones).
    covariate
        DU: the covariate (may be left out when there is one).
    section
        Cohort results: draw this section's results.
    x
        The variable on the x axis instead of the default (over ``gene``,
        or with ``covariate``, ``contrast`` or ``section`` dimensions reduced
        as above).
    fdr
        False-discovery-rate level: genes with an adjusted p-value below it
        are significant.
    label_top
        Label this many significant genes, smallest p-value first.
    {display}
    **scatter_kw
        Passed to ``Axes.scatter`` (e.g. ``s``; ``alpha`` is the points'
        opacity).

    Returns
    -------
    matplotlib.axes.Axes or None
        Not significant genes are the collection with gid ``not significant``,
        significant ones the one with gid ``significant``, the FDR line the
        line with gid ``threshold``, gene labels the texts with gid
        ``label``.  None when the figure was shown.
    """
    fdr = _check_fdr(fdr)
    ds = _as_dataset(data, key)
    name, covariate, p, adj, xs, xlabel, x = _volcano_data(ds, covariate=covariate, section=section, x=x)
    genes = np.asarray(ds["gene"].values).astype(str)
    ok = np.isfinite(p) & np.isfinite(xs)
    ys = _neglog10(np.where(ok, p, 1.0))
    sig = ok & (np.nan_to_num(adj, nan=1.0) < fdr)
    ax, own = _new_axes(ax)
    cohort = "section" in ds[f"{_kind(ds)}_pvalue"].dims
    ax.set_title(_title(ds, _kind(ds), covariate, _cohort_detail(ds, section) if cohort else None))
    if not ok.any():
        _message(ax, "No genes in the results" if genes.size == 0 else "No genes with finite p-values"
                 if not np.isfinite(p).any() else "No genes with finite p-values and x values")
        return _finish(ax, ax.figure, own=own, show=show, save=save)
    if x == "beta":  # a signed effect: symmetric about no effect
        ax.axvline(0.0, color="0.85", linewidth=0.8, zorder=0, gid="zero")
        reach = float(np.abs(xs[ok]).max()) * 1.08 or 1.0
        ax.set_xlim(-reach, reach)
    kw = {"s": 10, "linewidths": 0, **scatter_kw}
    ax.scatter(xs[ok & ~sig], ys[ok & ~sig], c="0.72", gid="not significant",
               label=f"Not significant ({int((ok & ~sig).sum())})", **kw)
    ax.scatter(xs[sig], ys[sig], c="#c0392b", gid="significant", label=f"FDR < {fdr:g} ({int(sig.sum())})", **kw)
    if sig.any():
        ax.axhline(float(ys[sig].min()), color="0.3", linestyle="--", linewidth=0.8, gid="threshold",
                   label="_threshold")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{NEGLOG10} {_pvalue_label(name, ds)}")
    ax.set_ylim(bottom=0.0)
    with contextlib.suppress(AttributeError):  # small statistics (HSIC ~1e-4): a x10^k offset, not 0.00010
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 4), useMathText=True)
    _clean(ax)
    ax.legend(frameon=False, fontsize="small", loc="best" if ok.sum() <= 2000 else "upper left",
              handletextpad=0.2, markerscale=1.5)
    k = max(0, int(label_top))
    if k:
        if not sig.any():
            _message(ax, f"No genes at FDR < {fdr:g} to label", where="top")
        else:
            top = np.flatnonzero(sig)[np.argsort(p[sig], kind="stable")][:k]
            _label_points(ax, np.c_[xs[top], ys[top]], genes[top])
    return _finish(ax, ax.figure, own=own, show=show, save=save)


# --------------------------------------------------------------------------- cohorts
def _cohort_pvalues(ds: xr.Dataset, covariate: Any, group: str | None) -> tuple[xr.DataArray, xr.DataArray, str,
                                                                                  Any]:
    """Per-section p-values (section x gene), combined p-values (gene), the per-section variable, the covariate."""
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
    return sections.transpose("section", "gene"), combined.transpose("gene"), per, covariate


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


@_display_doc
def sections(
    data: Any,
    *,
    key: str | None = None,
    covariate: str | None = None,
    group: str | None = None,
    highlight: Sequence[str] | None = None,
    highlight_label: str | None = None,
    fdr: float = 0.05,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    **scatter_kw: Any,
) -> Axes | None:
    """Per-section against combined evidence of a cohort: each gene's best single-section p against its combined p.

    Each gene is a point at ``-log10`` of its smallest p-value over the
    sections that tested it (x) and ``-log10`` of its combined p-value (y),
    with the line ``y = x``: genes above it gain from combining sections.
    (The smallest of several p-values is not itself a p-value: read the x
    axis as the strongest single section, not as a test.)

    Parameters
    ----------
    data
        Results of a cohort run (:func:`spatialscale.sv_test` or
        :func:`spatialscale.du_test` on a cohort), or an AnnData annotated
        with them.
    key
        AnnData input: the results' key in ``adata.uns`` (default: the only
        ones).
    covariate
        DU: the covariate (may be left out when there is one).
    group
        With results of a run with ``group_by``: the group's combined
        p-values against its own sections' p-values.
    highlight
        Genes to highlight (e.g. known true positives); default: genes whose
        combined adjusted p-value is below ``fdr``.
    highlight_label
        Legend entry of the highlighted genes.
    fdr
        False-discovery-rate level of the default highlight.
    {display}
    **scatter_kw
        Passed to ``Axes.scatter`` (e.g. ``s``; ``alpha`` is the points'
        opacity).

    Returns
    -------
    matplotlib.axes.Axes or None
        The highlighted genes are the collection with gid ``highlighted``, the
        others the one with gid ``other``; ``y = x`` the line with gid
        ``identity``.  None when the figure was shown.
    """
    fdr = _check_fdr(fdr)
    ds = _as_dataset(data, key)
    per, combined, per_name, covariate = _cohort_pvalues(ds, covariate, group)
    genes = np.asarray(ds["gene"].values).astype(str)
    p_sec = per.values.astype(np.float64)
    best = np.min(np.where(np.isfinite(p_sec), p_sec, np.inf), axis=0, initial=np.inf)
    best[~np.isfinite(p_sec).any(axis=0)] = np.nan
    comb = combined.values.astype(np.float64)
    ok = np.isfinite(best) & np.isfinite(comb)
    if highlight is None:
        marked = np.nan_to_num(_combined_adjusted(ds, comb, covariate, group), nan=1.0) < fdr
        highlight_label = highlight_label or f"Combined FDR < {fdr:g}"
    else:
        marked = np.isin(genes, np.asarray(list(highlight)).astype(str))
        highlight_label = highlight_label or "Highlighted"
    ax, own = _new_axes(ax)
    ax.set_title(_title(ds, _kind(ds), covariate, _cohort_detail(ds, group=group)))
    if not ok.any():
        _message(ax, "No genes with finite p-values")
        return _finish(ax, ax.figure, own=own, show=show, save=save)
    xs, ys = _neglog10(np.where(ok, best, 1.0)), _neglog10(np.where(ok, comb, 1.0))
    kw = {"s": 10, "linewidths": 0, **scatter_kw}
    ax.scatter(xs[ok & ~marked], ys[ok & ~marked], c="0.6", gid="other",
               label=f"Other genes ({int((ok & ~marked).sum())})", **kw)
    ax.scatter(xs[ok & marked], ys[ok & marked], c="#e67e22", gid="highlighted",
               label=f"{highlight_label} ({int((ok & marked).sum())})", **kw)
    top = float(max(xs[ok].max(initial=0.0), ys[ok].max(initial=0.0))) * 1.05 or 1.0
    ax.plot([0.0, top], [0.0, top], color="0.2", linestyle="--", linewidth=0.9, gid="identity", label="_y = x")
    ax.set_xlim(0.0, top)
    ax.set_ylim(0.0, top)
    ax.set_xlabel(f"Best single-section {NEGLOG10} p-value")
    ax.set_ylabel(f"{NEGLOG10} {_pvalue_label('combined_pvalue', ds)}")
    ax.legend(frameon=False, fontsize="small", loc="upper left", handletextpad=0.2, markerscale=1.5)
    _clean(ax)
    return _finish(ax, ax.figure, own=own, show=show, save=save)


@_display_doc
def section_counts(
    data: Any,
    *,
    key: str | None = None,
    genes: Sequence[str] | None = None,
    covariate: str | None = None,
    fdr: float = 0.05,
    groups: bool = False,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    **bar_kw: Any,
) -> Axes | None:
    """Bar chart of the genes each section finds on its own and the genes the combination finds.

    A bar per section counts the genes whose section-level adjusted p-value
    (``sv_pvalue_adj`` / ``du_pvalue_adj``) is below ``fdr``; the last bar
    (``combined``) those whose ``combined_pvalue_adj`` is; with ``groups``,
    one more bar per group of a ``group_by`` run.  Each bar is labelled with
    its count.

    Parameters
    ----------
    data
        Results of a cohort run, or an AnnData annotated with them.
    key
        AnnData input: the results' key in ``adata.uns`` (default: the only
        ones).
    genes
        Count only these genes (e.g. known true positives); default: all.
    covariate
        DU: the covariate (may be left out when there is one).
    fdr
        False-discovery-rate level.
    groups
        Add a bar per group (``group_combined_pvalue_adj``).
    {display}
    **bar_kw
        Passed to ``Axes.bar`` (e.g. ``width``; ``alpha`` is the bars'
        opacity).

    Returns
    -------
    matplotlib.axes.Axes or None
        With one bar (Rectangle patch) per section, then ``combined`` (and
        the groups), labelled on the x axis.  None when the figure was shown.
    """
    fdr = _check_fdr(fdr)
    ds = _as_dataset(data, key)
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
        return (da.fillna(1.0) < fdr).sum("gene").values

    names = [str(s) for s in ds["section"].values] + ["combined"]
    ax, own = _new_axes(ax, figsize=_bar_figsize(len(names) + (ds.sizes.get("group", 0) if groups else 0)))
    ax.set_title(_title(ds, kind, covariate, "genes found per section and combined"))
    if subset is not None and not subset:
        _message(ax, "None of the given genes is in the results")
        return _finish(ax, ax.figure, own=own, show=show, save=save)
    if ds.sizes.get("gene", 0) == 0:
        _message(ax, "No genes in the results")
        return _finish(ax, ax.figure, own=own, show=show, save=save)
    values = [*count(ds[adj_name].transpose("section", ...)).tolist(), int(count(ds["combined_pvalue_adj"]))]
    colours = ["#4c72b0"] * (len(names) - 1) + ["#e67e22"]
    if groups and "group_combined_pvalue_adj" in ds:
        by = ds.attrs.get("group_by")
        for g, v in zip(ds["group"].values, count(ds["group_combined_pvalue_adj"].transpose("group", ...))):
            names.append(f"combined: {g}" if not by else f"combined: {by} {g}")
            values.append(int(v))
            colours.append("#55a868")
    bars = ax.bar(names, values, color=colours, **bar_kw)
    ax.bar_label(bars, padding=2, fontsize="small")
    ax.margins(y=0.12)
    ax.set_ylabel(f"Genes at FDR < {fdr:g}" + (f" (of {len(subset)})" if subset is not None else ""))
    if len(names) > 6 or max(len(n) for n in names) > 8:
        ax.tick_params(axis="x", labelrotation=40)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
            tick.set_rotation_mode("anchor")
    _clean(ax)
    return _finish(ax, ax.figure, own=own, show=show, save=save)


def _bar_figsize(n: int) -> tuple[float, float] | None:
    """Size of a new bar chart of ``n`` bars: rcParams' figure size, wider for many bars."""
    import matplotlib

    width, height = matplotlib.rcParams["figure.figsize"]
    return (max(float(width), 0.55 * n + 1.5), float(height))
