"""What a merge does, checked once, and its replayable YAML form (like mergekit's).

Conventions (the defaults and why):

- ``weights`` default to 1.0 for every input: task arithmetic is then the plain sum
  Σ ΔW_i (the task-arithmetic paper with λ = 1); scale them yourself to get λ.
- ``convention="peft"`` (default) for TIES and DARE-TIES: the sign is elected on the
  *unweighted* pruned task vectors and the agreeing weighted entries are divided by
  the *count* of agreeing inputs. With all weights equal to λ this is exactly the TIES
  paper (disjoint mean, then scaled by λ) and it matches PEFT's ``ties``/``ties_svd``,
  the baseline people compare against. ``convention="mergekit"`` elects on the
  *weighted* task vectors and divides by the *sum of the agreeing weights* (mergekit's
  ``ties`` with ``normalize: true``; there a common λ cancels out). mergekit's own
  ``dare_ties`` defaults to ``normalize: false``; we always normalise under this
  convention.
- TIES trim ties: ``peft`` keeps every entry tied with the k-th largest magnitude
  (k = int(density·n)) and nothing when k = 0; ``mergekit`` keeps exactly k and at least
  one, max(1, int(density·n)), as mergekit 0.1.5's ``sparsify.magnitude`` does, the
  tied ones being those its ``torch.argsort`` puts first (the same call on the same
  float32 values: ``kernels.topk.mergekit_topk_mask``; tested against mergekit's own
  output on tied inputs).
- ``rescale`` (DARE only): ``l1`` rescales each input's kept entries by ‖τ‖₁/‖mask·τ‖₁
  (mergekit ≥ 0.1, its ``sparsify`` with ``rescale_norm: l1``; the default under
  ``convention="mergekit"``), ``inverse-p`` by 1/density (the DARE paper and PEFT; the
  default under ``peft``). Configs written before this option (no ``rescale`` key)
  rescaled by 1/density under either convention and replay so.
- ``majority``: ``total`` elects the sign of the sum of values (TIES paper, PEFT
  ``total``, mergekit ``sum``); ``frequency`` the sign held by more inputs (PEFT
  ``frequency``, mergekit ``count``). A tie elects ``+``.
- ``density`` is required for TIES and DARE (no silent default that prunes nothing)
  and refused for task arithmetic.
- ``space="delta"`` (default) merges the true ΔW_i = scale_i·B_i·A_i and
  re-factorises; ``space="factors"`` merges A and B separately (PEFT ``linear``/``ties``
  /``dare_*``, ComPEFT, LoraHub): cross terms, equal ranks needed.
- ``svd`` (delta space, when the output rank is below what the merge holds):
  ``randomized`` (default) is a seeded randomized subspace iteration run until it is
  within ~1e-5 of the best rank-R approximation, ``exact`` a full decomposition; see
  :mod:`adapterhub_c.merging.lowrank`. Configs written before this option existed
  (no ``svd`` key) were made with the exact routine and replay with it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import yaml

from adapterhub_c.errors import UsageError
from adapterhub_c.options.merge import (
    CONVENTIONS,
    DARE_METHODS,
    MAJORITIES,
    METHODS,
    SPACES,
    SVD_ROUTINES,
    check_choice,
    check_density,
    check_rank,
    check_seed,
    dare_rescale,
    method_name,
    parse_weights,
)

CONFIG_VERSION = 1


@dataclass(frozen=True)
class MergeSpec:
    """A validated merge recipe (everything but the inputs themselves)."""

    method: str = "task-arithmetic"
    weights: tuple[float, ...] = ()
    space: str = "delta"
    rank: int | None = None
    density: float | None = None
    majority: str = "total"
    convention: str = "peft"
    seed: int = 0
    svd: str = "randomized"
    rescale: str | None = None  # DARE methods only: "l1" or "inverse-p"

    @property
    def uses_sign_election(self) -> bool:
        return self.method in ("ties", "dare-ties")

    @property
    def uses_dare(self) -> bool:
        return self.method in DARE_METHODS


def make_spec(n_inputs: int, method: str = "task-arithmetic", weights: Sequence[float] | None = None,  # noqa: PLR0913 - builds the MergeSpec from its fields
              space: str = "delta", rank: int | None = None, density: float | None = None,
              majority: str = "total", convention: str = "peft", seed: int | None = 0,
              svd: str = "randomized", rescale: str | None = None) -> MergeSpec:
    """Check every option against ``n_inputs`` and return the frozen spec (UsageError if bad).

    ``rescale`` (DARE only) defaults by ``convention``: ``l1`` for mergekit, ``inverse-p``
    for peft.
    """
    method = method_name(method)
    check_choice("method", method, METHODS)
    check_choice("space", space, SPACES)
    check_choice("majority", majority, MAJORITIES)
    check_choice("convention", convention, CONVENTIONS)
    check_choice("svd routine", svd, SVD_ROUTINES)
    if n_inputs < 1:
        raise UsageError("merge needs at least one adapter")
    weights = parse_weights(weights) or (1.0,) * n_inputs
    if len(weights) != n_inputs:
        raise UsageError(f"got {len(weights)} weights for {n_inputs} adapters; give one weight per adapter")
    density = check_density(method, density)
    rank = check_rank(rank)
    rescale = dare_rescale(method, convention, rescale)
    return MergeSpec(method=method, weights=weights, space=space, rank=rank, density=density,
                     majority=majority, convention=convention, seed=check_seed(seed), svd=svd, rescale=rescale)


@dataclass
class MergeInputRef:
    """How the caller names one input in the replayable config (name, digest, extra)."""

    name: str
    digest: str | None = None
    extra: dict = field(default_factory=dict)


def merge_config_yaml(spec: MergeSpec, inputs: Sequence[MergeInputRef | str | dict]) -> str:
    """The replayable merge config as YAML: method, space, options and the inputs.

    ``inputs`` are names (str), ``MergeInputRef``s or dicts with at least ``name``; they
    are written in merge order, each with its weight.
    """
    refs = [_as_ref(x) for x in inputs]
    if len(refs) != len(spec.weights):
        raise UsageError(f"{len(refs)} input names for {len(spec.weights)} merged adapters")
    doc = {
        "adapterhub_c_merge": CONFIG_VERSION,
        "method": spec.method,
        "space": spec.space,
        "rank": spec.rank,
        "density": spec.density,
        "majority": spec.majority if spec.uses_sign_election else None,
        "convention": spec.convention if spec.uses_sign_election else None,
        "seed": spec.seed if spec.uses_dare else None,
        "rescale": spec.rescale if spec.uses_dare else None,
        "svd": spec.svd if spec.space == "delta" else None,
        "inputs": [],
    }
    for ref, w in zip(refs, spec.weights, strict=False):
        item = {"name": ref.name, "weight": w}
        if ref.digest:
            item["digest"] = ref.digest
        item.update(ref.extra)
        doc["inputs"].append(item)
    doc = {k: v for k, v in doc.items() if v is not None}
    return yaml.safe_dump(doc, sort_keys=False)


def parse_merge_config(text: str) -> tuple[MergeSpec, list[MergeInputRef]]:
    """Read a config written by :func:`merge_config_yaml` back into a spec and input refs."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"merge config is not valid YAML ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise UsageError("merge config needs a non-empty 'inputs' list")
    refs, weights = [], []
    for item in doc["inputs"]:
        if not isinstance(item, dict) or "name" not in item:
            raise UsageError(f"merge config input without a name: {item!r}")
        extra = {k: v for k, v in item.items() if k not in ("name", "digest", "weight")}
        refs.append(MergeInputRef(name=str(item["name"]), digest=item.get("digest"), extra=extra))
        weights.append(item.get("weight", 1.0))
    space = doc.get("space", "delta")
    # version-1 configs from before the svd option truncated with the exact routine
    svd = doc.get("svd", "exact" if space == "delta" else "randomized")
    method = doc.get("method", "task-arithmetic")
    rescale = doc.get("rescale")
    if rescale is None and method_name(method) in DARE_METHODS:
        rescale = "inverse-p"  # configs from before the rescale option: DARE rescaled by 1/p
    spec = make_spec(len(refs), method=method, weights=weights,
                     space=space, rank=doc.get("rank"), density=doc.get("density"),
                     majority=doc.get("majority", "total"), convention=doc.get("convention", "peft"),
                     seed=doc.get("seed", 0), svd=svd, rescale=rescale)
    return spec, refs


def _as_ref(x) -> MergeInputRef:
    if isinstance(x, MergeInputRef):
        return x
    if isinstance(x, str):
        return MergeInputRef(name=x)
    if isinstance(x, dict) and "name" in x:
        extra = {k: v for k, v in x.items() if k not in ("name", "digest")}
        return MergeInputRef(name=str(x["name"]), digest=x.get("digest"), extra=extra)
    raise UsageError(f"cannot name a merge input with {x!r}")


def spec_dict(spec: MergeSpec) -> dict:
    """The spec as a plain dict (for run records)."""
    d = asdict(spec)
    d["weights"] = list(spec.weights)
    return d
