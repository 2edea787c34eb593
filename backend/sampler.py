"""Batch sampler: turns one step's last-token logits into each sequence's next token, or for beam
search into each beam's best candidates (the sampler's beam mode, so nothing else in a step
branches on beam search).

Contract: every operation is row-wise, so a row's token depends only on its own logits, its
SamplingRow and (for unseeded rows) the sampler's shared generator, never on its neighbours in
the batch. Processing runs in float32 on the logits' device, in vLLM's order: grammar bitmask
(structured outputs) -> logit_bias -> min_tokens -> repetition penalty -> presence/frequency
penalties -> greedy argmax, or temperature -> min_p -> top_k -> top_p -> sampling. Reported
logprobs, ranks and top logprobs are those of the raw logits, before any of that processing (as
OpenAI reports them; vLLM v1 masks the grammar before it computes logprobs).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from pagoda.backend.device_transfer import to_device
from pagoda.backend.logits_processing import (
    apply_logit_bias,
    apply_min_tokens,
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
    float32_tensor,
)
from pagoda.backend.model_output import BeamCandidates, ModelOutput, SampledToken
from pagoda.backend.seeded_noise import counter_exponential, stream_key
from pagoda.backend.sampling_params import SamplingParams
from pagoda.backend.structured import apply_token_bitmask
from pagoda.backend.token_logprobs import score_tokens


@dataclass(slots=True)
class SamplingRow:
    """One sequence's row in the batch's logits."""

    seq_id: int
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated so far by this sequence
    seed: int | None  # effective seed of this sequence (None: the sampler's shared generator)
    # Structured outputs: the tokens its grammar allows next ([words] int32 on the host, see
    # backend/structured/grammar.py); None when the sequence is unconstrained.
    token_bitmask: torch.Tensor | None = None


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
            candidates = self.beam_candidates(logits[to_device(beam, torch.long, logits.device)],
                                              beam_rows)
            output.beam_candidates = {row.seq_id: c for row, c in zip(beam_rows, candidates)}
        if len(beam) < len(rows):
            sampled = [i for i, row in enumerate(rows) if not row.params.use_beam_search]
            if beam:
                logits = logits[to_device(sampled, torch.long, logits.device)]
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
        return score_tokens(raw_logprobs, token_ids, [row.params.logprobs for row in rows])

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
        """Returns a new float32 tensor: logits with the grammar bitmasks, logit_bias, min_tokens
        and the repetition, presence and frequency penalties applied; temperature and truncation
        are not. Token ids at or beyond the vocabulary in logit_bias or stop_token_ids are
        ignored."""
        processed = logits.to(torch.float32, copy=True)
        _apply_grammar_bitmasks(processed, rows)
        apply_logit_bias(processed, rows)
        apply_min_tokens(processed, rows, self.eos_token_ids)
        apply_repetition_penalty(processed, rows)
        apply_presence_frequency_penalties(processed, rows)
        return processed

    def _choose_tokens(self, processed: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Argmax for greedy rows, a random draw for the others; [len(rows)] int64."""
        device = processed.device
        greedy = [i for i, row in enumerate(rows) if row.params.is_greedy]
        random = [i for i, row in enumerate(rows) if not row.params.is_greedy]
        if not random:  # all greedy (a constrained or penalised greedy batch): no gathers
            return processed.argmax(dim=-1)
        token_ids = torch.empty(len(rows), dtype=torch.long, device=device)
        if greedy:
            greedy_index = to_device(greedy, torch.long, device)
            token_ids[greedy_index] = processed[greedy_index].argmax(dim=-1)
        if random:
            random_index = to_device(random, torch.long, device)
            token_ids[random_index] = self._sample(
                processed[random_index], [rows[i] for i in random]
            )
        return token_ids

    def _sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Temperature, min_p, top_k, top_p, then one draw per row; modifies logits in place."""
        device = logits.device
        temperatures = float32_tensor([row.params.temperature for row in rows], device)
        logits.div_(temperatures.unsqueeze(1))
        min_p = [row.params.min_p for row in rows]
        if any(value > 0.0 for value in min_p):
            _apply_min_p(logits, float32_tensor(min_p, device))
        vocab_size = logits.shape[-1]
        top_k = [_effective_top_k(row.params.top_k, vocab_size) for row in rows]
        top_p = [row.params.top_p for row in rows]
        if any(p < 1.0 for p in top_p):
            _apply_top_k_top_p(
                logits, to_device(top_k, torch.long, device), float32_tensor(top_p, device)
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
            noise[to_device(unseeded, torch.long, device)] = shared.exponential_(
                generator=self._shared_generator(device)
            )
        seeded = [(i, row) for i, row in enumerate(rows) if row.seed is not None]
        if seeded:
            keys = [stream_key(row.seed, len(row.output_token_ids)) for _, row in seeded]
            noise[to_device([i for i, _ in seeded], torch.long, device)] = counter_exponential(
                to_device(keys, torch.int64, device), vocab_size
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
        row.token_bitmask is not None
        or bool(params.logit_bias)
        or params.needs_penalties
        or len(row.output_token_ids) < params.min_tokens
    )


def _apply_grammar_bitmasks(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Masks, in place, the tokens each constrained row's grammar forbids: one batched pass
    over those rows, their bitmasks moved to the device in one transfer."""
    constrained = [i for i, row in enumerate(rows) if row.token_bitmask is not None]
    if not constrained:
        return
    masks = torch.stack([rows[i].token_bitmask for i in constrained])
    if len(constrained) == len(rows):
        apply_token_bitmask(logits, masks.to(logits.device, non_blocking=True))
        return
    # Rows in batch order; the unconstrained ones' are never read.
    bitmask = torch.empty(len(rows), masks.shape[1], dtype=torch.int32)
    bitmask[constrained] = masks
    apply_token_bitmask(logits, bitmask.to(logits.device, non_blocking=True), constrained)


def _effective_top_k(top_k: int, vocab_size: int) -> int:
    """top_k as a count of kept tokens: 0 and -1 (off) or anything above the vocabulary keep
    every token."""
    return vocab_size if top_k <= 0 else min(top_k, vocab_size)


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
    kth = to_device([k - 1 for k in top_k], torch.long, logits.device).unsqueeze(1)
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
