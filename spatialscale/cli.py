"""Command line: ``spatialscale ingest | cohort ingest | sv | du | glmm | summary | demo | bench``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``spatialscale sv: error: ...``), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_ingest_options(p: argparse.ArgumentParser, *, anndata_input: bool = False) -> None:
    """The ingest flags; ``anndata_input``: on a test command, for an AnnData input (only the flags given count)."""
    from spatialscale.priors import DEFAULT_BANDWIDTH, PRIORS, WEIGHTS

    if anndata_input:
        p = p.add_argument_group("ingest (when STORE is an AnnData .h5ad / .zarr: it is ingested first, into "
                                 "--ingest-to or a temporary store; same flags as `spatialscale ingest`)")
        p.add_argument("--ingest-to", default=None, metavar="PATH",
                       help="keep the ingested store at PATH (default: a temporary store, removed at the end)")

    def default(value: object) -> object:
        return argparse.SUPPRESS if anndata_input else value

    p.add_argument("--table", default=default(None),
                   help="table of a SpatialData store input (needed when it has more than one)")
    p.add_argument("--layer", default=default("counts"), help="layer with isoform counts (default counts; X: adata.X)")
    p.add_argument("--gene-key", default=default("gene_symbol"), help="var column naming each isoform's gene")
    p.add_argument("--spatial-key", default=default("spatial"),
                   help="obsm key of spot coordinates (n x 2, or n x 3 for 3-D), or obs columns as X,Y or X,Y,Z "
                        "(default spatial)")
    p.add_argument("--adj-key", default=default(None),
                   help="obsp key of a user adjacency (instead of the kNN graph)")
    p.add_argument("--min-counts", type=float, default=default(10), help="min total count of a kept isoform (10)")
    p.add_argument("--min-bin-pct", type=float, default=default(0.0),
                   help="min fraction (or %% if > 1) of spots with counts")
    p.add_argument("--filter-single-iso-genes", action=argparse.BooleanOptionalAction, default=default(True),
                   help="drop genes left with one isoform (default; --no-filter-single-iso-genes keeps them)")
    p.add_argument("--keep-single-isoform-genes", dest="filter_single_iso_genes", action="store_false",
                   default=default(True), help=argparse.SUPPRESS)  # the earlier name of --no-filter-single-iso-genes
    p.add_argument("--min-component-size", type=int, default=default(1), help="drop spots in smaller graph components")
    p.add_argument("--k-neighbors", type=int, default=default(4), help="neighbours of the kNN graph (4)")
    p.add_argument("--rho", type=float, default=default(0.99),
                   help="spatial autocorrelation (0.99): 0 <= rho < 1 for splisosm, icar, isar; car, sar and sma "
                        "have a bound from the graph, checked")
    p.add_argument("--standardize-cov", action=argparse.BooleanOptionalAction, default=default(True),
                   help="standardise the CAR covariance (default; --no-standardize-cov keeps it unstandardised)")
    p.add_argument("--prior", default=default("splisosm"), choices=PRIORS,
                   help="spatial prior: splisosm (SPLISOSM's CAR kernel, default) or Smoother's car, icar, sar, isar, "
                        "sma (docs/priors.md)")
    p.add_argument("--weights", default=default("knn"), choices=WEIGHTS,
                   help="graph of the prior: knn (mutual kNN, default) or distance (Gaussian band, --radius)")
    p.add_argument("--radius", type=float, default=default(None),
                   help="distance weights: edge cutoff in coordinate units")
    p.add_argument("--bandwidth", type=float, default=default(DEFAULT_BANDWIDTH),
                   help=f"distance weights: Gaussian width in scaled coordinates ({DEFAULT_BANDWIDTH})")
    p.add_argument("--scale-coords", action=argparse.BooleanOptionalAction, default=default(True),
                   help="distance weights: scale coordinates into [0, 1] first (default)")
    p.add_argument("--row-scale", action=argparse.BooleanOptionalAction, default=default(False),
                   help="sar / sma: row-scaled weights D^-1 W")
    p.add_argument("--kernel", default=default("car"), choices=("car", "fft"),
                   help="car: CAR kernel on the kNN graph of the coordinates; fft: bins of a regular raster "
                        "(integer row/column obs columns, --grid-keys) with the periodic CAR kernel of the grid")
    p.add_argument("--grid-keys", nargs=2, default=default(["array_row", "array_col"]), metavar=("ROW", "COL"),
                   help="fft: obs columns of each bin's row and column (array_row array_col)")
    p.add_argument("--grid-spacing", nargs=2, type=float, default=default([1.0, 1.0]), metavar=("DY", "DX"),
                   help="fft: bin spacing (1 1)")
    p.add_argument("--neighbor-degree", type=int, default=default(1), help="fft: rings of neighbouring bins (1)")
    p.add_argument("--power-sums", default=default("auto"), choices=("auto", "exact", "selected", "hutchinson"),
                   help="kernel power sums of the null: auto (exact up to 5,000 spots, then selected), exact, "
                        "selected (k1, k2 exact; k3, k4 from probes with control variates), hutchinson (SPLISOSM's)")
    p.add_argument("--eigenpairs", action=argparse.BooleanOptionalAction, default=default(False),
                   help="also compute the GLMM's kernel eigenpairs and keep them in the store (car kernel; up to "
                        "5,000 spots the exact power sums come from the same decomposition)")
    p.add_argument("--format", default=default(None), choices=("anndata", "visium", "visium-hd", "xenium", "long-read"),
                   help="what the input is (default: detected; an instrument output folder is read by its reader, "
                        "docs/instruments.md)")
    p.add_argument("--reader", action="append", type=_key_value, metavar="KEY=VALUE", default=default(None),
                   help="an option of the instrument reader, e.g. bin_size=8 (Visium HD), counts=gene (Xenium), "
                        "x_col=X (long-read); repeat for several")


#: ingest options whose flag takes several values (given to ingest as a tuple)
_TUPLE_FLAGS = ("grid_keys", "grid_spacing")


def _ingest_kwargs(args: argparse.Namespace) -> dict:
    """The ingest keywords of the flags given (all of them on `ingest`, whose flags have defaults).

    Every ingest option has the flag of its Python name (``spatial_key`` is
    ``--spatial-key``; booleans also ``--no-...``).
    """
    from spatialscale.families.common import ingest_option_names

    out = {}
    for name in ingest_option_names():
        if hasattr(args, name):
            value = getattr(args, name)
            if name in ("format", "reader") and value is None:
                continue  # not given: the input is read as detected (and option sets of earlier runs are unchanged)
            if name == "reader":
                value = dict(value)
            out[name] = tuple(value) if name in _TUPLE_FLAGS and value is not None else value
    return out


def _add_execution(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="address of an existing Dask scheduler")
    where.add_argument("--workers", type=int, metavar="N", help="start a LocalCluster with N worker processes")
    g.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="torch device of the workers (cuda with --workers starts dask-cuda GPU workers)")
    g.add_argument("--batch-memory", default="256MB", help="working memory of one batch task (default 256MB)")
    g.add_argument("--batch-size", type=int, default=None, help="cap on genes per batch")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")


#: the commands generated from the test-family registry: (help, description, what --out holds)
COMMANDS = {
    "sv": ("spatial-variability tests of every gene", "Test every gene of an isoform store for spatial "
           "variability.", "results zarr (resumes if interrupted)"),
    "du": ("differential isoform usage: every gene x covariate", "Test every gene x covariate pair for "
           "differential isoform usage.", "results zarr (resumes if interrupted)"),
    "glmm": ("fit the multinomial GLM / GLMM of every gene", "Fit the multinomial GLM or GLMM of every gene; keep "
             "the fitted parameters.", "results zarr of the fitted parameters"),
    "summary": ("feature summaries of every gene and isoform", "Gene- and isoform-level feature summaries (as "
                "SPLISOSM's extract_feature_summary).", "results zarr (resumes if interrupted)"),
}


def _key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as JSON where it parses (numbers, true / false), else as text."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def family_options(command: str) -> dict[str, list]:
    """Every option of a command's families, by name: ``name -> [Option, ...]`` (one per family declaring it)."""
    from spatialscale.families import FAMILIES

    out: dict[str, list] = {}
    for fam in FAMILIES.values():
        if fam.command == command:
            for opt in fam.options:
                out.setdefault(opt.name, []).append((fam, opt))
    return out


