"""The one error class of model I/O: every format's errors are `ExportError`s (and `ValueError`s)."""

from __future__ import annotations


class ExportError(ValueError):
    """A model, its files or an output folder that a format cannot read or write; one line, naming it."""
