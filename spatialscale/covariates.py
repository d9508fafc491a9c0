"""Covariates for differential-usage tests: obs columns or arrays -> a design matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from spatialscale.errors import InputError

__all__ = ["one_hot", "resolve_covariates"]

#: covariates with a standard deviation at or below this are constant
_MIN_STD = 1e-5


def one_hot(col: pd.Series, name: str) -> pd.DataFrame:
    """Indicator columns ``<name>_<level>`` of every level of ``col``, in category order (missing values: all 0)."""
    cat = col.astype("category")
    levels = list(cat.cat.categories)
    return pd.DataFrame({f"{name}_{lv}": (cat == lv).to_numpy(float) for lv in levels}, index=col.index)


#: a text / categorical column with more levels than this is almost surely not a grouping
MAX_LEVELS = 100
#: a categorical whose level names are all numbers is taken as a grouping (cluster ids) up to this many levels
MAX_NUMERIC_LEVELS = 50


def _check_levels(col: pd.Series, name: str, n: int) -> None:
    """Refuse text columns that are numbers in disguise, or have too many levels to one-hot encode.

    Categorical columns with numeric level names (leiden clusters ``"0"``,
    ``"1"``...) are groupings and are kept, up to ``MAX_NUMERIC_LEVELS`` levels
    (AnnData stores every text column as a categorical).
    """
    levels = pd.Series(col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else col.unique())
    numeric = col.dtype != bool and len(levels) and pd.to_numeric(levels.astype(str), errors="coerce").notna().all()
    if numeric and (not isinstance(col.dtype, pd.CategoricalDtype) or len(levels) > MAX_NUMERIC_LEVELS):
        raise InputError(f"covariate {name!r} is text holding {len(levels)} different numbers; convert it to a "
                         f"numeric column (obs[{name!r}] = pd.to_numeric(...)), or to a categorical of at most "
                         f"{MAX_NUMERIC_LEVELS} levels to one-hot encode it.")
    levels = col.nunique()
    if levels > MAX_LEVELS or levels >= n:
        raise InputError(f"covariate {name!r} has {levels} levels; one-hot encoding it would add {levels} "
                         f"covariates (limit {MAX_LEVELS}). Group its levels or pass a design matrix.")


def resolve_covariates(obs: pd.DataFrame, covariates: Any) -> tuple[list[str], np.ndarray]:
    """Build the ``(n_spots, F)`` design from obs column names, an array or a DataFrame.

    Categorical (and string / boolean) obs columns are one-hot encoded with
    every level kept (``celltype_B``...); numeric columns are used as floats.
    Arrays and DataFrames must have one row per spot (a DataFrame indexed by
    spot names is aligned to the store's spots).

    Raises
    ------
    InputError
        Unknown columns, a row count other than the spots, NaN or infinite
        values (no rule fills them silently: drop or impute first), or a
        constant covariate.
    """
    n = len(obs)
    if isinstance(covariates, str):
        covariates = [c.strip() for c in covariates.split(",") if c.strip()]
    if isinstance(covariates, pd.Series):
        covariates = covariates.to_frame()
    if isinstance(covariates, Sequence) and not isinstance(covariates, np.ndarray):
        missing = [c for c in covariates if c not in obs.columns]
        if missing:
            raise InputError(f"covariate column(s) {missing} not found in obs (available: {list(obs.columns)}).")
        if not covariates:
            raise InputError("no covariates given.")
        dup = sorted({c for c in covariates if list(covariates).count(c) > 1})
        if dup:
            raise InputError(f"covariate(s) {dup} given more than once.")
        parts = []
        for c in covariates:
            col = obs[c]
            if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object or col.dtype == bool:
                if col.isna().any():
                    raise InputError(f"covariate {c!r} has missing values; drop those spots or fill them first.")
                _check_levels(col, c, n)
                parts.append(one_hot(col, c))
            else:
                parts.append(pd.DataFrame({c: pd.to_numeric(col, errors="raise").to_numpy(float)}, index=obs.index))
        frame = pd.concat(parts, axis=1)
    elif isinstance(covariates, pd.DataFrame):
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
            frame = frame.astype(float)
        except (TypeError, ValueError) as exc:
            raise InputError(f"covariate DataFrame has non-numeric columns ({exc}); one-hot encode them or pass "
                             "obs column names.") from None
    else:
        try:
            arr = np.asarray(covariates, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"covariates are not numeric ({exc}).") from None
        arr = arr[:, None] if arr.ndim == 1 else arr
        if arr.ndim != 2 or arr.shape[0] != n:
            raise InputError(f"covariates have shape {arr.shape} but the store has {n} spots.")
        frame = pd.DataFrame(arr, columns=[f"factor_{i + 1}" for i in range(arr.shape[1])])
    z = frame.to_numpy(np.float64)
    names = [str(c) for c in frame.columns]
    bad = ~np.isfinite(z).all(axis=0)
    if bad.any():
        raise InputError(f"covariate(s) {[names[i] for i in np.flatnonzero(bad)]} have NaN or infinite values; "
                         "drop those spots or fill them first.")
    const = z.std(axis=0) <= _MIN_STD
    if const.any():
        raise InputError(f"covariate(s) {[names[i] for i in np.flatnonzero(const)]} are constant across spots.")
    return names, z
