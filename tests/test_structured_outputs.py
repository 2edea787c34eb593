"""Structured outputs in the engine: bitmasks, matchers, and constrained generation (greedy,
seeded, n > 1, streamed, preempted) on the demo model. Every test ends with no leaks."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from pagoda.backend import LLM, SamplingParams
from pagoda.backend.errors import InvalidParameter
from pagoda.backend.sampling_params import RequestOutputKind
from pagoda.backend.structured import (
    StructuredOutputs,
    StructuredOutputsParams,
    apply_token_bitmask,
    fill_bitmasks,
)

BACKENDS = ["xgrammar", "guidance"]
# Bounded, so that a random-weight model must finish it within max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "alerts": {"type": "boolean"},
    },
    "required": ["city", "days", "unit", "alerts"],
    "additionalProperties": False,
}
PROMPT = "Give me the forecast as JSON:"


@pytest.fixture(scope="module")
def shared_llm(demo_model_dir) -> LLM:
    return LLM(str(demo_model_dir), num_kv_blocks=256, max_num_batched_tokens=256)


@pytest.fixture
def llm(shared_llm: LLM) -> Iterator[LLM]:
    """The module's engine, checked for leaks after each test."""
    yield shared_llm
    shared_llm.engine.check_no_leaks()


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir):
    return AutoTokenizer.from_pretrained(demo_model_dir)


