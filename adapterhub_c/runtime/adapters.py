"""Turning a registered adapter artefact into tensors, and attaching it to a loaded model.

Every adapter kind ends up as a :class:`LoadedAdapter`: a LoRA (PEFT layout) and, for
converted adapters, the recovery modules. Packs are decoded here once, so every command
that takes ``--adapter`` (eval, generate, convert, merge, compose, pack) accepts a pack.
"""
from __future__ import annotations

from adapterhub_c.adapters.attach import load_adapted
from adapterhub_c.adapters.loaded import LoadedAdapter
from adapterhub_c.adapters.lora import LoraAdapter
from adapterhub_c.adapters.recovery import FILE_NAME, read_recovery_file
from adapterhub_c.errors import UsageError
from adapterhub_c.registry.kinds import ADAPTER_KINDS, PACK_KINDS
from adapterhub_c.registry.models import Artifact
from adapterhub_c.registry.store import Registry
from adapterhub_c.runtime.packs import decode_pack_folder
from adapterhub_c.runtime.variants import variant_kept_indices


def load_adapter_artifact(reg: Registry, art: Artifact) -> LoadedAdapter:
    """Read (and for packs, decode) an adapter artefact from the blob store, verified."""
    if art.kind not in ADAPTER_KINDS:
        raise UsageError(f"{art.name!r} is a {art.kind}, not an adapter")
    folder = reg.materialize(art)
    if art.kind in PACK_KINDS:
        return decode_pack_folder(reg, art, folder)
    lora = LoraAdapter.from_folder(folder)

    if (folder / FILE_NAME).exists():
        state, config = read_recovery_file(folder / FILE_NAME)
        return LoadedAdapter(lora, state, config)
    return LoadedAdapter(lora)


def attach_adapter(reg: Registry, spec, model, device=None):
    """``model`` (base or variant) with the stack's adapter attached, eval mode.

    A LoRA trained on the uncompressed base and applied to an ``ffn-channels`` variant is
    sliced by the variant's recorded kept indices, as ``adapt convert`` does.
    """
    loaded = load_adapter_artifact(reg, spec.adapter)
    kept = None
    if spec.variant is not None and spec.adapter.variant_id != spec.variant.id:
        kept = variant_kept_indices(reg, spec.variant) or None
    return load_adapted(model, loaded.lora, loaded.recovery_state, loaded.recovery_config, kept_indices=kept)
