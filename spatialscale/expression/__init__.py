"""Covariates from expression: models that see every gene of a section at once.

Cell-type proportions by (spatially regularised) NNLS deconvolution, SpatialPCA,
and a VAE / LDVAE, each with an optional spatial loss (:mod:`spatialscale.losses`)
on the same priors as the kernels.  The modules here are plain torch / numpy on
count matrices; :func:`spatialscale.deconvolve` and
:func:`spatialscale.latent_factors` run them as Dask tasks on a store and write
their outputs back into it as named covariates.
"""
