"""Pack artefacts → verified packs and decoded adapters (the one route every reader takes)."""
from __future__ import annotations

from pathlib import Path

from adapterhub_c.adapters.loaded import LoadedAdapter
from adapterhub_c.adapters.recovery import RecoveryConfig
from adapterhub_c.errors import IntegrityError
from adapterhub_c.packing.format import (
    DecodedPack,
    Pack,
    read_pack,
    read_pack_dense,
    unpack_recovery,
    unpack_to_adapter,
)
from adapterhub_c.registry.models import Artifact, BaseModel
from adapterhub_c.registry.store import Registry
from adapterhub_c.runtime.bases import base_label

PACK_FILE = "pack.safetensors"


def loaded_from_pack(pack: Pack) -> LoadedAdapter:
    """The dense adapter a pack decodes to (LoRA, plus recovery modules when packed)."""
    lora = unpack_to_adapter(pack)
    rec = unpack_recovery(pack)
    if rec is None:
        return LoadedAdapter(lora)

    state, config = rec
    return LoadedAdapter(lora, state, RecoveryConfig.from_dict(config))


def base_of(reg: Registry, art: Artifact) -> BaseModel:
    """The base row of artefact ``art`` (IntegrityError if it is missing)."""
    with reg.session() as s:
        base = s.get(BaseModel, art.base_id)
        if base is None:
            raise IntegrityError(f"artefact {art.name!r} points at a missing base")
        return base


def read_pack_artifact(reg: Registry, art: Artifact, folder: str | Path | None = None, *,
                       dense: bool = False) -> Pack | DecodedPack:
    """Read and verify the pack file of a pack artefact (its folder, materialized if not given);
    ``dense``: decoded straight into dense tensors (:func:`read_pack_dense`), else a :class:`Pack`.

    IntegrityError: the file is missing, truncated or corrupt (digest mismatch), or its
    source digest differs from the artefact's. UsageError: the pack was made for another
    base, or has a format version this version cannot read.
    """
    folder = Path(folder) if folder is not None else reg.materialize(art)
    path = folder / PACK_FILE
    if not path.is_file():
        raise IntegrityError(f"pack {art.name!r} has no {PACK_FILE}")
    reader = read_pack_dense if dense else read_pack
    pack = reader(path, expected_base=base_label(base_of(reg, art)))
    expected = (art.config or {}).get("source_digest")
    if expected and pack.source_digest != expected:
        raise IntegrityError(f"pack {art.name!r}: the file's source digest does not match the registry's")
    return pack


def loaded_from_decoded(pack: DecodedPack) -> LoadedAdapter:
    """:func:`loaded_from_pack` of a pack decoded by :func:`read_pack_dense` (the same tensors)."""
    rec = pack.recovery()
    if rec is None:
        return LoadedAdapter(pack.to_adapter())
    state, config = rec
    return LoadedAdapter(pack.to_adapter(), state, RecoveryConfig.from_dict(config))


def decode_pack_folder(reg: Registry, art: Artifact, folder: str | Path) -> LoadedAdapter:
    """Read, verify (:func:`read_pack_artifact`) and decode the pack file of a pack artefact's
    folder, with the compiled decoder."""
    return loaded_from_decoded(read_pack_artifact(reg, art, folder, dense=True))
