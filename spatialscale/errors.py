"""Exceptions raised for bad input."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """The input data or options are invalid; the message names the problem."""
