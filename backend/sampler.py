"""Batch sampler: turns one step's last-token logits into each sequence's next token, or for beam
search into each beam's best candidates (the sampler's beam mode, so nothing else in a step
branches on beam search).

Contract: every operation is row-wise, so a row's token depends only on its own logits, its
SamplingRow and (for unseeded rows) the sampler's shared generator, never on its neighbours in
the batch. Processing runs in float32 on the logits' device, in vLLM's order: logit_bias ->
min_tokens -> repetition penalty -> presence/frequency penalties -> greedy argmax, or
temperature -> min_p -> top_k -> top_p -> sampling. Reported logprobs, ranks and top logprobs
are those of the raw logits, before any of that processing (as OpenAI and vLLM report them).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from pagoda.backend.model_output import BeamCandidates, ModelOutput, SampledToken
from pagoda.backend.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingRow:
    """One sequence's row in the batch's logits."""

    seq_id: int
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated so far by this sequence
    seed: int | None  # effective seed of this sequence (None: the sampler's shared generator)


class Sampler:
    """Samples one token per row of a batch of logits; see the module docstring."""

    def __init__(self, eos_token_ids: Iterable[int], seed: int | None = None) -> None:
        """eos_token_ids: masked while a row is below its min_tokens.
        seed: seeds the generator shared by rows without a seed (random when None)."""
        self.eos_token_ids = tuple(sorted(set(eos_token_ids)))
        self.seed = seed
        # One shared generator per device, created on first use: a torch.Generator is tied to
        # the device it draws on, and the logits' device is only known per call.
        self._shared_generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> ModelOutput:
        """logits: [len(rows), vocab], any float dtype and device; left unchanged.
        Returns each row's token (beam search rows: its candidates) under the row's seq_id."""
        _check_shape(logits, rows)
        output = ModelOutput()
        beam = [i for i, row in enumerate(rows) if row.params.use_beam_search]
        if beam:
            beam_rows = [rows[i] for i in beam]
            candidates = self.beam_candidates(logits[torch.tensor(beam, device=logits.device)],
                                              beam_rows)
            output.beam_candidates = {row.seq_id: c for row, c in zip(beam_rows, candidates)}
        if len(beam) < len(rows):
            sampled = [i for i, row in enumerate(rows) if not row.params.use_beam_search]
            if beam:
                logits = logits[torch.tensor(sampled, device=logits.device)]
                rows = [rows[i] for i in sampled]
            tokens = self.sample(logits, rows)
            output.tokens = {row.seq_id: [token] for row, token in zip(rows, tokens)}
        return output

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
        """One token per row, in order (no beam search rows)."""
        _check_shape(logits, rows)
        if not rows:
            return []
        raw_logits = logits.float()
        raw_logprobs = torch.log_softmax(raw_logits, dim=-1)
        if all(row.params.is_greedy and not _needs_processing(row) for row in rows):
            token_ids = raw_logits.argmax(dim=-1)
        else:
            token_ids = self._choose_tokens(self.process_logits(logits, rows), rows)
        return _sampled_tokens(raw_logprobs, token_ids, rows)

    def beam_candidates(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow]
    ) -> list[BeamCandidates]:
        """Each beam's best 2 x width next tokens by processed log-probability: the logits
        processing is applied to log-probabilities, as transformers' beam search does."""
        log_probs = self.process_logits(torch.log_softmax(logits.float(), dim=-1), rows)
        width = max(row.params.num_sequences for row in rows)
        top_values, top_ids = log_probs.topk(min(2 * width, log_probs.shape[-1]), dim=-1)
        candidates = []
        for row, ids, values in zip(rows, top_ids.tolist(), top_values.tolist()):
            count = 2 * row.params.num_sequences
            candidates.append(BeamCandidates(ids[:count], values[:count]))
        return candidates

    def process_logits(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Returns a new float32 tensor: logits with logit_bias, min_tokens and the repetition,
        presence and frequency penalties applied; temperature and truncation are not.
        Token ids at or beyond the vocabulary in logit_bias or stop_token_ids are ignored."""
        processed = logits.to(torch.float32, copy=True)
        _apply_logit_bias(processed, rows)
        _apply_min_tokens(processed, rows, self.eos_token_ids)
        _apply_repetition_penalty(processed, rows)
        _apply_presence_frequency_penalties(processed, rows)
        return processed

    def _choose_tokens(self, processed: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Argmax for greedy rows, a random draw for the others; [len(rows)] int64."""
        device = processed.device
        token_ids = torch.empty(len(rows), dtype=torch.long, device=device)
        greedy = [i for i, row in enumerate(rows) if row.params.is_greedy]
        random = [i for i, row in enumerate(rows) if not row.params.is_greedy]
        if greedy:
            greedy_index = torch.tensor(greedy, device=device)
            token_ids[greedy_index] = processed[greedy_index].argmax(dim=-1)
        if random:
            random_index = torch.tensor(random, device=device)
            token_ids[random_index] = self._sample(
                processed[random_index], [rows[i] for i in random]
            )
        return token_ids

    def _sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Temperature, min_p, top_k, top_p, then one draw per row; modifies logits in place."""
        device = logits.device
        temperatures = _float32_tensor([row.params.temperature for row in rows], device)
        logits.div_(temperatures.unsqueeze(1))
        min_p = [row.params.min_p for row in rows]
        if any(value > 0.0 for value in min_p):
            _apply_min_p(logits, _float32_tensor(min_p, device))
        vocab_size = logits.shape[-1]
        top_k = [_effective_top_k(row.params.top_k, vocab_size) for row in rows]
        top_p = [row.params.top_p for row in rows]
        if any(p < 1.0 for p in top_p):
            _apply_top_k_top_p(
                logits, torch.tensor(top_k, device=device), _float32_tensor(top_p, device)
            )
        elif any(k < vocab_size for k in top_k):
            _apply_top_k(logits, top_k)
        probs = torch.softmax(logits, dim=-1)
        # Exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) i.i.d. picks token i with
        # probability p_i, and an excluded token (p_i == 0 exactly) can never win.
        return probs.div_(self._exponential_noise(rows, vocab_size, device)).argmax(dim=-1)

    def _exponential_noise(
        self, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device
    ) -> torch.Tensor:
        """[len(rows), vocab_size] Exp(1) draws, each seeded row's from its own (seed, step)
        stream, the others from the sampler's shared generator."""
        noise = torch.empty(len(rows), vocab_size, dtype=torch.float32, device=device)
        unseeded = [i for i, row in enumerate(rows) if row.seed is None]
        if unseeded:
            shared = torch.empty(len(unseeded), vocab_size, dtype=torch.float32, device=device)
            noise[torch.tensor(unseeded, device=device)] = shared.exponential_(
                generator=self._shared_generator(device)
            )
        seeded = [(i, row) for i, row in enumerate(rows) if row.seed is not None]
        if seeded:
            keys = [_stream_key(row.seed, len(row.output_token_ids)) for _, row in seeded]
            noise[torch.tensor([i for i, _ in seeded], device=device)] = _counter_exponential(
                torch.tensor(keys, dtype=torch.int64, device=device), vocab_size
            )
        # NOTE: q == 0 would turn p / q into inf (or nan for p == 0) and could elect an excluded
        # token; the clamp keeps every q positive while leaving the distribution unchanged.
        return noise.clamp_min_(torch.finfo(torch.float32).tiny)

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._shared_generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self.seed is None:
                generator.seed()
            else:
                generator.manual_seed(self.seed)
            self._shared_generators[device] = generator
        return generator


def _check_shape(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(
            f"logits must have shape [len(rows)={len(rows)}, vocab], got {tuple(logits.shape)}"
        )


def _needs_processing(row: SamplingRow) -> bool:
    """Whether process_logits would change this row's logits."""
    params = row.params
    return (
        bool(params.logit_bias)
        or params.needs_penalties
        or len(row.output_token_ids) < params.min_tokens
    )


def _stream_key(seed: int, step: int) -> int:
    """The 63-bit key of a seeded sequence's draw at one step, fixed by (seed, step) alone, so the
    sequence draws the same noise whatever its batch and after a recompute. Hashing the pair
    (rather than seed + step) keeps seeds s and s + 1 from replaying each other's streams
    shifted by one step."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _as_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# SplitMix64's increment and finalizer constants (Steele, Lea and Flood, 2014), as int64.
_SPLITMIX_GAMMA = _as_int64(0x9E3779B97F4A7C15)
_SPLITMIX_MIX_1 = _as_int64(0xBF58476D1CE4E5B9)
_SPLITMIX_MIX_2 = _as_int64(0x94D049BB133111EB)


def _counter_exponential(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[len(keys), vocab_size] Exp(1) draws: token t of row r gets the SplitMix64 output number
    t + 1 of the stream started at keys[r]. Counter-based, so all seeded rows are drawn in one
    batched computation instead of one torch.Generator per row and step (seeding a Mersenne
    Twister per row cost more than the draws)."""
    counters = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=keys.device)
    # int64 arithmetic wraps around, as SplitMix64's uint64 does; shifts must be logical.
    z = keys[:, None] + counters[None, :] * _SPLITMIX_GAMMA
    z = (z ^ _shift_right(z, 30)) * _SPLITMIX_MIX_1
    z = (z ^ _shift_right(z, 27)) * _SPLITMIX_MIX_2
    z = z ^ _shift_right(z, 31)
    # The top 53 bits as a float64 strictly inside (0, 1), so -log is finite and positive.
    uniform = (_shift_right(z, 11).double() + 0.5) * 2.0**-53
    return torch.log(uniform).neg_().float()


def _shift_right(value: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> copies the sign bit)."""
    return (value >> bits) & ((1 << (64 - bits)) - 1)


def _float32_tensor(values: Sequence[float], device: torch.device) -> torch.Tensor:
    # NOTE: explicit dtype, because model loaders may change torch's default dtype to bf16.
    return torch.tensor(values, dtype=torch.float32, device=device)


def _effective_top_k(top_k: int, vocab_size: int) -> int:
    """top_k as a count of kept tokens: 0 and -1 (off) or anything above the vocabulary keep
    every token."""
    return vocab_size if top_k <= 0 else min(top_k, vocab_size)


def _flat_occurrences(
    token_lists: Sequence[Sequence[int]], row_ids: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index tensors of every occurrence of a token in each row's list, so the
    penalties touch only the tokens a row has seen instead of its whole vocabulary."""
    lengths = torch.tensor([len(tokens) for tokens in token_lists])
    rows = torch.repeat_interleave(torch.tensor(list(row_ids), dtype=torch.long), lengths)
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    return rows.to(device, non_blocking=True), tokens.to(device, non_blocking=True)


def _apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Adds each row's logit_bias to its logits, in place."""
    vocab_size = logits.shape[-1]
    row_ids: list[int] = []
    token_ids: list[int] = []
    biases: list[float] = []
    for i, row in enumerate(rows):
        for token_id, bias in row.params.logit_bias.items():
            if token_id < vocab_size:
                row_ids.append(i)
                token_ids.append(token_id)
                biases.append(bias)
    if row_ids:
        index = (
            torch.tensor(row_ids, device=logits.device),
            torch.tensor(token_ids, device=logits.device),
        )
        logits.index_put_(index, _float32_tensor(biases, logits.device), accumulate=True)


def _apply_min_tokens(
    logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: Sequence[int]
) -> None:
    """Sets the eos and stop_token_ids logits of rows still below min_tokens to -inf, in place."""
    vocab_size = logits.shape[-1]
    row_ids: list[int] = []
    token_ids: list[int] = []
    for i, row in enumerate(rows):
        if len(row.output_token_ids) < row.params.min_tokens:
            banned = {*eos_token_ids, *row.params.stop_token_ids}
            kept = [token_id for token_id in banned if token_id < vocab_size]
            row_ids.extend([i] * len(kept))
            token_ids.extend(kept)
    if row_ids:
        index = (
            torch.tensor(row_ids, device=logits.device),
            torch.tensor(token_ids, device=logits.device),
        )
        logits[index] = float("-inf")


def _apply_repetition_penalty(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Hugging Face semantics, in place: the logit of every token present in the prompt or the
    output is divided by the penalty when positive and multiplied by it otherwise, once
    however often the token occurs."""
    selected = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if not selected:
        return
    device = logits.device
    seen = [rows[i].prompt_token_ids + rows[i].output_token_ids for i in selected]
    row_index, token_index = _flat_occurrences(seen, selected, device)
    penalties = torch.ones(len(rows), dtype=torch.float32, device=device)
    penalties[selected] = _float32_tensor([rows[i].params.repetition_penalty for i in selected],
                                          device)
    penalty = penalties[row_index]
    seen_logits = logits[row_index, token_index]
    # NOTE: a token seen twice is written twice with the same value: penalized once.
    logits[row_index, token_index] = torch.where(
        seen_logits > 0, seen_logits / penalty, seen_logits * penalty
    )


def _apply_presence_frequency_penalties(
    logits: torch.Tensor, rows: Sequence[SamplingRow]
) -> None:
    """OpenAI semantics over output tokens only, in place:
    logit -= frequency_penalty * count + presence_penalty * (count > 0)."""
    selected = [
        i
        for i, row in enumerate(rows)
        if (row.params.presence_penalty != 0.0 or row.params.frequency_penalty != 0.0)
        and row.output_token_ids
    ]
    if not selected:
        return
    device = logits.device
    row_index, token_index = _flat_occurrences(
        [rows[i].output_token_ids for i in selected], selected, device
    )
    counts = torch.zeros(len(rows), logits.shape[-1], dtype=torch.float32, device=device)
    counts.index_put_((row_index, token_index), torch.ones_like(row_index, dtype=torch.float32),
                      accumulate=True)
    frequency = torch.zeros(len(rows), dtype=torch.float32, device=device)
    presence = torch.zeros(len(rows), dtype=torch.float32, device=device)
    frequency[selected] = _float32_tensor([rows[i].params.frequency_penalty for i in selected],
                                          device)
    presence[selected] = _float32_tensor([rows[i].params.presence_penalty for i in selected],
                                         device)
    # NOTE: every occurrence of a token writes the same value, so the penalty applies once.
    logits[row_index, token_index] = (
        logits[row_index, token_index]
        - frequency[row_index] * counts[row_index, token_index]
        - presence[row_index]
    )


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Masks tokens whose probability is below min_p times the row's top probability, in place.
    The top token always survives, since min_p <= 1."""
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    logits.masked_fill_(probs < threshold, float("-inf"))


def _apply_top_k(logits: torch.Tensor, top_k: list[int]) -> None:
    """Keeps, in place, each row's top_k largest logits (ties at the k-th value kept, as in
    Hugging Face). top_k: counts in [1, vocab]. The k-th values come from one topk, with no sort
    of the whole vocabulary."""
    kth = torch.tensor([k - 1 for k in top_k], device=logits.device).unsqueeze(1)
    top_values = logits.topk(max(top_k), dim=-1).values
    logits.masked_fill_(logits < top_values.gather(-1, kth), float("-inf"))


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
    """Keeps, in place, each row's top_k largest logits (ties at the k-th value kept, as in
    Hugging Face), then the smallest set of those whose cumulative probability reaches top_p;
    the top token is always kept. top_k: [rows] counts in [1, vocab]; top_p: [rows] in (0, 1].
    top_k alone is `_apply_top_k`, which needs no sort."""
    vocab_size = logits.shape[-1]
    # Ascending order: the k-th largest value sits at vocab - k, and a token is dropped by
    # top_p when the probability mass at or below it is at most 1 - top_p.
    sorted_logits, sorted_ids = logits.sort(dim=-1)
    kth_largest = sorted_logits.gather(-1, (vocab_size - top_k).unsqueeze(1))
    sorted_logits.masked_fill_(sorted_logits < kth_largest, float("-inf"))
    mass_at_or_below = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    outside_top_p = mass_at_or_below <= (1.0 - top_p).unsqueeze(1)
    outside_top_p[:, -1] = False
    sorted_logits.masked_fill_(outside_top_p, float("-inf"))
    logits.scatter_(-1, sorted_ids, sorted_logits)


def _sampled_tokens(
    raw_logprobs: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow]
) -> list[SampledToken]:
    """Packs the chosen tokens with their raw logprobs, and ranks and top logprobs for the rows
    that asked for logprobs. Moves each result to the host in one transfer."""
    chosen = raw_logprobs.gather(-1, token_ids.unsqueeze(1)).squeeze(1)
    ranks: dict[int, int] = {}
    top_logprobs: dict[int, list[tuple[int, float]]] = {}
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if wanted:
        index = torch.tensor(wanted, device=raw_logprobs.device)
        wanted_logprobs = raw_logprobs[index]
        # Rank 1 + the number of strictly more likely tokens, so ties share the better rank.
        wanted_ranks = (wanted_logprobs > chosen[index].unsqueeze(1)).sum(dim=-1) + 1
        num_top = min(max(rows[i].params.logprobs for i in wanted), raw_logprobs.shape[-1])
        top_values, top_ids = wanted_logprobs.topk(num_top, dim=-1)
        top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
        for j, (i, rank) in enumerate(zip(wanted, wanted_ranks.tolist())):
            ranks[i] = rank
            count = rows[i].params.logprobs
            top_logprobs[i] = list(zip(top_ids_list[j][:count], top_values_list[j][:count]))
    return [
        SampledToken(token_id, logprob, ranks.get(i, 0), top_logprobs.get(i, []))
        for i, (token_id, logprob) in enumerate(zip(token_ids.tolist(), chosen.tolist()))
    ]
