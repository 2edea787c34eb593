"""Scoring chosen tokens under a batch of log-probability rows: each token's log-probability,
its rank, and the row's top alternatives. The sampler scores the tokens it draws with it, and the
prompt-logprob pass scores the prompt's own tokens the same way, so both report alike."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pagoda.backend.model_output import SampledToken


def score_tokens(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: Sequence[int | None]
) -> list[SampledToken]:
    """logprobs: [rows, vocab] float32 log_softmax; token_ids: [rows] int64, the token of each
    row; num_top: per row, how many top alternatives to report, or None for none and no rank
    (rank 0). Moves each result to the host in one transfer."""
    chosen = logprobs.gather(-1, token_ids.unsqueeze(1)).squeeze(1)
    ranks: dict[int, int] = {}
    top_logprobs: dict[int, list[tuple[int, float]]] = {}
    wanted = [i for i, count in enumerate(num_top) if count is not None]
    if wanted:
        index = torch.tensor(wanted, device=logprobs.device)
        wanted_logprobs = logprobs[index]
        # Rank 1 + the number of strictly more likely tokens, so ties share the better rank.
        wanted_ranks = (wanted_logprobs > chosen[index].unsqueeze(1)).sum(dim=-1) + 1
        largest = min(max(num_top[i] or 0 for i in wanted), logprobs.shape[-1])
        top_values, top_ids = wanted_logprobs.topk(largest, dim=-1)
        top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
        for j, (i, rank) in enumerate(zip(wanted, wanted_ranks.tolist())):
            ranks[i] = rank
            count = num_top[i]
            top_logprobs[i] = list(zip(top_ids_list[j][:count], top_values_list[j][:count]))
    return [
        SampledToken(token_id, logprob, ranks.get(i, 0), top_logprobs.get(i, []))
        for i, (token_id, logprob) in enumerate(zip(token_ids.tolist(), chosen.tolist()))
    ]
