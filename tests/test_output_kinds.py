"""RequestOutputKind: cumulative outputs, deltas computed once in the engine, and final-only
outputs describe the same generation; RequestOutput.add merges deltas a slow reader missed."""

from __future__ import annotations

import dataclasses
import functools

import pytest

from pagoda.backend import LLM, SamplingParams
from pagoda.backend.sampling_params import RequestOutputKind


@pytest.fixture(scope="module")
def llm(demo_model_dir) -> LLM:
    # No prefix caching: a cached prefix changes float rounding, and the runs compare exactly.
    return LLM(str(demo_model_dir), num_kv_blocks=128, max_num_batched_tokens=64,
               enable_prefix_caching=False)


def run(llm: LLM, params: SamplingParams) -> list:
    """Every output of one request (a long prompt, so its prefill takes several steps)."""
    engine = llm.engine
    engine.add_request("r", list(range(5, 105)), params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    engine.check_no_leaks()
    return outputs


PARAMS = [
    SamplingParams(max_tokens=24, temperature=0.0, logprobs=2, ignore_eos=True),
    SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=4, logprobs=0, stop=["e"]),
]


@pytest.mark.parametrize("params", PARAMS)
def test_deltas_add_up_to_the_cumulative_output(llm, params):
    cumulative = run(llm, dataclasses.replace(params, output_kind=RequestOutputKind.CUMULATIVE))
    deltas = run(llm, dataclasses.replace(params, output_kind=RequestOutputKind.DELTA))
    final_only = run(llm, dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY))
    assert len(deltas) == len(cumulative) > 1
    assert all(o.delta for o in deltas) and not any(o.delta for o in cumulative)
    assert [o.finished for o in final_only] == [True]
    merged = functools.reduce(lambda older, newer: older.add(newer), deltas)
    for whole in (cumulative[-1], final_only[0]):
        assert merged.finished and merged.outputs == whole.outputs
    # Each delta holds only its new tokens: no token is sent twice.
    for index in range(params.n):
        sent = [c.token_ids for o in deltas for c in o.outputs if c.index == index]
        assert sum(len(tokens) for tokens in sent) == len(cumulative[-1].outputs[index].token_ids)


def test_a_delta_holds_back_what_could_become_a_stop_string(llm):
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=1, stop=["zzzz"],
                            output_kind=RequestOutputKind.DELTA)
    outputs = run(llm, params)
    text = "".join(c.text for o in outputs for c in o.outputs)
    assert text == run(llm, dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY))[
        0].outputs[0].text


def test_beam_search_and_best_of_report_only_their_final_output(llm):
    for params in (
        SamplingParams(n=2, best_of=3, use_beam_search=True, temperature=0.0, max_tokens=6,
                       output_kind=RequestOutputKind.DELTA),
        SamplingParams(n=1, best_of=3, temperature=1.0, seed=3, max_tokens=6,
                       output_kind=RequestOutputKind.DELTA),
    ):
        (final,) = run(llm, params)
        assert final.finished and [c.index for c in final.outputs] == list(range(params.n))
        assert all(len(c.token_ids) for c in final.outputs)