def api_function(command: str):
    """The Python function behind a generated command."""
    from spatialscale import api

    return {"sv": api.sv_test, "du": api.du_test, "glmm": api.glmm_fit, "summary": api.feature_summary}[command]


def _add_family_command(sub: argparse._SubParsersAction, command: str) -> None:
    import inspect

    from spatialscale.families import FAMILIES, methods_of

    short, description, out_help = COMMANDS[command]
    families = [f for f in FAMILIES.values() if f.command == command]
    p = sub.add_parser(command, help=short, description=description + " Options come from the test families: "
                       + "; ".join(f"{f.name}: {f.description}" for f in families) + ".")
    p.add_argument("store", help="isoform store (from `spatialscale ingest`)"
                   + (", a cohort folder (from `spatialscale cohort ingest`)" if command in ("sv", "du") else "")
                   + " or an AnnData .h5ad / .zarr (ingested first, see the ingest flags); a path or an s3:// "
                   "(fsspec) URL, as is --out (docs/object-storage.md)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--anndata-out", default=None, metavar="PATH",
                   help="also write a copy of the input AnnData (STORE's source when STORE is an isoform store) with "
                        "the gene table in uns[KEY], isoform-level values in var and the run's provenance in "
                        "uns['spatialscale'][KEY] (.h5ad or .zarr)")
    p.add_argument("--key-added", default=None, metavar="KEY",
                   help="with --anndata-out: the uns key of the results (default spatialscale_<test>_<method>)")
    cov = {f.covariates for f in families} - {"none"}
    if cov:
        p.add_argument("--covariates", required="required" in cov,
                       help="obs columns, comma separated (binary: one test; k >= 3 levels: one joint test, or one per "
                            "level with --per-level)" if command == "du" else
                       "obs columns (or covariate sets such as latent), comma separated: "
                       + ("adjust the test for them (spatial variability beyond the covariates; categorical columns "
                          "one-hot encoded)" if command == "sv" else "fixed effects of the fit"))
    methods = methods_of(command)
    if methods:
        default = inspect.signature(api_function(command)).parameters["method"].default
        p.add_argument("--method", default=default, choices=methods, help=f"test (default {default})")
    g = p.add_argument_group("test options (each applies to the methods named; giving it with another is an error)")
    for decl in family_options(command).values():
        opt = decl[0][1]
        where = sorted({m for fam, o in decl for m in (o.methods or fam.methods)})
        helptext = "; ".join(dict.fromkeys(o.help for _, o in decl))
        if where and len(where) < len(methods):
            helptext += f" [{', '.join(where)}]"
        if opt.kind == "dict":
            g.add_argument(opt.flag, action="append", type=_key_value, metavar="KEY=VALUE", default=None,
                           help=helptext + " (repeat for several)")
        elif opt.kind == "bool":
            g.add_argument(opt.flag, action="store_const", const=True, default=None, help=helptext)
        elif opt.kind == "list":
            g.add_argument(opt.flag, nargs="+", metavar="SPEC", default=None, help=helptext)
        else:
            choices = sorted({c for _, o in decl for c in (o.choices or ())}, key=str) or None
            g.add_argument(opt.flag, type=int if opt.kind == "int" else str, choices=choices, default=None,
                           help=helptext)
    if any(f.summaries for f in families):
        p.add_argument("--with-summary", action="store_true", help="add the gene-level feature summaries")
    if command in ("sv", "du"):
        p.add_argument("--top", type=int, default=10, help="print the N most significant results (10)")
        p.add_argument("--combine", default=None, choices=("cauchy", "fisher", "stouffer", "pooled"),
                       help="when STORE is a cohort folder: how sections' p-values are combined per gene (cauchy)")
        p.add_argument("--group-by", default=None, metavar="COLUMN",
                       help="when STORE is a cohort folder: also combine the sections within each group of this "
                            "manifest column (e.g. condition)")
        p.add_argument("--compare", default=None, metavar="COLUMN",
                       help="when STORE is a cohort folder: test per gene whether the sections' effect sizes differ "
                            "between the levels of this manifest column (sections as replicates; F test)")
        p.add_argument("--compare-levels", default=None, metavar="A,B,...", type=lambda v: v.split(","),
                       help="with --compare: the levels in this order (default sorted)")
        p.add_argument("--block", default=None, metavar="COLUMN",
                       help="with --compare: a donor column; crossed donors are blocks, nested donors averaged")
        p.add_argument("--min-sections", default=None, type=int, metavar="R",
                       help="when STORE is a cohort folder: add replicated_pvalue, the gene is SV/DU in at least R "
                            "of its sections (partial conjunction)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace results of other options at --out (only results spatialscale wrote)")
    _add_ingest_options(p, anndata_input=True)
    _add_execution(p)


