"""CA-LoRA recovery modules: R(x) = U · act(D · dropout(x)) · scale beside a linear layer.

The one definition of the recovery maths (:func:`recovery_forward`, the scale
:attr:`RecoveryConfig.scale` / :meth:`RecoveryConfig.for_rank`, the seeded start
:func:`seeded_d_init`) and of the module that carries it; training (``training.recovery``
adds fresh modules to train), packing (D − D₀), the runtime loader and the server's
multi-adapter layer all call these.

Each recovery module lives as a child ``recovery`` of the layer it sits beside (a plain
``nn.Linear``, transformers' ``Conv1D``, a bitsandbytes ``Linear8bitLt`` / ``Linear4bit``,
or a PEFT LoRA layer)
and a forward hook adds R(x) to that layer's output, so ``forward(x) = original(x) +
R(x)``. A hook rather than a wrapper module keeps every module name unchanged: PEFT
keys (``…q_proj.lora_A.weight``) and recovery keys both name the variant's own modules.

- D [r, in] is kaiming-uniform (a = sqrt(5), like ``nn.Linear``/LoRA A); U [out, r] is
  zero, so at step 0 the layer's output is exactly the original one. With
  ``RecoveryConfig.init_seed`` set (``adapt convert`` sets it), D starts from
  :func:`seeded_d_init`, which anyone can draw again from the seed and the module name: a
  pack then stores what training changed, D − D₀, like ComPEFT's task vectors (a random
  D₀ is what a sparse ternary code cannot hold).
- scale = alpha / r with alpha = 2 · r by default (scale 2.0: the usual LoRA r=16,
  alpha=32 setting the reference uses for Llama); ``act`` in gelu (the reference's),
  relu, silu, identity; dropout 0.05 on the input, active only while the host layer is
  in training mode.
- D and U are kept in float32 whatever the model's dtype; the input is cast to them and
  the result back to the layer's output dtype.

Recovery is non-linear and is never merged into weights. On disk: ``recovery.safetensors``
with tensors ``<module>.recovery_D`` / ``<module>.recovery_U`` (module names as in the
bare variant, without PEFT's ``base_model.model.`` prefix) and a JSON config in the
file metadata (key ``adapterhub_c.recovery``). Do not save a student with PEFT's
``save_pretrained``: PEFT counts every tensor inside a LoRA layer as the adapter's and
would put the recovery tensors into ``adapter_model.safetensors``; use
``convert.ConvertResult.save`` (or ``peft_io.extract_lora``), which leaves them out.
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from adapterhub_c.adapters.lora import rank_scale
from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.models import arch as archmod

FILE_NAME = "recovery.safetensors"
META_KEY = "adapterhub_c.recovery"
FORMAT_VERSION = 1
CHILD = "recovery"
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "identity": lambda x: x}
PEFT_PREFIX = "base_model.model."


@dataclass
class RecoveryConfig:
    """Settings shared by all recovery modules of a model."""

    rank: int = 16
    alpha: float | None = None  # None → 2 · rank (scale 2.0)
    act: str = "gelu"
    dropout: float = 0.05
    init_seed: int | None = None  # D starts from seeded_d_init(name, …, init_seed); None: torch's RNG

    def __post_init__(self):
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        if self.rank < 1:
            raise UsageError(f"recovery rank must be >= 1, got {self.rank}")
        if self.act not in ACTIVATIONS:
            raise UsageError(f"unknown recovery activation {self.act!r} (choose from {', '.join(ACTIVATIONS)})")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"recovery dropout must be in [0, 1), got {self.dropout}")
        if self.init_seed is not None and not (isinstance(self.init_seed, int) and not isinstance(self.init_seed, bool)
                                               and 0 <= self.init_seed < 2 ** 63):
            raise UsageError(f"recovery init seed must be an integer in [0, 2^63), got {self.init_seed!r}")

    @property
    def scale(self) -> float:
        """alpha / rank (:func:`~adapterhub_c.adapters.lora.rank_scale`, the LoRA rule)."""
        return rank_scale(float(self.alpha), self.rank)

    def for_rank(self, rank: int) -> "RecoveryConfig":
        """This config for a module of rank ``rank`` with the same scale (a file's modules may
        differ in rank from the config; the scale is what they share)."""
        return RecoveryConfig(rank=rank, alpha=self.scale * rank, act=self.act, dropout=self.dropout,
                              init_seed=self.init_seed)

    def to_dict(self) -> dict:
        return {**asdict(self), "scale": self.scale, "format_version": FORMAT_VERSION}

    @classmethod
    def from_dict(cls, d: dict) -> "RecoveryConfig":
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), act=d["act"], dropout=float(d["dropout"]),
                   init_seed=d.get("init_seed"))


def seeded_d_init(name: str, rank: int, in_features: int, seed: int) -> torch.Tensor:
    """The initial D [rank, in] of the recovery module beside ``name`` (a bare module name).

    Uniform in ±1/√in, the bound of ``kaiming_uniform_(a=√5)``, from the raw 64-bit stream of
    numpy's PCG64 seeded with (``seed``, crc32 of ``name``) through ``SeedSequence``: both are
    specified bit for bit, so the same seed gives the same float32 D₀ on any machine and
    numpy version, which is what lets a pack store D − D₀ (float64 arithmetic, rounded once).
    """
    raw = np.random.PCG64([seed, zlib.crc32(name.encode())]).random_raw(rank * in_features)
    unit = (raw >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # [0, 1), 53 random bits
    d0 = (2.0 * unit - 1.0) / math.sqrt(in_features)
    return torch.from_numpy(d0.astype(np.float32).reshape(rank, in_features))


def recovery_forward(x: torch.Tensor, D: torch.Tensor, U: torch.Tensor, scale: float, act: str,
                     dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """R(x) = act(dropout(x) @ Dᵀ) @ Uᵀ · scale, x cast to D's dtype (float32).

    The only place the recovery arithmetic is written: the training module
    (:class:`Recovery`) and the server's multi-adapter layer both call it, so a served row
    gives the numbers ``adapt generate`` gives. Dropout is active only with ``training``.
    """
    x = F.dropout(x.to(D.dtype), dropout, training=training)
    return ACTIVATIONS[act](F.linear(x, D)) @ U.t() * scale


class Recovery(nn.Module):
    """R(x) = act(dropout(x) @ Dᵀ) @ Uᵀ · scale for one layer."""

    def __init__(self, in_features: int, out_features: int, config: RecoveryConfig,
                 device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        self.D = nn.Parameter(torch.empty(config.rank, in_features, device=device, dtype=torch.float32))
        self.U = nn.Parameter(torch.zeros(out_features, config.rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.D, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """R(x) (:func:`recovery_forward`); dropout only while ``training``."""
        cfg = self.config
        return recovery_forward(x, self.D, self.U, cfg.scale, cfg.act, cfg.dropout, training)


def _recovery_hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    # module-level (not a closure) so that deepcopy of a model keeps working hooks
    rec = module._modules.get(CHILD)
    if rec is None:
        return output
    x = args[0] if args else kwargs.get("x", kwargs.get("input"))
    return output + rec(x, module.training).to(output.dtype)


# ---------------------------------------------------------------------------------------
# finding the layers


def bare_name(name: str) -> str:
    """A module name without PEFT's wrapper prefix (``base_model.model.``)."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _is_lora_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, LoraLayer)


