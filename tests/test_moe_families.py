"""The mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers in float32
on tiny random checkpoints (tests/checkpoints.py): greedy tokens exact under chunked prefill and
preemption, chosen-token and cumulative logprobs, the Triton attention backend under the
interpreter (and, on CUDA, the Triton fused-MoE kernel through the whole engine), which layers
are sparse, and the configurations refused by name."""

from __future__ import annotations

import pytest
import torch
import triton_devices
from test_parity import _hf_model, hf_greedy_ignore_eos, make_prompts
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

from pagoda.backend import LLM, SamplingParams
from pagoda.backend.attention import ATTENTION_BACKEND_ENV, TorchAttentionBackend
from pagoda.backend.models import ModelContext, build_model
from pagoda.backend.models.layers import SparseMoE

VARIANTS = ("mixtral", "qwen2-moe", "qwen3-moe")


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_transformers_under_chunked_prefill_and_preemption(checkpoint, variant):
    path = checkpoint(variant)
    # A budget of 16 tokens a step chunks every prompt but one; 8 blocks of 16 slots cannot hold
    # five requests of up to 60 + 36 tokens, so some are preempted and recomputed.
    llm = LLM(path, num_kv_blocks=8, max_num_batched_tokens=16)
    prompts = make_prompts(llm.engine.hf_config.vocab_size, lengths=(30, 45, 5, 60, 17))
    # min_tokens masks EOS as transformers' min_new_tokens does, so both run all 36 tokens.
    params = SamplingParams(temperature=0.0, max_tokens=36, min_tokens=36)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, output in zip(prompts, outputs):
        expected = hf_greedy_ignore_eos(path, prompt, 36)
        assert output.outputs[0].token_ids == expected, f"prompt length {len(prompt)}"
    llm.engine.check_no_leaks()


@pytest.mark.parametrize("variant", VARIANTS)
def test_logprobs_match_transformers_log_softmax(checkpoint, variant):
    path = checkpoint(variant)
    llm = LLM(path, num_kv_blocks=64, max_num_batched_tokens=32)
    prompts = make_prompts(llm.engine.hf_config.vocab_size, lengths=(9, 40))
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=16, logprobs=1, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    model = _hf_model(path)
    for prompt, output in zip(prompts, outputs):
        completion = output.outputs[0]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion.token_ids])).logits[0].float()
        reference = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        chosen = reference.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        for step, token_id in enumerate(completion.token_ids):
            assert completion.logprobs[step][token_id].logprob == pytest.approx(
                chosen[step].item(), abs=1e-4)
        assert completion.cumulative_logprob == pytest.approx(chosen.sum().item(), abs=1e-3)
    llm.engine.check_no_leaks()


@pytest.mark.parametrize("device_type", triton_devices.DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_path_gives_transformers_tokens(checkpoint, variant, device_type, monkeypatch):
    """On CPU the Triton attention backend under the interpreter; on CUDA also the Triton
    fused-MoE kernel, which the experts take there."""
    device = triton_devices.require(device_type)
    monkeypatch.setenv(ATTENTION_BACKEND_ENV, "triton")
    path = checkpoint(variant)
    llm = LLM(path, device=device.type, dtype="float32", num_kv_blocks=16,
              max_num_batched_tokens=16)
    prompt = make_prompts(llm.engine.hf_config.vocab_size, lengths=(20,))[0]
    params = SamplingParams(temperature=0.0, max_tokens=6, min_tokens=6)
    output = llm.generate([prompt], params, use_tqdm=False)[0]
    assert output.outputs[0].token_ids == hf_greedy_ignore_eos(path, prompt, 6)
    llm.engine.check_no_leaks()


def _build_on_meta(config) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(ModelContext(config, TorchAttentionBackend(), 64))


QWEN2_MOE_TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=6,
                      num_attention_heads=2, num_key_value_heads=1, num_experts=4,
                      moe_intermediate_size=8, shared_expert_intermediate_size=8,
                      architectures=["Qwen2MoeForCausalLM"])


@pytest.mark.parametrize("sparsity", [dict(decoder_sparse_step=2),
                                      dict(decoder_sparse_step=1, mlp_only_layers=[0, 4]),
                                      dict(decoder_sparse_step=3, mlp_only_layers=[5])])
def test_sparse_and_dense_layers_are_those_of_transformers(sparsity):
    config = Qwen2MoeConfig(**QWEN2_MOE_TINY, **sparsity)
    reference = AutoModelForCausalLM.from_config(config)
    expected = [type(layer.mlp).__name__ == "Qwen2MoeSparseMoeBlock"
                for layer in reference.model.layers]
    assert any(expected) and not all(expected)
    model = _build_on_meta(config)
    assert [isinstance(layer.mlp, SparseMoE) for layer in model.layers] == expected


def test_per_layer_sliding_windows_are_refused_naming_layer_types():
    config = Qwen2MoeConfig(**QWEN2_MOE_TINY, use_sliding_window=True, sliding_window=32,
                            max_window_layers=4)
    with pytest.raises(ValueError, match="layer_types mixes.*Qwen2MoeForCausalLM"):
        _build_on_meta(config)
    config = AutoConfig.for_model("qwen2_moe", **QWEN2_MOE_TINY)
    model = _build_on_meta(config)  # sliding_window is 0 there: no window at all
    assert all(layer.self_attn.sliding_window is None for layer in model.layers)


def test_experts_with_another_activation_are_refused_naming_hidden_act():
    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=8,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           num_local_experts=4, hidden_act="gelu",
                           architectures=["MixtralForCausalLM"])
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported for Mixtral"):
        _build_on_meta(config)
