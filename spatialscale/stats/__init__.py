"""Statistics: pure, batch-vectorised functions with no knowledge of Dask."""

from spatialscale.stats.hsic import feature_power_sums, mixture_cumulants, quadratic_statistic
from spatialscale.stats.multitest import bh_adjust
from spatialscale.stats.nulls import NULLS, liu_pvalue, permutation_pvalue, welch_pvalue
from spatialscale.stats.responses import TRANSFORMS, ratio_response

__all__ = [
    "NULLS",
    "TRANSFORMS",
    "bh_adjust",
    "feature_power_sums",
    "liu_pvalue",
    "mixture_cumulants",
    "permutation_pvalue",
    "quadratic_statistic",
    "ratio_response",
    "welch_pvalue",
]
