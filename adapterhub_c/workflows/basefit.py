"""Does an adapter fit a base? Its modules checked against the base's stored tensor shapes.

Read from safetensors headers only (no tensor loaded; a GGUF base from its config). A base whose block linears are
Conv1D (GPT-2; ``models.arch``) stores them ``[in, out]``. Embedding LoRAs and
``modules_to_save`` tensors are checked too.
"""
from __future__ import annotations

from sqlalchemy import select

from adapterhub_c.adapters.lora import PREFIX
from adapterhub_c.errors import IntegrityError
from adapterhub_c.fsutil import read_safetensors_header
from adapterhub_c.models.arch import stored_layout_is_in_out
from adapterhub_c.models.weights import is_gguf_weight_file, weight_shapes
from adapterhub_c.registry.models import BaseModel
from adapterhub_c.registry.store import Registry


def base_weight_shapes(reg: Registry, base: BaseModel) -> dict[str, list[int]]:
    """{tensor name: shape} of a stored base, from its safetensors headers (no tensor loaded; a GGUF base:
    its model's parameters on the meta device)."""
    if any(is_gguf_weight_file(rel) for rel in (base.files or {})):
        return weight_shapes(reg.materialize(base))
    shapes: dict[str, list[int]] = {}
    for rel, digest in sorted((base.files or {}).items()):
        if rel.endswith(".safetensors"):
            header = read_safetensors_header(reg.blobs.path_for(digest))
            shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _linear_problem(shapes: dict, module: str, layer, in_out: bool) -> str | None:
    key = f"{module}.weight"
    if key not in shapes:
        if module.endswith("lm_head") and "lm_head.weight" not in shapes:
            return None  # tied to the embeddings
        return f"adapts module {module!r}, which is not in base"
    shape = shapes[key]
    want = [int(layer.B.shape[0]), int(layer.A.shape[-1])]
    stored = want[::-1] if in_out and not module.endswith("lm_head") else want
    if len(shape) != 2 or list(shape) != stored:
        return (f"module {module!r} is {want[0]}x{want[1]} (out x in) in the adapter but {shape} "
                "in base" + (" (stored [in, out], Conv1D)" if in_out else ""))
    return None


def _embedding_problem(shapes: dict, module: str, layer) -> str | None:
    want = [int(layer.A.shape[1]), int(layer.B.shape[0])]
    if shapes.get(f"{module}.weight") != want:
        return (f"embedding LoRA {module!r} is {want[0]}x{want[1]} (vocab x hidden) but "
                f"{shapes.get(f'{module}.weight')} in base")
    return None


def _full_tensor_problems(shapes: dict, adapter) -> tuple[list[str], int]:
    problems, checked = [], 0
    for key, tensor in sorted(adapter.full_tensors().items()):
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".base_layer.", ".")
        if name not in shapes:
            continue  # e.g. a tied lm_head
        checked += 1
        if list(tensor.shape) != list(shapes[name]):
            problems.append(f"full tensor {name!r} (modules_to_save) is {list(tensor.shape)} but "
                            f"{shapes[name]} in base")
    return problems, checked


def shape_problems(shapes: dict[str, list[int]], model_type: str | None, adapter) -> tuple[list[str], int]:
    """(what does not fit, how many adapter modules / tensors were checked) against base shapes."""
    if not shapes:
        return [], 0
    in_out = stored_layout_is_in_out(model_type, bool(adapter.config.get("fan_in_fan_out")))
    layers, embeddings = sorted(adapter.layers().items()), sorted(adapter.embedding_layers().items())
    problems = [_linear_problem(shapes, module, layer, in_out) for module, layer in layers]
    problems += [_embedding_problem(shapes, module, layer) for module, layer in embeddings]
    full, full_checked = _full_tensor_problems(shapes, adapter)
    return [p for p in problems if p is not None] + full, len(layers) + len(embeddings) + full_checked


def check_adapter_against_base(reg: Registry, base: BaseModel, adapter, label: str) -> None:
    """Every adapted module exists in the base with matching in/out features (stored bases only).

    IntegrityError names the first problem and the nearest registered base by shape.
    """
    if base.is_reference:
        return
    problems, _ = shape_problems(base_weight_shapes(reg, base), (base.config or {}).get("model_type"), adapter)
    if problems:
        raise IntegrityError(f"{label}: {problems[0]} {base.name!r}" + nearest_hint(reg, adapter, base.name))


def nearest_bases(reg: Registry, adapter) -> list[tuple[str, int, int]]:
    """Stored bases ranked by how much of the adapter fits their shapes: [(name, fitting, checked)]."""
    with reg.session() as s:
        bases = [b for b in s.scalars(select(BaseModel)) if not b.is_reference]
    ranked = []
    total = len(adapter.layers()) + len(adapter.embedding_layers())
    for b in bases:
        problems, checked = shape_problems(base_weight_shapes(reg, b), (b.config or {}).get("model_type"), adapter)
        ranked.append((b.name, max(0, (checked or total) - len(problems)), checked or total))
    return sorted(ranked, key=lambda t: (-t[1] / max(t[2], 1), t[0]))


def nearest_hint(reg: Registry, adapter, exclude: str | None = None) -> str:
    """A message tail naming the registered base that fits ``adapter`` best (other than ``exclude``)."""
    ranked = [r for r in nearest_bases(reg, adapter) if r[0] != exclude]
    if not ranked:
        return "; no other registered base to compare with"
    name, fit, total = ranked[0]
    if fit == total:
        return f"; base {name!r} fits every module: pull with --base {name}"
    return f"; nearest registered base by shape: {name!r} ({fit}/{total} modules fit)"
