"""Fresh CA-LoRA recovery modules for training: :func:`attach_recovery`.

The recovery module itself, its forward and scale, the seeded start D₀, loading a saved
state and the ``recovery.safetensors`` file live in :mod:`adapterhub_c.adapters.recovery`
(every consumer, serving and packing included, uses that one definition); the names are
re-exported here for existing callers.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from adapterhub_c.adapters.recovery import (
    ACTIVATIONS,
    CHILD,
    FILE_NAME,
    FORMAT_VERSION,
    META_KEY,
    PEFT_PREFIX,
    Recovery,
    RecoveryConfig,
    attach_module,
    bare_name,
    detach_recovery,
    device_of,
    features,
    linear_layers,
    load_recovery,
    read_recovery_file,
    recovery_file_bytes,
    recovery_forward,
    recovery_modules,
    recovery_state,
    seeded_d_init,
)
from adapterhub_c.errors import UsageError
from adapterhub_c.models import arch as archmod


def attach_recovery(model: nn.Module, config: RecoveryConfig | None = None,
                    targets: tuple[str, ...] | list[str] | None = None) -> dict[str, Recovery]:
    """Put a fresh recovery module beside every linear layer of the decoder blocks
    (``models.arch``: attention and MLP, fused or not; not the head, not projections
    outside the blocks), or beside those named by ``targets`` (see ``linear_layers``).

    Returns {bare module name: Recovery}. The new parameters require grad; D is
    :func:`seeded_d_init` with ``config.init_seed``, or (without one) drawn from the global
    torch RNG.
    """
    config = config or RecoveryConfig()
    layers = linear_layers(model, targets)
    if not targets:
        blocks = archmod.describe(model, warn=False).linears()
        layers = {name: layer for name, layer in layers.items() if name in blocks}
    if not layers:
        raise UsageError("no linear layers to put recovery modules beside"
                         + (f" (targets: {', '.join(targets)})" if targets else ""))
    added = {}
    for name, layer in layers.items():
        if CHILD in layer._modules:
            raise UsageError(f"{name} already has a recovery module")
        in_f, out_f = features(layer)
        rec = Recovery(in_f, out_f, config, device=device_of(layer))
        if config.init_seed is not None:
            with torch.no_grad():
                rec.D.copy_(seeded_d_init(name, config.rank, in_f, config.init_seed))
        added[name] = attach_module(layer, rec)
    return added


__all__ = ["ACTIVATIONS", "CHILD", "FILE_NAME", "FORMAT_VERSION", "META_KEY", "PEFT_PREFIX", "Recovery",
           "RecoveryConfig", "attach_recovery", "bare_name", "detach_recovery", "linear_layers", "load_recovery",
           "read_recovery_file", "recovery_file_bytes", "recovery_forward", "recovery_modules", "recovery_state",
           "seeded_d_init"]
