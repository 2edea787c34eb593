"""generation_config.json's sampling settings as vLLM's `--generation-config auto` honours them:
defaults for what a request leaves unset, max_new_tokens as a cap; through the OpenAI API, the
FastChat worker's protocol and LLM.generate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from openai_server import running_server
from pagoda.adapters.fastchat.protocol import GenerateRequest
from pagoda.adapters.openai.protocol import ChatCompletionRequest
from pagoda.adapters.openai.sampling import build_sampling_params
from pagoda.backend import LLM
from pagoda.backend.config import EngineConfig
from pagoda.backend.generation_defaults import SamplingDefaults, load_sampling_defaults

QWEN3_STYLE = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
               "repetition_penalty": 1.0, "max_new_tokens": 40, "eos_token_id": 2}


def _write_generation_config(folder: Path, settings: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(settings))
    return folder


def test_the_sampling_fields_the_file_sets_become_defaults(tmp_path):
    folder = _write_generation_config(tmp_path, QWEN3_STYLE)
    assert load_sampling_defaults("auto", folder) == SamplingDefaults(
        temperature=0.6, top_p=0.95, top_k=20, repetition_penalty=1.0, max_tokens=40
    )
    assert load_sampling_defaults("vllm", folder) == SamplingDefaults()
    other = _write_generation_config(tmp_path / "other", {"top_k": 0, "min_p": 0.05})
    assert load_sampling_defaults(str(other), folder) == SamplingDefaults(top_k=-1, min_p=0.05)


def test_missing_files_mean_no_defaults_unless_a_folder_was_named(tmp_path):
    assert load_sampling_defaults("auto", tmp_path) == SamplingDefaults()
    with pytest.raises(ValueError, match="no generation_config.json"):
        load_sampling_defaults(str(tmp_path), tmp_path)
    with pytest.raises(ValueError, match="generation_config must be"):
        EngineConfig(generation_config=str(tmp_path / "missing"))


def test_openai_requests_keep_what_they_set_and_take_the_rest():
    defaults = SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20, max_tokens=40)
    messages = [{"role": "user", "content": "hi"}]

    def params(**fields):
        request = ChatCompletionRequest(model="m", messages=messages, **fields)
        return build_sampling_params(request, max_tokens=request.max_tokens, logprobs=None,
                                     param_names={}, defaults=defaults)

    unset = params()
    assert (unset.temperature, unset.top_p, unset.top_k, unset.max_tokens) == (0.6, 0.95, 20, 40)
    given = params(temperature=0.0, top_k=-1, max_tokens=100)
    assert (given.temperature, given.top_p, given.top_k, given.max_tokens) == (0.0, 0.95, -1, 40)
    assert params(max_tokens=5).max_tokens == 5
    # Beam search stays greedy rather than taking the model's sampling temperature.
    assert params(use_beam_search=True, n=2).temperature == 0.0


def test_fastchat_requests_take_defaults_for_unset_fields_only():
    defaults = SamplingDefaults(temperature=0.6, top_k=20, repetition_penalty=1.1, max_tokens=40)
    body = {"model": "m", "prompt": "hi", "temperature": 0.0, "max_new_tokens": 100}
    params = GenerateRequest.parse(body).sampling_params(defaults)
    assert (params.temperature, params.top_k, params.repetition_penalty, params.max_tokens) == (
        0.0, 20, 1.1, 40
    )


def _demo_copy_with(demo_model_dir: Path, folder: Path, settings: dict) -> Path:
    shutil.copytree(demo_model_dir, folder)
    current = json.loads((folder / "generation_config.json").read_text())
    return _write_generation_config(folder, {**current, **settings})


def test_offline_generate_without_params_uses_the_model_defaults(demo_model_dir, tmp_path):
    model = _demo_copy_with(demo_model_dir, tmp_path / "model", {"max_new_tokens": 3, "top_k": 1})
    llm = LLM(str(model), num_kv_blocks=32)
    assert llm.get_default_sampling_params().top_k == 1
    (output,) = llm.generate(["Once upon a time"], use_tqdm=False)
    assert len(output.outputs[0].token_ids) <= 3
    llm.engine.check_no_leaks()


def test_the_openai_server_applies_the_model_defaults(demo_model_dir, tmp_path):
    # top_k 1 samples the most likely token: a default that shows in the text.
    model = _demo_copy_with(demo_model_dir, tmp_path / "model", {"max_new_tokens": 6, "top_k": 1})
    messages = [{"role": "user", "content": "Tell me a story."}]
    with running_server(model) as server:
        def chat(**fields) -> dict:
            body = {"model": server.model, "messages": messages, "ignore_eos": True, **fields}
            response = httpx.post(f"{server.v1}/chat/completions", json=body,
                                  headers=server.headers, timeout=60)
            assert response.status_code == 200, response.text
            return response.json()

        unset = chat(seed=1)
        assert unset["usage"]["completion_tokens"] == 6
        assert unset["choices"][0]["finish_reason"] == "length"
        greedy = chat(temperature=0.0, max_tokens=50)
        assert greedy["usage"]["completion_tokens"] == 6
        text = unset["choices"][0]["message"]["content"]
        assert text == greedy["choices"][0]["message"]["content"]
        assert chat(max_tokens=2)["usage"]["completion_tokens"] == 2
