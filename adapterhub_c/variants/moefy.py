"""MoEfication (Zhang et al. 2022, thunlp/MoEfication; CPET / CA-LoRA's "M"): every MLP's
intermediate channels split into experts, a router per layer picks the top-k experts per token,
and only the chosen experts' channels count.

- **Partition**: balanced k-means over the channels (:func:`balanced_kmeans`). A channel's
  feature is its row of the first MLP layer, L2-normalised, as in the reference's
  ``ParamSplit``; for a gated MLP (Llama's SwiGLU, Phi-3's fused gate/up) the normalised gate
  row and up row are concatenated, so an expert is one set of intermediate channels for both.
  The reference calls ``KMeansConstrained`` (min-cost flow); we assign greedily in vectorised
  rounds (each unplaced channel proposes to its nearest expert with room, experts keep their
  nearest proposers), deterministic for a given seed. When E does not divide the intermediate size n, the first
  ``n % E`` experts hold one channel more (sizes differ by at most one); E > n is refused.
- **Routers**, two kinds (the recipe's ``moe_router``):
  ``mlp`` (default) — the reference's ``MLPCenter``: scores = tanh(x̂·C₁ᵀ)·C₂ᵀ with x̂ the
  normalised MLP input, C₁ [E, d] initialised to the experts' centroids, C₂ [E, E] to the
  identity, trained (Adam, lr 0.01, BCE with logits) to predict each expert's activation norm
  ||h_e||₂ (divided by its maximum) on the calibration tokens; ``similarity`` — the reference's
  ``ParamCenter``: the experts whose centroid (mean normalised first-layer row) is nearest to x̂.
  Both are measured on held-out calibration tokens as the share of the activation-norm mass
  ‖h_e‖ the chosen experts hold (``captured``), whichever the recipe uses.
- **Routed forward** (:class:`MoeRouting`): the MLP's own linear modules stay (so PEFT LoRA,
  the server's multi-adapter layers and recovery modules still wrap them); a forward pre-hook
  on the MLP's first input layer computes the router's choice, one on its output layer zeroes
  the intermediate channels of the experts not chosen before anything (base weight, LoRA,
  recovery) reads them. The hooks follow whatever module sits at those attributes when the
  MLP runs (PEFT and the server replace them by wrappers). This is exact (K = E gives the
  dense MLP bit for bit) and differentiable for training (the router is frozen), but it
  computes every channel: it saves no compute on CPU or GPU. The FLOPs a gathered kernel would
  save are reported: the fraction of MLP FLOPs per token, K/E of the channels plus the router.
- **Stored** (``moe.safetensors``): per MLP the partition (int16 expert id per channel) and the
  router in float16 (``<mlp>.centers`` [E, d], ``<mlp>.mix`` [E, E] for the mlp router); the
  base's weights are untouched.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.models import arch as archmod
from adapterhub_c.options.variant import MOE_ROUTERS
from adapterhub_c.progress import Progress
from adapterhub_c.variants.calibration import BlockwiseCalibrator, normalise_calibration

MOE_FILE = "moe.safetensors"
FORMAT = "adapterhub_c.moe"
VERSION = "1"
ROUTERS = MOE_ROUTERS
CHILD = "moe_routing"  # the MlpInfo module's child holding the routing
SEED = 0
KMEANS_ITERS = 30
ROUTER_EPOCHS = 30
ROUTER_LR = 0.01
ROUTER_BATCH = 512
HOLDOUT = 0.1  # share of calibration tokens kept out of router training, for `captured`


# ---- balanced clustering -------------------------------------------------------------------


def expert_sizes(n: int, experts: int) -> list[int]:
    """Channels per expert: n // E each, the first n % E experts one more (UsageError when E > n)."""
    if experts < 1 or experts > n:
        raise UsageError(f"{experts} experts cannot split {n} MLP channels (at least one channel per expert)")
    q, r = divmod(n, experts)
    return [q + (e < r) for e in range(experts)]


