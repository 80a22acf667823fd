"""Soft prompts (Compress, Then Prompt) on the tiny base: wrapper, init, files, transfer."""
from __future__ import annotations

import pytest
import torch

from adapterhub_c.errors import UsageError
from adapterhub_c.models.tiny import build_tiny_llama
from adapterhub_c.training.prompt import (
    IGNORE_INDEX,
    PromptedModel,
    SoftPrompt,
    init_prompt,
    learn_prompt,
    lm_loss,
    load_prompt,
    prompt_batches,
    prompt_loss_fn,
    save_prompt,
    special_token_ids,
)
from adapterhub_c.training.prompt_transfer import NO_PROMPT, plot_transfer, transfer_matrix

K = 5
TEXT = ("The for statement is used to iterate over the elements of a sequence "
        "(such as a string, tuple or list) or other iterable object. ") * 4


@pytest.fixture
def tiny():
    return build_tiny_llama()


def make_prompt(model, tokenizer, k=K, seed=0):
    return init_prompt(model.get_input_embeddings(), k, "vocab-sample", tokenizer, seed, base="tiny")


def ids_of(tokenizer, text=TEXT, n=24):
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :n]


def lora_model(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, cfg)


def capture_inner_kwargs(module):
    seen = {}

    def hook(_mod, _args, kwargs):
        seen.update(kwargs)

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


def test_prompt_positions_have_ignored_labels_and_attended_mask(tiny):
    model, tok = tiny
    prompted = PromptedModel(model, make_prompt(model, tok))
    ids = ids_of(tok).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    seen, handle = capture_inner_kwargs(model)
    out = prompted(input_ids=ids, attention_mask=mask, labels=ids)
    handle.remove()
    assert seen["inputs_embeds"].shape == (2, K + ids.shape[1], 64)
    assert (seen["labels"][:, :K] == IGNORE_INDEX).all()
    assert torch.equal(seen["labels"][:, K:], ids)
    assert (seen["attention_mask"][:, :K] == 1).all()
    assert torch.equal(seen["attention_mask"][:, K:], mask)
    assert out.logits.shape == (2, ids.shape[1], model.config.vocab_size)


def test_logits_align_with_input_and_loss_is_mean_ce(tiny):
    model, tok = tiny
    prompt = make_prompt(model, tok)
    prompted = PromptedModel(model, prompt)
    ids = ids_of(tok)
    out = prompted(input_ids=ids, labels=ids)
    embeds = torch.cat([prompt.embeddings.unsqueeze(0), model.get_input_embeddings()(ids)], 1)
    full = model(inputs_embeds=embeds).logits
    assert torch.allclose(out.logits, full[:, K:], atol=1e-5)
    labels = torch.cat([torch.full((1, K), IGNORE_INDEX), ids], 1)
    assert torch.allclose(out.loss, lm_loss(full, labels), atol=1e-5)
    # the prompt changes what the model sees
    assert not torch.allclose(out.logits, model(input_ids=ids).logits, atol=1e-4)


