"""Tiny models of every supported family, built from their config classes (no download)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 128


def tiny_config(family: str, layers: int = 2, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, max_position_embeddings=128)
    if family == "llama":
        cfg = LlamaConfig(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, **common)
    elif family == "mistral":
        cfg = MistralConfig(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, **common)
    elif family == "qwen2":
        cfg = Qwen2Config(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, **common)
    elif family == "qwen3":
        cfg = Qwen3Config(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8, **common)
    elif family == "opt":
        cfg = OPTConfig(ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32, **common)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


FAMILY_NAMES = ("llama", "mistral", "qwen2", "qwen3", "opt")


def tiny_model(family: str = "llama", layers: int = 2, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_config(family, layers, **overrides)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def calib(n: int = 4, seq: int = 16, seed: int = 0, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n // batch)]
