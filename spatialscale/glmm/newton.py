"""``joint_newton``: Newton steps on the GLMM's joint likelihood (to be written)."""

from __future__ import annotations

import numpy as np

__all__ = ["fit_joint_newton"]


def fit_joint_newton(counts: np.ndarray, eigvals: np.ndarray | None, eigvecs: np.ndarray | None, *,
                     design: np.ndarray | None = None, config=None, device: str = "cpu") -> dict[str, np.ndarray]:
    """Same inputs and outputs as :func:`spatialscale.glmm.glmm.fit_glmm`."""
    raise NotImplementedError("joint_newton is not written yet")
