"""Merging LoRA adapters (task arithmetic, TIES, DARE) and LoraHub-style composition."""
from adapterhub_c.merging.api import MergeResult, merge_adapters
from adapterhub_c.merging.compose import ComposeResult, compose_adapters, optimizer_chain
from adapterhub_c.merging.compose_eval import ComposeStack, PeftEvaluator
from adapterhub_c.merging.spec import (
    CONVENTIONS,
    MAJORITIES,
    METHODS,
    SPACES,
    MergeInputRef,
    MergeSpec,
    make_spec,
    merge_config_yaml,
    parse_merge_config,
)

__all__ = [
    "CONVENTIONS", "MAJORITIES", "METHODS", "SPACES",
    "ComposeResult", "ComposeStack", "MergeInputRef", "MergeResult", "MergeSpec", "PeftEvaluator",
    "compose_adapters", "make_spec", "merge_adapters",
    "merge_config_yaml", "optimizer_chain", "parse_merge_config",
]
