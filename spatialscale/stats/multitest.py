"""Multiple-testing adjustment across genes."""

from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["bh_adjust"]


def bh_adjust(pvalues: np.ndarray, axis: int = 0) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values; NaN entries stay NaN.

    Parameters
    ----------
    pvalues
        P-values; adjusted independently along ``axis`` slices.
    axis
        Axis of the genes.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    p = np.moveaxis(p, axis, -1)
    out = np.full_like(p, np.nan)
    for idx in np.ndindex(p.shape[:-1]):
        row = p[idx]
        ok = np.isfinite(row)
        if ok.any():
            out[idx][ok] = stats.false_discovery_control(np.clip(row[ok], 0.0, 1.0), method="bh")
    return np.moveaxis(out, -1, axis)
