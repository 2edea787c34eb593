"""FastChat protocol pieces that need no server: request mapping, errors, templates, settings."""

from __future__ import annotations

import socket
import sys

import pytest

from pagoda.adapters.fastchat.chunks import ChunkBuilder
from pagoda.adapters.fastchat.conv_template import VICUNA_V1_1, resolve_conv_template
from pagoda.adapters.fastchat.protocol import (
    DEFAULT_MAX_NEW_TOKENS,
    ErrorCode,
    GenerateRequest,
    WorkerError,
    engine_error,
)
from pagoda.adapters.fastchat.registration import (
    HEART_BEAT_INTERVAL_ENV,
    check_http_url,
    heart_beat_interval_from_env,
)
from pagoda.adapters.fastchat.server import (
    default_model_name,
    default_worker_address,
    expand_worker_address,
)
from pagoda.backend.errors import (
    EngineError,
    InvalidParameter,
    KVCacheCapacityExceeded,
    PromptTooLong,
    RequestFailed,
)
from pagoda.backend.outputs import CompletionOutput, RequestMetrics, RequestOutput


def test_fastchat_defaults():
    request = GenerateRequest.parse({"prompt": "Hi"})
    params = request.sampling_params()
    assert request.wants_echo  # FastChat echoes unless told not to
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 1.0, -1)
    assert params.max_tokens == DEFAULT_MAX_NEW_TOKENS
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (
        1.0, 0.0, 0.0
    )
    assert params.logprobs is None and params.stop == [] and params.n == 1


def test_fields_map_onto_sampling_params():
    params = GenerateRequest.parse({
        "prompt": "Hi", "temperature": 0.5, "top_p": 0.9, "top_k": 40.0, "max_new_tokens": 7,
        "stop": ["###", ""], "stop_token_ids": [2, 5], "repetition_penalty": 1.2,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "logprobs": 3, "best_of": 2,
        "echo": False, "images": ["ignored"],
    }).sampling_params()
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.5, 0.9, 40, 7)
    assert params.stop == ["###"]
    assert params.stop_token_ids == [2, 5]
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (
        1.2, 0.5, -0.5
    )
    assert (params.logprobs, params.best_of, params.n) == (3, 2, 1)


def test_top_p_zero_is_greedy_and_beam_search_ignores_temperature():
    params = GenerateRequest.parse({"prompt": "Hi", "top_p": 0.0, "temperature": 0.7})
    assert params.sampling_params().is_greedy
    beams = GenerateRequest.parse(
        {"prompt": "Hi", "temperature": 0.7, "use_beam_search": True, "best_of": 3}
    ).sampling_params()
    assert beams.use_beam_search and beams.num_sequences == 3 and beams.is_greedy


@pytest.mark.parametrize(("body", "code"), [
    ({"prompt": "Hi", "top_k": 1.5}, ErrorCode.VALIDATION_TYPE_ERROR),
    ({"prompt": ["a", "b"]}, ErrorCode.VALIDATION_TYPE_ERROR),
    ({"prompt": "Hi", "top_p": -0.1}, ErrorCode.PARAM_OUT_OF_RANGE),
    ({"prompt": "Hi", "repetition_penalty": 0}, ErrorCode.PARAM_OUT_OF_RANGE),
    ({"prompt": "Hi", "best_of": 0}, ErrorCode.PARAM_OUT_OF_RANGE),
])
def test_bad_requests_get_fastchat_codes(body, code):
    with pytest.raises(WorkerError) as caught:
        GenerateRequest.parse(body).sampling_params()
    assert caught.value.code == code
    assert caught.value.chunk() == {"text": str(caught.value), "error_code": int(code)}


@pytest.mark.parametrize(("error", "code"), [
    (PromptTooLong(9000, 4096), ErrorCode.CONTEXT_OVERFLOW),
    (InvalidParameter("stop_token_ids", "token id 99999 is outside the vocabulary"),
     ErrorCode.PARAM_OUT_OF_RANGE),
    (KVCacheCapacityExceeded(116, 64, 16, 1000), ErrorCode.PARAM_OUT_OF_RANGE),
    (RequestFailed("the model failed on this request"), ErrorCode.INTERNAL_ERROR),
])
def test_engine_errors_map_to_fastchat_codes_by_type(error, code):
    assert engine_error(error).code == code
    assert engine_error(error).chunk()["text"] == str(error)


