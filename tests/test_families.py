"""The test-family registry: CLI and API generated from one set of definitions; a new family is one module."""

from __future__ import annotations

import argparse
import functools
import inspect

import numpy as np
import pytest
import xarray as xr

import spatialscale
from spatialscale import InputError
from spatialscale.cli import COMMANDS, _parser, api_function, family_options
from spatialscale.families import FAMILIES, Family, Option, Prepared, methods_of, run_family
from spatialscale.families.common import batch_counts, ingest_option_names, provenance
from spatialscale.options import ExecutionOptions
from spatialscale.results import VARIABLES, make_dataset

EXECUTION = {"scheduler", "workers", "device", "batch_memory", "batch_size", "no_progress", "overwrite", "out"}


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = _parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_cli_and_api_match_name_for_name_with_choices(command):
    sub = _subparser(command)
    flags = {a.dest: a for a in sub._actions if a.dest != "help"}
    declared = family_options(command)
    fixed = EXECUTION | {"store", "method", "covariates", "with_summary", "top", "combine", "group_by", "compare",
                         "compare_levels", "block", "min_sections"}
    # AnnData inputs: every ingest option is a flag of its Python name and a keyword of the API
    options = set(ingest_option_names()) - {"block_bytes"}
    ingest = options | {"ingest_to", "anndata_out", "key_added"}
    assert set(flags) - fixed - ingest == set(declared)  # every family option is a flag, and nothing else is
    assert ingest <= set(flags)
    api = inspect.signature(api_function(command)).parameters
    strings = {}
    for a in sub._actions:
        strings.setdefault(a.dest, []).extend(a.option_strings)
    for name in options:
        assert name in api and f"--{name.replace('_', '-')}" in strings[name]
    for name, decl in declared.items():
        assert name in api, f"{command}: API lacks {name}"
        assert api[name].default is None or decl[0][1].kind == "bool" or api[name].default == decl[0][1].default
        choices = {c for _, o in decl for c in (o.choices or ())}
        assert set(flags[name].choices or ()) == choices
    if methods_of(command):
        assert set(flags["method"].choices) == set(methods_of(command))
        assert api["method"].default in methods_of(command)
    for name in ("scheduler", "workers", "device", "batch_memory", "batch_size", "out", "overwrite", "progress",
                 "ingest", "ingest_to"):
        assert name in api


def test_every_family_declares_registry_variables_and_unique_methods():
    seen = {}
    for fam in FAMILIES.values():
        assert set(fam.variables) <= set(VARIABLES), fam.name
        for m in fam.methods:
            assert (fam.command, m) not in seen, m
            seen[(fam.command, m)] = fam.name
        for opt in fam.options:
            assert set(opt.methods) <= set(fam.methods)
            assert opt.choices is None or opt.default is None or opt.default in opt.choices


def test_an_option_that_does_not_apply_is_an_error(small_store):
    with pytest.raises(InputError, match=r"'null' does not apply to method 'hsic' \(it applies to hsic-gp\)"):
        spatialscale.du_test(small_store, "region", method="hsic", null="gp", scheduler="threads")
    with pytest.raises(InputError, match="'glmm' does not apply to method 'hsic-ir'"):
        spatialscale.sv_test(small_store, glmm={"lr": 0.1}, scheduler="threads")
    # restating an inapplicable option's default changes nothing and is allowed
    a = spatialscale.sv_test(small_store, method="hsic-ic", transformation="none", scheduler="threads",
                             progress=False)
    b = spatialscale.sv_test(small_store, method="hsic-ic", scheduler="threads", progress=False)
    np.testing.assert_array_equal(a["sv_pvalue"].values, b["sv_pvalue"].values)


def test_execution_options_object_is_accepted_everywhere(small_store, tmp_path):
    opts = ExecutionOptions(scheduler="threads", batch_size=3, progress=False, out=tmp_path / "sv.zarr")
    ds = spatialscale.sv_test(small_store, options=opts)
    assert (tmp_path / "sv.zarr").exists() and ds.attrs["execution"] == "threads"
    summary = spatialscale.feature_summary(small_store, options=ExecutionOptions(scheduler="threads", progress=False))
    assert summary.sizes["gene"] == small_store.n_genes
    with pytest.raises(InputError, match="not both"):
        spatialscale.glmm_fit(small_store, model="glm", options=opts, batch_size=5)


# ---------------------------------------------------------------- a new family is one module
def _toy_task(store_path: str, batch) -> dict:
    counts = batch_counts(store_path, batch)
    return {"total": counts.sum(axis=(1, 2))}


def _toy_prepare(store, method, opts, covariates, device) -> Prepared:
    def assemble(run) -> xr.Dataset:
        total = np.concatenate([r["total"] for r in run.parts]) * opts["scale"]
        return make_dataset(store.genes.index.to_numpy(), {"sv_statistic": total},
                            {"method": method, **provenance(store), "execution": run.kind})

    return Prepared(kind="toy", params={"scale": opts["scale"]}, label="toy", assemble=assemble,
                    task=functools.partial(_toy_task, str(store.path)), bytes_per_gene=lambda p: 8.0 * p)


TOY = Family(name="sv-toy", command="sv", methods=("toy-total",), description="total counts per gene",
             options=(Option("scale", 1, "multiply the totals", kind="int"),), prepare=_toy_prepare,
             variables=("sv_statistic",))


def test_a_new_family_plugs_into_engine_and_cli(small_store, tmp_path, monkeypatch):
    monkeypatch.setitem(FAMILIES, TOY.name, TOY)
    ds = run_family("sv", small_store, method="toy-total", options={"scale": 2},
                    execution=ExecutionOptions(scheduler="threads", progress=False, batch_size=2,
                                               out=tmp_path / "toy.zarr"))
    want = [2 * small_store.gene_counts(g).sum() for g in ds["gene"].values]
    np.testing.assert_allclose(ds["sv_statistic"].values, want)
    assert spatialscale.open_results(tmp_path / "toy.zarr")["sv_statistic"].values.tolist() == list(want)
    via_api = spatialscale.sv_test(small_store, method="toy-total", scale=3, scheduler="threads", progress=False)
    np.testing.assert_allclose(via_api["sv_statistic"].values, 1.5 * ds["sv_statistic"].values)
    with pytest.raises(InputError, match="'scale' does not apply to method 'hsic-ir'"):
        spatialscale.sv_test(small_store, scale=3, scheduler="threads")
    sub = _subparser("sv")
    assert "toy-total" in next(a for a in sub._actions if a.dest == "method").choices
    assert any(a.dest == "scale" for a in sub._actions)
