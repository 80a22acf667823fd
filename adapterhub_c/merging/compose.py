"""LoraHub-style composition: a gradient-free search for weights w over N LoRA adapters.

objective(w) = loss(w) + l1 · mean|w|, where loss is the completion NLL of
:func:`adapterhub_c.evals.metrics.completion_perplexity` (mean cross-entropy per
completion token over all examples, so the penalty's weight does not depend on the
batch size, unlike LoraHub's mean of per-batch means) or the value of a caller's
callable. Search: a nevergrad optimizer by name (default NGOpt, budget 40, weights
start at 0 within [-1.5, 1.5], as LoraHub). The result uses the best *evaluated*
weights, and records which optimizer NGOpt actually delegated to (with nevergrad
1.0.12 and bounded weights that is Cobyla).

The default penalty, LORAHUB_L1 = 0.25, makes the objective LoraHub's at its default
setting: LoraHub's is (sum of per-batch mean losses) / (number of examples) + 0.05 · mean|w|;
with its 5 examples in one batch that is loss/5 + 0.05 · mean|w|, i.e. exactly ours with
l1 = 0.25 divided by 5, so both searches rank every candidate alike and land on the same
weights. Other example counts keep our batch-size-independent weighting.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from adapterhub_c.adapters.lora import LoraAdapter
from adapterhub_c.errors import AdaptError, NotFoundError, UsageError
from adapterhub_c.evals.metrics import encode_completions
from adapterhub_c.merging.compose_eval import ComposeStack, PeftEvaluator
from adapterhub_c.merging.delta import Progress
from adapterhub_c.merging.inputs import input_names
from adapterhub_c.options.merge import (  # noqa: F401 - LORAHUB_EXAMPLES: what LORAHUB_L1 is made of
    DEFAULT_BOUNDS,
    DEFAULT_BUDGET,
    DEFAULT_OPTIMIZER,
    LORAHUB_EXAMPLES,
    LORAHUB_L1,
    check_search,
)


@dataclass
class ComposeResult:
    """The composed adapter, its weights, and how the search went."""

    adapter: LoraAdapter
    weights: list[float]
    loss: float                 # task loss at ``weights`` (without the penalty)
    objective: float            # loss + l1 · mean|w|
    optimizer: str              # the name asked for
    optimizer_used: list[str]   # the chain nevergrad ran, e.g. ["NGOpt", "Cobyla"]
    curve: list[dict] = field(default_factory=list)  # per evaluation: step, loss, objective, best
    seconds: float = 0.0
    names: list[str] = field(default_factory=list)


def compose_adapters(adapters: Sequence[LoraAdapter], *, loss_fn: Callable[[np.ndarray], float] | None = None,  # noqa: PLR0913 - LoraHub's entry point: a keyword per search option
                     model=None, tokenizer=None, examples: Sequence[tuple[str, str]] | None = None,
                     optimizer: str = DEFAULT_OPTIMIZER, budget: int = DEFAULT_BUDGET,
                     bounds: tuple[float, float] = DEFAULT_BOUNDS,
                     l1: float = LORAHUB_L1, seed: int = 0, init: Sequence[float] | None = None,
                     batch_size: int = 8, max_length: int | None = 512, names: Sequence[str] | None = None,
                     progress: Progress | None = None) -> ComposeResult:
    """Find weights w for A = Σ w_i A_i, B = Σ w_i B_i (equal ranks; LoraHub's rule).

    Give either ``loss_fn(weights) -> float`` or ``model`` + ``tokenizer`` + ``examples``
    (a list of (prompt, completion) strings; the model is wrapped with PEFT for the
    search and restored afterwards). ``init`` defaults to zeros. UsageError on bad input.
    """
    started = time.perf_counter()
    adapters = list(adapters)
    names = input_names(adapters, names)
    check_compose_options(optimizer, budget, bounds, l1)
    n = len(adapters)
    init = np.zeros(n) if init is None else np.asarray(init, dtype=np.float64)
    if init.shape != (n,) or np.any(init < bounds[0]) or np.any(init > bounds[1]):
        raise UsageError(f"init must be {n} weights within {list(bounds)}, got {init.tolist()}")
    if (loss_fn is None) == (model is None):
        raise UsageError("give either loss_fn or model + tokenizer + examples")
    device = None
    if model is not None:
        if tokenizer is None:
            raise UsageError("composition on a model needs its tokenizer")
        device = next(model.parameters()).device
    stack = ComposeStack(adapters, names, device=device)
    evaluator = None
    if model is not None:
        evaluator = PeftEvaluator(stack, model, encode_completions(tokenizer, examples, batch_size, max_length, device))
        loss_fn = evaluator.loss
    try:
        best_w, best, curve, used = _search(loss_fn, n, init, optimizer, budget, bounds, l1, seed, progress)
    finally:
        if evaluator is not None:
            evaluator.close()
    return ComposeResult(adapter=stack.adapter(best_w), weights=best_w.tolist(), loss=best[0],
                         objective=best[1], optimizer=optimizer, optimizer_used=used, curve=curve,
                         seconds=time.perf_counter() - started, names=names)


def check_compose_options(optimizer: str, budget: int, bounds: tuple[float, float], l1: float) -> None:
    """UsageError / NotFoundError on a search that cannot run: unknown nevergrad optimizer, bad budget, bounds, l1."""
    import nevergrad as ng

    if optimizer not in ng.optimizers.registry:
        raise NotFoundError("nevergrad optimizer", optimizer, ng.optimizers.registry.keys())
    check_search(budget, bounds, l1)


def _search(loss_fn, n, init, optimizer, budget, bounds, l1, seed, progress):
    """Ask/tell loop; returns (best weights, (loss, objective), curve, optimizer chain)."""
    import nevergrad as ng

    param = ng.p.Array(init=init, lower=bounds[0], upper=bounds[1])
    param.random_state = np.random.RandomState(seed)
    with warnings.catch_warnings():
        # e.g. "budget too small for this optimizer": reported through optimizer_used instead
        warnings.simplefilter("ignore")
        opt = ng.optimizers.registry[optimizer](parametrization=param, budget=int(budget), num_workers=1)
        curve, best_w, best = [], init.copy(), (float("inf"), float("inf"))
        for step in range(int(budget)):
            cand = opt.ask()
            w = np.asarray(cand.value, dtype=np.float64)
            loss = float(loss_fn(w))
            objective = loss + l1 * float(np.mean(np.abs(w)))
            if not np.isfinite(objective):
                objective = float("inf")
            if objective < best[1]:
                best_w, best = w.copy(), (loss, objective)
            opt.tell(cand, objective if np.isfinite(objective) else 1e30)
            curve.append({"step": step + 1, "loss": loss, "objective": objective, "best": best[1],
                          "weights": w.tolist()})
            if progress:
                progress(f"composing ({optimizer})", step + 1, int(budget))
        used = optimizer_chain(opt)
    if not np.isfinite(best[1]):
        raise AdaptError("composition failed: every candidate gave a non-finite loss")
    return best_w, best, curve, used


def optimizer_chain(opt) -> list[str]:
    """The optimizers actually run: NGOpt-style wrappers delegate through ``.optim``."""
    from nevergrad.optimization.base import Optimizer

    chain = [getattr(opt, "name", type(opt).__name__)]
    seen = {id(opt)}
    while True:
        try:
            inner = getattr(opt, "optim", None)
        except Exception:  # some wrappers build it lazily and may refuse
            break
        if not isinstance(inner, Optimizer) or id(inner) in seen:
            break
        chain.append(getattr(inner, "name", type(inner).__name__))
        seen.add(id(inner))
        opt = inner
    return chain
