"""Model cards: writing adapter cards (README.md with YAML front matter) and reading their tags."""
from __future__ import annotations

import datetime
import json
import re
from typing import Any, Iterable

import yaml

_FRONT_MATTER_RE = re.compile(r"\A---\s*\n(.*?\n)?---\s*(\n|\Z)", re.DOTALL)


class _NoAliasLoader(yaml.SafeLoader):
    """A safe loader that refuses aliases: a few hundred bytes of nested ``*alias`` lists
    ("billion laughs") expand to gigabytes once the card is serialised as JSON."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not allowed in front matter",
                event.start_mark)
        return super().compose_node(parent, index)


def parse_front_matter(text: str) -> dict:
    """The YAML front matter of a README as a dict ({} when absent).

    Raises ``yaml.YAMLError`` if it is malformed or uses aliases, ValueError if it is not a
    mapping.
    """
    m = _FRONT_MATTER_RE.match(text or "")
    if not m or not (m.group(1) or "").strip():
        return {}
    data = yaml.load(m.group(1), Loader=_NoAliasLoader)
    if not isinstance(data, dict):
        raise ValueError("the YAML front matter is not a mapping")
    return data


MAX_CARD_DEPTH = 64            # model-index, the deepest field real cards use, nests about 6 levels
MAX_CARD_INT = 2**63           # past this a JSON reader (the Hub's, a browser's) loses the value
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")


class CardDataError(ValueError):
    """Front matter YAML allows and JSON cannot carry: NaN, infinities, ``!!binary``, sets, huge numbers."""


def json_card(data: dict) -> dict:
    """Front matter as JSON data (dates become ISO strings), or CardDataError naming the first value
    JSON cannot carry (``tags[1]: .nan``). What a Hub answers as ``cardData`` must pass through this:
    a card that fails it has no metadata, and the local Hub refuses it at upload."""
    if not isinstance(data, dict):
        raise CardDataError("the YAML front matter is not a mapping")
    return _json_value(data, "", 0)


def _json_value(value: Any, where: str, depth: int) -> Any:
    if depth > MAX_CARD_DEPTH:
        raise CardDataError(f"{where or 'card'}: nested deeper than {MAX_CARD_DEPTH} levels")
    if isinstance(value, dict):
        return {_json_key(k, where): _json_value(v, _field(where, k), depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    return _json_scalar(value, where or "card")


def _field(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _json_scalar(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) >= MAX_CARD_INT:
            raise CardDataError(f"{_shown_field(where)}: an integer too large for JSON readers")
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise CardDataError(f"{_shown_field(where)}: {value!r} (.nan / .inf) is not a JSON number")
        return value
    if isinstance(value, str):
        if _SURROGATE_RE.search(value):
            raise CardDataError(f"{_shown_field(where)}: a lone surrogate is not valid UTF-8")
        return value
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    what = "!!binary data" if isinstance(value, (bytes, bytearray)) else f"a YAML {type(value).__name__}"
    raise CardDataError(f"{_shown_field(where)}: {what} is not a JSON value")


def _json_key(key: Any, where: str) -> str:
    """A mapping key as JSON writes it (``1`` → ``"1"``, ``null`` → ``"null"``); NaN / binary refused."""
    if isinstance(key, str):
        return _json_scalar(key, _field(where, "<key>"))
    value = _json_scalar(key, _field(where, f"<key {_shown_field(repr(key))}>"))
    return value if isinstance(value, str) else json.dumps(value)


def _shown_field(where: str, limit: int = 80) -> str:
    text = ascii(where)[1:-1]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None]
    return [str(value)]


def card_tags(card_data: dict) -> list[str]:
    """The tags the Hub derives from card metadata: explicit tags, library, base-model relations."""
    tags = _as_list(card_data.get("tags"))
    tags += _as_list(card_data.get("library_name"))
    relation = card_data.get("base_model_relation")
    for base in _as_list(card_data.get("base_model")):
        tags.append(f"base_model:{base}")
        if relation:
            tags.append(f"base_model:{relation}:{base}")
    if card_data.get("license"):
        tags.append(f"license:{card_data['license']}")
    return list(dict.fromkeys(tags))


def _json_block(obj: Any) -> str:
    return "```json\n" + json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n```\n"


def model_card(base_model: str, name: str, recipe: dict | None = None,
               lineage: Iterable[dict] | dict | None = None, metrics: dict | None = None,
               extra_tags: Iterable[str] = (), peft_loadable: bool = True) -> str:
    """A README.md for an adapter of ``base_model``: YAML front matter then human sections.

    The front matter carries ``library_name: peft``, ``base_model``, ``base_model_relation:
    adapter`` and the tags ``lora``, ``adapterhub-c``, ``base_model:adapter:<base>`` so that
    ``HfApi.list_models(filter="base_model:adapter:<base>")`` finds it. With
    ``peft_loadable=False`` (a repo holding only an adapterhub-c pack) the usage section says
    how to decode it instead of showing PEFT code.
    """
    from huggingface_hub import ModelCardData

    tags = ["lora", "adapterhub-c", f"base_model:adapter:{base_model}", *extra_tags]
    data = ModelCardData(library_name="peft", base_model=base_model,
                         tags=list(dict.fromkeys(tags)))
    data.base_model_relation = "adapter"
    lines = [f"---\n{data.to_yaml()}\n---\n", f"# {name}\n"]
    if peft_loadable:
        lines += [f"A LoRA adapter for [`{base_model}`](https://huggingface.co/{base_model}), "
                  "made with adapterhub-c. It loads with plain PEFT:\n",
                  "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                  f"base = AutoModelForCausalLM.from_pretrained({base_model!r})\n"
                  f"model = PeftModel.from_pretrained(base, {name!r})\n```\n"]
    else:
        lines += [f"A LoRA adapter for [`{base_model}`](https://huggingface.co/{base_model}) "
                  "stored as an adapterhub-c pack (ComPEFT: sparse ternary values and scales). "
                  "Decode it with adapterhub-c (`adapt pack unpack`) into a PEFT folder.\n"]
    lines.append("## Variant recipe\n")
    lines.append(_json_block(recipe) if recipe else "Uncompressed base (no variant recipe).\n")
    lines.append("## Lineage\n")
    if lineage:
        items = [lineage] if isinstance(lineage, dict) else list(lineage)
        for item in items:
            if isinstance(item, dict):
                role = item.get("role", "derived-from")
                parent = item.get("parent", item.get("source", "?"))
                lines.append(f"- {role}: `{parent}`\n")
            else:
                lines.append(f"- `{item}`\n")
    else:
        lines.append("No recorded parents.\n")
    lines += _metrics_section(metrics)
    return "\n".join(lines)


def _metrics_section(metrics: dict | None) -> list[str]:
    """The card's "Measured metrics" lines: a table, or a line saying there are none."""
    lines = ["\n## Measured metrics\n"]
    if not metrics:
        return lines + ["No metrics recorded.\n"]
    lines.append("| metric | value |\n|---|---|\n")
    for key, value in sorted(metrics.items()):
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |\n")
    return lines


