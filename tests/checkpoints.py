"""Tiny Hugging Face checkpoints with random weights, built by the tests themselves."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPTBigCodeConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    StableLmConfig,
    Starcoder2Config,
)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json", "chat_template.jinja")

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    # Wider than the default 0.02 so the next-token distribution is peaked: near-ties between
    # the top two logits would make greedy parity depend on rounding.
    initializer_range=0.2,
)

VARIANTS: dict[str, tuple[type[PretrainedConfig], str, dict]] = {
    "llama-gqa": (LlamaConfig, "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "llama-mha-tied": (LlamaConfig, "LlamaForCausalLM",
                       dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-sharded": (LlamaConfig, "LlamaForCausalLM", dict(num_key_value_heads=2)),
    # Biases on q, k, v and o.
    "llama-attention-bias": (LlamaConfig, "LlamaForCausalLM",
                             dict(num_key_value_heads=2, attention_bias=True)),
    "llama3-rope": (LlamaConfig, "LlamaForCausalLM", dict(
        num_key_value_heads=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    )),
    "mistral-window": (MistralConfig, "MistralForCausalLM",
                       dict(num_key_value_heads=2, sliding_window=40)),
    "qwen2": (Qwen2Config, "Qwen2ForCausalLM", dict(num_key_value_heads=2)),
    "mixtral": (MixtralConfig, "MixtralForCausalLM", dict(
        num_key_value_heads=2, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=40,
    )),
    # Layer 0 sparse, layer 1 dense (mlp_only_layers); top-k weights not renormalized.
    "qwen2-moe": (Qwen2MoeConfig, "Qwen2MoeForCausalLM", dict(
        num_key_value_heads=2, intermediate_size=48, moe_intermediate_size=32,
        shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=3,
        norm_topk_prob=False, mlp_only_layers=[1], qkv_bias=True,
    )),
    # Every layer sparse; heads wider than hidden_size / num_heads, as in Qwen3; biases on q, k,
    # v and o (attention_bias); one window for all layers (use_sliding_window).
    "qwen3-moe": (Qwen3MoeConfig, "Qwen3MoeForCausalLM", dict(
        num_key_value_heads=2, head_dim=32, intermediate_size=48, moe_intermediate_size=32,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, attention_bias=True,
        use_sliding_window=True, sliding_window=48,
    )),
    # Dense families beyond Llama's: each variant turns on what tells its family apart.
    "qwen3": (Qwen3Config, "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=32)),
    # Every layer windowed (use_sliding_window from layer 0 on).
    "qwen3-window": (Qwen3Config, "Qwen3ForCausalLM", dict(
        num_key_value_heads=2, use_sliding_window=True, max_window_layers=0, sliding_window=40,
    )),
    "phi3": (Phi3Config, "Phi3ForCausalLM",
             dict(num_key_value_heads=2, sliding_window=40, pad_token_id=0)),
    # LongRoPE switching at 32 tokens, so prompts start below and above it and grow past it;
    # partial rotary and tied embeddings as in Phi-4-mini.
    "phi3-longrope": (Phi3Config, "Phi3ForCausalLM", dict(
        num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=True,
        original_max_position_embeddings=32, partial_rotary_factor=0.5,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6],
                      "long_factor": [1.5, 3.0, 6.0, 12.0]},
    )),
    "gpt-neox": (GPTNeoXConfig, "GPTNeoXForCausalLM",
                 dict(rotary_pct=0.25, use_parallel_residual=True, hidden_act="gelu")),
    "gpt-neox-sequential": (GPTNeoXConfig, "GPTNeoXForCausalLM", dict(
        rotary_pct=0.5, use_parallel_residual=False, hidden_act="gelu_fast",
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    )),
    "stablelm": (StableLmConfig, "StableLmForCausalLM", dict(
        num_key_value_heads=2, use_qkv_bias=True, qk_layernorm=True,
        use_parallel_residual=False,
    )),
    "stablelm-parallel": (StableLmConfig, "StableLmForCausalLM",
                          dict(num_key_value_heads=4, use_parallel_residual=True,
                               partial_rotary_factor=0.5)),
    "opt": (OPTConfig, "OPTForCausalLM", dict(ffn_dim=128, init_std=0.2, pad_token_id=0)),
    # opt-350m's shape: post-norm layers and word embeddings projected in and out.
    "opt-post-norm": (OPTConfig, "OPTForCausalLM", dict(
        ffn_dim=128, init_std=0.2, pad_token_id=0, do_layer_norm_before=False,
        word_embed_proj_dim=32,
    )),
    # Sliding layers alternate with global ones (Gemma 2's default layer_types); the caps are
    # small enough to change most attention scores and the top logits of these weights.
    "gemma2": (Gemma2Config, "Gemma2ForCausalLM", dict(
        num_hidden_layers=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=12, attn_logit_softcapping=4.0, final_logit_softcapping=10.0,
        tie_word_embeddings=False,
    )),
    # Local layers with their own rope theta; the global layer's rope linearly scaled.
    "gemma3": (Gemma3TextConfig, "Gemma3ForCausalLM", dict(
        num_hidden_layers=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=32,
        sliding_window=10, final_logit_softcapping=10.0, tie_word_embeddings=False,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
        },
    )),
    "starcoder2": (Starcoder2Config, "Starcoder2ForCausalLM",
                   dict(num_key_value_heads=2, sliding_window=12, use_bias=True)),
    "gpt-bigcode": (GPTBigCodeConfig, "GPTBigCodeForCausalLM", dict(n_inner=128, multi_query=True)),
    "gpt-bigcode-mha": (GPTBigCodeConfig, "GPTBigCodeForCausalLM",
                        dict(n_inner=128, multi_query=False)),
}
# Variants whose norm weights (and biases) get random values: transformers initializes them to
# ones and zeros, which would leave per-head norms, LayerNorm biases and the like untested.
RANDOM_NORMS = {"qwen3", "qwen3-window", "phi3", "phi3-longrope", "gpt-neox",
                "gpt-neox-sequential", "stablelm", "stablelm-parallel", "opt", "opt-post-norm"}
# Their default initialization leaves norms at identity (Gemma's zero offsets from 1, LayerNorm
# weights 1 and biases 0) and projection biases at 0, which would hide how those are loaded and
# applied: these variants get random offsets on every 1-D parameter (GPT-BigCode's norms are
# ln_1, ln_2 and ln_f, and the biases matter as much).
PERTURBED_1D = {"gemma2", "gemma3", "starcoder2", "gpt-bigcode", "gpt-bigcode-mha"}


def build_checkpoint(variant: str, tokenizer_dir: Path, output_dir: Path) -> Path:
    """Save a float32 random-weight model of `variant` with the demo tokenizer into output_dir."""
    config_class, architecture, overrides = VARIANTS[variant]
    vocab_size = _vocab_size(tokenizer_dir)
    settings = {**COMMON, **overrides}
    if config_class is not LlamaConfig:
        settings.pop("mlp_bias", None)
    config = config_class(vocab_size=vocab_size, architectures=[architecture], **settings)
    torch.manual_seed(sum(map(ord, variant)))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if variant in RANDOM_NORMS:
        _randomize_norms(model)
    if variant in PERTURBED_1D:
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() == 1:
                    param.add_(torch.randn_like(param) * 0.1)
    shard = "20KB" if variant == "llama-sharded" else "2GB"
    model.save_pretrained(output_dir, safe_serialization=True, max_shard_size=shard)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, output_dir / name)
    return output_dir


def _randomize_norms(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)


def _vocab_size(tokenizer_dir: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir))
