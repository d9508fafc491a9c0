"""Covariates for differential-usage tests: obs columns or arrays -> a design and its tests.

Numeric obs columns, arrays and DataFrames give one test per column.  A
categorical, string or boolean obs column gives one test per covariate:

* two observed levels: one 0/1 indicator of the second level, the first
  level (category order; ``False`` for booleans) being the reference;
* ``k >= 3`` levels: the indicators of its levels, tested jointly (every
  level for the kernel tests, every level but the reference for regression
  models with an intercept);
* with ``per_level=True``: one indicator per level, each tested against the
  rest (``<column>_<level>``, the layout of SPLISOSM's one-hot design).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from spatialscale.errors import InputError

__all__ = ["ENCODINGS", "CovariateDesign", "encode_covariates", "one_hot", "resolve_covariates"]

#: covariates with a standard deviation at or below this are constant
_MIN_STD = 1e-5
#: how a test's columns were made: a number, a two-level indicator, the joint indicators of k >= 3 levels,
#: or one level against the rest (``per_level=True``)
ENCODINGS = ("numeric", "binary", "joint", "level")


def one_hot(col: pd.Series, name: str) -> pd.DataFrame:
    """Indicator columns ``<name>_<level>`` of every level of ``col``, in category order (missing values: all 0)."""
    cat = col.astype("category")
    levels = list(cat.cat.categories)
    return pd.DataFrame({f"{name}_{lv}": (cat == lv).to_numpy(float) for lv in levels}, index=col.index)


#: a text / categorical column with more levels than this is almost surely not a grouping
MAX_LEVELS = 100
#: a categorical whose level names are all numbers is taken as a grouping (cluster ids) up to this many levels
MAX_NUMERIC_LEVELS = 50


@dataclass(frozen=True)
class CovariateDesign:
    """The design columns of DU tests and the columns each test takes.

    Attributes
    ----------
    z
        ``(n, C)`` float64 design columns.
    columns
        The ``C`` column names: numeric columns by their name, indicators
        ``<covariate>[<level>]``, per-level indicators ``<covariate>_<level>``.
    tests
        The ``T`` test names (the ``covariate`` coordinate of DU results):
        the column's or covariate's name, ``<covariate>_<level>`` per level.
    groups
        ``T`` tuples of column indices: the columns each test takes jointly,
        in column order.
    reference
        ``T`` reference levels: the level coded 0 by a binary indicator, the
        reference of a joint test; ``""`` for numeric and per-level tests.
    encoding
        ``T`` entries of :data:`ENCODINGS`.
    """

    z: np.ndarray
    columns: list[str]
    tests: list[str]
    groups: tuple[tuple[int, ...], ...]
    reference: list[str]
    encoding: list[str]

    @property
    def joint(self) -> list[str]:
        """The tests that take several columns jointly (categoricals of k >= 3 levels)."""
        return [t for t, g in zip(self.tests, self.groups) if len(g) > 1]

    @property
    def column_groups(self) -> tuple[tuple[int, ...], ...] | None:
        """:attr:`groups` when some test takes several columns, else ``None`` (one test per column)."""
        return self.groups if self.joint else None

    @property
    def numeric(self) -> bool:
        """Whether every test is one numeric column (no level was encoded)."""
        return all(e == "numeric" for e in self.encoding)

    def describe(self) -> dict[str, Any]:
        """The encoding, for fingerprints: tests, their columns, references and encodings."""
        return {"tests": self.tests, "groups": [list(g) for g in self.groups], "reference": self.reference,
                "encoding": self.encoding}


def _check_levels(col: pd.Series, name: str, n: int) -> None:
    """Refuse text columns that are numbers in disguise, or have too many levels to encode.

    Categorical columns with numeric level names (leiden clusters ``"0"``,
    ``"1"``...) are groupings and are kept, up to ``MAX_NUMERIC_LEVELS`` levels
    (AnnData stores every text column as a categorical).
    """
    levels = pd.Series(col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else col.unique())
    numeric = col.dtype != bool and len(levels) and pd.to_numeric(levels.astype(str), errors="coerce").notna().all()
    if numeric and (not isinstance(col.dtype, pd.CategoricalDtype) or len(levels) > MAX_NUMERIC_LEVELS):
        raise InputError(f"covariate {name!r} is text holding {len(levels)} different numbers; convert it to a "
                         f"numeric column (obs[{name!r}] = pd.to_numeric(...)), or to a categorical of at most "
                         f"{MAX_NUMERIC_LEVELS} levels to encode its levels.")
    levels = col.nunique()
    if levels > MAX_LEVELS or levels >= n:
        raise InputError(f"covariate {name!r} has {levels} levels; encoding it would add {levels} "
                         f"indicator columns (limit {MAX_LEVELS}). Group its levels or pass a design matrix.")


def _is_categorical(col: pd.Series) -> bool:
    return isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object or col.dtype == bool


def level_indicators(col: pd.Series) -> tuple[list[Any], np.ndarray]:
    """The observed levels of ``col`` (category order; sorted for text, ``False, True`` for booleans) and
    their ``(n, k)`` 0/1 indicators.  Categories no spot takes are dropped."""
    cat = col.astype("category").cat.remove_unused_categories()
    codes = cat.cat.codes.to_numpy()
    levels = list(cat.cat.categories)
    return levels, (codes[:, None] == np.arange(len(levels))[None, :]).astype(np.float64)


def _encode_column(col: pd.Series, name: str, n: int, per_level: bool,
                   drop_reference: bool) -> list[tuple[str, list[str], np.ndarray, str, str]]:
    """One obs column's tests: ``(test, column names, (n, c) columns, reference, encoding)`` each."""
    if not _is_categorical(col):
        return [(name, [name], pd.to_numeric(col, errors="raise").to_numpy(float)[:, None], "", "numeric")]
    if col.isna().any():
        raise InputError(f"covariate {name!r} has missing values; drop those spots or fill them first.")
    _check_levels(col, name, n)
    levels, ind = level_indicators(col)
    if len(levels) < 2:
        raise InputError(f"covariate {name!r} takes one value ({levels[0]!r}) on every spot: nothing to test.")
    if per_level:
        return [(f"{name}_{lv}", [f"{name}_{lv}"], ind[:, [j]], "", "level") for j, lv in enumerate(levels)]
    ref = str(levels[0])
    if len(levels) == 2:
        return [(name, [f"{name}[{levels[1]}]"], ind[:, [1]], ref, "binary")]
    keep = range(1, len(levels)) if drop_reference else range(len(levels))
    return [(name, [f"{name}[{levels[j]}]" for j in keep], ind[:, list(keep)], ref, "joint")]


