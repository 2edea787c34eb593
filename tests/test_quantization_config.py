"""Choosing the quantization: what config.json says, what `quantization=` asks for, and the
start-up errors that name the scheme and what is supported; online int8/fp8 of a dense
checkpoint against the same rounding done by the test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagoda.backend import LLM, SamplingParams
from pagoda.backend.config import EngineConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "quantized"


def with_quantization_config(source: Path, target: Path, quantization_config: dict) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("method", ["bitsandbytes", "gguf", "hqq"])
def test_an_unsupported_scheme_is_refused_naming_it_and_the_supported_ones(
        checkpoint, tmp_path, method):
    folder = with_quantization_config(checkpoint("llama-gqa"), tmp_path / method,
                                      {"quant_method": method, "bits": 4})
    with pytest.raises(ValueError, match=f"quantized with {method}, which Pagoda does not load; "
                                         "supported quantized checkpoints: auto-round, awq, "
                                         "compressed-tensors, gptq"):
        LLM(str(folder), num_kv_blocks=8)


def test_a_quantization_argument_must_match_the_checkpoint(demo_model_dir):
    with pytest.raises(ValueError, match="quantization='gptq' does not match the checkpoint, "
                                         "which is quantized with compressed-tensors"):
        LLM(str(FIXTURES / "ct-w8a16-channel"), tokenizer=str(demo_model_dir),
            num_kv_blocks=8, quantization="gptq")


def test_a_checkpoint_scheme_asked_of_a_dense_checkpoint_is_refused(checkpoint):
    with pytest.raises(ValueError, match="quantization='awq' needs a checkpoint quantized with "
                                         "it.*online quantization .*: fp8, int8"):
        LLM(str(checkpoint("llama-gqa")), num_kv_blocks=8, quantization="awq")


def test_an_unknown_quantization_name_names_the_argument():
    with pytest.raises(ValueError, match="quantization must be one of auto-round, awq, "
                                         "compressed-tensors, fp8, gptq, int8, got 'nf4'"):
        EngineConfig(quantization="nf4")
    assert EngineConfig(quantization="gptq_marlin").quantization == "gptq_marlin"


@pytest.mark.parametrize("change, message", [
    ({"num_bits": 3}, r"3-bit weights with strategy 'group' are not supported \(supported: "
                      r"\(2, 4, 8\) bits"),
    ({"type": "float"}, "format 'pack-quantized' with float weights is not supported"),
])
def test_unsupported_compressed_tensors_arguments_are_named(
        demo_model_dir, tmp_path, change, message):
    source = FIXTURES / "ct-w4a16-sym-g32"
    quantization = json.loads((source / "config.json").read_text())["quantization_config"]
    quantization["config_groups"]["group_0"]["weights"].update(change)
    folder = with_quantization_config(source, tmp_path / "changed", quantization)
    with pytest.raises(ValueError, match=f"compressed-tensors config_groups.group_0: {message}"):
        LLM(str(folder), tokenizer=str(demo_model_dir), num_kv_blocks=8, dtype="float32")


def _int8_round_trip(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.abs().max(dim=1, keepdim=True).values / 127
    return torch.round(weight / scale).clamp(-127, 127) * scale


def _fp8_round_trip(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.abs().max(dim=1, keepdim=True).values / 448
    return (weight / scale).to(torch.float8_e4m3fn).float() * scale


@pytest.mark.parametrize("variant, scheme, round_trip", [
    ("qwen2", "int8", _int8_round_trip),  # q/k/v biases pass through unquantized
    ("qwen2", "fp8", _fp8_round_trip),
    ("phi3", "int8", _int8_round_trip),  # q/k/v and gate/up fused in the checkpoint itself
    ("gpt-neox", "fp8", _fp8_round_trip),
])
def test_online_quantization_equals_the_rounded_weights_in_float32(
        checkpoint, variant, scheme, round_trip):
    source = checkpoint(variant)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                module.weight.copy_(round_trip(module.weight))
    prompt = [1, 30, 31, 32, 33, 34]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    expected = out.sequences[0, len(prompt):].tolist()
    expected_logprobs = [torch.log_softmax(step[0], -1)[token].item()
                         for step, token in zip(out.logits, expected)]

    llm = LLM(str(source), num_kv_blocks=8, dtype="float32", quantization=scheme)
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=0, ignore_eos=True)
    got = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == expected
    assert [step[token].logprob for step, token in zip(got.logprobs, got.token_ids)] == \
        pytest.approx(expected_logprobs, abs=1e-4)
    llm.engine.check_no_leaks()


def test_quantized_mixture_of_experts_checkpoints_are_refused(checkpoint, tmp_path):
    folder = with_quantization_config(checkpoint("mixtral"), tmp_path / "moe", {
        "quant_method": "gptq", "bits": 4, "group_size": 32})
    with pytest.raises(ValueError, match="gptq checkpoints of this architecture are not "
                                         "supported: .*quantized mixture-of-experts layers"):
        LLM(str(folder), num_kv_blocks=8)
