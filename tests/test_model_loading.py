"""Loading checkpoints: architectures, weight formats, dtypes, and the errors a user sees."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagoda.backend import LLM, SamplingParams
from pagoda.backend.models import MODEL_REGISTRY


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_unsupported_architecture_names_it_and_the_supported_list(checkpoint, tmp_path):
    folder = copy_checkpoint(checkpoint("llama-gqa"), tmp_path / "gpt")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        LLM(str(folder), num_kv_blocks=8)
    assert "FancyNewForCausalLM" in str(error.value)
    for supported in MODEL_REGISTRY:
        assert supported in str(error.value)


def test_pickle_weights_refused_unless_allowed(checkpoint, tmp_path):
    source = checkpoint("llama-gqa")
    folder = copy_checkpoint(source, tmp_path / "pickled")
    for file in folder.glob("*.safetensors"):
        file.unlink()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle_weights"):
        LLM(str(folder), num_kv_blocks=8)
    prompt = [1, 40, 41, 42]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    allowed = LLM(str(folder), num_kv_blocks=8, allow_pickle_weights=True)
    reference = LLM(str(source), num_kv_blocks=8)
    assert allowed.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == \
        reference.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids


def test_missing_tensor_is_reported(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_checkpoint(checkpoint("llama-gqa"), tmp_path / "partial")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj.weight"):
        LLM(str(folder), num_kv_blocks=8)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is not a folder: pass a Hugging Face checkpoint folder"):
        LLM(str(tmp_path / "no-such-model"), num_kv_blocks=8)
    with pytest.raises(ValueError, match="has no config.json"):
        LLM(str(tmp_path), num_kv_blocks=8)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(checkpoint, dtype):
    path = checkpoint("qwen2")
    prompt = [1, 30, 31, 32, 33]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=0, ignore_eos=True)
    full = LLM(str(path), num_kv_blocks=8).generate(prompt, params, use_tqdm=False)[0].outputs[0]
    llm = LLM(str(path), num_kv_blocks=8, dtype=dtype)
    assert llm.engine.runner.kv_caches[0][0].dtype == getattr(torch, dtype)
    half = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    # The first token comes from the same context in both runs; its logprob differs only by
    # half-precision rounding.
    assert half.token_ids[0] == full.token_ids[0]
    first = full.token_ids[0]
    assert half.logprobs[0][first].logprob == pytest.approx(full.logprobs[0][first].logprob, abs=0.1)
    llm.engine.check_no_leaks()


def test_bad_engine_arguments_name_the_argument(demo_model_dir):
    for name, value in (("block_size", 0), ("max_num_seqs", -1), ("dtype", "int8"),
                        ("device", "tpu"), ("gpu_memory_utilization", 1.5)):
        with pytest.raises(ValueError, match=name):
            LLM(str(demo_model_dir), **{name: value})
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(demo_model_dir), num_kv_blocks=2, max_model_len=100)


def test_an_unused_cpu_kv_pool_costs_no_ram(demo_model_dir):
    """The default 2 GiB CPU pool is zero-filled lazily: RAM grows with the blocks in use."""
    import psutil

    before = psutil.Process().memory_info().rss
    llm = LLM(str(demo_model_dir), kv_cache_memory_bytes=1024**3, enable_prefix_caching=False)
    grown = psutil.Process().memory_info().rss - before
    key_cache = llm.engine.runner.kv_caches[0][0]
    assert key_cache.numel() * key_cache.element_size() * 2 * len(llm.engine.runner.kv_caches) \
        == pytest.approx(1024**3, rel=0.01)
    assert grown < 256 * 1024**2
    assert not key_cache.any()
