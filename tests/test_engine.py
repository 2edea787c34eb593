"""The engine's behaviour around the model: validation, failures, aborts, stops, sampling
reproducibility, n/best_of, streaming text and KV accounting. Every test ends with no leaks."""

from __future__ import annotations

import pytest

from pagoda.backend import LLM, LLMEngine, SamplingParams
from pagoda.backend.config import EngineConfig
from pagoda.backend.errors import InvalidParameter, KVCacheCapacityExceeded, PromptTooLong


@pytest.fixture(scope="module")
def llm(demo_model_dir) -> LLM:
    return LLM(str(demo_model_dir), num_kv_blocks=256, max_num_batched_tokens=256)


@pytest.fixture(autouse=True)
def no_leaks(request):
    yield
    if "llm" in request.fixturenames:
        request.getfixturevalue("llm").engine.check_no_leaks()


def run_to_completion(engine: LLMEngine) -> dict[str, list]:
    """Step until idle; every output of every request, in order."""
    history: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            history.setdefault(output.request_id, []).append(output)
    return history


def test_bad_requests_raise_naming_the_field(llm):
    engine = llm.engine
    for request_id, prompt, params, field in (
        ("a", [], SamplingParams(), "prompt"),
        ("b", [1, 10**9], SamplingParams(), "prompt"),
        ("c", [1, 5], SamplingParams(stop_token_ids=[10**9]), "stop_token_ids"),
        ("d", [1, 5], SamplingParams(logit_bias={10**9: 1.0}), "logit_bias"),
        ("e", [1, 5], SamplingParams(n=300), "n"),  # more samples than a step runs
        ("e", [1, 5], SamplingParams(n=2, best_of=300), "best_of"),
    ):
        with pytest.raises(InvalidParameter) as caught:
            engine.add_request(request_id, prompt, params)
        assert caught.value.field == field and isinstance(caught.value, ValueError)
    with pytest.raises(PromptTooLong, match="max_model_len") as too_long:
        engine.add_request("f", [1] * engine.max_model_len, SamplingParams())
    assert (too_long.value.field, too_long.value.prompt_len) == ("prompt", engine.max_model_len)
    assert too_long.value.max_model_len == engine.max_model_len
    engine.add_request("g", [1, 5], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidParameter, match="already in use"):
        engine.add_request("g", [1, 5], SamplingParams())
    run_to_completion(engine)


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("max_tokens", -1), ("n", 0),
     ("min_p", 1.5), ("presence_penalty", 3.0), ("repetition_penalty", 0.0), ("logprobs", -1),
     ("temperature", float("nan")), ("best_of", 0)],
)
def test_sampling_params_name_the_bad_field(field, value):
    with pytest.raises(InvalidParameter, match=field) as caught:
        SamplingParams(**{field: value})
    assert caught.value.field == field


def test_a_request_larger_than_the_whole_cache_is_refused_before_anything_is_queued(
    demo_model_dir,
):
    # 64 blocks of 16 tokens. 4 samples of a 200-token prompt share its 12 full blocks; with
    # max_tokens 400 each needs 26 blocks of its own: 116 in all.
    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=64))
    params = SamplingParams(n=4, max_tokens=400)
    with pytest.raises(KVCacheCapacityExceeded) as caught:
        engine.add_request("big", [1] + [7] * 199, params)
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.num_blocks_needed, error.num_blocks_total, error.block_size) == (116, 64, 16)
    # At most 13 blocks of each sample's own: 25 blocks of 16 tokens, max_tokens 200.
    assert error.max_request_tokens == 200 + 200 * 4
    assert not engine.has_unfinished_requests() and not engine.scheduler.has_unfinished()
    assert engine.block_manager.pool.num_used_blocks == 0
    # The same prompt fits with max_tokens at that limit.
    engine.add_request("fits", [1] + [7] * 199, SamplingParams(n=4, max_tokens=200))
    engine.abort("fits")
    engine.check_no_leaks()


def test_llm_generate_raises_for_a_request_larger_than_the_whole_cache(llm, monkeypatch):
    """LLM.generate refuses the batch at admission: no engine step runs, the prompts added before
    the refused one are withdrawn, and no block is held."""
    steps = []
    real_step = llm.engine.step
    monkeypatch.setattr(llm.engine, "step", lambda: steps.append(1) or real_step())
    fits = SamplingParams(max_tokens=8)
    # 256 blocks of 16 tokens: 8 samples of up to 1,000 tokens each need 504.
    too_big = SamplingParams(n=8, max_tokens=1000)
    with pytest.raises(KVCacheCapacityExceeded) as caught:
        llm.generate([[1, 5, 6], [1, 7, 8]], [fits, too_big], use_tqdm=False)
    assert (caught.value.num_blocks_needed, caught.value.num_blocks_total) == (504, 256)
    assert steps == []
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.pool.num_used_blocks == 0


def test_request_outgrowing_the_cache_fails_alone(demo_model_dir):
    # 4 blocks of 16 tokens: two samples of a 20-token prompt fit (3 blocks), but without
    # max_tokens they grow until they cannot, even alone.
    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=4))
    engine.add_request("big", [1] + [7] * 19, SamplingParams(n=2, max_tokens=None, seed=1,
                                                            ignore_eos=True))
    engine.add_request("small", [1, 7, 8], SamplingParams(max_tokens=5, ignore_eos=True))
    history = run_to_completion(engine)
    big = history["big"][-1]
    assert big.finished and isinstance(big.error, KVCacheCapacityExceeded)
    assert not big.error.internal and "KV blocks" in str(big.error)
    assert all(c.finish_reason == "error" for c in big.outputs)
    small = history["small"][-1]
    assert small.error is None and len(small.outputs[0].token_ids) == 5
    engine.check_no_leaks()


