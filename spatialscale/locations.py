"""Where data lives: a local path or the URL of an object store, and the data layers' way to hand URLs on.

:mod:`spatialscale.remote` builds on the store, output and cohort modules
(it builds a store locally and publishes it, uploads batch records...), so
those modules do not import it: when a public entry point of theirs
(``ingest``, ``open_store``, ``claim_output``, ``open_cohort``...) is given
a URL, it calls the handler that :mod:`spatialscale.remote` registered
here under that entry point's name.  Importing :mod:`spatialscale` imports
:mod:`spatialscale.remote`, so the handlers are there whenever a module of
the package is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spatialscale.errors import InputError

__all__ = ["LOCAL_PROTOCOLS", "is_url", "url_handler", "register_url_handler"]

#: fsspec protocols that are the local filesystem (paths, not URLs)
LOCAL_PROTOCOLS = ("file", "local")

_HANDLERS: dict[str, Callable[..., Any]] = {}


def is_url(value: Any) -> bool:
    """Whether ``value`` is a URL of a non-local fsspec filesystem (``s3://...``, ``gs://...``, ``memory://...``)."""
    if not isinstance(value, str) or "://" not in value:
        return False
    try:
        from fsspec.utils import get_protocol
    except ImportError:
        return True  # refused with a message where the URL is opened
    return get_protocol(value) not in LOCAL_PROTOCOLS


def register_url_handler(name: str, handler: Callable[..., Any]) -> None:
    """Register the URL version of the entry point ``name`` (done by :mod:`spatialscale.remote`)."""
    _HANDLERS[name] = handler


def url_handler(name: str) -> Callable[..., Any]:
    """The URL version of the entry point ``name``."""
    try:
        return _HANDLERS[name]
    except KeyError:
        raise InputError(f"URLs are handled by spatialscale.remote, which is not loaded ({name}); "
                         "import spatialscale first.") from None
