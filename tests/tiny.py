"""Tiny models of every supported family, built from their config classes (no download): the one place the tests
build models and model configs.

Every family has hidden 32, 4 query heads (2 KV groups where the family has GQA), MLP 64, vocabulary 128 (``VOCAB``;
``BYTE_VOCAB`` = 256 for byte-level text) and 128 positions; any config field can be overridden by keyword (passed to
the config's constructor, so derived fields such as ``head_dim`` follow).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

VOCAB = 128
BYTE_VOCAB = 256  # byte-level text (pruning.text.stdlib, the byte tokenizer of the harness tests)
MOE_NAMES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
FAMILY_NAMES = ("llama", "mistral", "qwen2", "qwen3", "opt", "gemma", "gemma2", "gemma3_text", "phi3", "gpt_neox")

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, max_position_embeddings=128)
_GQA = dict(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
_FAMILY = {
    "llama": _GQA,
    "mistral": _GQA,
    "qwen2": _GQA,
    "qwen3": {**_GQA, "head_dim": 8},
    "opt": dict(ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32),
    "gemma": {**_GQA, "head_dim": 8},
    "gemma2": {**_GQA, "head_dim": 8, "query_pre_attn_scalar": 8},
    "gemma3_text": {**_GQA, "head_dim": 8, "query_pre_attn_scalar": 8},
    "phi3": {**_GQA, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},  # fused qkv_proj and gate_up_proj
    "gpt_neox": dict(intermediate_size=64, num_attention_heads=4),  # per-head interleaved query_key_value
    # mixtures of experts: 4 experts of 32 neurons, 2 per token (Qwen2-MoE adds a shared expert of 64)
    "mixtral": {**_GQA, "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        **_GQA,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "num_experts": 4,
        "num_experts_per_tok": 2,
    },
    "qwen3_moe": {**_GQA, "head_dim": 8, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2},
    "olmoe": {**_GQA, "intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "eos_token_id": 2},
    # not a supported family: for the tests of the "unsupported model" errors
    "gpt2": dict(hidden_size=16, num_attention_heads=2, max_position_embeddings=32),
}


def tiny_config_dict(family: str = "llama", layers: int = 2, **overrides) -> dict:
    """The tiny config as a plain dict with ``model_type``: what ``DistillationModule(config=...)`` takes."""
    if family not in _FAMILY:
        raise ValueError(f"family={family!r} must be one of {list(_FAMILY)}")
    return {"model_type": family, **_COMMON, "num_hidden_layers": layers, **_FAMILY[family], **overrides}


def tiny_config(family: str = "llama", layers: int = 2, **overrides) -> PretrainedConfig:
    kw = tiny_config_dict(family, layers, **overrides)
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def tiny_model(
    family: str = "llama", layers: int = 2, seed: int = 0, attn: str | None = "eager", **overrides
) -> PreTrainedModel:
    """A randomly initialised model (``torch.manual_seed(seed)``) in eval mode; ``attn=None`` keeps transformers'
    default attention implementation."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, layers, **overrides)
    if attn is not None:
        cfg._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def byte_model(seed: int = 0, **overrides) -> PreTrainedModel:
    """The 2-layer tiny Llama with a byte vocabulary (256 ids), for byte-level text."""
    return tiny_model("llama", layers=2, seed=seed, vocab_size=BYTE_VOCAB, **overrides)


def calib(n: int = 4, seq: int = 16, seed: int = 0, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n // batch)]