def balanced_assign(similarity: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Labels [n] (int64) putting exactly ``sizes[e]`` rows in expert e, greedily by similarity.

    ``similarity`` is [n, E]. In rounds, every unplaced row proposes to its most similar expert
    that still has room, and each expert takes its most similar proposers up to its room; every
    round places at least one row. Vectorised (a few rounds for a whole MLP); ties go to the
    lower row.
    """
    n, k = similarity.shape
    if sum(sizes) != n or len(sizes) != k:
        raise UsageError(f"expert sizes {list(sizes)} do not cover {n} rows in {k} experts")
    labels = torch.full((n,), -1, dtype=torch.int64)
    room = torch.tensor(list(sizes), dtype=torch.int64)
    sim = similarity.detach().float().cpu()
    while True:
        free = torch.nonzero(labels < 0).flatten()
        if free.numel() == 0:
            return labels
        scores = sim[free].masked_fill((room == 0)[None, :], float("-inf"))
        best, choice = scores.max(dim=1)
        order = torch.argsort(best, descending=True, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]  # grouped by expert, most similar first
        counts = torch.bincount(choice, minlength=k)
        starts = torch.cumsum(counts, 0) - counts
        chosen = choice[order]
        rank = torch.arange(order.numel()) - starts[chosen]
        take = rank < room[chosen]
        labels[free[order[take]]] = chosen[take]
        room -= torch.bincount(chosen[take], minlength=k)


def balanced_kmeans(X: torch.Tensor, experts: int, iters: int = KMEANS_ITERS, seed: int = SEED) -> torch.Tensor:
    """Balanced k-means of the rows of X [n, f] into ``experts`` clusters of sizes ``expert_sizes``.

    Rows are L2-normalised (spherical k-means, as the reference normalises the weight rows);
    each iteration assigns by :func:`balanced_assign` on cosine similarity to the centroids and
    moves the centroids to their members' mean. Returns labels [n] (int64), deterministic.
    """
    X = F.normalize(X.detach().float(), dim=1)
    sizes = expert_sizes(X.shape[0], experts)
    generator = torch.Generator().manual_seed(seed)
    centers = X[torch.randperm(X.shape[0], generator=generator)[:experts]]  # Forgy: k distinct random rows
    labels = None
    for _ in range(iters):
        new = balanced_assign(X @ F.normalize(centers, dim=1).t(), sizes)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centers = torch.zeros_like(centers).index_add_(0, labels, X) / torch.tensor(sizes, dtype=X.dtype)[:, None]
    return labels


# ---- the MLP's channels ---------------------------------------------------------------------


def _input_blocks(mlp: archmod.MlpInfo) -> list[torch.Tensor]:
    """[n, d] row blocks of the MLP's input layers, the first one the gate (gated) or the only input."""
    n = mlp.intermediate
    blocks = []
    for attr in mlp.inputs:
        W = archmod.weight_out_in(getattr(mlp.module, attr)).detach().float().cpu()
        blocks += [W[j * n:(j + 1) * n] for j in range(mlp.halves.get(attr, 1))]
    return blocks


def channel_features(mlp: archmod.MlpInfo) -> torch.Tensor:
    """Per intermediate channel: its normalised input row(s), concatenated (gate | up for a gated MLP)."""
    return torch.cat([F.normalize(b, dim=1) for b in _input_blocks(mlp)], dim=1)


def expert_centroids(mlp: archmod.MlpInfo, labels: torch.Tensor, experts: int) -> torch.Tensor:
    """[E, d]: the mean normalised first-layer row (gate, or the only input) of each expert's channels."""
    first = F.normalize(_input_blocks(mlp)[0], dim=1)
    counts = torch.bincount(labels, minlength=experts).clamp_min(1).to(first.dtype)
    return torch.zeros(experts, first.shape[1]).index_add_(0, labels, first) / counts[:, None]


def _one_hot(labels: torch.Tensor, experts: int) -> torch.Tensor:
    return F.one_hot(labels, experts).float()


# ---- routers --------------------------------------------------------------------------------


@dataclass
class RouterWeights:
    """One MLP's partition and router (``mix`` None: the similarity router)."""

    labels: torch.Tensor  # int64 [n]: expert of each intermediate channel
    centers: torch.Tensor  # float [E, d]
    mix: torch.Tensor | None = None  # float [E, E]

    @property
    def experts(self) -> int:
        return int(self.centers.shape[0])


def router_scores(x: torch.Tensor, centers: torch.Tensor, mix: torch.Tensor | None) -> torch.Tensor:
    """Router scores [..., E] of inputs x [..., d] (float32): the mlp router's logits, or −‖x̂ − c‖² + 2."""
    xn = F.normalize(x.float(), dim=-1)
    c = centers.float()
    if mix is None:
        return 2 * xn @ c.t() - c.pow(2).sum(1)  # = 1 + ... − ‖x̂ − c‖²: nearest centroid first
    return torch.tanh(xn @ c.t()) @ mix.float().t()


def expert_mask(scores: torch.Tensor, active: int) -> torch.Tensor:
    """Bool [..., E]: the ``active`` highest-scoring experts of each token."""
    if active >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    top = torch.topk(scores, active, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)


def captured(scores: torch.Tensor, norms: torch.Tensor, active: int) -> float:
    """Mean over tokens of the share of Σ_e ‖h_e‖ that the chosen experts hold (1.0 = the oracle's best)."""
    chosen = (norms * expert_mask(scores, active)).sum(-1)
    best = torch.topk(norms, min(active, norms.shape[-1]), dim=-1).values.sum(-1)
    keep = best > 0
    return float((chosen[keep] / norms.sum(-1)[keep]).mean()) if keep.any() else 1.0


def train_mlp_router(x: torch.Tensor, norms: torch.Tensor, centers: torch.Tensor,
                     epochs: int = ROUTER_EPOCHS, seed: int = SEED) -> torch.Tensor:
    """Train the reference's MLP router from its initial ``centers`` [E, d] (C₂ starts as the identity)
    on inputs x [N, d] and expert norms [N, E]; returns [C₁ | C₂], [E, d + E] (the caller splits it).
    Targets: norms / max(norms), binary cross-entropy with logits, Adam, shuffled mini-batches."""
    generator = torch.Generator().manual_seed(seed)
    xn = F.normalize(x.float(), dim=-1)
    target = norms / norms.max().clamp_min(1e-12)
    c1 = centers.clone().float().requires_grad_(True)
    c2 = torch.eye(centers.shape[0]).requires_grad_(True)
    opt = torch.optim.Adam([c1, c2], lr=ROUTER_LR)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(xn.shape[0], generator=generator).split(ROUTER_BATCH):
                opt.zero_grad()
                pred = torch.tanh(xn[idx] @ c1.t()) @ c2.t()
                F.binary_cross_entropy_with_logits(pred, target[idx]).backward()
                opt.step()
    return torch.cat([c1.detach(), c2.detach()], dim=1)


@dataclass
class LayerData:
    """One MLP's calibration data: its inputs x [N, d] and each expert's activation norm [N, E]."""

    x: torch.Tensor
    norms: torch.Tensor


def fit_router(mlp: archmod.MlpInfo, data: LayerData, labels: torch.Tensor, router: str,
               active: int) -> tuple[RouterWeights, dict[str, float]]:
    """The recipe's router for one MLP (float16-rounded, as stored) and how much of the activation-norm mass
    each kind captures on the held-out tokens ({'mlp': …, 'similarity': …})."""
    experts = int(labels.max()) + 1
    centers = expert_centroids(mlp, labels, experts)
    n_train = data.x.shape[0] - max(1, int(data.x.shape[0] * HOLDOUT)) if data.x.shape[0] > 1 else 1
    stacked = train_mlp_router(data.x[:n_train], data.norms[:n_train], centers)
    trained = RouterWeights(labels, stacked[:, :centers.shape[1]].half(), stacked[:, centers.shape[1]:].half())
    similar = RouterWeights(labels, centers.half(), None)
    held_x, held_n = data.x[n_train:], data.norms[n_train:]
    if held_x.shape[0] == 0:
        held_x, held_n = data.x, data.norms
    scores = {kind: captured(router_scores(held_x, w.centers, w.mix), held_n, active)
              for kind, w in (("mlp", trained), ("similarity", similar))}
    return (trained if router == "mlp" else similar), scores


# ---- building -------------------------------------------------------------------------------


def _mlps(model: nn.Module) -> list[archmod.MlpInfo]:
    arch = archmod.describe(model)
    for block in arch.blocks:
        if block.mlp is None:
            roles = ", ".join(f"{i.local} ({i.role})" for i in block.linears.values())
            raise UsageError(f"MoEfication needs an MLP with input linears and one output linear in one module; "
                             f"model type {arch.model_type!r} block {block.name} has {roles}")
    return [b.mlp for b in arch.blocks]


def check_experts(model: nn.Module, experts: int) -> None:
    """UsageError (one line, naming the MLP) when an MLP has fewer channels than ``experts``."""
    for mlp in _mlps(model):
        if experts > mlp.intermediate:
            raise UsageError(f"{experts} experts exceed the {mlp.intermediate} intermediate channels of {mlp.name} "
                             "(at least one channel per expert)")


def _layer_data(calibrator: BlockwiseCalibrator, i: int, mlp: archmod.MlpInfo, labels: torch.Tensor,
                experts: int) -> LayerData:
    """Block i's MLP inputs and per-expert activation norms on the calibration tokens."""
    source, out = getattr(mlp.module, mlp.inputs[0]), getattr(mlp.module, mlp.output)
    xs: list[torch.Tensor] = []
    hs: list[torch.Tensor] = []
    onehot = _one_hot(labels, experts)

    def take(name: str, x: torch.Tensor) -> None:
        flat = x.reshape(-1, x.shape[-1]).float().cpu()
        if name == "in":
            xs.append(flat)
        else:
            hs.append((flat * flat) @ onehot)

    calibrator.observe(i, {"in": source, "out": out}, take)
    return LayerData(torch.cat(xs), torch.cat(hs).sqrt())


@dataclass
class MoeBuild:
    """What MoEfication of a model made: a router per MLP and the measurements."""

    routers: dict[str, RouterWeights]
    active: int
    router: str
    stats: dict

    @property
    def nbytes(self) -> int:
        """Tensor bytes as stored: int16 labels, float16 centers and mix."""
        return sum(2 * (w.labels.numel() + w.centers.numel() + (0 if w.mix is None else w.mix.numel()))
                   for w in self.routers.values())


def moefy_model(model: nn.Module, experts: int, active: int, router: str,
                calib_input_ids: Sequence[torch.Tensor] | torch.Tensor,
                progress: Progress | None = None) -> MoeBuild:
    """Partition every MLP into ``experts`` experts and fit its router on the calibration data.

    The model's weights are not changed. Routers see the dense model's activations (each layer
    independently, as the reference trains them).
    """
    if router not in ROUTERS:
        raise UsageError(f"unknown MoE router {router!r} (choose from {', '.join(ROUTERS)})")
    rows = normalise_calibration(calib_input_ids)
    if not rows:
        raise UsageError("MoEfication needs calibration data (give calib, e.g. builtin:pydoc)")
    check_experts(model, experts)
    mlps = _mlps(model)
    routers: dict[str, RouterWeights] = {}
    scores: dict[str, dict[str, float]] = {}
    was_training = model.training
    model.eval()
    try:
        calibrator = BlockwiseCalibrator(model, rows, [b.module for b in archmod.describe(model).blocks])
        for i, mlp in enumerate(mlps):
            labels = balanced_kmeans(channel_features(mlp), experts)
            data = _layer_data(calibrator, i, mlp, labels, experts)
            routers[mlp.name], scores[mlp.name] = fit_router(mlp, data, labels, router, active)
            calibrator.advance(i)
            if progress:
                progress(f"moefying {mlp.name}", i + 1, len(mlps))
    finally:
        model.train(was_training)
    return MoeBuild(routers, active, router, moe_stats(mlps, experts, active, router, scores))


def mlp_flops(mlp: archmod.MlpInfo) -> int:
    """Multiply-adds ×2 per token of the dense MLP: every input row and the output's columns."""
    n = mlp.intermediate
    d = archmod.features(getattr(mlp.module, mlp.output))[1]
    matrices = sum(mlp.halves.get(a, 1) for a in mlp.inputs) + 1
    return 2 * d * n * matrices


def router_flops(d: int, experts: int, router: str) -> int:
    """FLOPs per token of one router (its matmuls)."""
    return 2 * d * experts + (2 * experts * experts if router == "mlp" else 0)


def moe_stats(mlps: Sequence[archmod.MlpInfo], experts: int, active: int, router: str,
              scores: Mapping[str, Mapping[str, float]]) -> dict:
    """The figures a MoEfied variant reports: channels computed, MLP FLOPs per token, router quality."""
    dense = sum(mlp_flops(m) for m in mlps)
    d = archmod.features(getattr(mlps[0].module, mlps[0].output))[1]
    routed = dense * active / experts + len(mlps) * router_flops(d, experts, router)
    mean = {kind: sum(s[kind] for s in scores.values()) / len(scores) for kind in ROUTERS}
    return {"experts": experts, "active": active, "router": router,
            "mlp_channels_computed": active / experts,
            "mlp_flops_fraction": routed / dense, "mlp_flops_saved": 1 - routed / dense,
            "captured": mean, "captured_by_layer": {k: dict(v) for k, v in scores.items()},
            "computes_chosen_only": False}


# ---- storing --------------------------------------------------------------------------------


def moe_to_bytes(build: MoeBuild) -> bytes:
    """``moe.safetensors``: per MLP ``<name>.labels`` (int16), ``.centers`` and ``.mix`` (float16)."""
    from safetensors.torch import save

    tensors = {}
    for name, w in build.routers.items():
        tensors[f"{name}.labels"] = w.labels.to(torch.int16).contiguous()
        tensors[f"{name}.centers"] = w.centers.half().contiguous()
        if w.mix is not None:
            tensors[f"{name}.mix"] = w.mix.half().contiguous()
    meta = {"format": FORMAT, "version": VERSION, "active": str(build.active), "router": build.router,
            "mlps": json.dumps(sorted(build.routers))}
    return save(tensors, metadata=meta)


def load_moe(path: str | Path) -> tuple[dict[str, RouterWeights], dict[str, str]]:
    """The routers of a ``moe.safetensors`` file and its metadata (IntegrityError when unreadable)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
        names = json.loads(meta["mlps"])
        routers = {n: RouterWeights(tensors[f"{n}.labels"].long(), tensors[f"{n}.centers"],
                                    tensors.get(f"{n}.mix")) for n in names}
    except Exception as e:  # noqa: BLE001 - safetensors / json / a missing key: one message
        raise IntegrityError(f"MoE file {Path(path).name} is unreadable ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise IntegrityError(f"MoE file {Path(path).name} is not a {FORMAT} file")
    return routers, meta


# ---- the routed forward ---------------------------------------------------------------------


class MoeRouting(nn.Module):
    """The routing of one MLP (frozen, buffers only: no linear layer for PEFT or the server to wrap).

    Lives as child ``moe_routing`` of the MLP's module; see the module docstring for the hooks.
    """

    def __init__(self, weights: RouterWeights, active: int, source: str, output: str):
        super().__init__()
        self.register_buffer("labels", weights.labels.long(), persistent=False)
        self.register_buffer("centers", weights.centers.float(), persistent=False)
        self.register_buffer("mix", None if weights.mix is None else weights.mix.float(), persistent=False)
        self.active, self.source, self.output = int(active), source, output
        self.__dict__["_hosts"] = {}  # attr → module our hook sits on (a plain dict: not a submodule)
        self.__dict__["_mask"] = None

    @property
    def experts(self) -> int:
        return int(self.centers.shape[0])

    @torch.no_grad()
    def channel_mask(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] in x's dtype: 1 on the channels of each token's chosen experts, 0 elsewhere."""
        chosen = expert_mask(router_scores(x, self.centers, self.mix), self.active)
        return chosen[..., self.labels].to(x.dtype)

    def _take_input(self, _module: nn.Module, args: tuple):
        if self.active < self.experts:
            self.__dict__["_mask"] = self.channel_mask(args[0])
        return None

    def _mask_output(self, _module: nn.Module, args: tuple):
        if self.active >= self.experts:
            return None
        mask = self.__dict__["_mask"]
        self.__dict__["_mask"] = None
        if mask is None:
            raise RuntimeError(f"MoE routing: the MLP's {self.output} ran before its {self.source}")
        return (args[0] * mask.to(args[0].dtype),) + tuple(args[1:])

    def sync(self, container: nn.Module) -> None:
        """Put the hooks on the modules now at ``source`` / ``output`` (moved off the ones they left)."""
        hosts = self.__dict__["_hosts"]
        for attr, hook in ((self.source, self._take_input), (self.output, self._mask_output)):
            current = getattr(container, attr)
            old = hosts.get(attr)
            if old is current:
                continue
            if old is not None:
                _drop_hooks(old, self)
            current.register_forward_pre_hook(hook)
            hosts[attr] = current

    def release(self) -> None:
        """Remove the hooks from the modules they sit on."""
        for module in self.__dict__["_hosts"].values():
            _drop_hooks(module, self)
        self.__dict__["_hosts"] = {}

    def extra_repr(self) -> str:
        kind = "mlp" if self.mix is not None else "similarity"
        return f"experts={self.experts}, active={self.active}, router={kind}, {self.source} → {self.output}"


def _drop_hooks(module: nn.Module, routing: MoeRouting) -> None:
    for key, fn in list(module._forward_pre_hooks.items()):
        if getattr(fn, "__self__", None) is routing:
            del module._forward_pre_hooks[key]


def _sync_hook(container: nn.Module, _args: tuple) -> None:
    # module-level (not a closure): a deep copy of the model keeps working hooks
    routing = container._modules.get(CHILD)
    if isinstance(routing, MoeRouting):
        routing.sync(container)


def attach_moe(model: nn.Module, routers: Mapping[str, RouterWeights], active: int) -> dict[str, MoeRouting]:
    """Route every MLP of ``model`` by ``routers`` (keyed by MLP module name); IntegrityError on a mismatch."""
    arch = archmod.describe(model, warn=False)
    mlps = {b.mlp.name: b.mlp for b in arch.blocks if b.mlp is not None}
    if set(mlps) != set(routers):
        missing = sorted(set(mlps) ^ set(routers))
        raise IntegrityError(f"the MoE routers do not match the model's MLPs (e.g. {missing[0]!r})")
    out = {}
    for name, mlp in mlps.items():
        weights = routers[name]
        d = archmod.features(getattr(mlp.module, mlp.inputs[0]))[0]
        if weights.labels.numel() != mlp.intermediate or weights.centers.shape[1] != d \
                or int(weights.labels.max()) >= weights.experts or not 1 <= active <= weights.experts:
            raise IntegrityError(f"the MoE router of {name} does not fit its MLP ({mlp.intermediate} channels, "
                                 f"{d} inputs, {weights.experts} experts, {active} active)")
        routing = MoeRouting(weights, active, mlp.inputs[0], mlp.output)
        routing.to(next(mlp.module.parameters()).device)
        detach_moe_module(mlp.module)
        mlp.module.add_module(CHILD, routing)
        mlp.module.register_forward_pre_hook(_sync_hook)
        routing.sync(mlp.module)
        out[name] = routing
    return out


def detach_moe_module(container: nn.Module) -> bool:
    """Remove the routing (and its hooks) from one MLP module; True when there was one."""
    routing = container._modules.get(CHILD)
    if not isinstance(routing, MoeRouting):
        return False
    routing.release()
    del container._modules[CHILD]
    for key, fn in list(container._forward_pre_hooks.items()):
        if fn is _sync_hook:
            del container._forward_pre_hooks[key]
    return True


def detach_moe(model: nn.Module) -> int:
    """Make every MLP dense again; returns how many routings were removed."""
    return sum(detach_moe_module(m) for m in list(model.modules()))


def routings(model: nn.Module) -> dict[str, MoeRouting]:
    """The MoE routings attached to ``model``, by the name of the MLP module holding them."""
    return {name.rsplit(".", 1)[0]: m for name, m in model.named_modules() if isinstance(m, MoeRouting)}


def attach_moe_file(model: nn.Module, path: str | Path, active: int | None = None) -> dict[str, MoeRouting]:
    """:func:`attach_moe` from a ``moe.safetensors`` file (``active`` defaults to the file's)."""
    routers, meta = load_moe(path)
    k = int(meta.get("active", 0)) if active is None else int(active)
    return attach_moe(model, routers, k)

