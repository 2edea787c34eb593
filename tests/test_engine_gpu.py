"""The whole engine on CUDA (skipped without it): decode steps replayed from CUDA graphs give the
eager path's tokens, greedy output equals transformers' in float32, and in bfloat16 the
engine's logprobs of its own tokens match transformers' scoring of them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagoda.backend import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PROMPTS = [[1, 450, 29871, 13], [1, 306, 763, 304, 1348], [1, 100, 200, 300, 400, 500, 600]]


def generate(path, **engine_args) -> list:
    llm = LLM(str(path), device="cuda", max_num_seqs=16, **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=0)
    prompts = [[t % 4000 for t in p] for p in PROMPTS] * 3  # 9 sequences: a padded bucket
    outputs = llm.generate(prompts, params, use_tqdm=False)
    llm.engine.check_no_leaks()
    return outputs


def test_graph_replay_gives_the_eager_tokens(checkpoint):
    path = checkpoint("llama-gqa")
    eager = generate(path, dtype="bfloat16", enforce_eager=True)
    graphs = generate(path, dtype="bfloat16", cuda_graph_sizes=[1, 2, 4, 8, 16])
    assert [o.outputs[0].token_ids for o in graphs] == [o.outputs[0].token_ids for o in eager]


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2", "mistral-window"])
def test_float32_greedy_matches_transformers(checkpoint, variant):
    path = checkpoint(variant)
    outputs = generate(path, dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).cuda()
    for output in outputs:
        prompt = torch.tensor([output.prompt_token_ids], device="cuda")
        reference = model.generate(prompt, max_new_tokens=24, do_sample=False,
                                   attention_mask=torch.ones_like(prompt))
        assert output.outputs[0].token_ids == reference[0, prompt.shape[1]:].tolist()


def test_bfloat16_logprobs_match_transformers_scoring(checkpoint):
    path = checkpoint("llama-gqa")
    outputs = generate(path, dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16).cuda()
    for output in outputs:
        completion = output.outputs[0]
        tokens = torch.tensor([output.prompt_token_ids + completion.token_ids], device="cuda")
        with torch.no_grad():
            logits = model(tokens).logits[0, len(output.prompt_token_ids) - 1 : -1].float()
        reference = torch.log_softmax(logits, dim=-1).gather(
            -1, tokens[0, len(output.prompt_token_ids):, None])[:, 0]
        engine = torch.tensor([step[t].logprob for step, t in
                               zip(completion.logprobs, completion.token_ids)], device="cuda")
        torch.testing.assert_close(engine, reference, atol=0.15, rtol=0.0)
