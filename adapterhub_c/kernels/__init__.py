"""Triton kernels over bitmask-encoded ternary tensors, each with an exact reference twin.

Word layout everywhere: a bit plane is a 1-d int32 tensor, bit i of word w is element
32w+i (little-endian); ``pos`` has the bits where T = +1, ``neg`` where T = -1; padding
bits past ``numel`` are zero. Dispatch (``impl="auto"``): the Triton kernel for CUDA
tensors, the twin for CPU tensors; ``impl="triton"`` forces the kernel (CPU tensors then
need ``TRITON_INTERPRET=1`` set before triton is imported), ``impl="ref"`` the twin.

:mod:`.ties_cpu` (not imported here: numba loads on first use) holds the fused CPU
kernels of TIES over dense task vectors; their twins are the torch rules of
:mod:`adapterhub_c.merging.rules`. Also numba, also loaded on first use: :mod:`.unpack_cpu`
(pack streams → dense tensors; twin: the numpy decoder of ``packing.encoding``) and
:mod:`.masks_cpu` (packed keep-masks applied in place; twin: ``weight.mul_(mask)``).
"""
from adapterhub_c.kernels.add import bitmask_add_, bitmask_add_ref
from adapterhub_c.kernels.agree import ternary_agreement, ternary_agreement_ref
from adapterhub_c.kernels.decode import bitmask_decode, bitmask_decode_ref
from adapterhub_c.kernels.elect import elect_signs, elect_signs_ref
from adapterhub_c.kernels.layout import planes_to_torch, unpack_bits

__all__ = [
    "bitmask_add_", "bitmask_add_ref", "ternary_agreement", "ternary_agreement_ref",
    "bitmask_decode", "bitmask_decode_ref", "elect_signs", "elect_signs_ref",
    "planes_to_torch", "unpack_bits",
]