#: help of the model options (the flags are generated from spatialscale.families.models.MODELS)
_MODEL_HELP = {
    "n_latent": "number of latent factors", "n_hidden": "hidden units per layer", "n_layers": "hidden layers",
    "dropout_rate": "dropout", "gene_likelihood": "count likelihood", "dispersion": "dispersion of the counts",
    "latent_distribution": "normal or ln (logistic normal)", "use_observed_lib_size": "observed library size "
    "(--no-use-observed-lib-size learns it)", "max_epochs": "training epochs", "lr": "Adam step size",
    "minibatch_size": "spots per minibatch (default: full batch)", "validation_fraction": "held-out spots for "
    "early stopping", "early_stopping": "stop when the held-out loss stops improving", "kl_warmup_epochs":
    "KL warm-up epochs", "sp_loss_as_kl": "the spatial loss in its KL form", "spatial_loss": "add a spatial loss "
    "on the store's graph (a prior name, kl or contrastive)", "lambda_spatial": "weight of the spatial loss",
    "spatial_rho": "rho of the spatial prior", "spatial_standardize": "standardise the prior's covariance",
    "seed": "seed of initialisation and training (the same seed reproduces the result)",
}


def _add_model_command(sub: argparse._SubParsersAction, command: str) -> None:
    """``deconvolve`` / ``latent``: flags generated from the model registry (the API's keywords)."""
    from spatialscale.families import models as M

    names = ["nnls"] if command == "deconvolve" else ["pca", "vae", "ldvae"]
    if command == "deconvolve":
        p = sub.add_parser("deconvolve", help="cell-type proportions of every spot from a reference (NNLS)",
                           description="Deconvolve every spot's gene expression into cell-type proportions by "
                           "(spatially regularised) non-negative least squares on a reference's signatures; the "
                           "proportions are written into the store as covariate set --key-added (default props), "
                           "usable by name: spatialscale du STORE --covariates props.")
        p.add_argument("store", help="isoform store, cohort folder, or AnnData input (ingested first)")
        p.add_argument("reference", help="reference AnnData (.h5ad / .zarr): cell types x genes, or cells x genes "
                       "with --celltype-key")
        p.add_argument("--celltype-key", default=None, help="the reference is single cells: obs column of their type")
        p.add_argument("--key-added", default="props", help="name of the covariate set (props)")
    else:
        p = sub.add_parser("latent", help="latent factors of every spot: SpatialPCA, VAE or LDVAE",
                           description="Learn latent factors of every spot's expression (SpatialPCA, an scVI-style "
                           "VAE or an LDVAE, optionally with a spatial loss) and write them into the store as "
                           "covariate set --key-added (default latent), usable by name: spatialscale du STORE "
                           "--covariates latent. On a cohort folder, one model over all sections (the section as "
                           "the batch).")
        p.add_argument("store", help="isoform store, cohort folder, or AnnData input (ingested first)")
        p.add_argument("--model", default="vae", choices=names, help="vae (default), ldvae or pca")
        p.add_argument("--key-added", default="latent", help="name of the covariate set (latent)")
        p.add_argument("--batch-key", default=None, help="obs column of batches (a cohort: its sections)")
        p.add_argument("--labels-key", default=None, help="obs column of spot labels (--dispersion gene-label)")
    p.add_argument("--genes", default=None, help="comma-separated genes to use (default: all shared)")
    g = p.add_argument_group("model options (defaults: the model's)")
    seen: set[str] = set()
    for name in names:
        for opt, default in M.MODELS[name].defaults.items():
            if opt in seen:
                continue
            seen.add(opt)
            flag = "--" + opt.replace("_", "-")
            where = [m for m in names if opt in M.MODELS[m].defaults]
            text = _MODEL_HELP.get(opt, opt) + (f" [{', '.join(where)}]" if len(where) < len(names) else "")
            choices = {"gene_likelihood": M.LIKELIHOODS, "dispersion": M.DISPERSIONS,
                       "latent_distribution": M.LATENT_DISTRIBUTIONS, "spatial_loss": M.SPATIAL_LOSSES}.get(opt)
            if isinstance(default, bool):
                g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
            elif opt in ("minibatch_size", "n_latent", "max_epochs", "seed", "n_hidden", "n_layers",
                         "kl_warmup_epochs") or isinstance(default, int):
                g.add_argument(flag, type=int, default=None, help=text)
            elif isinstance(default, float) or opt in ("spatial_rho", "lambda_spatial"):
                g.add_argument(flag, type=float, default=None, help=text)
            else:
                g.add_argument(flag, default=None, choices=choices, help=text)
    p.add_argument("--overwrite", action="store_true", help="replace a covariate set of that name (spatialscale's)")
    _add_ingest_options(p, anndata_input=True)
    where = p.add_argument_group("execution").add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="address of an existing Dask scheduler")
    where.add_argument("--workers", type=int, metavar="N", help="start a LocalCluster with N worker processes")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="torch device of the training")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _run_model_command(args: argparse.Namespace) -> int:
    import spatialscale
    from spatialscale.families import models as M

    names = ["nnls"] if args.command == "deconvolve" else ["pca", "vae", "ldvae"]
    opts = {k: getattr(args, k) for n in names for k in M.MODELS[n].defaults if getattr(args, k, None) is not None}
    common = {"key_added": args.key_added, "scheduler": args.scheduler, "workers": args.workers,
              "device": args.device, "overwrite": args.overwrite, "progress": not args.no_progress,
              "ingest": _ingest_kwargs(args) or None, "ingest_to": args.ingest_to,
              "genes": None if args.genes is None else [g.strip() for g in args.genes.split(",") if g.strip()]}
    if args.command == "deconvolve":
        ds = spatialscale.deconvolve(args.store, args.reference, celltype_key=args.celltype_key, **opts, **common)
    else:
        wrong = sorted(set(opts) - set(M.MODELS[args.model].defaults))
        if wrong:
            from spatialscale.errors import InputError

            raise InputError(f"--{wrong[0].replace('_', '-')} does not apply to --model {args.model}.")
        ds = spatialscale.latent_factors(args.store, model=args.model, batch_key=args.batch_key,
                                         labels_key=args.labels_key, **opts, **common)
    prov = json.loads(ds.attrs["provenance"])
    done = "reused" if ds.attrs.get("reused") else "wrote"
    loss = prov.get("final_loss")
    print(f"{done} covariate set {args.key_added!r} ({ds.sizes['column']} columns x {ds.sizes['spot']} spots; "
          f"{prov['model']}" + (f", {prov.get('epochs')} epochs, final loss {loss:.6g}" if loss is not None else "")
          + f") into {', '.join(json.loads(ds.attrs['stores']))}")
    return 0


