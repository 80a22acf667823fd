from __future__ import annotations

from adapterhub_c.errors import UsageError
from adapterhub_c.registry.kinds import PROMPT_KINDS
from adapterhub_c.registry.models import Artifact, BaseModel
from adapterhub_c.registry.store import Registry
from adapterhub_c.runtime.bases import base_label
from adapterhub_c.training.prompt import PromptedModel, SoftPrompt, load_prompt

PROMPT_FILE = "prompt.safetensors"


def read_prompt_artifact(reg: Registry, art: Artifact, base: BaseModel,
                         expected_hidden: int | None = None) -> SoftPrompt:
    """The prompt of a ``prompt`` artefact, checked against ``base`` and the hidden size."""
    if art.kind not in PROMPT_KINDS:
        raise UsageError(f"{art.name!r} is a {art.kind}, not a prompt")
    if art.base_id != base.id:
        raise UsageError(f"prompt {art.name!r} was learned for another base, not {base.name!r}")
    folder = reg.materialize(art)
    return load_prompt(folder / PROMPT_FILE, expected_base=base_label(base),
                       expected_hidden=expected_hidden)


def attach_prompt(reg: Registry, spec, model, device=None):
    """``model`` (plain or PEFT, base or variant) wrapped in ``PromptedModel`` with the stack's prompt.

    A prompt learned for another base, or of another hidden size, is a UsageError; so is
    one too long for the model's context.
    """
    embed = model.get_input_embeddings()
    hidden = embed.weight.shape[1] if embed is not None else None
    prompt = read_prompt_artifact(reg, spec.prompt, spec.base, expected_hidden=hidden)
    wrapped = PromptedModel(model, prompt, freeze_inner=False)
    wrapped.eval()
    return wrapped