def encode_covariates(obs: pd.DataFrame, covariates: Any, *, per_level: bool = False,
                      drop_reference: bool = False) -> CovariateDesign:
    """Build the DU design and its tests from obs column names, an array or a DataFrame.

    Parameters
    ----------
    obs
        The store's spot annotations.
    covariates
        obs column names (a list, or ``"a,b"``), or an array / DataFrame with
        one row per spot (a DataFrame indexed by spot names is aligned to the
        store's spots): numeric, one test per column.
    per_level
        Categorical (string, boolean) obs columns: one indicator per level,
        each its own test ``<column>_<level>`` (every level kept, as
        SPLISOSM's one-hot design).  Default: one test per column, a single
        indicator for two levels, the levels' indicators jointly for more.
    drop_reference
        Joint tests of ``k >= 3`` levels: leave out the reference level's
        indicator (``k - 1`` columns, for models with an intercept) instead
        of keeping all ``k``.

    Returns
    -------
    CovariateDesign
        The columns, the tests and the columns each takes.

    Raises
    ------
    InputError
        Unknown columns, a row count other than the spots, NaN or infinite
        values (no rule fills them silently: drop or impute first), a
        constant covariate, or a text column of more than ``MAX_LEVELS``
        levels or holding numbers.
    """
    n = len(obs)
    if isinstance(covariates, str):
        covariates = [c.strip() for c in covariates.split(",") if c.strip()]
    if isinstance(covariates, pd.Series):
        covariates = covariates.to_frame()
    if isinstance(covariates, Sequence) and not isinstance(covariates, np.ndarray):
        covariates = expand_covariate_sets(obs, covariates)
        missing = [c for c in covariates if c not in obs.columns]
        if missing:
            sets = sorted(obs.attrs.get("covariate_sets") or {})
            raise InputError(f"covariate column(s) {missing} not found in obs (available: {list(obs.columns)}"
                             + (f"; covariate sets: {sets}" if sets else "") + ").")
        if not covariates:
            raise InputError("no covariates given.")
        dup = sorted({c for c in covariates if list(covariates).count(c) > 1})
        if dup:
            raise InputError(f"covariate(s) {dup} given more than once.")
        tests = [t for c in covariates for t in _encode_column(obs[c], c, n, per_level, drop_reference)]
    else:
        frame = _numeric_frame(obs, covariates)
        tests = [(str(c), [str(c)], frame[[c]].to_numpy(np.float64), "", "numeric") for c in frame.columns]
    z = np.concatenate([t[2] for t in tests], axis=1)
    columns = [c for t in tests for c in t[1]]
    sizes = np.cumsum([0] + [len(t[1]) for t in tests])
    bad = ~np.isfinite(z).all(axis=0)
    if bad.any():
        raise InputError(f"covariate(s) {[columns[i] for i in np.flatnonzero(bad)]} have NaN or infinite values; "
                         "drop those spots or fill them first.")
    const = z.std(axis=0) <= _MIN_STD
    if const.any():
        raise InputError(f"covariate(s) {[columns[i] for i in np.flatnonzero(const)]} are constant across spots.")
    return CovariateDesign(z=z, columns=columns, tests=[t[0] for t in tests],
                           groups=tuple(tuple(range(a, b)) for a, b in zip(sizes[:-1], sizes[1:])),
                           reference=[t[3] for t in tests], encoding=[t[4] for t in tests])


