"""Multinomial GLM / GLMM for isoform usage (docs/statistics.md).

Pure, batched torch/numpy math: a batch is ``B`` genes with equal isoform
count, fitted at once; nothing here knows Dask.
"""

from spatialscale.glmm.glm import fit_glm
from spatialscale.glmm.inference import llr_test, score_test, wald_test
from spatialscale.glmm.likelihood import multinomial_loglik, probabilities

__all__ = ["fit_glm", "llr_test", "multinomial_loglik", "probabilities", "score_test", "wald_test"]
