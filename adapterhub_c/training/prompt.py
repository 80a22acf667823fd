"""Compression-aware soft prompts (Compress, Then Prompt): the prompt, its wrapper, its file.

A soft prompt is ``k`` learned embeddings prepended to the input embeddings of a causal
LM. PEFT cannot hold a prompt and a LoRA in one model, so ``PromptedModel`` wraps any HF
causal LM (plain, PEFT-wrapped, or with bitsandbytes layers) and prepends the prompt
itself. Its outputs are aligned with the caller's ``input_ids`` (prompt positions are
stripped), so perplexity and generation code run on it unchanged.

Files are safetensors: one tensor ``prompt_embeddings`` [k, hidden] plus string metadata
(base, hidden_size, num_virtual_tokens, init, learned_on, format_version). Never pickle.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapterhub_c.errors import IntegrityError, UsageError
from adapterhub_c.fsutil import atomic_write_bytes
from adapterhub_c.models.arch import context_length
from adapterhub_c.training.loop import train

FORMAT_VERSION = "1"
TENSOR_NAME = "prompt_embeddings"
IGNORE_INDEX = -100
# Control tokens that a tokenizer did not declare special (e.g. ChatML's <|im_end|>).
_CONTROL_TOKEN = re.compile(r"^<\|.*\|>$")

TrainFn = Callable[..., Any]


class SoftPrompt(nn.Module):
    """``k`` learned embeddings [k, hidden] plus where they came from.

    ``base`` names the base model the prompt belongs to, ``learned_on`` the variant (or
    base) it was trained on, ``init`` how it was initialised.
    """

    def __init__(self, embeddings: torch.Tensor, base: str = "", learned_on: str = "",
                 init: str = ""):
        super().__init__()
        if embeddings.dim() != 2 or embeddings.shape[0] <= 0:
            raise UsageError(f"a soft prompt needs embeddings of shape [k>0, hidden], "
                             f"got {tuple(embeddings.shape)}")
        self.embeddings = nn.Parameter(embeddings.detach().clone().float())
        self.base = base
        self.learned_on = learned_on
        self.init = init

    @property
    def num_virtual_tokens(self) -> int:
        """Number of prompt positions ``k``."""
        return self.embeddings.shape[0]

    @property
    def hidden_size(self) -> int:
        """Width of each prompt embedding."""
        return self.embeddings.shape[1]

    def metadata(self) -> dict[str, str]:
        """The file metadata describing this prompt (all values are strings)."""
        return {"base": self.base, "hidden_size": str(self.hidden_size),
                "num_virtual_tokens": str(self.num_virtual_tokens), "init": self.init,
                "learned_on": self.learned_on, "format_version": FORMAT_VERSION}

    def forward(self) -> torch.Tensor:
        """The prompt embeddings [k, hidden]."""
        return self.embeddings


# ---------------------------------------------------------------------------------------
# initialisation


def special_token_ids(tokenizer) -> set[int]:
    """Ids never to sample a prompt from: declared special tokens, special added tokens,
    and ``<|…|>`` control tokens the tokenizer forgot to declare special."""
    ids = set(int(i) for i in (tokenizer.all_special_ids or []))
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    for tok, i in tokenizer.get_vocab().items():
        if _CONTROL_TOKEN.match(tok):
            ids.add(int(i))
    return ids


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise UsageError(f"the number of prompt tokens must be a positive integer, got {k!r}")


def init_prompt(embedding_layer: nn.Embedding, k: int, method: str = "vocab-sample",
                tokenizer=None, seed: int = 0, base: str = "", learned_on: str = "") -> SoftPrompt:
    """A new ``SoftPrompt`` of ``k`` tokens initialised from ``embedding_layer``.

    ``method``:
    - ``"vocab-sample"``: rows drawn uniformly at random (seeded by ``seed``) from the
      real-token ids, never special tokens; without replacement when ``k`` allows.
    - ``"text:<string>"``: the embeddings of the tokenized string, repeated and cut to ``k``.
    """
    _check_k(k)
    if tokenizer is None:
        raise UsageError("init_prompt needs the tokenizer (to know which ids are real tokens)")
    weight = embedding_layer.weight.detach()
    n_rows = weight.shape[0]
    if method == "vocab-sample":
        banned = special_token_ids(tokenizer)
        # Embedding matrices are often padded past the tokenizer; padded rows are untrained.
        limit = min(n_rows, len(tokenizer))
        candidates = torch.tensor([i for i in range(limit) if i not in banned], dtype=torch.long)
        if candidates.numel() == 0:
            raise UsageError("the tokenizer has no real (non-special) tokens to sample from")
        gen = torch.Generator().manual_seed(int(seed))
        if k <= candidates.numel():
            pick = candidates[torch.randperm(candidates.numel(), generator=gen)[:k]]
        else:
            pick = candidates[torch.randint(candidates.numel(), (k,), generator=gen)]
        ids = pick
    elif method.startswith("text:"):
        text = method[len("text:"):]
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise UsageError("prompt init text tokenizes to nothing; give some text after 'text:'")
        ids = torch.tensor((tokens * (k // len(tokens) + 1))[:k], dtype=torch.long)
        if int(ids.max()) >= n_rows:
            raise UsageError("prompt init text has token ids outside the embedding matrix")
    else:
        raise UsageError(f"unknown prompt init {method!r} (choose 'vocab-sample' or 'text:<string>')")
    rows = weight[ids.to(weight.device)].float().cpu()
    return SoftPrompt(rows, base=base, learned_on=learned_on, init=method)


# ---------------------------------------------------------------------------------------
# the wrapper


class PromptedModel(nn.Module):
    """A causal LM with a soft prompt prepended to every input.

    ``forward`` takes the usual ``input_ids`` / ``attention_mask`` / ``labels`` and returns
    the inner model's output with ``.logits`` (and ``.hidden_states``) aligned with the
    caller's ``input_ids``; ``.loss`` is the inner model's LM loss on the extended sequence,
    where prompt positions carry label -100 (the first real token is predicted from the
    last prompt position). With ``freeze_inner`` the inner model's parameters stop
    requiring gradients, so only the prompt learns.
    """

    def __init__(self, model: nn.Module, prompt: SoftPrompt, freeze_inner: bool = True):
        super().__init__()
        embed = model.get_input_embeddings()
        if embed is None:
            raise UsageError("the model has no input embeddings to prepend a prompt to")
        hidden = embed.weight.shape[1]
        if prompt.hidden_size != hidden:
            raise UsageError(f"the prompt has hidden size {prompt.hidden_size}, "
                             f"the model has {hidden}")
        _check_k(prompt.num_virtual_tokens)
        context = context_length(getattr(model, "config", None))
        if context is not None and prompt.num_virtual_tokens >= context:
            raise UsageError(f"{prompt.num_virtual_tokens} prompt tokens do not fit the model's "
                             f"context of {context} positions")
        self.model = model
        self.prompt = prompt.to(embed.weight.device)
        if freeze_inner:
            for p in model.parameters():
                p.requires_grad_(False)

    @property
    def config(self):
        """The inner model's configuration."""
        return self.model.config

    @property
    def num_virtual_tokens(self) -> int:
        """Number of prompt positions prepended to each input."""
        return self.prompt.num_virtual_tokens

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to optimise: the prompt embeddings only."""
        return [self.prompt.embeddings]

    def get_input_embeddings(self) -> nn.Module:
        """The inner model's input embedding layer."""
        return self.model.get_input_embeddings()

    def extend(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """The inner model's inputs: prompt + token embeddings, extended mask and labels."""
        if (input_ids is None) == (inputs_embeds is None):
            raise UsageError("give exactly one of input_ids and inputs_embeds")
        embed = self.model.get_input_embeddings()
        if inputs_embeds is None:
            inputs_embeds = embed(input_ids)
        batch, length = inputs_embeds.shape[:2]
        k = self.num_virtual_tokens
        prompt = self.prompt.embeddings.to(dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        out = {"inputs_embeds": torch.cat([prompt.unsqueeze(0).expand(batch, -1, -1), inputs_embeds], 1)}
        device = inputs_embeds.device
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
        ones = torch.ones(batch, k, dtype=attention_mask.dtype, device=attention_mask.device)
        out["attention_mask"] = torch.cat([ones, attention_mask], dim=1)
        if labels is not None:
            ignore = torch.full((batch, k), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
            out["labels"] = torch.cat([ignore, labels], dim=1)
        return out

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None, **kw):
        """Run the inner model on prompt + input; outputs aligned with the input."""
        for unsupported in ("past_key_values", "position_ids"):
            if kw.get(unsupported) is not None:
                raise UsageError(f"PromptedModel does not take {unsupported}; "
                                 "pass the whole sequence instead")
        kw.pop("past_key_values", None)
        kw.pop("position_ids", None)
        kw.setdefault("use_cache", False)
        inputs = self.extend(input_ids, attention_mask, labels, inputs_embeds)
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        output = self.model(**inputs, **kw)
        logits = getattr(output, "logits", None)
        # With logits_to_keep the model may return fewer positions than the input.
        if logits is not None and logits.shape[1] > length:
            output.logits = logits[:, -length:]
        hidden_states = getattr(output, "hidden_states", None)
        if hidden_states is not None:
            output.hidden_states = tuple(h[:, -length:] for h in hidden_states)
        return output


# ---------------------------------------------------------------------------------------
# files


def save_prompt(prompt: SoftPrompt, path: str | Path) -> Path:
    """Write ``prompt`` as a safetensors file at ``path`` (atomically); returns the path."""
    from safetensors.torch import save

    data = save({TENSOR_NAME: prompt.embeddings.detach().float().cpu().contiguous()},
                metadata=prompt.metadata())
    atomic_write_bytes(path, data)
    return Path(path)


def load_prompt(path: str | Path, expected_base: str | None = None,
                expected_hidden: int | None = None) -> SoftPrompt:
    """Read a prompt file; refuse one made for another base or hidden size."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"prompt file {str(path)!r} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if TENSOR_NAME not in f.keys():
                raise IntegrityError(f"{path}: no {TENSOR_NAME!r} tensor; not a prompt file")
            tensor = f.get_tensor(TENSOR_NAME)
    except SafetensorError as e:
        raise IntegrityError(f"{path}: not a readable safetensors file ({e})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise IntegrityError(f"{path}: unsupported prompt format version {version!r}")
    if tensor.dim() != 2 or str(tensor.shape[1]) != meta.get("hidden_size") \
            or str(tensor.shape[0]) != meta.get("num_virtual_tokens"):
        raise IntegrityError(f"{path}: tensor shape {tuple(tensor.shape)} disagrees with its metadata")
    base = meta.get("base", "")
    if expected_base is not None and base != expected_base:
        raise UsageError(f"prompt {path.name!r} was made for base {base!r}, not {expected_base!r}")
    if expected_hidden is not None and tensor.shape[1] != expected_hidden:
        raise UsageError(f"prompt {path.name!r} has hidden size {tensor.shape[1]}, "
                         f"the model has {expected_hidden}")
    return SoftPrompt(tensor, base=base, learned_on=meta.get("learned_on", ""),
                      init=meta.get("init", ""))


# ---------------------------------------------------------------------------------------
# learning


def text_chunks(tokenizer, texts: Iterable[str], seq_len: int, max_chunks: int | None = None
                ) -> list[torch.Tensor]:
    """The texts joined by EOS and cut into ``seq_len``-token chunks (the tail is dropped)."""
    if seq_len < 2:
        raise UsageError("sequence length must be at least 2 tokens")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    chunks: list[torch.Tensor] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        while len(ids) >= seq_len:
            chunks.append(torch.tensor(ids[:seq_len], dtype=torch.long))
            ids = ids[seq_len:]
            if max_chunks and len(chunks) >= max_chunks:
                return chunks
    return chunks


def prompt_batches(tokenizer, texts: Sequence[str], seq_len: int, batch_size: int,
                   max_batches: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Batches ``{"input_ids": [B, seq_len]}`` of text chunks for prompt learning."""
    if batch_size <= 0:
        raise UsageError("batch size must be positive")
    limit = max_batches * batch_size if max_batches else None
    chunks = text_chunks(tokenizer, texts, seq_len, limit)
    if len(chunks) < batch_size:
        raise UsageError(f"not enough text for one batch of {batch_size} × {seq_len} tokens")
    return [{"input_ids": torch.stack(chunks[i:i + batch_size])}
            for i in range(0, len(chunks) - batch_size + 1, batch_size)]


def prompt_loss_fn(prompted: PromptedModel) -> Callable[[dict], torch.Tensor]:
    """``loss_fn(batch)``: the LM loss of ``prompted`` on a batch of token chunks."""
    def loss_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = prompted.prompt.embeddings.device
        ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        labels = ids if mask is None else ids.masked_fill(mask.to(device) == 0, IGNORE_INDEX)
        return prompted(input_ids=ids, attention_mask=None if mask is None else mask.to(device),
                        labels=labels).loss
    return loss_fn


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def learn_prompt(model: nn.Module, tokenizer, dataset, k: int = 100, init: str = "vocab-sample",  # noqa: PLR0913 - the method's hyper-parameters as keywords
                 config: Any = None, *, seq_len: int = 256, batch_size: int = 2,
                 max_batches: int | None = None, seed: int = 0, base: str = "",
                 learned_on: str = "", train_fn: TrainFn | None = None) -> tuple[SoftPrompt, Any]:
    """Learn a ``k``-token soft prompt for ``model`` with the LM loss on ``dataset``'s text.

    ``dataset`` is an ``evals.data.Dataset`` or a list of texts; it is cut into
    ``seq_len``-token chunks in batches of ``batch_size``. The inner model is frozen; the
    prompt is the only trainable parameter. Training is done by ``train_fn(module,
    named_params, loss_fn, batches, config)`` — the shared loop in ``training.loop`` when
    ``train_fn`` is not given — and its result is returned beside the prompt.
    """
    texts = dataset.as_texts() if hasattr(dataset, "as_texts") else list(dataset)
    prompt = init_prompt(model.get_input_embeddings(), k, init, tokenizer, seed,
                         base=base, learned_on=learned_on)
    prompted = PromptedModel(model, prompt, freeze_inner=True)
    batches = prompt_batches(tokenizer, texts, seq_len, batch_size, max_batches)
    fn = train_fn or train
    named = [("prompt.embeddings", prompted.prompt.embeddings)]
    result = fn(prompted, named, prompt_loss_fn(prompted), batches, config)
    return prompted.prompt, result