def _run_family_command(args: argparse.Namespace) -> int:
    command = args.command
    kwargs: dict = {}
    for name, decl in family_options(command).items():
        value = getattr(args, name)
        if decl[0][1].kind == "dict" and value is not None:
            value = dict(value)
        kwargs[name] = value
    for name in ("method", "covariates", "with_summary", "combine", "group_by", "compare", "compare_levels", "block",
                 "min_sections"):
        if hasattr(args, name):
            kwargs[name] = getattr(args, name)
    from spatialscale.results import check_anndata_target, write_anndata_copy

    ingest = _ingest_kwargs(args)
    if args.anndata_out is not None:
        source = _annotation_source(args.store)
        check_anndata_target(source, args.anndata_out, overwrite=args.overwrite)
    ds = api_function(command)(
        args.store, **kwargs, scheduler=args.scheduler, workers=args.workers, device=args.device,
        batch_memory=args.batch_memory, batch_size=args.batch_size, out=args.out, overwrite=args.overwrite,
        progress=not args.no_progress, ingest=ingest or None, ingest_to=args.ingest_to)
    _report(command, args, ds)
    if args.anndata_out is not None:
        written = write_anndata_copy(ds, source, args.anndata_out, key_added=args.key_added,
                                     overwrite=args.overwrite)
        print(f"annotated copy of {source} in {written}")
    return 0


