"""Faults inside the model fail only the request they happen on.

The engine's `fault_injector` hook raises for chosen requests; every other request must finish
with exactly the output it has without the fault, and no KV block may be left behind.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from combined_server import server  # noqa: F401  (the FastChat test's server fixture)
from openai_server import wait_until_idle
from pagoda.backend import LLM, LLMEngine, SamplingParams
from pagoda.backend.errors import RequestFailed
from pagoda.backend.sequence import SequenceGroup

PROMPTS = {
    "a": "The quick brown fox",
    "b": "Once upon a time",
    "c": "def fibonacci(n):",
    "d": "Paged attention keeps",
}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(demo_model_dir) -> LLM:
    return LLM(str(demo_model_dir), num_kv_blocks=64, max_num_batched_tokens=64)


@pytest.fixture(autouse=True)
def no_leaks(llm):
    yield
    llm.engine.fault_injector = None
    llm.engine.check_no_leaks()


def run(engine: LLMEngine, params: dict[str, SamplingParams] | None = None) -> dict[str, object]:
    for request_id, prompt in PROMPTS.items():
        engine.add_request(request_id, prompt, (params or {}).get(request_id, GREEDY))
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    return finals


def fail_when(condition: Callable[[SequenceGroup], bool]) -> Callable[[SequenceGroup], None]:
    def inject(group: SequenceGroup) -> None:
        if condition(group):
            raise RuntimeError(f"injected fault for {group.request_id}")

    return inject


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_a_fault_fails_only_its_request(llm, when):
    engine = llm.engine
    expected = {rid: out.outputs[0].text for rid, out in run(engine).items()}

    def culprit(group: SequenceGroup) -> bool:
        if group.request_id != "c":
            return False
        # A decode fault strikes once the request has tokens: mid-generation, batched with others.
        return when == "prefill" or group.seqs[0].num_output_tokens >= 3

    engine.fault_injector = fail_when(culprit)
    finals = run(engine)
    assert isinstance(finals["c"].error, RequestFailed) and finals["c"].error.internal
    assert "injected fault for c" in str(finals["c"].error)
    assert finals["c"].outputs[0].finish_reason == "error"
    for request_id in "abd":
        assert finals[request_id].error is None
        assert finals[request_id].outputs[0].text == expected[request_id]


def test_a_fault_in_a_parallel_sampling_or_beam_request(llm):
    engine = llm.engine
    params = {
        "a": SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=8),
        "b": SamplingParams(n=2, use_beam_search=True, temperature=0, max_tokens=8),
    }
    expected = run(engine, params)
    engine.fault_injector = fail_when(lambda group: group.request_id == "b")
    finals = run(engine, params)
    assert finals["b"].error.internal
    for request_id in "acd":
        assert [c.text for c in finals[request_id].outputs] == [
            c.text for c in expected[request_id].outputs
        ]


def test_every_request_failing_leaves_the_engine_usable(llm):
    engine = llm.engine
    engine.fault_injector = fail_when(lambda group: True)
    finals = run(engine)
    assert all(output.error.internal for output in finals.values())
    engine.fault_injector = None
    assert all(output.error is None for output in run(engine).values())


def test_kv_exhaustion_preempts_beams_and_samples_without_leaking(demo_model_dir):
    """A pool and a token budget so small that beam search and parallel-sampling requests are
    preempted and recomputed in chunks the budget splits between their beams: all finish, and
    every block comes back (a beam still recomputing when its siblings sampled used to leak)."""
    from pagoda.backend import EngineConfig

    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), dtype="float32", device="cpu",
                                    num_kv_blocks=24, max_num_batched_tokens=24,
                                    max_model_len=256))
    words = "paged attention keeps every block of the cache busy".split()
    for index in range(8):
        prompt = " ".join(words[: 3 + index % 6] * 2)
        params = (SamplingParams(n=3, use_beam_search=True, temperature=0, max_tokens=10,
                                 ignore_eos=True) if index % 2 else
                  SamplingParams(n=3, temperature=0.8, seed=index, max_tokens=10,
                                 ignore_eos=True))
        engine.add_request(str(index), prompt, params)
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    assert engine.scheduler.num_preemptions > 0
    assert all(output.error is None for output in finals.values())
    assert all(len(output.outputs) == 3 for output in finals.values())
    engine.check_no_leaks()


def test_a_fault_through_the_openai_server(openai_server):
    """The faulty requests get 500 engine_error (a stream too: the fault strikes at its prefill,
    before its first event); the requests beside them get their answers."""
    import asyncio

    import httpx

    engine = openai_server.engine.engine
    engine.fault_injector = fail_when(lambda group: "FAULT" in (group.prompt or ""))
    body = {"model": openai_server.model, "max_tokens": 8, "temperature": 0, "ignore_eos": True}

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=openai_server.v1, headers=openai_server.headers,
                                     timeout=60) as client:
            return await asyncio.gather(*(
                client.post("/completions", json={**body, "prompt": prompt, "stream": stream})
                for prompt, stream in (("Hello there", False), ("FAULT here", False),
                                       ("FAULT streamed", True), ("Once upon", True))
            ))

    try:
        fine, faulty, faulty_stream, fine_stream = asyncio.run(send_all())
    finally:
        engine.fault_injector = None
    assert fine.status_code == 200 and fine.json()["choices"][0]["finish_reason"] == "length"
    assert faulty.status_code == 500
    assert faulty.json()["error"]["code"] == "engine_error"
    assert faulty_stream.status_code == 500
    assert faulty_stream.json()["error"]["code"] == "engine_error"
    assert fine_stream.status_code == 200 and '"finish_reason":"length"' in fine_stream.text


def test_a_fault_through_the_fastchat_worker(server):  # noqa: F811
    """The faulty request ends with FastChat's 50001; the one after it is served."""
    import httpx

    base_url, engine = server
    engine.engine.fault_injector = fail_when(lambda group: "FAULT" in (group.prompt or ""))
    body = {"max_new_tokens": 4, "temperature": 0, "echo": False}
    try:
        faulty = httpx.post(f"{base_url}/worker_generate", json={**body, "prompt": "FAULT here"},
                            timeout=60).json()
        fine = httpx.post(f"{base_url}/worker_generate", json={**body, "prompt": "Hello there"},
                          timeout=60).json()
    finally:
        engine.engine.fault_injector = None
    assert faulty["error_code"] == 50001 and "injected fault" in faulty["text"]
    assert fine["error_code"] == 0 and fine["usage"]["completion_tokens"] >= 1
    wait_until_idle(engine)
    engine.engine.check_no_leaks()
