"""Tiny models llama.cpp can load, shared by the GGUF tests.

llama.cpp's ``gpt2`` tokenizer needs BPE merges, which the tiny byte tokenizer has none of, so
these models use SmolLM2's own tokenizer cut to its first 2048 tokens: read from the built-in
SmolLM2 GGUF's ``tokenizer.*`` fields, the merges kept are those whose parts and result all
fall inside the cut (a valid, smaller BPE with SmolLM2's pre-tokenizer: single digits, then
GPT-2's byte-level regex, which llama.cpp names ``smollm``). Models: hidden 256 (so
llama.cpp's k-quants, which need rows of 256, apply), 2 layers, 4 heads, 2 KV heads.
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY_VOCAB = 2048
TINY_GGUF_ARCH = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.08)
CONTROL = 3  # llama.cpp's token type for special tokens


def smol_tokenizer(dest: Path, n_vocab: int = TINY_VOCAB):
    """SmolLM2's tokenizer cut to ``n_vocab`` tokens, saved to ``dest`` (a transformers folder); returns it."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from adapterhub_c.models.builtin import smollm2_gguf_path

    reader = gguf.GGUFReader(smollm2_gguf_path())
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()[:n_vocab]
    types = reader.fields["tokenizer.ggml.token_type"].contents()[:n_vocab]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for merge in reader.fields["tokenizer.ggml.merges"].contents():
        a, b = merge.split(" ")
        if a in vocab and b in vocab and a + b in vocab:
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(tokens, types, strict=True) if kind == CONTROL]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>",
                                   additional_special_tokens=[t for t in specials if t not in
                                                              ("<|im_start|>", "<|im_end|>", "<|endoftext|>")])
    fast.chat_template = reader.fields["tokenizer.chat_template"].contents()
    fast.save_pretrained(dest)
    return fast


def tiny_gguf_model(model_type: str, tokenizer, seed: int = 7, tie: bool = False):
    """A seeded tiny ``model_type`` causal LM (float32, eval) over ``tokenizer``'s vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  tie_word_embeddings=tie, **TINY_GGUF_ARCH)
    with torch.random.fork_rng(devices=[]):  # seeded here, the caller's RNG state untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()