def _output(
    text: str, finish_reason: str | None, error: EngineError | None = None
) -> RequestOutput:
    completion = CompletionOutput(0, text, [5] * len(text), None, None, finish_reason)
    return RequestOutput("r", "Hi", [1, 7], [completion], finish_reason is not None,
                         RequestMetrics(0.0), error)


def test_chunks_grow_and_end_like_fastchat_workers():
    request = GenerateRequest.parse({"prompt": "Hi"})
    builder = ChunkBuilder(request, request.sampling_params(), tokenizer=None)
    assert [c["text"] for c in builder.chunks(_output("a", None))] == ["Hia"]
    assert builder.chunks(_output("a", None)) == []  # nothing new: nothing sent
    last = builder.chunks(_output("ab", "length"))
    assert [(c["text"], c["finish_reason"]) for c in last] == [("Hiab", None), ("Hiab", "length")]
    assert last[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


@pytest.mark.parametrize(("error", "code"), [
    (RequestFailed("the model failed on this request"), ErrorCode.INTERNAL_ERROR),
    (KVCacheCapacityExceeded(5, 4, 16, None), ErrorCode.PARAM_OUT_OF_RANGE),
])
def test_a_failed_request_ends_with_its_error_code(error, code):
    request = GenerateRequest.parse({"prompt": "Hi", "echo": False})
    builder = ChunkBuilder(request, request.sampling_params(), tokenizer=None)
    with pytest.raises(WorkerError) as caught:
        builder.chunks(_output("a", "error", error=error))
    assert caught.value.code == code
    assert str(caught.value) == str(error)


def test_builtin_template_without_fschat(monkeypatch):
    for module in ("fastchat", "fastchat.conversation", "fastchat.model.model_adapter"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert resolve_conv_template(None, None, ["pagoda-demo"]) == VICUNA_V1_1
    assert resolve_conv_template("vicuna_v1.1", "/models/x", ["x"]) == VICUNA_V1_1
    with pytest.raises(ValueError, match="needs fschat"):
        resolve_conv_template("llama-2", None, ["pagoda-demo"])


def test_fastchat_templates_by_path_then_name():
    pytest.importorskip("fastchat")
    assert resolve_conv_template(None, None, ["pagoda-demo"]) == VICUNA_V1_1
    assert resolve_conv_template(None, "/models/demo", ["vicuna-demo"])["name"] == "vicuna_v1.1"
    assert resolve_conv_template(None, "mistralai/Mistral-7B-Instruct-v0.2", ["m"])["name"] == (
        "mistral"
    )
    assert resolve_conv_template("llama-2", None, ["pagoda-demo"])["name"] == "llama-2"
    with pytest.raises(ValueError, match="not one of FastChat's templates"):
        resolve_conv_template("no-such-template", None, ["pagoda-demo"])


def test_worker_settings(monkeypatch):
    assert default_model_name(None) == "pagoda-demo"
    assert default_model_name("/models/vicuna-7b-v1.5/") == "vicuna-7b-v1.5"
    assert default_worker_address("0.0.0.0", 21002) == "http://localhost:21002"
    assert default_worker_address("::1", 9) == "http://[::1]:9"
    # Scaled compose replicas share one command line; each registers its own host name.
    assert expand_worker_address("http://{hostname}:21002") == (
        f"http://{socket.gethostname()}:21002"
    )
    assert check_http_url("x", "http://127.0.0.1:21001/") == "http://127.0.0.1:21001"
    with pytest.raises(ValueError, match="controller"):
        check_http_url("--controller-address", "localhost:21001")
    monkeypatch.setenv(HEART_BEAT_INTERVAL_ENV, "2")
    assert heart_beat_interval_from_env() == 2.0
    for invalid in ("soon", "2.5", "0"):  # fastchat.constants reads it with int()
        monkeypatch.setenv(HEART_BEAT_INTERVAL_ENV, invalid)
        with pytest.raises(ValueError, match=HEART_BEAT_INTERVAL_ENV):
            heart_beat_interval_from_env()