def linear_layers(model: nn.Module, targets: tuple[str, ...] | list[str] | None = None) -> dict[str, nn.Module]:
    """The outermost linear layers by bare name: ``nn.Linear`` (bnb layers included),
    ``Conv1D`` or PEFT LoRA layers, never their inner parts; the output head (``lm_head``)
    is left out.

    ``targets``: keep only names equal to or ending in ``.<target>``.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found: dict[str, nn.Module] = {}
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(t + ".") for t in taken):
            continue
        if not (_is_lora_layer(module) or archmod.is_linear(module)):
            continue
        taken.append(name)
        bare = bare_name(name)
        if module is head or bare.split(".")[-1] == "lm_head" or (
                head is not None and getattr(module, "base_layer", None) is head):
            continue
        if targets and not any(bare == t or bare.endswith("." + t) for t in targets):
            continue
        found[bare] = module
    return found


def features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear, a Conv1D ([in, out] weight) or a PEFT layer."""
    return archmod.features(module)


def device_of(module: nn.Module) -> torch.device:
    """The device of the module's first materialised parameter (CPU when it has none)."""
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------
# attach, detach, state


def attach_module(layer: nn.Module, rec: Recovery) -> Recovery:
    """Put ``rec`` beside ``layer`` (child ``recovery`` + the forward hook that adds R(x))."""
    layer.add_module(CHILD, rec)
    layer._recovery_handle = layer.register_forward_hook(_recovery_hook, with_kwargs=True)
    return rec


