"""Load a model named ``module:attr`` or ``path/to/file.py:attr`` (kept for older imports:
the code lives in ``ketch.loading``)."""

from __future__ import annotations

from ketch.loading import load_target

__all__ = ["load_target"]