def variant_card(base_model: str, name: str, recipe: dict, quantized: bool, sizes: dict | None = None,
                 metrics: dict | None = None, extra_tags: Iterable[str] = (), gguf_file: str | None = None) -> str:
    """A README.md for a compressed variant of ``base_model`` (an `adapt export --format hf` folder, or
    with ``gguf_file`` a `--format gguf` one: llama.cpp / ollama usage instead of transformers').

    Front matter: ``library_name: transformers`` (``gguf`` for a GGUF), ``base_model`` and, for
    quantized variants, ``base_model_relation: quantized`` (the Hub's model tree then lists it
    under the base's quantizations); pruned-only variants leave the relation to the Hub.
    """
    from huggingface_hub import ModelCardData

    tags = ["adapterhub-c", "compressed-variant", *extra_tags, *(["gguf"] if gguf_file else [])]
    data = ModelCardData(library_name="gguf" if gguf_file else "transformers", base_model=base_model,
                         tags=list(dict.fromkeys(tags)))
    if quantized:
        data.base_model_relation = "quantized"
    if gguf_file:
        usage = ["It is one GGUF file, for llama.cpp and ollama (`Modelfile` beside it):\n",
                 f"```\nllama-cli -m {gguf_file}\nollama create {name} -f Modelfile\n```\n"]
    else:
        usage = ["It loads with plain transformers (bitsandbytes installed for quantized variants):\n",
                 "```python\nimport torch\nfrom transformers import AutoModelForCausalLM\n\n"
                 f"model = AutoModelForCausalLM.from_pretrained({name!r}, dtype=torch.float32)\n```\n"]
    lines = [f"---\n{data.to_yaml()}\n---\n", f"# {name}\n",
             f"A compressed variant of [`{base_model}`](https://huggingface.co/{base_model}), made with "
             "adapterhub-c. " + usage[0], usage[1], "## Recipe\n", _json_block(recipe), "## Sizes\n"]
    if sizes:
        lines.append("| what | bytes | / fp16 base |\n|---|---|---|\n")
        fp16 = sizes.get("base_fp16_bytes")
        for key in ("stored_bytes", "loaded_bytes", "export_bytes", "base_fp16_bytes"):
            value = sizes.get(key)
            if value is None:
                continue
            ratio = f"{value / fp16:.3f}" if fp16 else "-"
            lines.append(f"| {key.replace('_bytes', '')} | {value:,} | {ratio} |\n")
        lines.append("\nstored = what the variant adds to an adapterhub-c registry beside its base; loaded = "
                     "memory of the loaded weights (unquantized tensors in float32); export = the weight files "
                     "of this repo.\n")
    else:
        lines.append("No sizes recorded.\n")
    lines += _metrics_section(metrics)
    return "\n".join(lines)