def recovery_modules(model: nn.Module) -> dict[str, Recovery]:
    """The recovery modules attached to ``model``, by bare name of the layer they sit beside."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, Recovery):
            host = name.rsplit(".", 1)[0].removesuffix(".base_layer")  # attached before PEFT wrapped it
            out[bare_name(host)] = module
    return out


def detach_recovery(model: nn.Module) -> int:
    """Remove every recovery module and its hook; returns how many were removed."""
    count = 0
    for module in list(model.modules()):
        if isinstance(module._modules.get(CHILD), Recovery):
            handle = getattr(module, "_recovery_handle", None)
            if handle is not None:
                handle.remove()
                del module._recovery_handle
            del module._modules[CHILD]
            count += 1
    return count


def recovery_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{``<module>.recovery_D``: D, ``<module>.recovery_U``: U} of every recovery module (CPU copies)."""
    state = {}
    for name, rec in sorted(recovery_modules(model).items()):
        state[f"{name}.recovery_D"] = rec.D.detach().cpu().clone()
        state[f"{name}.recovery_U"] = rec.U.detach().cpu().clone()
    return state


def recovery_geometry_fault(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What is wrong with the shapes of a recovery state (``<module>.recovery_D`` / ``_U`` keys), or None:
    every module has both, D ``[R, in]`` and U ``[out, R]`` of one rank R >= 1."""
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        name, _, part = key.rpartition(".")
        if part not in ("recovery_D", "recovery_U") or not name:
            return f"{key!r} is not a recovery tensor"
        modules.setdefault(name, {})[part] = tuple(shape)
    for name in sorted(modules):
        parts = modules[name]
        if len(parts) != 2:
            return f"recovery module {name} has {', '.join(parts)} only"
        D, U = parts["recovery_D"], parts["recovery_U"]
        if len(D) != 2 or len(U) != 2 or D[0] < 1 or D[0] != U[1]:
            return f"recovery module {name}: D {list(D)} and U {list(U)} are not [rank, in] and [out, rank]"
    return None


def load_recovery(model: nn.Module, state: dict[str, torch.Tensor], config: RecoveryConfig) -> dict[str, Recovery]:
    """Attach recovery modules holding ``state`` to the matching layers of ``model``.

    Raises UsageError naming modules that ``state`` has and the model lacks, or whose
    shapes do not fit.
    """
    names = sorted({k.rsplit(".", 1)[0] for k in state})
    bad_keys = [k for k in state if not k.endswith((".recovery_D", ".recovery_U"))]
    if bad_keys:
        raise UsageError(f"not recovery tensors: {', '.join(bad_keys[:5])}")
    layers = linear_layers(model)
    missing = [n for n in names if n not in layers]
    if missing:
        raise UsageError(f"the model has no layers named {', '.join(missing[:8])}"
                         + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""))
    attached = {}
    for name in names:
        layer = layers[name]
        if CHILD in layer._modules:
            raise UsageError(f"{name} already has a recovery module")
        D, U = state[f"{name}.recovery_D"], state[f"{name}.recovery_U"]
        in_f, out_f = features(layer)
        if D.shape[1] != in_f or U.shape[0] != out_f or D.shape[0] != U.shape[1]:
            raise UsageError(f"recovery tensors of {name} ({tuple(D.shape)}, {tuple(U.shape)}) "
                             f"do not fit a {in_f}→{out_f} layer")
        rec = Recovery(in_f, out_f, config.for_rank(D.shape[0]), device=device_of(layer))
        with torch.no_grad():
            rec.D.copy_(D)
            rec.U.copy_(U)
        attached[name] = attach_module(layer, rec)
    return attached


def recovery_file_bytes(state: dict[str, torch.Tensor], config: RecoveryConfig) -> bytes:
    """The bytes of a ``recovery.safetensors`` file (config as JSON in the metadata)."""
    return st_save({k: v.contiguous() for k, v in state.items()},
                   metadata={META_KEY: json.dumps(config.to_dict(), sort_keys=True), "format": "pt"})


def read_recovery_file(path: str | Path) -> tuple[dict[str, torch.Tensor], RecoveryConfig]:
    """(state, config) of a ``recovery.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such recovery file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise IntegrityError(f"{path}: unreadable recovery file ({e})") from None
    return state, RecoveryConfig.from_dict(meta)
