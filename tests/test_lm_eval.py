"""lm-evaluation-harness against `pagoda serve`: a multiple-choice (loglikelihood) task read from
local files, run through its `local-completions` model (echo=true, logprobs=1, max_tokens=1 per
request: prompt logprobs), must score as its `hf` model scores the same checkpoint with
transformers in float32. Slow (two evaluations and a server) and needs the `eval` extra."""

from __future__ import annotations

import importlib.util
import json

import pytest

from openai_server import pagoda_serve

pytestmark = pytest.mark.slow
# Found, not imported: `datasets` reads its offline switches when first imported (in the test).
if importlib.util.find_spec("lm_eval") is None:
    pytest.skip("needs lm-evaluation-harness (pip install -e '.[eval]')", allow_module_level=True)

QUESTIONS = [
    ("The cat sat on the", ["mat", "moon", "idea"], 0),
    ("One, two, three,", ["four", "blue", "seven"], 0),
    ("Paris is the capital of", ["France", "Peru"], 0),
    ("Water boils at one hundred degrees", ["Celsius", "sideways", "tomorrow"], 0),
    ("The opposite of hot is", ["cold", "green"], 0),
]
TASK = "pagoda_tiny_choices"


@pytest.fixture(scope="module")
def served(demo_model_dir):
    with pagoda_serve(
        "--model", str(demo_model_dir), "--served-model-name", "demo", "--dtype", "float32",
        "--device", "cpu", "--num-kv-blocks", "256", "--uvicorn-log-level", "warning",
    ) as base_url:
        yield base_url


def write_task(folder) -> None:
    """A task YAML over a local jsonl (the `json` dataset builder: nothing is downloaded)."""
    data = folder / "choices.jsonl"
    data.write_text("".join(
        json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS
    ))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )


def test_lm_eval_through_pagoda_matches_transformers(served, demo_model_dir, tmp_path,
                                                      monkeypatch):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    write_task(tmp_path)
    tasks = TaskManager(include_path=str(tmp_path))

    def evaluate(model: str, model_args: dict, batch_size: int) -> dict:
        return lm_eval.simple_evaluate(
            model=model, model_args=model_args, tasks=[TASK], task_manager=tasks,
            batch_size=batch_size, log_samples=True, bootstrap_iters=0,
        )

    # Both prepend BOS (the demo tokenizer's add_bos_token), as the server would for text.
    served_run = evaluate("local-completions", {
        "base_url": f"{served}/v1/completions", "model": "demo", "tokenizer_backend": "huggingface",
        "tokenizer": str(demo_model_dir), "add_bos_token": True, "num_concurrent": 2,
        "max_retries": 1,
    }, batch_size=3)
    reference_run = evaluate("hf", {
        "pretrained": str(demo_model_dir), "dtype": "float32", "device": "cpu",
        "add_bos_token": True,
    }, batch_size=1)

    def loglikelihoods(run: dict) -> list[list[float]]:
        samples = sorted(run["samples"][TASK], key=lambda sample: sample["doc_id"])
        return [[resp[0][0] for resp in sample["resps"]] for sample in samples]

    served_scores, reference_scores = loglikelihoods(served_run), loglikelihoods(reference_run)
    assert len(served_scores) == len(QUESTIONS)
    for served_choices, reference_choices in zip(served_scores, reference_scores):
        assert served_choices == pytest.approx(reference_choices, abs=1e-3)
    for metric in ("acc,none", "acc_norm,none"):
        assert served_run["results"][TASK][metric] == reference_run["results"][TASK][metric]
