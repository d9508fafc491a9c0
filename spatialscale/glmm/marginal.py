"""``marginal_gd`` / ``marginal_newton``: the Laplace marginal likelihood (to be written)."""

from __future__ import annotations

import numpy as np

__all__ = ["fit_marginal"]


def fit_marginal(counts: np.ndarray, eigvals: np.ndarray | None, eigvecs: np.ndarray | None, *,
                     design: np.ndarray | None = None, config=None, device: str = "cpu") -> dict[str, np.ndarray]:
    """Same inputs and outputs as :func:`spatialscale.glmm.glmm.fit_glmm`."""
    raise NotImplementedError("marginal fits are not written yet")
