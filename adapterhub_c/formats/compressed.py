"""GPTQ variants as compressed-tensors ``pack-quantized`` checkpoints (what vLLM loads), written by that library.

A GPTQ variant stores, per linear, codes c in [0, 2^b − 1], fp16 scales s and uint8 zeros z per
output row and group: Ŵ = s · (c − z). compressed-tensors' int quantization is signed:
q = clamp(round(W / s) + zp, −2^(b−1), 2^(b−1) − 1) and W = s · (q − zp), so the same Ŵ is
q = c − 2^(b−1) with zp = z − 2^(b−1) (symmetric variants have z = 2^(b−1): zp = 0, not stored).
We set each quantized linear's weight to Ŵ (float32) and its ``weight_scale`` /
``weight_zero_point`` to those values, and let ``ModelCompressor`` quantize and pack: round(Ŵ / s)
gives c − z back exactly, so compressed-tensors' dequantization is Ŵ again (float32; scales kept
in float32, exact copies of the fp16 scales).

Not expressible, refused with one line (`pack_quantized_refusal`): 2 / 3 bits (vLLM's
pack-quantized kernels take 4 and 8), act-order with groups (compressed-tensors >= 0.15 has no
``g_idx``: its groups are consecutive input columns; act-order without groups is one group
per row, where the order does not matter), [in, out] (Conv1D) weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from adapterhub_c.errors import UsageError
from adapterhub_c.variants.packed import StoredWeight

PACK_BITS = (4, 8)


def pack_quantized_refusal(bits: int | None, group_size: int | None, act_order: bool) -> str | None:
    """Why a GPTQ variant with these settings cannot be written as pack-quantized (one line), or None."""
    if bits not in PACK_BITS:
        return (f"a {bits}-bit GPTQ variant cannot be written as compressed-tensors pack-quantized "
                "(vLLM loads 4 and 8 bits only): use --format hf")
    if act_order and group_size:
        return ("a GPTQ variant with act-order and groups needs g_idx, which compressed-tensors "
                "pack-quantized no longer stores: use --format hf")
    return None


def quant_params(w: StoredWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Ŵ float32 [out, in], scale float32 [out, G], signed zero point int8 [out, G]) of one GPTQ weight."""
    offset = 2 ** (w.bits - 1)
    zero = (w.zeros.to(torch.int16) - offset).to(torch.int8)
    return w.matrix(), w.scales.float(), zero


def _quant_config(bits: int, group_size: int | None, sym: bool, ignore: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group" if group_size else "channel",
                            group_size=group_size or None)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    return QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore, format="pack-quantized")


@torch.no_grad()
def _set_weights(model, weights: Mapping[str, StoredWeight]) -> None:
    """Each stored weight's linear as float32 Ŵ (before the scales are created: they take its dtype)."""
    for name, w in weights.items():
        module = model.get_submodule(name[: -len(".weight")])
        module.weight = torch.nn.Parameter(quant_params(w)[0], requires_grad=False)


@torch.no_grad()
def _set_qparams(model, weights: Mapping[str, StoredWeight], sym: bool) -> None:
    for name, w in weights.items():
        module = model.get_submodule(name[: -len(".weight")])
        _, scale, zero = quant_params(w)
        module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
        if not sym:
            module.weight_zero_point.data = zero.reshape(module.weight_zero_point.shape)


def save_pack_quantized(model, weights: Mapping[str, StoredWeight], dest: Path, *, bits: int,
                        group_size: int | None, sym: bool) -> None:
    """Write ``model`` (its GPTQ linears given by ``weights``) as pack-quantized into ``dest`` (config + safetensors)."""
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    if any(w.transposed or w.kind not in ("gptq", "sparse-gptq") for w in weights.values()):
        raise UsageError("compressed-tensors pack-quantized holds GPTQ weights of nn.Linear layers only "
                         "(this base has [in, out] Conv1D weights): use --format hf")
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    ignore = sorted(linears - {n[: -len(".weight")] for n in weights})
    _set_weights(model, weights)
    apply_quantization_config(model, _quant_config(bits, group_size, sym, ignore))
    _set_qparams(model, weights, sym)
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(dest)
    compressor.update_config(str(dest))