def expand_covariate_sets(obs: pd.DataFrame, names: Sequence[Any]) -> list[Any]:
    """Replace the name of a covariate set written into the store (``"latent"``, ``"props"``) by its columns.

    The sets are those of ``obs.attrs["covariate_sets"]`` (see
    :meth:`spatialscale.store.IsoformStore.obs`); an ``obs`` column of the same
    name wins (a set may not take an existing column's name).
    """
    sets = obs.attrs.get("covariate_sets") or {}
    out: list[Any] = []
    for c in names:
        if isinstance(c, str) and c not in obs.columns and c in sets:
            out += list(sets[c])
        else:
            out.append(c)
    return out


def _numeric_frame(obs: pd.DataFrame, covariates: Any) -> pd.DataFrame:
    """An array's or DataFrame's covariates as a float DataFrame in the store's spot order."""
    n = len(obs)
    if isinstance(covariates, pd.DataFrame):
        frame = covariates
        if len(frame) != n:
            raise InputError(f"covariates have {len(frame)} rows but the store has {n} spots.")
        if frame.index.astype(str).isin(obs.index.astype(str)).all() and frame.index.is_unique:
            frame = frame.set_axis(frame.index.astype(str)).loc[obs.index.astype(str)]  # aligned by spot name
        elif not isinstance(frame.index, pd.RangeIndex):
            raise InputError("the covariate DataFrame's index does not match the store's spot names; index it by "
                             "spot name (it is then aligned), or pass a plain array / RangeIndex to use row order.")
        dup = frame.columns[frame.columns.duplicated()]
        if len(dup):
            raise InputError(f"covariate column(s) {sorted(map(str, set(dup)))} appear more than once.")
        try:
            return frame.astype(float)
        except (TypeError, ValueError) as exc:
            raise InputError(f"covariate DataFrame has non-numeric columns ({exc}); encode them as numbers or "
                             "pass obs column names.") from None
    try:
        arr = np.asarray(covariates, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"covariates are not numeric ({exc}).") from None
    arr = arr[:, None] if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.shape[0] != n:
        raise InputError(f"covariates have shape {arr.shape} but the store has {n} spots.")
    return pd.DataFrame(arr, columns=[f"factor_{i + 1}" for i in range(arr.shape[1])])


def resolve_covariates(obs: pd.DataFrame, covariates: Any) -> tuple[list[str], np.ndarray]:
    """The ``(n_spots, F)`` design with every level of a categorical kept, and its column names.

    Categorical (string, boolean) obs columns become one indicator per
    observed level (``celltype_B``...; :func:`encode_covariates` with
    ``per_level=True``); numeric columns, arrays and DataFrames are used as
    floats.  The DU tests use :func:`encode_covariates` (one test per
    covariate by default).

    Raises
    ------
    InputError
        As :func:`encode_covariates`.
    """
    design = encode_covariates(obs, covariates, per_level=True)
    return design.columns, design.z
