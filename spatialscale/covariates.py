"""Covariates for differential-usage tests: obs columns or arrays -> a design matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from spatialscale.errors import InputError

__all__ = ["resolve_covariates"]

#: covariates with a standard deviation at or below this are constant
_MIN_STD = 1e-5


def _one_hot(col: pd.Series, name: str) -> pd.DataFrame:
    cat = col.astype("category")
    levels = list(cat.cat.categories)
    return pd.DataFrame({f"{name}_{lv}": (cat == lv).to_numpy(float) for lv in levels}, index=col.index)


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
        parts = []
        for c in covariates:
            col = obs[c]
            if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype == object or col.dtype == bool:
                if col.isna().any():
                    raise InputError(f"covariate {c!r} has missing values; drop those spots or fill them first.")
                parts.append(_one_hot(col, c))
            else:
                parts.append(pd.DataFrame({c: pd.to_numeric(col, errors="raise").to_numpy(float)}, index=obs.index))
        frame = pd.concat(parts, axis=1)
    elif isinstance(covariates, pd.DataFrame):
        frame = covariates
        if frame.index.isin(obs.index).all() and len(frame) == n:
            frame = frame.loc[obs.index]
        elif len(frame) != n:
            raise InputError(f"covariates have {len(frame)} rows but the store has {n} spots.")
        frame = frame.astype(float)
    else:
        arr = np.asarray(covariates, dtype=np.float64)
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
