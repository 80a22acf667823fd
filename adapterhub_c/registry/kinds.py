from __future__ import annotations

LORA_KINDS = ("lora", "recovered-lora", "merged", "composed")


PACK_KINDS = ("pack",)


ADAPTER_KINDS = LORA_KINDS + PACK_KINDS