def test_abort_mid_decode_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("x", [1, 20, 30, 40], SamplingParams(max_tokens=200, ignore_eos=True))
    engine.add_request("y", [1, 21, 31], SamplingParams(max_tokens=3, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert engine.kv_stats().num_used_blocks > 0
    aborted = engine.abort("x")
    assert aborted is not None and aborted.finished
    assert aborted.outputs[0].finish_reason == "abort"
    assert engine.abort("x") is None
    run_to_completion(engine)


def test_stop_string_cuts_text_and_reports_reason(llm):
    prompt = [1, 300, 301, 302, 303]
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    expected = text[: text.index(stop)]
    cut = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                              stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.text == expected
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    kept = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                               stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == expected + stop


def test_stop_token_and_length_finish_reasons(llm):
    prompt = [1, 400, 401]
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop_token = free.token_ids[5]
    first = free.token_ids.index(stop_token)
    stopped = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                  stop_token_ids=[stop_token]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop_token)


def test_min_tokens_defers_eos(llm):
    eos = llm.get_tokenizer().eos_token_id
    params = SamplingParams(temperature=0, max_tokens=8, min_tokens=8, logit_bias={eos: 100.0})
    output = llm.generate([1, 50, 51], params, use_tqdm=False)[0].outputs[0]
    assert eos not in output.token_ids and len(output.token_ids) == 8
    eager = SamplingParams(temperature=0, max_tokens=8, min_tokens=3, logit_bias={eos: 100.0})
    output = llm.generate([1, 50, 51], eager, use_tqdm=False)[0].outputs[0]
    # Three tokens under the mask, then the biased eos ends it.
    assert len(output.token_ids) == 4 and output.token_ids[-1] == eos
    assert (output.finish_reason, output.stop_reason) == ("stop", None)


def test_seeded_sampling_is_independent_of_the_batch(demo_model_dir):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=20, ignore_eos=True)
    prompt = [1, 100, 200, 300]
    alone = LLM(str(demo_model_dir), num_kv_blocks=64)
    reference = alone.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    alone.engine.check_no_leaks()
    # Same request among unseeded neighbours, with a pool small enough to preempt.
    crowded = LLM(str(demo_model_dir), num_kv_blocks=6, max_num_batched_tokens=32)
    others = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    prompts = [[1, 5, 6, 7] * 5, prompt, [1, 9] * 10, [1, 11, 12]]
    outputs = crowded.generate(prompts, [others, params, others, others], use_tqdm=False)
    assert outputs[1].outputs[0].token_ids == reference
    assert crowded.engine.scheduler.num_preemptions > 0
    crowded.engine.check_no_leaks()


def test_n_samples_and_best_of(llm):
    prompt = [1, 60, 61, 62]
    params = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True)
    output = llm.generate(prompt, params, use_tqdm=False)[0]
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1, "samples should differ"
    single = SamplingParams(temperature=1.0, seed=3, max_tokens=10, ignore_eos=True)
    assert llm.generate(prompt, single, use_tqdm=False)[0].outputs[0].token_ids == \
        output.outputs[0].token_ids

    best = SamplingParams(n=2, best_of=5, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True)
    output = llm.generate(prompt, best, use_tqdm=False)[0]
    assert len(output.outputs) == 2
    scores = [c.cumulative_logprob for c in output.outputs]
    assert scores == sorted(scores, reverse=True)


def test_streamed_text_only_grows(llm):
    engine = llm.engine
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=60, ignore_eos=True)
    for index in range(4):
        engine.add_request(f"s{index}", [1, 70 + index, 80], params)
    history = run_to_completion(engine)
    for outputs in history.values():
        texts = [o.outputs[0].text for o in outputs]
        for before, after in zip(texts, texts[1:]):
            assert after.startswith(before)
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 60


def test_kv_accounting_while_running(llm):
    engine = llm.engine
    total = engine.kv_stats().num_blocks
    for index, length in enumerate((10, 40, 70)):
        engine.add_request(f"kv{index}", [1] * length, SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    stats = engine.kv_stats()
    block_size = stats.block_size
    assert stats.num_tokens == 10 + 40 + 70
    assert stats.num_used_blocks == sum(-(-n // block_size) for n in (10, 40, 70))
    assert stats.num_blocks == total
    assert 0.0 <= stats.waste < 1.0
    run_to_completion(engine)
    assert engine.kv_stats().num_used_blocks == 0


def test_chat_uses_the_template(llm):
    output = llm.chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        SamplingParams(max_tokens=5), use_tqdm=False,
    )[0]
    assert output.prompt.startswith("Be brief. USER: Hi there ASSISTANT:")
    assert output.prompt_token_ids[0] == llm.get_tokenizer().bos_token_id
    assert output.prompt_token_ids.count(llm.get_tokenizer().bos_token_id) == 1


def test_generation_stops_at_max_model_len(demo_model_dir):
    engine_llm = LLM(str(demo_model_dir), num_kv_blocks=16, max_model_len=32)
    output = engine_llm.generate([1] * 20, SamplingParams(max_tokens=None, ignore_eos=True),
                                 use_tqdm=False)[0]
    assert output.outputs[0].finish_reason == "length"
    assert len(output.prompt_token_ids) + len(output.outputs[0].token_ids) == 32
    engine_llm.engine.check_no_leaks()
