"""Pack parameters from user input: ``parse_density`` / ``parse_alpha`` live with the pack options."""
from __future__ import annotations

from adapterhub_c.options.pack import parse_alpha, parse_density

__all__ = ["parse_alpha", "parse_density"]