def _annotation_source(store: str) -> str:
    """The AnnData file that ``--anndata-out`` copies: the input itself, or the one an isoform store came from."""
    import os

    from spatialscale.cohort import is_cohort
    from spatialscale.errors import InputError
    from spatialscale.families.common import is_anndata_input
    from spatialscale.store import open_store

    if is_anndata_input(store):
        return store
    if is_cohort(store):
        raise InputError("--anndata-out applies to one section, not to a cohort.")
    from spatialscale.store import source_stamp

    meta = open_store(store).meta
    source = str(meta.get("source", ""))
    if not source or not os.path.isabs(source) or not os.path.exists(source):
        raise InputError(f"--anndata-out: the AnnData that {store} was ingested from ({source or 'in memory'}) is not "
                         "found; give that AnnData file as STORE instead.")
    recorded = {k: meta.get(k) for k in ("source_size", "source_mtime_ns")}
    if recorded != source_stamp(source):  # the file there now is not the one the store was made from
        raise InputError(f"--anndata-out: {source} changed since {store} was ingested from it (size or modification "
                         "time differ); re-ingest, or give that AnnData file as STORE instead.")
    return source


def _report(command: str, args: argparse.Namespace, ds) -> None:
    if "section" in ds.dims:
        n_sig = int((ds["combined_pvalue_adj"] < 0.05).sum())
        print(f"{ds.sizes['gene']} genes in {ds.sizes['section']} sections tested ({ds.attrs['method']}, "
              f"{ds.attrs['combine']} combination); {n_sig} with combined BH-adjusted p < 0.05; results in {args.out}")
        if args.top:
            table = ds[["combined_pvalue", "combined_pvalue_adj", "n_sections_tested", "n_sections_significant"]]
            print(table.to_dataframe().nsmallest(args.top, "combined_pvalue").to_string())
        if "compare_pvalue_adj" in ds:
            print(f"{ds.attrs['compare']} ({', '.join(map(str, ds['level'].values))}; {ds.attrs['compare_test']}): "
                  f"{int((ds['compare_pvalue_adj'] < 0.05).sum())} with compare BH-adjusted p < 0.05")
        if "replicated_pvalue_adj" in ds:
            print(f"replicated in >= {ds.attrs['min_sections']} sections: "
                  f"{int((ds['replicated_pvalue_adj'] < 0.05).sum())} with BH-adjusted p < 0.05")
        for g in ds["group"].values if "group" in ds.dims else ():
            sig = int((ds["group_combined_pvalue_adj"].sel(group=g) < 0.05).sum())
            print(f"{ds.attrs['group_by']} = {g}: {sig} with combined BH-adjusted p < 0.05 "
                  f"({int((ds[ds.attrs['group_by']] == g).sum())} sections)")
    elif command == "sv":
        n_sig = int((ds["sv_pvalue_adj"] < 0.05).sum())
        how = [f"{ds.attrs['method']}, {ds.attrs['null']} null"]
        if ds.attrs.get("covariates"):
            how.append(f"adjusted for {', '.join(ds.attrs['covariates'])}")
        if ds.attrs.get("kernels"):
            how.append(f"{len(ds.attrs['kernels'])} kernels, {ds.attrs['kernel_combination']}")
        print(f"{ds.sizes['gene']} genes tested ({'; '.join(how)}); "
              f"{n_sig} with BH-adjusted p < 0.05; results in {args.out}")
        if args.top:
            cols = [c for c in ("sv_statistic", "sv_pvalue", "sv_pvalue_adj", "sv_effect", "n_isoforms") if c in ds]
            print(ds[cols].to_dataframe().nsmallest(args.top, "sv_pvalue").to_string())
    elif command == "du":
        n_sig = int((ds["du_pvalue_adj"] < 0.05).sum())
        print(f"{ds.sizes['gene']} genes x {ds.sizes['covariate']} covariates tested ({ds.attrs['method']}); "
              f"{n_sig} pairs with BH-adjusted p < 0.05; results in {args.out}")
        if args.top:
            table = ds[["du_statistic", "du_pvalue", "du_pvalue_adj"]].reset_coords(drop=True).to_dataframe()
            print(table.nsmallest(args.top, "du_pvalue").to_string())
    elif command == "glmm":
        print(f"fitted {ds.attrs['model']} for {ds.sizes['gene']} genes; {int(ds['converged'].sum())} converged; "
              f"results in {args.out}")
    else:
        print(f"summaries of {ds.sizes['gene']} genes and {ds.sizes['isoform']} isoforms; results in {args.out}")


