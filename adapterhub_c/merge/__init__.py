"""Merging LoRA adapters (task arithmetic, TIES, DARE) and LoraHub-style composition."""
from .api import MergeResult, merge_adapters
from .spec import (CONVENTIONS, MAJORITIES, METHODS, SPACES, MergeInputRef, MergeSpec, make_spec,
                   merge_config_yaml, parse_merge_config)

__all__ = [
    "CONVENTIONS", "MAJORITIES", "METHODS", "SPACES",
    "MergeInputRef", "MergeResult", "MergeSpec",
    "make_spec", "merge_adapters", "merge_config_yaml", "parse_merge_config",
]
