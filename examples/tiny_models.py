"""Small randomly initialised Llama-style models for the examples: built from a config, so
nothing is downloaded."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    *,
    seed: int,
    max_positions: int = 512,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> LlamaForCausalLM:
    """A LlamaForCausalLM with ``num_layers`` layers of width ``hidden_size`` (head size 16,
    MLP 2x), float32, weights drawn from ``torch.manual_seed(seed)``."""
    heads = max(hidden_size // 16, 1)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,  # grouped-query attention
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
