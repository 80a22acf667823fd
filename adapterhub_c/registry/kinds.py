"""The kinds of artefact rows (``Artifact.kind``), in one place."""
from __future__ import annotations

LORA_KINDS = ("lora", "recovered-lora", "merged", "composed")
"""Artefacts stored as a PEFT LoRA folder."""

PACK_KINDS = ("pack",)
"""Artefacts stored as a ComPEFT pack file."""

ADAPTER_KINDS = LORA_KINDS + PACK_KINDS
"""Everything that loads as an adapter (merged, composed, packed, pushed)."""

PROMPT_KINDS = ("prompt",)
"""Soft prompts."""

ARTIFACT_KINDS = ADAPTER_KINDS + PROMPT_KINDS
"""Every kind an artefact row may have."""

LISTABLE = ("bases", "variants", "artifacts", "runs")
"""What ``adapt ls`` lists."""
