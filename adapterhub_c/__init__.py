"""adapterhub-c: run many LoRA adapters on compressed models.

The public Python API (see :mod:`adapterhub_c.api`) is importable from here; it loads on
first use, so ``import adapterhub_c`` stays fast::

    import adapterhub_c as ah
    reg = ah.open_registry()
    pack = ah.pack(ah.pull("org/lora", registry=reg).name, density=0.1, registry=reg)
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Lazily re-exported names of adapterhub_c.api. `api.serve` and `api.ui` are not among them: here
# `adapterhub_c.serve` / `adapterhub_c.ui` are subpackages, which would shadow the functions once imported.
_API = (
    "Result", "open_registry", "add_base", "create_variant", "list_variants", "show_variant", "export", "pull",
    "search", "train", "convert",
    "pack", "unpack", "inspect_pack", "merge", "compose", "learn_prompt", "transfer_prompts", "push", "evaluate",
    "generate", "load", "list_objects", "show", "lineage", "remove", "gc", "run_batch", "batch_status",
    "serve_hub", "demo", "replay_merge", "add_variant", "registry_summary", "model_tree", "show_page", "compare", "list_runs",
    "find",
    # the typed options of the commands (light: importing them loads no torch)
    "TrainOptions", "ConvertOptions", "PackOptions", "MergeOptions", "ComposeOptions", "VariantOptions",
    "PromptOptions", "TransferOptions", "BatchItems", "BatchSteps", "BatchExecution",
)
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module("adapterhub_c.api"), name)
    raise AttributeError(f"module 'adapterhub_c' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
