"""The Llama family (Llama 1-3, Vicuna, Mistral, Qwen2) reading and writing the paged KV cache.

One implementation covers the three architectures; they differ only in configuration: Qwen2 adds
biases to q/k/v, Mistral may set a sliding window, Llama 3 scales its rotary frequencies.
Numerics follow transformers' implementation (RMSNorm in float32, rotate-half rotary embedding),
so float32 outputs match it token for token.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagoda.backend.attention import AttentionBackend, AttentionMetadata

KVCache = tuple[torch.Tensor, torch.Tensor]
RotaryAngles = tuple[torch.Tensor, torch.Tensor]

# Rope types whose frequencies do not depend on the sequence length seen so far. "dynamic" and
# "longrope" rescale with the current length, which a cache shared across steps cannot follow.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden.dtype
        hidden = hidden.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(input_dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin per position, precomputed in float32 for every position the model can see.

    The tables are non-persistent buffers built on the default device (a `torch.device` context
    or `set_default_device`), so they sit with the weights and move with `.to()`. A model built on
    the meta device gets storage from `to_empty`, which leaves buffers uninitialized: call
    `reset_buffers` (see `materialize`) to compute them on their new device.
    """

    def __init__(self, config: PretrainedConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        rope = dict(config.rope_parameters or {})
        self.rope_type = rope.get("rope_type", "default")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_type {self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )
        self.config = config
        self.head_dim = head_dim
        self.max_positions = max_positions
        cos, sin = self._tables(torch.get_default_device())
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reset_buffers(self) -> None:
        """Recompute cos and sin in place, on the device the buffers are on now."""
        cos, sin = self._tables(self.cos.device)
        with torch.no_grad():
            self.cos.copy_(cos)
            self.sin.copy_(sin)

    def _tables(self, device: torch.device) -> RotaryAngles:
        # NOTE: ROPE_INIT_FUNCTIONS ignore the default device and use the one they are given;
        # every tensor here must be made on `device`, or a CUDA model mixes in CPU tensors.
        if self.rope_type == "default":
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device)
            theta = self.config.rope_parameters["rope_theta"]
            inv_freq = 1.0 / (theta ** (exponents / self.head_dim))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](self.config, device)
        positions = torch.arange(self.max_positions, dtype=torch.float, device=device)
        freqs = positions[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos() * scaling, angles.sin() * scaling

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryAngles:
        """cos and sin of every token's position, [num_tokens, 1, head_dim]; looked up once per
        step and shared by all layers."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Give a model built on the meta device storage on `device`: parameters uninitialized (for
    `load_weights` to fill), computed buffers (rotary tables) recomputed there."""
    model.to_empty(device=device)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_buffers()
    return model


def apply_rotary(x: torch.Tensor, angles: RotaryAngles) -> torch.Tensor:
    cos, sin = angles
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.backend = backend
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        angles: RotaryAngles,
        hidden: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        query, key, value = self.qkv_proj(hidden).split(
            [self.q_size, self.kv_size, self.kv_size], dim=-1
        )
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        query, key = apply_rotary(query, angles), apply_rotary(key, angles)
        out = self.backend.forward(query, key, value, *kv_cache, metadata, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu')")
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        angles: RotaryAngles,
        hidden: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(angles, self.input_layernorm(hidden), kv_cache, metadata)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, config: PretrainedConfig, backend: AttentionBackend, max_positions: int
    ) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, backend) for _ in range(config.num_hidden_layers)
        )
        attn = self.layers[0].self_attn
        self.rotary = RotaryEmbedding(config, attn.head_dim, max_positions)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.sliding_window = _sliding_window(config)

    @property
    def attention_backend(self) -> AttentionBackend:
        """The backend every layer attends with (prepare its metadata with this one)."""
        return self.layers[0].self_attn.backend

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads, head_dim) of the cache this model needs."""
        attn = self.layers[0].self_attn
        return len(self.layers), attn.num_kv_heads, attn.head_dim

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden_size] of a flat batch of new tokens."""
        hidden = self.embed_tokens(input_ids)
        angles = self.rotary(positions, hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(angles, hidden, kv_cache, metadata)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors, named as in transformers, into the parameters.

        Every expected tensor must come exactly once; a missing or unexpected one is an error.
        """
        slots = self._checkpoint_slots()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints store the shared matrix twice
            if name not in slots:
                raise ValueError(f"unexpected tensor in checkpoint: {name}")
            param, offset, size = slots.pop(name)
            if tensor.shape[0] != size or tensor.shape[1:] != param.shape[1:]:
                raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, expected "
                                 f"{(size, *param.shape[1:])}")
            with torch.no_grad():
                param.narrow(0, offset, size).copy_(tensor)
        if slots:
            raise ValueError(f"checkpoint lacks tensors: {sorted(slots)[:8]}")

    def _checkpoint_slots(self) -> dict[str, tuple[nn.Parameter, int, int]]:
        """Checkpoint tensor name -> (parameter, first row, rows). q/k/v and gate/up are stored
        fused here, each checkpoint tensor filling a band of rows."""
        slots: dict[str, tuple[nn.Parameter, int, int]] = {}
        for name, param in self.named_parameters():
            checkpoint_name = name if name.startswith("lm_head.") else f"model.{name}"
            if ".qkv_proj." in name:
                attn = self.layers[int(name.split(".")[1])].self_attn
                bands = {"q_proj": (0, attn.q_size), "k_proj": (attn.q_size, attn.kv_size),
                         "v_proj": (attn.q_size + attn.kv_size, attn.kv_size)}
            elif ".gate_up_proj." in name:
                size = self.layers[int(name.split(".")[1])].mlp.intermediate_size
                bands = {"gate_proj": (0, size), "up_proj": (size, size)}
            else:
                slots[checkpoint_name] = (param, 0, param.shape[0])
                continue
            fused = "qkv_proj" if ".qkv_proj." in name else "gate_up_proj"
            for part, (offset, size) in bands.items():
                slots[checkpoint_name.replace(fused, part)] = (param, offset, size)
        return slots


def _sliding_window(config: PretrainedConfig) -> int | None:
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return getattr(config, "sliding_window", None)
