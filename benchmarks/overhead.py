"""Host overhead per decode step: where a step's time goes besides the model's arithmetic.

A GPU computes a small model's decode step in a few milliseconds; whatever the host spends around
it (scheduling, building the step's inputs, attention metadata, sampling bookkeeping, applying the
output and making RequestOutputs) leaves the GPU idle unless it is well below that. This runs a
1-layer model (so host work dominates) with B sequences decoding in steady state and times each
phase of a step separately, next to the forward pass itself, for several batch sizes, with and
without repetition/presence/frequency penalties.

    python benchmarks/overhead.py [--batch-sizes 1,64,256] [--steps 30] [--quick]

Writes benchmarks/results/overhead-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from common import machine_description, output_path
from transformers import AutoConfig, LlamaForCausalLM

from pagoda.backend import EngineConfig, LLMEngine, SamplingParams
from pagoda.backend.attention import AttentionMetadata
from pagoda.backend.attention.torch_backend import TorchAttentionMetadata
from pagoda.backend.demo import demo_model_path
from pagoda.backend.model_input import build_model_input
from pagoda.backend.sampling_params import RequestOutputKind

T = TypeVar("T")
PHASES = ("schedule", "model_input", "attention_metadata", "forward", "sample", "update",
          "outputs")
HOST_PHASES = ("schedule", "model_input", "attention_metadata", "update", "outputs")


def one_layer_model(folder: Path) -> Path:
    """The demo model's tokenizer and shapes with a single decoder layer, random weights."""
    demo = demo_model_path()
    config = AutoConfig.from_pretrained(demo)
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in demo.iterdir():
        if "token" in name.name or name.suffix == ".model":
            shutil.copy(name, folder / name.name)
    return folder


class PhaseTimer:
    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {phase: [] for phase in PHASES}

    def time(self, phase: str, work: Callable[[], T]) -> T:
        started = time.perf_counter()
        result = work()
        self.samples[phase].append((time.perf_counter() - started) * 1e3)
        return result

    def medians(self) -> dict[str, float]:
        return {phase: statistics.median(values) for phase, values in self.samples.items()}


def timed_step(engine: LLMEngine, timer: PhaseTimer) -> None:
    """One engine step, phase by phase (LLMEngine.step and ModelRunner.execute, unrolled)."""
    runner = engine.runner
    scheduler_output = timer.time("schedule", engine.scheduler.schedule)
    model_input = timer.time("model_input", lambda: build_model_input(
        scheduler_output, engine.block_manager, engine.device))

    def prepare() -> AttentionMetadata:
        metadata = runner.backend.prepare(model_input.layout, engine.device)
        if isinstance(metadata, TorchAttentionMetadata):
            # The torch backend builds its masks at the first layer that attends, once per
            # sliding window; this model's one layer has none. Built here, they count as
            # metadata, as in the results recorded before layers chose their own windows.
            metadata.for_window(None)
        return metadata

    metadata = timer.time("attention_metadata", prepare)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            runner.backend.copy_blocks(runner.kv_caches, model_input.block_copies)
            hidden = runner.model(model_input.input_ids, model_input.positions, runner.kv_caches,
                                  metadata)
            return runner.model.compute_logits(hidden[model_input.logits_indices])

    logits = timer.time("forward", forward)
    model_output = timer.time("sample", lambda: runner.sampler(logits, model_input.sampling_rows))
    touched = timer.time("update", lambda: engine.scheduler.update_from_output(
        scheduler_output, model_output))
    timer.time("outputs", lambda: engine._outputs(touched))


def measure(model: Path, batch_size: int, steps: int, penalties: bool) -> dict[str, float]:
    engine = LLMEngine(EngineConfig(model=str(model), num_kv_blocks=4096, max_num_seqs=512,
                                    enable_prefix_caching=False))
    params = SamplingParams(
        temperature=0.0, max_tokens=steps + 8, ignore_eos=True,
        output_kind=RequestOutputKind.DELTA,
        repetition_penalty=1.1 if penalties else 1.0,
        presence_penalty=0.5 if penalties else 0.0,
        frequency_penalty=0.5 if penalties else 0.0,
    )
    for index in range(batch_size):
        engine.add_request(str(index), [(7 * index + t) % 4000 + 5 for t in range(64)], params)
    while any(seq.num_output_tokens == 0 for group in engine.requests.values()
              for seq in group.seqs):
        engine.step()  # prefill until every sequence decodes
    timer = PhaseTimer()
    for _ in range(steps):
        timed_step(engine, timer)
    for request_id in list(engine.requests):
        engine.abort(request_id)
    engine.check_no_leaks()
    medians = timer.medians()
    medians["host_total"] = sum(medians[phase] for phase in HOST_PHASES)
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,64,256")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8, 3 steps")
    parser.add_argument("--notes", default="", help="free text stored in the result")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    batch_sizes = [1, 8] if args.quick else [int(b) for b in args.batch_sizes.split(",")]
    steps = 3 if args.quick else args.steps
    results = []
    with tempfile.TemporaryDirectory() as folder:
        model = one_layer_model(Path(folder))
        for penalties in (False, True):
            for batch_size in batch_sizes:
                phases = measure(model, batch_size, steps, penalties)
                results.append({"batch_size": batch_size, "penalties": penalties,
                                "median_ms": phases})
                print(f"batch {batch_size:4d} penalties={penalties!s:5}: " + ", ".join(
                    f"{phase} {ms:.2f}" for phase, ms in phases.items()))
    path = output_path(args.output, "overhead-cpu.json", args.quick)
    path.write_text(json.dumps({
        "benchmark": "overhead", "machine": machine_description(), "notes": args.notes,
        "model": "demo model shapes, 1 decoder layer", "steps": steps,
        "host_phases": list(HOST_PHASES), "results": results,
    }, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
