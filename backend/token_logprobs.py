"""Scoring chosen tokens under a batch of log-probability rows: each token's log-probability,
its rank, and the row's top alternatives. The sampler scores the tokens it draws with it, and the
prompt-logprob pass scores the prompt's own tokens the same way, so both report alike."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pagoda.backend.device_transfer import to_device
from pagoda.backend.model_output import SampledToken


def score_tokens(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: Sequence[int | None]
) -> list[SampledToken]:
    """logprobs: [rows, vocab] float32 log_softmax; token_ids: [rows] int64, the token of each
    row; num_top: per row, how many top alternatives to report, or None for none and no rank
    (rank 0). Everything comes to the host in one transfer, the step's one wait for the device
    (float64 holds token ids and float32 logprobs exactly)."""
    chosen = logprobs.gather(-1, token_ids.unsqueeze(1)).squeeze(1)
    pieces = [token_ids.double(), chosen.double()]
    wanted = [i for i, count in enumerate(num_top) if count is not None]
    largest = 0
    if wanted:
        index = to_device(wanted, torch.long, logprobs.device)
        wanted_logprobs = logprobs[index]
        # Rank 1 + the number of strictly more likely tokens, so ties share the better rank.
        wanted_ranks = (wanted_logprobs > chosen[index].unsqueeze(1)).sum(dim=-1) + 1
        largest = min(max(num_top[i] or 0 for i in wanted), logprobs.shape[-1])
        top_values, top_ids = wanted_logprobs.topk(largest, dim=-1)
        pieces += [wanted_ranks.double(), top_values.double().flatten(),
                   top_ids.double().flatten()]
    packed = torch.cat(pieces).tolist()
    num_rows, num_wanted = len(num_top), len(wanted)
    ranks: dict[int, int] = {}
    top_logprobs: dict[int, list[tuple[int, float]]] = {}
    values_start = 2 * num_rows + num_wanted
    ids_start = values_start + num_wanted * largest
    for j, i in enumerate(wanted):
        ranks[i] = int(packed[2 * num_rows + j])
        first, count = j * largest, num_top[i] or 0
        values = packed[values_start + first : values_start + first + count]
        ids = packed[ids_start + first : ids_start + first + count]
        top_logprobs[i] = [(int(token_id), value) for token_id, value in zip(ids, values)]
    return [
        SampledToken(int(packed[i]), packed[num_rows + i], ranks.get(i, 0),
                     top_logprobs.get(i, []))
        for i in range(num_rows)
    ]