def test_only_the_prompt_trains(tiny):
    model, tok = tiny
    prompted = PromptedModel(model, make_prompt(model, tok))
    assert all(not p.requires_grad for p in model.parameters())
    assert prompted.trainable_parameters() == [prompted.prompt.embeddings]
    before_inner = {n: p.detach().clone() for n, p in model.named_parameters()}
    before_prompt = prompted.prompt.embeddings.detach().clone()
    opt = torch.optim.AdamW(prompted.trainable_parameters(), lr=1e-2)
    ids = ids_of(tok)
    prompted(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert not torch.equal(prompted.prompt.embeddings, before_prompt)
    for n, p in model.named_parameters():
        assert torch.equal(p, before_inner[n]), n
        assert p.grad is None, n


def test_prompt_and_lora_are_both_applied(tiny):
    model, tok = tiny
    ids = ids_of(tok)
    prompt = make_prompt(model, tok)
    with torch.no_grad():
        prompt_only = PromptedModel(model, prompt, freeze_inner=False)(input_ids=ids).logits.clone()
        peft_model = lora_model(model)
        lora_only = peft_model(input_ids=ids).logits.clone()
        both = PromptedModel(peft_model, prompt)(input_ids=ids).logits
        embeds = torch.cat([prompt.embeddings.unsqueeze(0),
                            peft_model.get_input_embeddings()(ids)], 1)
        reference = peft_model(inputs_embeds=embeds).logits[:, K:]
    assert torch.allclose(both, reference, atol=1e-5)
    assert not torch.allclose(both, prompt_only, atol=1e-4)
    assert not torch.allclose(both, lora_only, atol=1e-4)


def test_vocab_sample_skips_specials_and_is_seeded(tiny):
    model, tok = tiny
    assert {0, 1, 2} <= special_token_ids(tok)  # <|im_end|> is not declared special but is a control token
    weight = model.get_input_embeddings().weight.detach()
    a = init_prompt(model.get_input_embeddings(), 250, "vocab-sample", tok, seed=3)
    b = init_prompt(model.get_input_embeddings(), 250, "vocab-sample", tok, seed=3)
    c = init_prompt(model.get_input_embeddings(), 250, "vocab-sample", tok, seed=4)
    assert torch.equal(a.embeddings, b.embeddings)
    assert not torch.equal(a.embeddings, c.embeddings)
    # recover which rows were picked
    picked = torch.cdist(a.embeddings, weight).argmin(dim=1)
    assert torch.equal(weight[picked], a.embeddings)
    assert not set(picked.tolist()) & {0, 1, 2}
    assert picked.tolist() != list(range(3, 253))  # not the first rows
    assert len(set(picked.tolist())) == 250  # without replacement when k allows
    assert a.init == "vocab-sample"


def test_text_init_repeats_and_truncates(tiny):
    model, tok = tiny
    embed = model.get_input_embeddings()
    p = init_prompt(embed, 7, "text:abc", tok)
    ids = tok("abc", add_special_tokens=False)["input_ids"]
    expected = embed.weight.detach()[(ids * 3)[:7]]
    assert torch.equal(p.embeddings, expected)
    with pytest.raises(UsageError):
        init_prompt(embed, 7, "text:", tok)
    with pytest.raises(UsageError):
        init_prompt(embed, 7, "random", tok)


def test_bad_token_counts_are_refused(tiny):
    model, tok = tiny
    with pytest.raises(UsageError):
        init_prompt(model.get_input_embeddings(), 0, "vocab-sample", tok)
    with pytest.raises(UsageError):
        init_prompt(model.get_input_embeddings(), -2, "vocab-sample", tok)
    too_long = make_prompt(model, tok, k=model.config.max_position_embeddings)
    with pytest.raises(UsageError, match="context"):
        PromptedModel(model, too_long)
    with pytest.raises(UsageError, match="hidden size"):
        PromptedModel(model, SoftPrompt(torch.zeros(3, 32)))


def test_save_load_round_trip_gives_identical_outputs(tiny, tmp_path):
    model, tok = tiny
    prompt = make_prompt(model, tok)
    prompt.learned_on = "tiny-50pct"
    path = save_prompt(prompt, tmp_path / "p" / "prompt.safetensors")
    assert not [f for f in path.parent.iterdir() if f.name.endswith(".part")]
    loaded = load_prompt(path, expected_base="tiny", expected_hidden=64)
    assert (loaded.base, loaded.learned_on, loaded.init, loaded.num_virtual_tokens) == \
        ("tiny", "tiny-50pct", "vocab-sample", K)
    ids = ids_of(tok)
    with torch.no_grad():
        a = PromptedModel(model, prompt, freeze_inner=False)(input_ids=ids).logits
        b = PromptedModel(model, loaded, freeze_inner=False)(input_ids=ids).logits
    assert torch.equal(a, b)


def test_load_refuses_other_base_or_hidden(tiny, tmp_path):
    model, tok = tiny
    path = save_prompt(make_prompt(model, tok), tmp_path / "prompt.safetensors")
    with pytest.raises(UsageError, match="'tiny'.*'smollm2'"):
        load_prompt(path, expected_base="smollm2")
    with pytest.raises(UsageError, match="64.*576"):
        load_prompt(path, expected_hidden=576)
    with pytest.raises(UsageError):
        load_prompt(tmp_path / "missing.safetensors")


def test_perplexity_and_generation_run_on_prompted_model(tiny):
    from adapterhub_c.evals.metrics import greedy_generate, perplexity

    model, tok = tiny
    prompted = PromptedModel(model, make_prompt(model, tok))
    base = perplexity(model, tok, [TEXT], max_length=64, stride=32)
    with_prompt = perplexity(prompted, tok, [TEXT], max_length=64, stride=32)
    assert with_prompt["tokens"] == base["tokens"]
    assert with_prompt["perplexity"] > 1 and with_prompt["perplexity"] != base["perplexity"]
    assert isinstance(greedy_generate(prompted, tok, "def f", 3), str)


def test_transfer_matrix_and_heat_map(tiny, tmp_path):
    model, tok = tiny
    other, _ = build_tiny_llama()
    with torch.no_grad():  # a crude "compressed variant": half the weights zeroed
        for p in other.parameters():
            p.mul_((torch.arange(p.numel()).reshape(p.shape) % 2).to(p.dtype))
    prompts = {"tiny": make_prompt(model, tok, seed=1), "tiny-pruned": make_prompt(other, tok, seed=2)}
    matrix = transfer_matrix(prompts, {"tiny": model, "tiny-pruned": other}, tok, [TEXT], max_tokens=80,
                             max_length=40, stride=20)
    assert matrix["rows"] == [NO_PROMPT, "tiny", "tiny-pruned"]
    assert matrix["columns"] == ["tiny", "tiny-pruned"]
    assert len(matrix["values"]) == 3 and all(len(r) == 2 for r in matrix["values"])
    assert all(v > 1 for r in matrix["values"] for v in r)
    assert any(p.requires_grad for p in model.parameters())  # transfer does not freeze callers' models
    png = plot_transfer(matrix, tmp_path / "fig" / "transfer.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_few_steps_lower_the_loss(tiny):
    model, tok = tiny
    prompted = PromptedModel(model, make_prompt(model, tok, k=8))
    batch = prompt_batches(tok, [TEXT] * 3, seq_len=32, batch_size=2)[0]
    loss_fn = prompt_loss_fn(prompted)
    opt = torch.optim.AdamW(prompted.trainable_parameters(), lr=5e-2)
    with torch.no_grad():
        first = loss_fn(batch).item()
    for _ in range(15):
        opt.zero_grad()
        loss_fn(batch).backward()
        opt.step()
    with torch.no_grad():
        assert loss_fn(batch).item() < first - 0.01


def test_learn_prompt_drives_the_given_train_fn(tiny):
    model, tok = tiny
    calls = {}

    def train_fn(module, named_params, loss_fn, batches, config):
        calls.update(module=module, names=[n for n, _ in named_params], batches=batches, config=config)
        params = [p for _, p in named_params]
        opt = torch.optim.AdamW(params, lr=5e-2)
        for batch in batches:
            opt.zero_grad()
            loss = loss_fn(batch)
            loss.backward()
            opt.step()
        return {"final_loss": loss.item()}

    prompt, result = learn_prompt(model, tok, [TEXT] * 4, k=6, seq_len=32, batch_size=2,
                                  max_batches=2, base="tiny", learned_on="tiny", config={"x": 1},
                                  train_fn=train_fn)
    assert isinstance(calls["module"], PromptedModel)
    assert calls["names"] == ["prompt.embeddings"]
    assert len(calls["batches"]) == 2 and calls["config"] == {"x": 1}
    assert prompt.num_virtual_tokens == 6 and prompt.base == "tiny"
    assert "final_loss" in result
