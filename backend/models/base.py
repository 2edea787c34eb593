"""What every model family gives the engine, and what it is built from."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import PretrainedConfig

from pagoda.backend.attention import AttentionBackend, AttentionMetadata
from pagoda.backend.models.layers import UNQUANTIZED, Linear, LinearMethod

KVCache = tuple[torch.Tensor, torch.Tensor]


def dense_linears(prefix: str) -> LinearMethod:
    return UNQUANTIZED


@dataclass(frozen=True)
class ModelContext:
    """Everything a family's constructor needs: the checkpoint's configuration, the attention
    backend every layer uses, how many positions to precompute rotary tables for, and which
    LinearMethod stores each linear layer (by the module path in the model of what the
    checkpoint stores, e.g. "layers.3.mlp.down_proj"; a fused layer asks for each of its parts,
    "layers.3.mlp.gate_proj" and "layers.3.mlp.up_proj"; dense unless a quantization scheme
    says otherwise)."""

    config: PretrainedConfig
    attention: AttentionBackend
    max_positions: int
    linear_method: Callable[[str], LinearMethod] = field(default=dense_linears)

    def linear(
        self, prefix: str, input_size: int, output_sizes: int | dict[str, int], bias: bool
    ) -> Linear:
        return Linear(input_size, output_sizes, bias, self._method_of(prefix, output_sizes))

    def _method_of(self, prefix: str, output_sizes: int | dict[str, int]) -> LinearMethod:
        if isinstance(output_sizes, int):
            return self.linear_method(prefix)
        # NOTE: quantization configs name checkpoint modules, and a fused layer is several of
        # them; they are stored one way or not at all.
        parent = prefix.rpartition(".")[0]
        paths = [".".join(filter(None, (parent, name))) for name in output_sizes]
        methods = [self.linear_method(path) for path in paths]
        if any(method != methods[0] for method in methods):
            raise ValueError(f"the parts {paths} of the fused layer {prefix} are quantized "
                             "differently, which a fused layer cannot store")
        return methods[0]


class CausalLM(Protocol):
    """A decoder-only model over the paged KV cache, as the engine drives it.

    Optionally (LongRoPE, see backend/long_context.py) a model has a `long_context_threshold`
    (int or None): its forward then also takes `long_context`, a [num_tokens] bool tensor saying
    which tokens belong to sequences longer than the threshold; without it (decode-only steps)
    a token's position decides.
    """

    @property
    def attention_backend(self) -> AttentionBackend:
        """The backend every layer attends with (prepare its metadata with this one)."""

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(num_layers, num_kv_heads, head_dim) of the cache this model needs."""

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden_size] of a flat batch of new tokens."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [num_tokens, vocab_size] of final hidden states."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill the parameters from checkpoint tensors named as in transformers."""

    def eval(self) -> CausalLM: ...
