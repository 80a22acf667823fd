from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from adapterhub_c.adapters.lora import LoraAdapter


@dataclass
class LoadedAdapter:
    """An adapter in memory: the LoRA part and, for converted adapters, the recovery part."""

    lora: LoraAdapter
    recovery_state: dict[str, torch.Tensor] | None = None
    recovery_config: Any = None  # adapt.recovery.RecoveryConfig when recovery_state is set
