"""Runs one step's ModelInput: copy-on-write copies -> attention metadata -> forward -> sampler,
and from the same hidden states the prompt logprobs and pooled embeddings asked for."""

from __future__ import annotations

import torch

from pagoda.backend.attention import AttentionBackend
from pagoda.backend.cuda_graphs import DecodeGraphRunner
from pagoda.backend.model_input import ModelInput
from pagoda.backend.model_output import ModelOutput
from pagoda.backend.models import CausalLM, KVCache
from pagoda.backend.pooling import pool_hidden
from pagoda.backend.prompt_logprobs import compute_prompt_logprobs
from pagoda.backend.sampler import Sampler


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[KVCache],
        backend: AttentionBackend,
        sampler: Sampler,
        device: torch.device,
        graph_runner: DecodeGraphRunner | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.sampler = sampler
        self.device = device
        # Decode steps run through it (padded, replayed from CUDA graphs where captured).
        self.graph_runner = graph_runner

    @torch.inference_mode()
    def execute(self, model_input: ModelInput) -> ModelOutput:
        """Apply the pending block copies, feed every scheduled token, and sample each sampling
        row's next token (beam search rows: their candidates) from its logits row; score the
        prompt tokens of prompt-logprob rows and pool the rows of pooling sequences."""
        self.backend.copy_blocks(self.kv_caches, model_input.block_copies)
        if not model_input.num_tokens:
            return ModelOutput()
        if self.graph_runner is not None and self.graph_runner.supports(model_input):
            hidden = self.graph_runner.hidden_states(model_input)
        else:
            metadata = self.backend.prepare(model_input.layout, self.device)
            # Only a model with a long-context threshold takes (and gets) the per-token flags;
            # decode-only steps above need none (their positions tell).
            extra = ({} if model_input.long_context is None
                     else {"long_context": model_input.long_context})
            hidden = self.model(
                model_input.input_ids, model_input.positions, self.kv_caches, metadata, **extra
            )
        output = ModelOutput()
        if model_input.sampling_rows:
            logits = self.model.compute_logits(hidden[model_input.logits_indices])
            output = self.sampler(logits, model_input.sampling_rows)
        if model_input.prompt_logprob_rows:
            output.prompt_logprobs = compute_prompt_logprobs(
                self.model, hidden, model_input.prompt_logprob_rows
            )
        if model_input.pooling_rows:
            output.pooled = pool_hidden(hidden, model_input.pooling_rows)
        return output
