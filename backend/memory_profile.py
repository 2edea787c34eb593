"""How much GPU memory the KV cache may take: one profiling step, then the arithmetic.

Nothing on CUDA says how much memory a step's activations need, so the KV budget is measured:
a dummy step of `max_num_batched_tokens` tokens (the most any step feeds) goes through the model
and the sampler while torch's allocator records its peak. The budget is what remains of
`gpu_memory_utilization` of the device after the weights, that peak, the memory used outside
torch's allocator (the CUDA context, library workspaces, other processes) and a reserve for the
CUDA graph pool. The measurement (`profile_memory`, CUDA only) and the arithmetic
(`kv_cache_budget`, plain numbers) are separate, so the arithmetic is tested anywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pagoda.backend.attention import BatchLayout
from pagoda.backend.kv.cache_tensors import allocate_kv_cache
from pagoda.backend.model_output import ModelOutput
from pagoda.backend.models import CausalLM
from pagoda.backend.sampler import Sampler, SamplingRow
from pagoda.backend.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Every sampling stage on: penalties (a float32 copy of the logits and token masks), min_p,
# top-k and top-p (a sort of the vocabulary), so the step's sampler peak is the largest one.
_PROFILE_SAMPLING = SamplingParams(
    temperature=1.0, top_p=0.9, top_k=50, min_p=0.05, repetition_penalty=1.1,
    presence_penalty=0.1, frequency_penalty=0.1, max_tokens=1,
)
_MIB = 2**20


@dataclass(frozen=True, slots=True)
class MemoryProfile:
    """One profiling step's measurements on a device, in bytes."""

    total: int  # the device's memory
    weights: int  # held by torch tensors before the step: the weights and rotary tables
    peak_activations: int  # the step's peak allocation above `weights`
    non_torch: int  # used outside torch's allocator: CUDA context, workspaces, other processes


def kv_cache_budget(
    profile: MemoryProfile, gpu_memory_utilization: float, cuda_graph_reserve_bytes: int = 0
) -> int:
    """Bytes the KV cache may take: gpu_memory_utilization x total, less the weights, the peak
    activations, the non-torch memory and the CUDA graph reserve. Raises ValueError, with the
    numbers, when nothing is left."""
    budget = (
        int(profile.total * gpu_memory_utilization)
        - profile.weights
        - profile.peak_activations
        - profile.non_torch
        - cuda_graph_reserve_bytes
    )
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache: {gpu_memory_utilization:.2f} x "
            f"{profile.total / _MIB:.0f} MiB, less weights {profile.weights / _MIB:.0f} MiB, "
            f"peak activations {profile.peak_activations / _MIB:.0f} MiB, non-torch "
            f"{profile.non_torch / _MIB:.0f} MiB and CUDA graph reserve "
            f"{cuda_graph_reserve_bytes / _MIB:.0f} MiB; raise gpu_memory_utilization or lower "
            "max_num_batched_tokens"
        )
    return budget


def profile_memory(
    model: CausalLM,
    device: torch.device,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    block_size: int,
) -> MemoryProfile:
    """Measure one profiling step (see `run_profile_step`) on a CUDA device. Call it after the
    model is loaded and before the KV cache is allocated."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated(device)
    num_layers, num_kv_heads, head_dim = model.kv_shape
    # One block per layer: the step writes nothing (slot -1) and reads this block only.
    scratch = allocate_kv_cache(num_layers, 1, block_size, num_kv_heads, head_dim,
                                model.embed_tokens.weight.dtype, device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    run_profile_step(model, device, max_num_batched_tokens, max_num_seqs, scratch)
    torch.cuda.synchronize(device)
    peak_activations = torch.cuda.max_memory_allocated(device) - baseline
    del scratch
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    profile = MemoryProfile(
        total=total, weights=weights, peak_activations=peak_activations,
        non_torch=total - free - torch.cuda.memory_reserved(device),
    )
    logger.info(
        "memory profile (%d tokens, %d sequences): total %.0f MiB, weights %.0f MiB, peak "
        "activations %.0f MiB, non-torch %.0f MiB", max_num_batched_tokens, max_num_seqs,
        total / _MIB, weights / _MIB, peak_activations / _MIB, profile.non_torch / _MIB,
    )
    return profile


@torch.inference_mode()
def run_profile_step(
    model: CausalLM,
    device: torch.device,
    max_num_batched_tokens: int,
    max_num_seqs: int,
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
) -> ModelOutput:
    """The work of the largest step the scheduler can make, on dummy tokens: the
    `max_num_batched_tokens` tokens split over min(max_num_seqs, tokens) fresh prompts, every
    prompt sampling its next token with every sampling stage on (as ModelRunner.execute does:
    forward through the model's attention backend, logits of each prompt's last token, sampler).
    Nothing is written to `kv_caches` (every slot is -1); reads go to its block 0, which is all
    any block table names."""
    num_seqs = min(max_num_seqs, max_num_batched_tokens)
    lengths = [max_num_batched_tokens // num_seqs] * num_seqs
    lengths[-1] += max_num_batched_tokens % num_seqs
    block_size = kv_caches[0][0].shape[1]
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    layout = BatchLayout(
        query_start_loc=starts,
        context_lens=[0] * num_seqs,
        block_tables=[[0] * -(-length // block_size) for length in lengths],
        slot_mapping=torch.full((max_num_batched_tokens,), -1, dtype=torch.long, device=device),
        block_size=block_size,
    )
    positions = torch.cat([torch.arange(length, device=device) for length in lengths])
    input_ids = torch.zeros(max_num_batched_tokens, dtype=torch.long, device=device)
    metadata = model.attention_backend.prepare(layout, device)
    hidden = model(input_ids, positions, kv_caches, metadata)
    last_tokens = torch.tensor(starts[1:], device=device) - 1
    logits = model.compute_logits(hidden[last_tokens])
    rows = [
        SamplingRow(seq_id=index, params=_PROFILE_SAMPLING, prompt_token_ids=[0] * length,
                    output_token_ids=[], seed=None)
        for index, length in enumerate(lengths)
    ]
    return Sampler(eos_token_ids=())(logits, rows)
