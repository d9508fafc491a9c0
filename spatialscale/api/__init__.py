"""User-facing tests: store in, xarray Dataset out (one module per test family)."""

from spatialscale.api._common import MIN_BATCHES, MIN_BATCHES_GLMM, parse_bytes
from spatialscale.api.du import du_test
from spatialscale.api.fit import fitted_ratios, glmm_fit
from spatialscale.api.summary import feature_summary, merge_summary
from spatialscale.api.sv import sv_test

__all__ = ["MIN_BATCHES", "MIN_BATCHES_GLMM", "du_test", "fitted_ratios", "glmm_fit", "parse_bytes", "sv_test",
           "feature_summary", "merge_summary"]
