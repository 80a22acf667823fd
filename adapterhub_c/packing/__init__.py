"""ComPEFT packs: sparsify + ternarize + scale, exact encodings, the pack file."""
from adapterhub_c.packing.compeft import (
    METHODS,
    SCOPES,
    compress_tensors,
    decode_tensors,
    kept_at_density,
    prune_tensors,
    topk_indices,
)
from adapterhub_c.packing.digest import tensors_digest
from adapterhub_c.packing.encoding import ENCODINGS, EncodedSigns, decode, encode, entropy_bound, golomb_parameter
from adapterhub_c.packing.format import (
    FORMAT_VERSION,
    RECOVERY_PREFIX,
    DecodedPack,
    Pack,
    build_pack,
    inspect_pack,
    pack_adapter,
    pack_stats,
    read_pack,
    read_pack_dense,
    unpack_recovery,
    unpack_to_adapter,
    write_pack,
)
from adapterhub_c.packing.ternary import TernaryTensor, from_signs

__all__ = [
    "METHODS", "SCOPES", "compress_tensors", "decode_tensors", "kept_at_density", "prune_tensors", "topk_indices",
    "tensors_digest", "ENCODINGS", "EncodedSigns", "decode", "encode", "entropy_bound", "golomb_parameter",
    "FORMAT_VERSION", "DecodedPack", "Pack", "build_pack", "inspect_pack", "pack_adapter", "pack_stats",
    "read_pack", "read_pack_dense",
    "unpack_to_adapter", "unpack_recovery", "RECOVERY_PREFIX", "write_pack", "TernaryTensor", "from_signs",
]