def _parser() -> argparse.ArgumentParser:
    from spatialscale._version import __version__

    parser = _Parser(
        prog="spatialscale",
        description="Spatial isoform statistics (SPLISOSM's HSIC tests and multinomial GLM/GLMM) at scale on Dask.",
    )
    parser.add_argument("--version", action="version", version=f"spatialscale {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="say more: -v what runs where (plan, resume, results), -vv also Dask's own messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="AnnData (.h5ad or .zarr) or instrument output -> isoform store",
                       description="Ingest isoform counts from an AnnData, or an instrument output folder (Visium, "
                                   "Visium HD, Xenium, long-read; docs/instruments.md), into an isoform store (zarr).")
    p.add_argument("input", help="AnnData .h5ad file or .zarr store, or an instrument output folder")
    p.add_argument("store", help="isoform store to create (directory, or an s3:// / fsspec URL)")
    _add_ingest_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing isoform store")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    p = sub.add_parser("cohort", help="many sections: ingest a manifest into a cohort folder",
                       description="Cohorts of tissue sections, one isoform store each.")
    cohort = p.add_subparsers(dest="cohort_command", required=True)
    p = cohort.add_parser("ingest", help="ingest every section of a manifest (sections in parallel)",
                          description="Ingest every section listed in MANIFEST (CSV or TSV: a 'section' id column, "
                          "a 'path' column, further columns kept as section metadata) into OUT_DIR, one isoform "
                          "store per section. Sections that fail are named; the others are kept, and a re-run "
                          "ingests only what is missing or changed. With --library-key, MANIFEST is instead one "
                          "AnnData (.h5ad / .zarr) holding several sections, as squidpy keeps them: each value of "
                          "that obs column is a section, and obs columns constant within every section become "
                          "section metadata.")
    p.add_argument("manifest", help="CSV / TSV manifest (or, with --library-key, one multi-section AnnData)")
    p.add_argument("out_dir", help="cohort folder (created, or completed; a path or an s3:// / fsspec URL)")
    p.add_argument("--library-key", default=None, metavar="COLUMN",
                   help="obs column naming each spot's section in one multi-section AnnData (squidpy's "
                        "library_key, e.g. library_id)")
    _add_ingest_options(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler (or 'threads')")
    where.add_argument("--workers", type=int, metavar="N", help="start a LocalCluster with N worker processes")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    for command in COMMANDS:
        _add_family_command(sub, command)
    for command in ("deconvolve", "latent"):
        _add_model_command(sub, command)

    p = sub.add_parser("simulate", help="write simulated example data (sample.h5ad, a raster, a cohort)",
                       description="Write simulated isoform counts to try spatialscale on: a section (obs region, "
                       "celltype, rbp; spatially variable genes and genes whose usage depends on celltype), a "
                       "raster of bins, a cohort folder with a manifest, or one AnnData of several sections "
                       "(obs library_id).")
    p.add_argument("out", help="the .h5ad to write (--kind cohort: a folder)")
    p.add_argument("--kind", default="section", choices=("section", "raster", "cohort", "sections", "mixture"),
                   help="section (default), raster, cohort (a folder of sections and manifest.csv), sections "
                        "(one .h5ad of several sections, obs library_id and condition) or mixture (spots as "
                        "mixtures of cell types with their own expression and isoform usage; the cell types' "
                        "signatures beside it as <name>.reference.h5ad)")
    p.add_argument("--spots", type=int, default=900, help="spots per section, or bins of the raster (900)")
    p.add_argument("--genes", type=int, default=100, help="genes (100)")
    p.add_argument("--sections", type=int, default=3, help="cohort / sections: how many (3)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("demo", help="simulate a section, ingest it and run hsic-ir on a LocalCluster",
                       description="End-to-end demo on simulated data with known spatially variable genes.")
    p.add_argument("--spots", type=int, default=2500, help="spots (default 2500)")
    p.add_argument("--genes", type=int, default=400, help="genes (default 400)")
    p.add_argument("--sv-genes", type=int, default=60, help="truly spatially variable genes (60)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers (2)")
    p.add_argument("--out-dir", default="demo-output", help="where the store and results go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cohort", action="store_true",
                   help="a cohort instead: --sections sections of 900-1600 spots x --genes genes, weak shared SV "
                   "genes; prints per-section and combined recovery")
    p.add_argument("--sections", type=int, default=4, help="sections of the --cohort demo (4)")

    p = sub.add_parser("bench", help="time spatialscale against SPLISOSM on the same simulated data",
                       description="Run SPLISOSM 1.2.0 and spatialscale on the same data in one run.")
    p.add_argument("--spots", type=int, nargs="+", default=[10_000], help="section sizes (10000)")
    p.add_argument("--genes", type=int, nargs="+", default=[300], help="gene counts (300; --test du, raster: 200)")
    p.add_argument("--method", default="hsic-ir", help="SV method (hsic-ir); --test glmm: glmm-score (default) "
                   "or glmm-llr")
    p.add_argument("--null", default="liu", help="null (liu)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers for spatialscale (2)")
    p.add_argument("--test", default="sv", choices=("sv", "glmm", "du", "kernel", "raster", "compat", "latent",
                                                    "sv-adjusted", "ensemble"),
                   help="sv: HSIC SV tests; glmm: glmm-full fit + DU score test (genes of 3 isoforms); "
                   "du: hsic and hsic-gp DU tests of every gene x covariate; kernel: kernel build of large sections "
                   "(graph, standardisation, power sums, peak memory) at each --spots and --geometry; "
                   "raster: sv on square grids of --spots bins (kernel='fft', ~70%% under tissue) against SplisosmFFT; "
                   "compat: SPLISOSM's classes against spatialscale.compat, the same calls (--method hsic-ir: "
                   "SplisosmNP; glmm-score: SplisosmGLMM); latent: VAE training (epochs/s, peak memory, time to "
                   "the final loss) and NNLS deconvolution into 10 cell types against Smoother's NNLS, at --spots "
                   "(10000 100000) x --genes (500); sv-adjusted: sv_test adjusted for celltype + a numeric covariate "
                   "against unadjusted on the same store, local threads and --workers (--spots 10000 100000); "
                   "ensemble: one sv_test(kernels=[store, splisosm:rho=0.9, sar:rho=0.2]) against the 3 single-kernel "
                   "runs on stores ingested with them, local threads (--spots 1000 10000)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="latent: torch device (cpu)")
    p.add_argument("--epochs", type=int, default=20, help="latent: VAE epochs per run (20)")
    p.add_argument("--geometry", nargs="+", default=["hex", "random", "grid"], choices=("hex", "random", "grid"),
                   help="kernel: spot layouts (hex random grid)")
    p.add_argument("--covariates", type=int, default=50, help="du: covariates (50)")
    p.add_argument("--du-methods", default="hsic,hsic-gp", help="du: methods, comma separated (hsic,hsic-gp)")
    p.add_argument("--gp-backends", default="auto",
                   help="du: spatialscale's hsic-gp GP backends, comma separated (auto; also exact, lowrank, sod)")
    p.add_argument("--splisosm-gp-covariates", type=int, default=None,
                   help="du: run SPLISOSM's hsic-gp on this many covariates and extrapolate its time "
                   "(default: all up to 2,000 spots, else 2; minutes per covariate at 10,000 spots)")
    p.add_argument("--batch-memory", default="256MB", help="spatialscale's per-task memory budget (256MB)")
    p.add_argument("--splisosm-genes", type=int, default=None,
                   help="sv: run SplisosmNP on this many genes and extrapolate its test time (default: every gene up "
                   "to 2 x 10^8 genes x spots, else 1000)")
    p.add_argument("--umis", type=float, default=2000.0,
                   help="sv: counts per spot of sections of more than 5,000 genes, drawn sparsely as a whole "
                   "transcriptome (2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cohort", action="store_true",
                   help="sv on a simulated cohort: one graph over all sections vs a loop of single-section runs on "
                   "the same cluster, vs SplisosmNP section by section, and 1 vs --workers workers; --spots LO HI is "
                   "the range of spots per section (1500 3000), --genes one gene count (300)")
    p.add_argument("--sections", type=int, default=24, help="--cohort: sections (24)")
    p.add_argument("--no-splisosm", action="store_true",
                   help="sv / --cohort: skip the SplisosmNP reference (sizes it cannot reach)")
    p.add_argument("--no-scaling", action="store_true", help="--cohort: skip the 1-worker run")
    p.add_argument("--repeats", type=int, default=3,
                   help="--cohort: time each spatialscale run this many times, report the median (3)")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "ingest":
        from pathlib import Path

        from spatialscale.remote import exists, is_url
        from spatialscale.store import ingest

        there = exists(args.store) if is_url(args.store) else Path(args.store).exists()
        existed = there and not args.overwrite  # then ingest reuses it or refuses
        store = ingest(args.input, args.store, **_ingest_kwargs(args), overwrite=args.overwrite,
                       progress=not args.no_progress)
        print(f"{'reused' if existed else 'wrote'} {store!r}" + (" (same input and ingest options)" if existed else ""))
        return 0
    if args.command == "cohort":
        from spatialscale.cohort import ingest_cohort

        cohort = ingest_cohort(args.manifest, args.out_dir, library_key=args.library_key, scheduler=args.scheduler,
                               workers=args.workers, progress=not args.no_progress, **_ingest_kwargs(args))
        print(f"cohort of {len(cohort.section_ids)} section(s) in {cohort.location}: {', '.join(cohort.section_ids)}")
        return 0
    if args.command in COMMANDS:
        return _run_family_command(args)
    if args.command in ("deconvolve", "latent"):
        return _run_model_command(args)
    if args.command == "simulate":
        from pathlib import Path

        from spatialscale.errors import InputError
        from spatialscale.remote import is_url
        from spatialscale.simulate import write_example

        if is_url(args.out):
            raise InputError(f"simulate writes local files; {args.out} is a URL (give a local path).")
        out = Path(args.out)
        for path in [out] + ([out.with_suffix(".reference.h5ad")] if args.kind == "mixture" else []):
            if path.exists():
                raise InputError(f"{path} already exists; simulate writes a new file or folder.")
        if args.kind != "cohort" and out.suffix != ".h5ad":
            raise InputError(f"name the file *.h5ad (got {out.name}).")
        for name in ("spots", "genes", "sections"):
            if getattr(args, name) < (10 if name == "spots" else 1):
                raise InputError(f"--{name} is too small ({getattr(args, name)}).")
        written = write_example(out, args.kind, n_spots=args.spots, n_genes=args.genes, n_sections=args.sections,
                                seed=args.seed)
        print(f"wrote {written}")
        return 0
    if args.command == "demo":
        from spatialscale.demo import run_cohort_demo, run_demo

        if args.cohort:
            run_cohort_demo(n_sections=args.sections, n_genes=args.genes if args.genes != 400 else 200,
                            workers=args.workers, out_dir=args.out_dir, seed=args.seed)
            return 0
        run_demo(n_spots=args.spots, n_genes=args.genes, n_sv=args.sv_genes, workers=args.workers,
                 out_dir=args.out_dir, seed=args.seed)
        return 0
    if args.command == "bench":
        from spatialscale.bench import (
            run_bench,
            run_cohort_bench,
            run_du_bench,
            run_glmm_bench,
            run_kernel_bench,
            run_raster_bench,
        )

        if args.cohort:
            from spatialscale.errors import InputError

            if args.test != "sv":
                raise InputError("bench --cohort times the sv tests (leave --test at sv).")
            spots = [1500, 3000] if args.spots == [10_000] else args.spots
            if len(spots) != 2 or not 0 < spots[0] <= spots[1]:
                raise InputError("bench --cohort: --spots takes the range of spots per section, LO HI (1500 3000).")
            if len(args.genes) != 1 or args.sections < 1 or args.repeats < 1:
                raise InputError("bench --cohort: give one --genes count, --sections >= 1 and --repeats >= 1.")
            run_cohort_bench(args.sections, (spots[0], spots[1]), args.genes[0], method=args.method, null=args.null,
                             workers=args.workers, seed=args.seed, splisosm=not args.no_splisosm,
                             scaling=not args.no_scaling, batch_memory=args.batch_memory,
                             repeats=args.repeats)
            return 0
        if args.test == "du":
            genes = args.genes if args.genes != [300] else [200]
            run_du_bench(spots=args.spots, genes=genes, covariates=args.covariates,
                         methods=tuple(m.strip() for m in args.du_methods.split(",")), workers=args.workers,
                         seed=args.seed, splisosm_gp_covariates=args.splisosm_gp_covariates,
                         gp_backends=tuple(b.strip() for b in args.gp_backends.split(",")))
            return 0
        if args.test == "kernel":
            spots = [100_000] if args.spots == [10_000] else args.spots
            run_kernel_bench(spots, tuple(args.geometry), seed=args.seed)
            return 0
        if args.test == "raster":
            sides = [max(2, round(float(n) ** 0.5)) for n in args.spots]
            run_raster_bench([(s, s) for s in sides], genes=args.genes if args.genes != [300] else [200],
                             method=args.method, workers=args.workers, seed=args.seed,
                             batch_memory=args.batch_memory, splisosm=not args.no_splisosm)
            return 0
        if args.test == "compat":
            from spatialscale.bench import run_compat_bench
            from spatialscale.errors import InputError

            if args.method not in ("hsic-ir", "glmm-score"):
                raise InputError("bench --test compat: --method hsic-ir (SplisosmNP, default) or glmm-score "
                                 "(SplisosmGLMM).")
            run_compat_bench(spots=args.spots, genes=args.genes, model="np" if args.method == "hsic-ir" else "glmm",
                             workers=args.workers, seed=args.seed)
            return 0
        if args.test == "latent":
            from spatialscale.bench import run_latent_bench

            spots = [10_000, 100_000] if args.spots == [10_000] else args.spots
            genes = 500 if args.genes == [300] else args.genes[0]
            run_latent_bench(spots, genes, vae_epochs=args.epochs, device=args.device, seed=args.seed,
                             smoother=not args.no_splisosm)
            return 0
        if args.test == "sv-adjusted":
            from spatialscale.bench import run_adjusted_bench

            spots = [10_000, 100_000] if args.spots == [10_000] else args.spots
            run_adjusted_bench(spots, args.genes[0], workers=args.workers, repeats=args.repeats, seed=args.seed,
                               method=args.method, batch_memory=args.batch_memory)
            return 0
        if args.test == "ensemble":
            from spatialscale.bench import run_ensemble_bench

            spots = [1000, 10_000] if args.spots == [10_000] else args.spots
            run_ensemble_bench(spots, args.genes[0], repeats=args.repeats, seed=args.seed, method=args.method,
                               batch_memory=args.batch_memory)
            return 0
        if args.device != "cpu":
            from spatialscale.errors import InputError

            raise InputError("bench --device applies to --test latent (the other tests take their device from "
                             "their workers).")
        if args.test == "glmm":
            method = "glmm-score" if args.method == "hsic-ir" else args.method
            run_glmm_bench(spots=args.spots, genes=args.genes, method=method, workers=args.workers, seed=args.seed)
            return 0
        run_bench(spots=args.spots, genes=args.genes, method=args.method, null=args.null,
                  workers=args.workers, seed=args.seed, batch_memory=args.batch_memory,
                  splisosm=not args.no_splisosm, splisosm_genes=args.splisosm_genes, umis_per_spot=args.umis)
        return 0
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces choices


def _configure_logging(verbose: int) -> None:
    """Quiet by default (warnings only); ``-v``: spatialscale's progress messages; ``-vv``: Dask's too."""
    import logging

    logger = logging.getLogger("spatialscale")
    if verbose and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("spatialscale: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.INFO if verbose > 1 else logging.WARNING)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``spatialscale`` command.

    Exit codes: 0 success; 2 bad input, options, environment (unreachable
    scheduler, unwritable or full disk) or a task that kept failing, each
    reported as one line naming the problem; 130 interrupted (finished
    batches are kept; the same command resumes); 1 an unexpected internal
    error (one line; ``SPATIALSCALE_TRACEBACK=1`` shows the traceback).
    """
    import os

    from spatialscale.errors import InputError

    args = _parser().parse_args(argv)
    _configure_logging(args.verbose)
    warnings.filterwarnings("ignore", message="zarr v3 autosharding")
    warnings.filterwarnings("ignore", message="Consolidated metadata")
    where = f"spatialscale {args.command}"
    try:
        return _run(args)
    except (InputError, FileExistsError) as exc:
        print(f"{where}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{where}: interrupted; finished batches are kept and re-running the same command resumes.",
              file=sys.stderr)
        return 130
    except OSError as exc:  # full disk, permissions, a vanished file
        print(f"{where}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - never a raw traceback on the terminal
        if os.environ.get("SPATIALSCALE_TRACEBACK"):
            raise
        if type(exc).__name__ == "KilledWorker":
            print(f"{where}: error: a task kept killing its worker ({_one_line(exc)}); finished batches are kept, "
                  "re-running the same command resumes.", file=sys.stderr)
            return 2
        print(f"{where}: internal error: {type(exc).__name__}: {_one_line(exc)} (set SPATIALSCALE_TRACEBACK=1 for "
              "the traceback, and please report it).", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
