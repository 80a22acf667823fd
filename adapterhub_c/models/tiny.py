"""A seeded tiny random Llama with its own byte-level tokenizer, for tests.

Hidden size 64, 2 layers, gated MLP; builds in well under a second and is the same
model, bit for bit, every time (the weights come from a fixed seed). ``build_tiny``
builds the same kind of model for other architectures (GPT-2, GPT-NeoX, Phi-3, …) from
their transformers configs, sharing the tokenizer.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_SEED = 1234
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + 3 special tokens); any text round-trips."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS[1],
        eos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[0],
        unk_token=SPECIAL_TOKENS[0],
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def tiny_config(vocab_size: int) -> LlamaConfig:
    """The tiny Llama's configuration (hidden 64, 2 layers, 4 heads, 2 KV heads)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=0,
        pad_token_id=0,
    )


# hidden 64, 2 layers, 4 heads (2 KV heads where the family has them), MLP width 128
TINY_ARCHS: dict[str, dict] = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False),
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, original_max_position_embeddings=512,
                 tie_word_embeddings=False),
    "gpt2": dict(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=512),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=512, tie_word_embeddings=False),
}


def build_tiny(model_type: str = "llama", seed: int = TINY_SEED):
    """A seeded tiny random causal LM of ``model_type`` (see ``TINY_ARCHS``) and the tiny tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type == "llama" and seed == TINY_SEED:
        return build_tiny_llama()
    tokenizer = tiny_tokenizer()
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=0,
                                  pad_token_id=0, **TINY_ARCHS[model_type])
    with torch.random.fork_rng(devices=[]):  # seeded here, the caller's RNG state untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model, tokenizer


def build_tiny_llama() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Build the seeded tiny Llama and its tokenizer (float32, eval mode)."""
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):  # seeded here, the caller's RNG state untouched
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(tiny_config(len(tokenizer)))
    model.eval()
    return model, tokenizer
