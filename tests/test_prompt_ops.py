"""Soft prompts in the registry: learn via the CLI, eval/generate with --prompt (and --adapter),
transfer matrix, resume, bad input. Tiny Llama base with tiny variants (magnitude 50%, int8)."""
from __future__ import annotations

import math

import pytest
import torch
from sqlalchemy import select

from adapterhub_c.evals.data import load_dataset
from adapterhub_c.evals.metrics import perplexity
from adapterhub_c.registry import Registry
from adapterhub_c.registry.models import Artifact, Evaluation, Lineage, Run
from adapterhub_c.training.prompt import PromptedModel, SoftPrompt, load_prompt, save_prompt
from adapterhub_c.workflows.prompts import PROMPT_FILE, eval_window, learn_prompt_artifact

K = 4
LEARN = ("--tokens", str(K), "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--eval-tokens", "300")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A registry with the tiny base, two variants, a LoRA and two learned prompts."""
    from peft import LoraConfig, get_peft_model

    from adapterhub_c.registry.artifacts import register_artifact
    from adapterhub_c.runtime.bases import load_base_model
    from adapterhub_c.workflows.bases import add_builtin_base
    from adapterhub_c.workflows.variants import create_variant

    home = tmp_path_factory.mktemp("prompt-home")
    reg = Registry(home=home)
    base, _ = add_builtin_base(reg, "builtin:tiny-llama")
    mag, _ = create_variant(reg, base.name, prune="magnitude", sparsity=0.5, eval_tokens=0, name="tiny-mag50")
    int8, _ = create_variant(reg, base.name, quant="int8", eval_tokens=0, name="tiny-int8")

    model, _ = load_base_model(reg, base)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # PEFT starts B at zero; make the LoRA change the output
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    lora_dir = home / "lora"
    peft_model.save_pretrained(lora_dir)
    lora = register_artifact(reg, kind="lora", name="tiny-lora", base_id=base.id, folder=lora_dir)

    common = dict(tokens=K, steps=3, seq_len=32, batch_size=2, eval_tokens=300)
    p_mag, _ = learn_prompt_artifact(reg, mag.name, name="p-mag", **common)
    p_int8, _ = learn_prompt_artifact(reg, int8.name, name="p-int8", **common)
    yield dict(home=home, reg=reg, base=base, mag=mag, int8=int8, lora=lora, lora_dir=lora_dir,
               p_mag=p_mag, p_int8=p_int8)
    reg.close()


def adapt(cli, world, *args):
    return cli("--home", str(world["home"]), *args)


def artifact_count(reg) -> int:
    with reg.session() as s:
        return len(s.scalars(select(Artifact.id)).all())


def test_learn_via_cli_registers_prompt_with_lineage_and_evaluations(cli, world):
    reg, mag = world["reg"], world["mag"]
    r = adapt(cli, world, "prompt", "learn", "--variant", mag.name, *LEARN, "--name", "p-cli", "--json")
    assert r.code == 0, r.err
    report = r.json()
    assert report["learned_on"] == mag.name and report["tokens"] == K
    assert report["perplexity_after"] != report["perplexity_before"]
    with reg.session() as s:
        art = s.scalar(select(Artifact).where(Artifact.name == "p-cli"))
        assert art.kind == "prompt" and art.variant_id == mag.id and art.base_id == world["base"].id
        assert art.config["num_virtual_tokens"] == K and art.config["hidden_size"] == 64
        assert art.config["learned_on"] == mag.name
        edges = s.scalars(select(Lineage).where(Lineage.child_id == art.id)).all()
        assert [(e.parent_id, e.role) for e in edges] == [(mag.id, "learned-on")]
        evals = s.scalars(select(Evaluation).where(Evaluation.run_id == art.run_id)).all()
        by_prompt = {e.prompt_id: e.value for e in evals}
        assert by_prompt == {None: pytest.approx(report["perplexity_before"]),
                             art.id: pytest.approx(report["perplexity_after"])}
        assert s.get(Run, art.run_id).status == "succeeded"
    prompt = load_prompt(reg.materialize(art) / PROMPT_FILE)
    assert tuple(prompt.embeddings.shape) == (K, 64) and prompt.learned_on == mag.name
    assert not any((reg.cache_dir / "checkpoints").glob("prompt-*/checkpoint.safetensors"))


def _hand_ppl(model, tokenizer, prompt: SoftPrompt | None, max_tokens: int) -> float:
    texts = load_dataset("builtin:pydoc", "test").as_texts()
    if prompt is None:
        return perplexity(model, tokenizer, texts, max_tokens=max_tokens)["perplexity"]
    length, stride = eval_window(512, prompt.num_virtual_tokens)
    wrapped = PromptedModel(model, prompt, freeze_inner=False)
    return perplexity(wrapped, tokenizer, texts, max_length=length, stride=stride,
                      max_tokens=max_tokens)["perplexity"]


def test_eval_with_prompt_changes_perplexity_and_equals_hand_built_wrapper(cli, world):
    from adapterhub_c.runtime.bases import load_base_tokenizer
    from adapterhub_c.runtime.variants import load_variant

    reg, mag = world["reg"], world["mag"]
    plain = adapt(cli, world, "eval", mag.name, "--data", "builtin:pydoc", "--max-tokens", "600", "--json")
    prompted = adapt(cli, world, "eval", mag.name, "--data", "builtin:pydoc", "--max-tokens", "600",
                     "--prompt", "p-mag", "--json")
    assert plain.code == 0 and prompted.code == 0, (plain.err, prompted.err)
    assert prompted.json()["perplexity"] != pytest.approx(plain.json()["perplexity"], rel=1e-6)
    model = load_variant(reg, mag)
    tokenizer = load_base_tokenizer(reg, world["base"])
    prompt = load_prompt(reg.materialize(world["p_mag"]) / PROMPT_FILE)
    assert prompted.json()["perplexity"] == pytest.approx(_hand_ppl(model, tokenizer, prompt, 600), rel=1e-6)


def test_eval_with_prompt_and_adapter_applies_both(cli, world):
    from peft import PeftModel

    from adapterhub_c.runtime.bases import load_base_model

    base = world["base"].name
    args = ("eval", base, "--data", "builtin:pydoc", "--max-tokens", "600", "--json")
    both = adapt(cli, world, *args, "--adapter", "tiny-lora", "--prompt", "p-mag")
    lora_only = adapt(cli, world, *args, "--adapter", "tiny-lora")
    prompt_only = adapt(cli, world, *args, "--prompt", "p-mag")
    assert both.code == lora_only.code == prompt_only.code == 0, (both.err, lora_only.err, prompt_only.err)
    values = [r.json()["perplexity"] for r in (both, lora_only, prompt_only)]
    assert len({round(v, 6) for v in values}) == 3
    model, tokenizer = load_base_model(world["reg"], world["base"])
    peft_model = PeftModel.from_pretrained(model, world["lora_dir"]).eval()
    prompt = load_prompt(world["reg"].materialize(world["p_mag"]) / PROMPT_FILE)
    assert values[0] == pytest.approx(_hand_ppl(peft_model, tokenizer, prompt, 600), rel=1e-6)


def test_transfer_matrix_json_and_heat_map(cli, world, tmp_path):
    png = tmp_path / "transfer.png"
    cols = [world["mag"].name, world["int8"].name, world["base"].name]
    r = adapt(cli, world, "prompt", "transfer", "--prompts", "p-mag,p-int8", "--variants", ",".join(cols),
              "--data", "builtin:pydoc", "--max-tokens", "400", "--plot", str(png), "--json")
    assert r.code == 0, r.err
    m = r.json()
    assert m["rows"] == ["no prompt", "p-mag", "p-int8"] and m["columns"] == cols
    assert m["learned_on"] == [None, world["mag"].name, world["int8"].name]
    assert len(m["values"]) == 3 and all(len(line) == 3 and all(math.isfinite(v) for v in line)
                                         for line in m["values"])
    assert m["values"][1][0] != pytest.approx(m["values"][0][0], rel=1e-6)  # the prompt does something
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the learned-on cell equals `adapt eval --prompt` on the same tokens (same windows)
    e = adapt(cli, world, "eval", world["mag"].name, "--prompt", "p-mag", "--data", "builtin:pydoc",
              "--max-tokens", "400", "--json")
    assert e.json()["perplexity"] == pytest.approx(m["values"][1][0], rel=1e-9)
    table = adapt(cli, world, "prompt", "transfer", "--prompts", "p-mag", "--variants", cols[0],
                  "--data", "builtin:pydoc", "--max-tokens", "200")
    assert table.code == 0 and "no prompt" in table.out and "p-mag" in table.out


def test_interrupted_learning_resumes_to_the_same_prompt(world):
    reg, int8 = world["reg"], world["int8"]
    common = dict(tokens=K, steps=4, seq_len=32, batch_size=2, eval_tokens=100, checkpoint_every=1)
    whole, _ = learn_prompt_artifact(reg, int8.name, name="p-whole", **common)

    def stop_at_two(desc, done, total):
        if desc == "training" and done == 2:
            raise KeyboardInterrupt

    before = artifact_count(reg)
    with pytest.raises(KeyboardInterrupt):
        learn_prompt_artifact(reg, int8.name, name="p-resumed", progress=stop_at_two, **common)
    assert artifact_count(reg) == before
    art, report = learn_prompt_artifact(reg, int8.name, name="p-resumed", resume=True, **common)
    assert report["resumed_from"] == 2
    a = load_prompt(reg.materialize(whole) / PROMPT_FILE).embeddings
    b = load_prompt(reg.materialize(art) / PROMPT_FILE).embeddings
    assert torch.equal(a, b)


@pytest.mark.parametrize("extra, message", [
    (("--tokens", "0"), "positive"),
    (("--tokens", "-3"), "positive"),
    (("--tokens", "512"), "context"),
    (("--tokens", "500", "--seq-len", "32"), "context"),
    (("--init", "zeros"), "init"),
    (("--name", ""), "must not be empty"),
])
def test_bad_learn_options_exit_2_and_register_nothing(cli, world, extra, message):
    before = artifact_count(world["reg"])
    r = adapt(cli, world, "prompt", "learn", "--variant", world["mag"].name, "--steps", "1",
              "--seq-len", "16", *extra)
    assert r.code == 2 and message in r.err and "Traceback" not in r.err
    assert artifact_count(world["reg"]) == before


def test_prompt_of_other_base_or_hidden_size_is_refused(cli, world, tmp_path):
    from adapterhub_c.models.tiny import build_tiny_llama
    from adapterhub_c.registry.artifacts import register_artifact
    from adapterhub_c.workflows.bases import register_base_folder

    reg, base = world["reg"], world["base"]
    model, tok = build_tiny_llama()
    other_dir = tmp_path / "other"
    model.save_pretrained(other_dir)
    tok.save_pretrained(other_dir)
    other, _ = register_base_folder(reg, "other-tiny", other_dir, None, None, None, None)
    folder = tmp_path / "p-other"
    folder.mkdir()
    save_prompt(SoftPrompt(torch.randn(K, 64), base="other-tiny"), folder / PROMPT_FILE)
    register_artifact(reg, kind="prompt", name="p-other", base_id=other.id, folder=folder)
    narrow = tmp_path / "p-narrow"
    narrow.mkdir()
    save_prompt(SoftPrompt(torch.randn(K, 32), base=base.name), narrow / PROMPT_FILE)
    register_artifact(reg, kind="prompt", name="p-narrow", base_id=base.id, folder=narrow)

    data = ("--data", "builtin:pydoc", "--max-tokens", "100")
    r = adapt(cli, world, "eval", world["mag"].name, "--prompt", "p-other", *data)
    assert r.code == 2 and "base" in r.err
    r = adapt(cli, world, "eval", base.name, "--prompt", "p-narrow", *data)
    assert r.code == 2 and "hidden size" in r.err
    r = adapt(cli, world, "prompt", "transfer", "--prompts", "p-narrow", "--variants", world["mag"].name, *data)
    assert r.code == 2 and "hidden size" in r.err
    r = adapt(cli, world, "prompt", "transfer", "--prompts", "p-other", "--variants", world["mag"].name, *data)
    assert r.code == 2 and "base" in r.err
    r = adapt(cli, world, "prompt", "transfer", "--prompts", "tiny-lora", "--variants", world["mag"].name, *data)
    assert r.code == 2 and "not a prompt" in r.err
    r = adapt(cli, world, "prompt", "transfer", "--prompts", "p-mag", "--variants", world["mag"].name,
              "--plot", str(tmp_path / "x.jpg"), *data)
    assert r.code == 2 and ".png" in r.err
    r = adapt(cli, world, "prompt", "learn", "--variant", "tiny-lora", "--steps", "1")
    assert r.code == 2 and "variant" in r.err


def test_generation_longer_than_context_with_prompt_is_refused(cli, world):
    base = world["base"].name
    # 508 new tokens fit the 512-token context without the prompt, not with its 4 tokens
    r = adapt(cli, world, "generate", base, "ab", "--prompt", "p-mag", "--max-new-tokens", "508")
    assert r.code == 2 and "context" in r.err
    r = adapt(cli, world, "generate", base, "ab", "--prompt", "p-mag", "--max-new-tokens", "3")
    assert r.code == 0, r.err
