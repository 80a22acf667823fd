"""The corpus every command falls back to (training, evaluation, calibration): one name, here.

Its text is ``evals.data``'s to load; the name lives at the bottom of the layers so that the
options of every command (and the CLI's help) can name it without importing the loaders.
"""
from __future__ import annotations

DEFAULT_CORPUS = "builtin:pydoc"

__all__ = ["DEFAULT_CORPUS"]
