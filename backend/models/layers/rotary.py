"""Rotary position embeddings: cos/sin tables per position, and applying them to q and k."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

RotaryAngles = tuple[torch.Tensor, torch.Tensor]

# Rope types whose frequencies are fixed for every position a model can see. "dynamic" (NTK)
# rescales only past max_position_embeddings, which no sequence here reaches (max_model_len is
# capped by it), so within range it is the default rotary, as transformers computes it there.
# "longrope" switches its frequencies with the sequence's length: LongRopeEmbedding, for the
# families whose reference recomputes the cache when it switches (Phi-3).
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
LONGROPE_ARCHITECTURES = ("Phi3ForCausalLM",)


class RotaryEmbedding(nn.Module):
    """cos/sin per position, precomputed in float32 for every position the model can see.

    `rotary_dim` (at most head_dim) is how many leading features of each head rotate; models with
    partial rotary pass fewer than head_dim and the rest pass through unchanged. `layer_type`
    picks the parameters of one kind of layer where the config has a set per kind (Gemma 3's
    `rope_parameters["sliding_attention"]` and `["full_attention"]`).

    The tables are non-persistent buffers built on the default device (a `torch.device` context
    or `set_default_device`), so they sit with the weights and move with `.to()`. A model built on
    the meta device gets storage from `to_empty`, which leaves buffers uninitialized: call
    `reset_buffers` (see `materialize`) to compute them on their new device.
    """

    rope_types: tuple[str, ...] = SUPPORTED_ROPE_TYPES

    def __init__(
        self, config: PretrainedConfig, rotary_dim: int, max_positions: int,
        layer_type: str | None = None,
    ) -> None:
        super().__init__()
        parameters = config.rope_parameters or {}
        if layer_type is not None:
            if layer_type not in parameters:
                raise ValueError(f"rope_parameters has no entry for layer type {layer_type!r}")
            parameters = parameters[layer_type]
        self.rope = dict(parameters)
        self.layer_type = layer_type
        self.rope_type = self.rope.get("rope_type", "default")
        if self.rope_type not in self.rope_types:
            hint = (f" (longrope: {', '.join(LONGROPE_ARCHITECTURES)} only)"
                    if self.rope_type == "longrope" else "")
            raise ValueError(
                f"rope_type {self.rope_type!r} is not supported for "
                f"{config.architectures or config.model_type}; supported: {self.rope_types}{hint}"
            )
        self.config = config
        self.rotary_dim = rotary_dim
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
            exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float, device=device)
            theta = self.rope["rope_theta"]
            inv_freq = 1.0 / (theta ** (exponents / self.rotary_dim))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](
                self.config, device, layer_type=self.layer_type
            )
        return _angles(inv_freq, self.max_positions, scaling, device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryAngles:
        """cos and sin of every token's position, [num_tokens, 1, rotary_dim]; looked up once per
        step and shared by all layers."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]


class LongRopeEmbedding(RotaryEmbedding):
    """LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini) as transformers runs it.

    Two sets of frequencies: the short factors while a sequence has at most
    original_max_position_embeddings tokens, the long ones beyond. transformers picks them per
    forward by the sequence's length, and Phi-3 drops its cache and recomputes the whole sequence
    the first time it grows past that length, so every token's key is rotated with the set of
    the sequence's current length. The engine does the same (see `long_context_threshold`):
    it tells the model, per token, whether its sequence is long, and recomputes a sequence that
    crosses the threshold.

    The table holds the short angles of positions 0..threshold-1 (a short sequence never goes
    further) followed by the long angles of every position; a long token reads row
    threshold + position.
    """

    rope_types = ("longrope",)

    def __init__(self, config: PretrainedConfig, rotary_dim: int, max_positions: int) -> None:
        self.threshold = config.rope_parameters["original_max_position_embeddings"]
        super().__init__(config, rotary_dim, max_positions)

    @property
    def long_context_threshold(self) -> int | None:
        """The sequence length past which the long factors apply; None when no sequence can
        get longer than it."""
        return self.threshold if self.max_positions > self.threshold else None

    def _tables(self, device: torch.device) -> RotaryAngles:
        init = ROPE_INIT_FUNCTIONS["longrope"]
        # transformers' choice: seq_len above the threshold selects long_factor; the attention
        # scaling (from max/original positions) is the same for both.
        short_freq, scaling = init(self.config, device)
        long_freq, _ = init(self.config, device, seq_len=self.threshold + 1)
        short_cos, short_sin = _angles(short_freq, self.threshold, scaling, device)
        long_cos, long_sin = _angles(long_freq, self.max_positions, scaling, device)
        return torch.cat((short_cos, long_cos)), torch.cat((short_sin, long_sin))

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype, long_context: torch.Tensor | None = None
    ) -> RotaryAngles:
        """`long_context` [num_tokens] bool: whether each token's sequence is longer than the
        threshold. Without it a token's own position decides, which is right for decodes (a
        decoding sequence is one token longer than the position it feeds) but not for a prompt
        that is fed in chunks."""
        is_long = positions >= self.threshold if long_context is None else long_context
        rows = positions + is_long.to(positions.dtype) * self.threshold
        return super().forward(rows, dtype)


def _angles(
    inv_freq: torch.Tensor, num_positions: int, scaling: float, device: torch.device
) -> RotaryAngles:
    positions = torch.arange(num_positions, dtype=torch.float, device=device)
    freqs = positions[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos() * scaling, angles.sin() * scaling


def apply_rotary(x: torch.Tensor, angles: RotaryAngles) -> torch.Tensor:
    """Rotate the leading rotary_dim features of every head (rotate-half convention)."""
    cos, sin = angles
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rotated * cos + _rotate_half(rotated) * sin, passed), dim=-1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Give a model built on the meta device storage on `device`: parameters uninitialized (for
    `load_weights` to fill), computed buffers (rotary tables) recomputed there."""
    model.to_empty(device=device)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_buffers()
    return model