def allowed_tokens(bitmask_row: torch.Tensor, vocab_size: int) -> set[int]:
    return {t for t in range(vocab_size) if (int(bitmask_row[t // 32]) >> (t % 32)) & 1}


def test_bitmask_masks_exactly_the_disallowed_tokens():
    vocab_size = 100  # not a multiple of 32: the last word is partly padding
    generator = torch.Generator().manual_seed(0)
    allowed = [set(torch.randperm(vocab_size, generator=generator)[:k].tolist())
               for k in (1, 37, 99)]
    rows = [0, 2, 4]  # rows 1 and 3 are unconstrained: their bitmask rows are garbage
    bitmask = torch.randint(-2**31, 2**31 - 1, (5, 4), dtype=torch.int32, generator=generator)
    for row, tokens in zip(rows, allowed):
        bitmask[row] = 0
        for token in tokens:
            word = int(bitmask[row, token // 32]) | (1 << (token % 32))
            bitmask[row, token // 32] = word - (1 << 32) if word >= 1 << 31 else word
    logits = torch.randn(5, vocab_size, generator=generator)
    masked = logits.clone()
    apply_token_bitmask(masked, bitmask, rows)
    for row in (1, 3):
        assert torch.equal(masked[row], logits[row])
    for row, tokens in zip(rows, allowed):
        kept = {t for t in range(vocab_size) if masked[row, t] != float("-inf")}
        assert kept == tokens
        assert torch.equal(masked[row, sorted(kept)], logits[row, sorted(kept)])
    everything = logits.clone()
    apply_token_bitmask(everything, bitmask)  # no rows: all of them
    assert torch.equal(everything[rows], masked[rows])


@pytest.mark.parametrize("backend", BACKENDS)
def test_matcher_advances_and_terminates(backend, tokenizer):
    # A model's vocabulary may be larger than its tokenizer's: the ids past it are never allowed.
    vocab_size = len(tokenizer) + 64
    structured = StructuredOutputs(backend, tokenizer, vocab_size, [tokenizer.eos_token_id])
    compiled = structured.compile(StructuredOutputsParams(choice=["yes", "no"]))
    assert structured.compile(StructuredOutputsParams(choice=["yes", "no"])) is compiled
    assert structured.num_compiled == 1
    matcher = compiled.matcher()
    assert fill_bitmasks([matcher]).shape == (1, vocab_size // 32)
    allowed = allowed_tokens(fill_bitmasks([matcher])[0], vocab_size)
    assert max(allowed) < len(tokenizer)
    assert tokenizer.convert_tokens_to_ids("y") in allowed
    assert tokenizer.eos_token_id not in allowed
    assert not matcher.accept_token(tokenizer.convert_tokens_to_ids("x"))  # refused, no change
    for token in tokenizer.convert_tokens_to_ids(["y", "e", "s"]):
        assert matcher.accept_token(token)
    # Complete: only the stop token is left, and it terminates the grammar.
    assert allowed_tokens(fill_bitmasks([matcher])[0], vocab_size) == {tokenizer.eos_token_id}
    assert not matcher.is_terminated()
    assert matcher.accept_token(tokenizer.eos_token_id)
    assert matcher.is_terminated()


def test_invalid_specs_are_refused_naming_the_field(llm):
    for spec in (dict(regex="("), dict(grammar="root ::= nope"), dict(json={"type": "nope"})):
        with pytest.raises(InvalidParameter) as caught:
            llm.engine.add_request("bad", PROMPT, SamplingParams(
                structured_outputs=StructuredOutputsParams(**spec)))
        assert caught.value.field == "structured_outputs"
    with pytest.raises(InvalidParameter, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(InvalidParameter, match="use_beam_search"):
        SamplingParams(use_beam_search=True, temperature=0, n=2,
                       structured_outputs=StructuredOutputsParams(regex="a"))


def assert_valid(text: str) -> None:
    jsonschema.validate(json.loads(text), SCHEMA)


def test_greedy_n2_and_seeded_json_is_valid(llm):
    spec = StructuredOutputsParams(json=SCHEMA)
    greedy = SamplingParams(n=2, temperature=0, max_tokens=120, structured_outputs=spec)
    output = llm.generate(PROMPT, greedy, use_tqdm=False)[0]
    assert len(output.outputs) == 2
    for completion in output.outputs:
        assert completion.finish_reason == "stop"
        assert_valid(completion.text)
    seeded = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=120, structured_outputs=spec)
    output = llm.generate(PROMPT, seeded, use_tqdm=False)[0]
    assert len({c.text for c in output.outputs}) > 1, "samples walk the grammar separately"
    for completion in output.outputs:
        assert completion.finish_reason == "stop"
        assert_valid(completion.text)


@pytest.mark.parametrize(("spec", "check"), [
    (dict(choice=["north", "south", "east"]), lambda text: text in ("north", "south", "east")),
    (dict(regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}"), lambda text: len(text) == 10 and text[4] == "-"),
    (dict(grammar='root ::= "a" ("b" | "c")+ "d"'),
     lambda text: text[0] == "a" and text[-1] == "d"),
])
def test_regex_choice_and_grammar(llm, spec, check):
    params = SamplingParams(temperature=0, max_tokens=200,
                            structured_outputs=StructuredOutputsParams(**spec))
    completion = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert completion.finish_reason == "stop", completion
    assert check(completion.text), completion.text


def test_stop_strings_still_stop(llm):
    params = SamplingParams(temperature=0, max_tokens=20, stop=["or"],
                            structured_outputs=StructuredOutputsParams(choice=["north", "forth"]))
    completion = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert completion.text in ("n", "f")
    assert (completion.finish_reason, completion.stop_reason) == ("stop", "or")


def test_json_object(llm, tokenizer):
    # Any object's keys are free text, which a random model rambles on in: the bias on "}"
    # (applied after the grammar, so only where it is allowed) closes the object at once.
    close = tokenizer.convert_tokens_to_ids("}")
    params = SamplingParams(temperature=0, max_tokens=20, logit_bias={close: 100},
                            structured_outputs=StructuredOutputsParams(json_object=True))
    completion = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert (completion.text, completion.finish_reason) == ("{}", "stop")


def test_streamed_deltas_add_up_to_valid_json(llm):
    engine = llm.engine
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=120,
                            output_kind=RequestOutputKind.DELTA,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    engine.add_request("stream", PROMPT, params)
    texts = ["", ""]
    while engine.has_unfinished_requests():
        for output in engine.step():
            for completion in output.outputs:
                texts[completion.index] += completion.text
    for text in texts:
        assert_valid(text)


def test_preempted_sequences_keep_their_grammar_state(demo_model_dir):
    spec = StructuredOutputsParams(json=SCHEMA)
    params = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=100, structured_outputs=spec)
    alone = LLM(str(demo_model_dir), num_kv_blocks=64)
    reference = [c.text for c in alone.generate(PROMPT, params, use_tqdm=False)[0].outputs]
    alone.engine.check_no_leaks()
    # Arriving last, it is the one preempted when the others outgrow the pool.
    crowded = LLM(str(demo_model_dir), num_kv_blocks=16, max_num_batched_tokens=64)
    others = SamplingParams(temperature=1.0, max_tokens=150, ignore_eos=True)
    prompts = [[1, 5, 6, 7] * 5, [1, 9] * 10, [1, 11, 12] * 7, PROMPT]
    outputs = crowded.generate(prompts, [others, others, others, params], use_tqdm=False)
    assert crowded.engine.scheduler.num_preemptions > 0
    assert [c.text for c in outputs[3].outputs] == reference
    for text in reference:
        assert_valid(text)
    crowded.engine.check_no_leaks()


def test_llguidance_backend_end_to_end(demo_model_dir):
    llm = LLM(str(demo_model_dir), num_kv_blocks=64, structured_outputs_backend="guidance")
    params = SamplingParams(n=2, temperature=0, max_tokens=120,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    for completion in llm.generate(PROMPT, params, use_tqdm=False)[0].outputs:
        assert completion.finish_reason == "stop"
        assert_valid(completion.text)
    llm.engine.check_no_leaks()
