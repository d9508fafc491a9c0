"""SPLISOSM 1.2.0-compatible classes running on the spatialscale engine.

Change one import line and keep the rest of a SPLISOSM script::

    from spatialscale.compat import SplisosmNP, SplisosmGLMM, SplisosmFFT   # was: from splisosm import ...

The constructors, ``setup_data``, the test methods, their arguments and
defaults, ``get_formatted_test_results``, ``extract_feature_summary`` and the
``sv_test_results`` / ``du_test_results`` dictionaries follow SPLISOSM 1.2.0;
``setup_data`` writes an isoform store (a temporary folder the object owns,
or ``store=``) and every test runs on the native API (:func:`spatialscale.sv_test`,
:func:`spatialscale.du_test`, :func:`spatialscale.glmm_fit`,
:func:`spatialscale.feature_summary`) on the given ``client=``, else the
active Dask client, else local threads.  A SPLISOSM option the engine does
not offer raises :class:`~spatialscale.errors.InputError` naming the
alternative; ``docs/migration.md`` maps every SPLISOSM call to the compat
and native calls.
"""

from spatialscale.compat._fft import SplisosmFFT
from spatialscale.compat._glmm import SplisosmGLMM
from spatialscale.compat._np import SplisosmNP

__all__ = ["SplisosmFFT", "SplisosmGLMM", "SplisosmNP"]
