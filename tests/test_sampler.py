"""Sampler: greedy, logprobs, seeded draws, truncation, sampling frequencies, logit processing."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from pagoda.backend.sampler import Sampler, SamplingRow
from pagoda.backend.seeded_noise import counter_exponential, stream_key
from pagoda.backend.sampling_params import SamplingParams

EOS = 0


def make_row(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    seed: int | None = None,
    **params: object,
) -> SamplingRow:
    return SamplingRow(0, SamplingParams(**params), prompt or [1], output or [], seed)


def draw(
    logits: torch.Tensor, num_draws: int, sampler: Sampler | None = None, **params: object
) -> torch.Tensor:
    """num_draws samples from one row of logits, as one batch of identical rows (all with the
    same seed when params has one); returns the token ids."""
    sampler = sampler or Sampler([EOS], seed=0)
    rows = [make_row(**params) for _ in range(num_draws)]
    batch = logits.unsqueeze(0).expand(num_draws, -1)
    return torch.tensor([sampled.token_id for sampled in sampler.sample(batch, rows)])


def seeded_token(
    sampler: Sampler, logits: torch.Tensor, seed: int, step: int, position: int, batch_size: int
) -> int:
    """The token of a (seed, step) row placed at `position` in a batch of unseeded and
    differently seeded random rows."""
    rows = [make_row(seed=1000 + i if i % 2 else None, output=[5] * i) for i in range(batch_size)]
    rows[position] = make_row(seed=seed, output=[5] * step)
    batch = torch.randn(batch_size, logits.shape[-1])
    batch[position] = logits
    return sampler.sample(batch, rows)[position].token_id


# --- greedy and logprobs ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax_with_raw_logprob(dtype: torch.dtype) -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)).to(dtype)
    sampled = Sampler([EOS]).sample(logits, [make_row(temperature=0.0) for _ in range(6)])
    expected = torch.log_softmax(logits.float(), dim=-1)
    for row, token in enumerate(sampled):
        assert token.token_id == int(logits[row].float().argmax())
        assert token.logprob == pytest.approx(float(expected[row, token.token_id]), abs=1e-6)
        assert (token.rank, token.top_logprobs) == (0, [])


def test_greedy_and_random_rows_in_one_batch() -> None:
    vocab_size = 40
    logits = torch.randn(6, vocab_size, generator=torch.Generator().manual_seed(2))
    greedy = {0, 3, 5}
    rows = [
        make_row(temperature=0.0) if i in greedy else make_row(temperature=1.0, top_k=2, seed=i)
        for i in range(6)
    ]
    sampler = Sampler([EOS])
    mixed = sampler.sample(logits, rows)
    for i, token in enumerate(mixed):
        top_two = set(logits[i].topk(2).indices.tolist())
        if i in greedy:
            assert token.token_id == int(logits[i].argmax())
        else:
            assert token.token_id in top_two
            alone = sampler.sample(logits[i : i + 1], [rows[i]])[0]
            assert token.token_id == alone.token_id


@pytest.mark.parametrize("num_logprobs", [0, 1, 5])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rank_and_top_logprobs(num_logprobs: int, temperature: float) -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    rows = [make_row(temperature=temperature, logprobs=num_logprobs) for _ in range(4)]
    raw = torch.log_softmax(logits, dim=-1)
    for i, token in enumerate(Sampler([EOS], seed=0).sample(logits, rows)):
        order = raw[i].argsort(descending=True).tolist()
        assert token.rank == order.index(token.token_id) + 1
        assert token.logprob == pytest.approx(float(raw[i, token.token_id]), abs=1e-6)
        assert [token_id for token_id, _ in token.top_logprobs] == order[:num_logprobs]
        for token_id, logprob in token.top_logprobs:
            assert logprob == pytest.approx(float(raw[i, token_id]), abs=1e-6)


def test_logprobs_are_raw_despite_processing() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    row = make_row(temperature=0.0, logit_bias={3: 50.0}, logprobs=2)
    token = Sampler([EOS]).sample(logits, [row])[0]
    raw = torch.log_softmax(logits[0], dim=-1)
    assert token.token_id == 3
    assert token.logprob == pytest.approx(float(raw[3]), abs=1e-6)
    assert token.rank == 4
    assert [token_id for token_id, _ in token.top_logprobs] == [0, 1]


def test_input_logits_left_unchanged() -> None:
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(4))
    before = logits.clone()
    rows = [
        make_row(temperature=0.0, repetition_penalty=1.5, prompt=[1, 2, 3]),
        make_row(temperature=0.8, top_p=0.5, min_p=0.1, logit_bias={4: 3.0}),
        make_row(temperature=1.0, frequency_penalty=1.0, output=[7, 7], min_tokens=5),
    ]
    Sampler([EOS], seed=0).sample(logits, rows)
    assert torch.equal(logits, before)


def test_wrong_batch_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="len\\(rows\\)=2"):
        Sampler([EOS]).sample(torch.zeros(3, 10), [make_row(), make_row()])


# --- seeds -----------------------------------------------------------------------------------


def test_seeded_row_independent_of_batch_and_sampler() -> None:
    # Near-uniform logits over a large vocabulary: any change in the noise changes the token.
    logits = 0.01 * torch.randn(1000, generator=torch.Generator().manual_seed(5))
    for seed in range(10):
        alone = seeded_token(Sampler([EOS], seed=0), logits, seed, step=3, position=0, batch_size=1)
        for position, batch_size in [(0, 4), (3, 4), (2, 7)]:
            sampler = Sampler([EOS], seed=position)
            assert seeded_token(sampler, logits, seed, 3, position, batch_size) == alone


def test_seeded_draws_differ_across_steps_and_seeds() -> None:
    logits = torch.zeros(1000)
    sampler = Sampler([EOS])

    def token(seed: int, step: int) -> int:
        return seeded_token(sampler, logits, seed, step, position=0, batch_size=1)

    by_step = [token(7, step) for step in range(20)]
    by_seed = [token(seed, 3) for seed in range(20)]
    assert len(set(by_step)) > 15 and len(set(by_seed)) > 15
    # Seeds 1 and 2 must not replay each other's stream shifted by one step (as seed + step would).
    assert [token(1, step + 1) for step in range(10)] != [token(2, step) for step in range(10)]


def test_unseeded_rows_follow_the_sampler_seed() -> None:
    logits = torch.zeros(1000)
    first, second, other = (draw(logits, 50, Sampler([EOS], seed=s)) for s in (11, 11, 12))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


# --- truncation ------------------------------------------------------------------------------


def probs_to_logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        ({"top_k": 3}, {0, 1, 2}),
        ({"top_k": 1}, {0}),
        ({"top_p": 0.55}, {0, 1}),  # 0.35 + 0.25 = 0.6 reaches 0.55
        ({"top_p": 0.75}, {0, 1, 2}),
        ({"top_p": 0.85}, {0, 1, 2, 3}),
        ({"top_p": 0.01}, {0}),
        ({"min_p": 0.3}, {0, 1, 2}),  # threshold 0.3 * 0.35 = 0.105 drops 0.1 and below
        # top_p applies to the renormalized survivors [0.4375, 0.3125, 0.25]: 0.75 >= 0.7
        # drops token 2, which top_p=0.7 over the whole distribution would keep.
        ({"top_k": 3, "top_p": 0.7}, {0, 1}),
        ({"min_p": 0.5, "top_p": 0.7}, {0, 1}),
        ({"top_k": -1, "top_p": 1.0, "min_p": 0.0}, {0, 1, 2, 3, 4, 5}),
    ],
)
def test_truncation_emits_exactly_the_allowed_tokens(
    params: dict[str, object], allowed: set[int]
) -> None:
    logits = probs_to_logits([0.35, 0.25, 0.2, 0.1, 0.06, 0.04])
    tokens = draw(logits, 3000, **params)
    assert set(tokens.tolist()) == allowed


def test_truncation_after_temperature() -> None:
    # At temperature 0.5 the probabilities become ~[0.52, 0.26, 0.17, 0.04, ...]: min_p=0.2
    # keeps tokens 0..2 only, though at temperature 1 it would keep 0..3.
    logits = probs_to_logits([0.35, 0.25, 0.2, 0.1, 0.06, 0.04])
    tokens = draw(logits, 3000, temperature=0.5, min_p=0.2)
    assert set(tokens.tolist()) == {0, 1, 2}


def test_tiny_top_p_keeps_the_top_token() -> None:
    # 1 - 1e-8 rounds to 1 in float32, so the cumulative-mass rule alone would drop every token.
    logits = probs_to_logits([0.1, 0.2, 0.3, 0.4])
    assert set(draw(logits, 200, top_p=1e-8).tolist()) == {3}


def test_zero_noise_cannot_elect_an_excluded_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # Exp(1) draws of exactly 0 are possible in floating point; p / 0 must not beat the
    # allowed tokens (nor 0 / 0 = nan, which argmax would pick).
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, **kwargs: self.zero_())
    logits = torch.tensor([0.0, 1.0, 3.0, 2.0])
    tokens = torch.cat([draw(logits, 10, top_k=1), draw(logits, 10, top_k=2, seed=5)])
    assert set(tokens.tolist()) <= {2, 3}


def test_seeded_rows_never_emit_excluded_tokens() -> None:
    logits = probs_to_logits([0.3, 0.3, 0.2, 0.1, 0.1])
    sampler = Sampler([EOS])
    rows = [make_row(seed=seed, top_k=2) for seed in range(500)]
    tokens = {token.token_id for token in sampler.sample(logits.expand(500, -1), rows)}
    assert tokens == {0, 1}


# --- sampling frequencies --------------------------------------------------------------------


def chi_square(observed: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


# Critical value of the chi-square distribution with 5 degrees of freedom (6 categories - 1)
# at significance level 0.001: with a fixed seed, a correct sampler fails with probability 0.1%.
CHI_SQUARE_CRITICAL_DF5_P001 = 20.515


@pytest.mark.parametrize("seeded", [False, True])
def test_temperature_sampling_matches_softmax(seeded: bool) -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    temperature = 0.7
    num_draws = 20_000 if not seeded else 5_000
    rows = [
        make_row(temperature=temperature, seed=i if seeded else None) for i in range(num_draws)
    ]
    sampled = Sampler([EOS], seed=0).sample(logits.expand(num_draws, -1), rows)
    observed = torch.bincount(torch.tensor([t.token_id for t in sampled]), minlength=6).double()
    expected = num_draws * torch.softmax(logits.double() / temperature, dim=-1)
    assert chi_square(observed, expected) < CHI_SQUARE_CRITICAL_DF5_P001
    # The test has power: the same draws are far from the untempered distribution.
    untempered = num_draws * torch.softmax(logits.double(), dim=-1)
    assert chi_square(observed, untempered) > 10 * CHI_SQUARE_CRITICAL_DF5_P001


def test_seeded_noise_follows_the_exponential_distribution() -> None:
    """Kolmogorov-Smirnov test of the counter-based Exp(1) draws of seeded rows."""
    keys = torch.tensor([stream_key(seed, step=3) for seed in range(10)])
    draws = counter_exponential(keys, 4096).double().flatten().sort().values
    n = draws.numel()
    cdf = 1 - torch.exp(-draws)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - cdf
    below = cdf - torch.arange(0, n, dtype=torch.float64) / n
    # 1.95 / sqrt(n): the statistic's critical value at significance level 0.001.
    assert max(above.max(), below.max()) < 1.95 / n**0.5
    assert (draws > 0).all()


def test_chi_square_critical_value_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    assert stats.chi2.ppf(1 - 0.001, df=5) == pytest.approx(CHI_SQUARE_CRITICAL_DF5_P001, abs=1e-3)


# --- logit processing ------------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_tokens_until_reached() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])  # EOS (0) then stop token 1 lead
    sampler = Sampler([EOS, 4])

    def greedy(num_output: int) -> int:
        row = make_row(temperature=0.0, min_tokens=3, stop_token_ids=[1], output=[2] * num_output)
        return sampler.sample(logits, [row])[0].token_id

    assert [greedy(n) for n in range(4)] == [2, 2, 2, 0]
    rows = [make_row(min_tokens=3, stop_token_ids=[1], output=[2, 2]) for _ in range(2000)]
    sampled = {token.token_id for token in sampler.sample(logits.expand(2000, -1), rows)}
    assert sampled == {2, 3}  # 0 and 4 are eos, 1 is a stop token


def test_logit_bias_shifts_choice() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    sampler = Sampler([EOS])
    assert sampler.sample(logits, [make_row(temperature=0.0, logit_bias={3: 3.5})])[0].token_id == 3
    assert sampler.sample(logits, [make_row(temperature=0.0, logit_bias={0: -1.5})])[0].token_id == 1
    processed = sampler.process_logits(logits, [make_row(logit_bias={1: -0.5, 2: 100.0})])
    assert torch.equal(processed, torch.tensor([[3.0, 1.5, 101.0, 0.0]]))


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    logits = torch.tensor([[2.0, -1.5, 0.5, -0.25, 3.0, 0.0, -2.0, 1.0]])
    prompt, output = [1, 2, 2], [3, 5, 1]  # token 1 in both, token 2 twice: penalized once
    row = make_row(prompt=prompt, output=output, repetition_penalty=penalty)
    processed = Sampler([EOS]).process_logits(logits, [row])
    reference = RepetitionPenaltyLogitsProcessor(penalty)(
        torch.tensor([prompt + output]), logits.clone()
    )
    torch.testing.assert_close(processed, reference, rtol=0, atol=0)
    assert processed[0, 4] == 3.0 and processed[0, 6] == -2.0  # unseen tokens untouched


def test_presence_and_frequency_penalties_over_output_only() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    row = make_row(
        prompt=[4, 4], output=[2, 2, 2, 3], presence_penalty=0.5, frequency_penalty=0.25
    )
    processed = Sampler([EOS]).process_logits(logits, [row])
    expected = torch.tensor([[1.0, 1.0, 1.0 - 0.75 - 0.5, 1.0 - 0.25 - 0.5, 1.0, 1.0]])
    torch.testing.assert_close(processed, expected)


def test_processing_order_and_row_independence() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.5], [2.0, -1.0, 0.5, 1.5]])
    rows = [
        make_row(
            prompt=[2],
            output=[1, 1],
            logit_bias={1: 2.0},  # -1 + 2 = 1 > 0: the penalty then divides it
            repetition_penalty=2.0,
            frequency_penalty=0.5,
            min_tokens=5,
        ),
        make_row(),  # no processing: its row must come back unchanged
    ]
    processed = Sampler([EOS]).process_logits(logits, rows)
    expected_first = [-math.inf, (1.0 / 2.0) - 0.5 * 2, 0.5 / 2.0, 1.5]
    torch.testing.assert_close(processed[0], torch.tensor(expected_first))
    torch.testing.assert_close(processed[1], logits[1])
