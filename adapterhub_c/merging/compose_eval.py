"""LoraHub candidates: A = Σ w_i·A_i, B = Σ w_i·B_i, rebuilt in one matmul inside a PEFT model.

Each input's scale s_i is folded in as √s_i on both factors (sign on A), so w = e_i
gives back input i's own ΔW exactly and the composed adapter has scale 1. With equal
scales this is LoraHub's rule times that common scale.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from adapterhub_c.adapters.lora import LoraAdapter, LoraLayer
from adapterhub_c.errors import UsageError
from adapterhub_c.evals.metrics import EncodedCompletions, score_completions
from adapterhub_c.merging.factors import check_equal_ranks
from adapterhub_c.merging.inputs import check_inputs, module_inputs, output_base_config


class ComposeStack:
    """The N inputs' factors stacked once per module: A [N, r, in], B [N, out, r]."""

    def __init__(self, adapters: Sequence[LoraAdapter], names: Sequence[str],
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        check_inputs(adapters, names)
        mods = module_inputs(adapters, names)
        self.rank = check_equal_ranks(mods, list(names), what="composition")
        self.n = len(adapters)
        self.base_config = output_base_config(adapters)
        device = torch.device(device) if device is not None else next(iter(adapters[0].tensors.values())).device
        self.modules = [m.name for m in mods]
        self.A, self.B = {}, {}
        for m in mods:
            A = torch.zeros(self.n, self.rank, m.in_features, dtype=dtype, device=device)
            B = torch.zeros(self.n, m.out_features, self.rank, dtype=dtype, device=device)
            for i, layer in enumerate(m.layers):
                if layer is not None:
                    root = math.sqrt(abs(layer.scale))
                    A[i] = layer.A.to(device=device, dtype=dtype) * (root if layer.scale >= 0 else -root)
                    B[i] = layer.B.to(device=device, dtype=dtype) * root
            self.A[m.name], self.B[m.name] = A, B

    def layers(self, weights: Sequence[float]) -> dict[str, LoraLayer]:
        """The composed layers for ``weights`` (scale 1)."""
        w = self._w(weights, next(iter(self.A.values())))
        return {m: LoraLayer(A=torch.tensordot(w, self.A[m], 1).cpu(), B=torch.tensordot(w, self.B[m], 1).cpu(),
                             scale=1.0) for m in self.modules}

    def adapter(self, weights: Sequence[float]) -> LoraAdapter:
        """The composed adapter as a PEFT-loadable LoraAdapter."""
        return LoraAdapter.from_layers(self.layers(weights), self.base_config)

    def _w(self, weights, like: torch.Tensor) -> torch.Tensor:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=like.dtype, device=like.device)
        if w.shape != (self.n,):
            raise UsageError(f"need {self.n} weights, got shape {tuple(w.shape)}")
        return w


class PeftEvaluator:
    """The base wrapped once by ``peft.get_peft_model``; every LoRA parameter is a view into
    one flat buffer, so a candidate is written by a single ``mv(stackᵀ, w, out=buffer)``.

    Use as a context manager: on exit the LoRA layers are removed again and the base's
    ``requires_grad`` flags and train/eval mode are restored.
    """

    def __init__(self, stack: ComposeStack, model, examples: EncodedCompletions):
        from peft import LoraConfig, get_peft_model

        self.stack, self.examples = stack, examples
        self._base = model
        self._was_training = model.training
        self._grad = {n: p.requires_grad for n, p in model.named_parameters()}
        names = {n for n, _ in model.named_modules()}
        missing = [m for m in stack.modules if m not in names]
        if missing:
            raise UsageError(f"the model has no module {missing[0]!r} that the adapters target")
        config = LoraConfig(r=stack.rank, lora_alpha=stack.rank, target_modules=list(stack.modules),
                            lora_dropout=0.0, bias="none")
        self.model = get_peft_model(model, config)
        self.model.eval()
        params, rows = [], []
        for m in stack.modules:
            layer = self.model.base_model.model.get_submodule(m)
            params += [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            rows += [stack.A[m].flatten(1), stack.B[m].flatten(1)]
        dtype, device = params[0].dtype, params[0].device
        self._stack = torch.cat(rows, 1).to(device=device, dtype=dtype)   # [N, P]
        self._flat = torch.zeros(self._stack.shape[1], dtype=dtype, device=device)
        offset = 0
        for p in params:
            p.requires_grad_(False)
            p.data = self._flat[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()

    def set_weights(self, weights: Sequence[float]) -> None:
        """Write the composed adapter for ``weights`` into the model (one fused matmul)."""
        w = self.stack._w(weights, self._stack)
        # mv writes [P] straight into the buffer (matmul's out= would resize and detach the views)
        torch.mv(self._stack.T, w, out=self._flat)

    def loss(self, weights: Sequence[float]) -> float:
        """Completion NLL (nats per completion token; the log of completion perplexity)
        with the composed adapter for ``weights``."""
        self.set_weights(weights)
        return score_completions(self.model, self.examples)["completion_nll"]

    def close(self) -> None:
        """Remove the LoRA layers and restore the base as it was."""
        if self.model is None:
            return
        self.model.unload()
        for n, p in self._base.named_parameters():
            if n in self._grad:
                p.requires_grad_(self._grad[n])
        self._base.train(self._was_training)
        self.model = None

    def __enter__(self) -> "PeftEvaluator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
