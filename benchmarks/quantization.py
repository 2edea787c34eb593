"""Batch-1 decode speed and weight memory of quantized weights against dense, in one run.

Builds a random-weight Llama of a ~0.5B-parameter shape (hidden 1024, 24 layers, MLP 4096,
vocab 32000; --quick: a tiny one), then writes it as compressed-tensors pack-quantized
checkpoints (the layout llm-compressor's W8A16 and W4A16 write: int8 per output channel, int4
in groups of 128, symmetric, rounded to nearest here) and loads four engines on CPU:

    fp32  dense float32            bf16  dense bfloat16
    W8    8-bit weights (torch's int8 pack kernel, bfloat16 activations)
    W4    4-bit weights (torch's int4 pack kernel, bfloat16 activations)

Each round decodes --decode-tokens tokens at batch 1 on every engine in turn, so that a busy
machine weighs on all of them alike; the result keeps every round and the medians.

    python benchmarks/quantization.py [--rounds 3] [--decode-tokens 32] [--cpu-threads 1]

Writes benchmarks/results/quantization-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import add_run_args, machine_description, output_path
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from pagoda.backend import LLM, SamplingParams
from pagoda.backend.demo import demo_model_path
from pagoda.backend.models.layers import Linear, RotaryEmbedding

SHAPES = {
    "0.5b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=4096),
}
# Goals of issue 19: decode speed-up over fp32 and weight memory as a fraction of fp32's.
GOALS = {"W8": {"speedup": 2.0, "memory": 0.30}, "W4": {"speedup": 3.0, "memory": 0.17}}
GROUP_SIZE = 128
QUANTIZED_SUFFIXES = ("_proj.weight",)


def build_dense(shape: str, folder: Path, seed: int) -> Path:
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # Random normal weights without transformers' (slow, per-module) initialization.
    tensors = {name: (torch.randn(param.shape) * 0.02).to(torch.bfloat16)
               for name, param in model.state_dict().items() if "norm" not in name}
    tensors |= {name: torch.ones(param.shape, dtype=torch.bfloat16)
                for name, param in model.state_dict().items() if "norm" in name}
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(folder)
    return folder


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-bit values [rows, cols] -> int32 words [rows, cols * bits / 32], lowest
    bits first (compressed-tensors' pack-quantized layout)."""
    per_word = 32 // bits
    grouped = values.to(torch.int64).view(values.shape[0], -1, per_word)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = (grouped << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def quantize_checkpoint(dense: Path, folder: Path, bits: int) -> Path:
    """Round to nearest, symmetric: int8 per output channel, int4 per group of 128 inputs."""
    half_range = (2**bits - 1) / 2
    tensors = {}
    for name, weight in load_file(dense / "model.safetensors").items():
        if not name.endswith(QUANTIZED_SUFFIXES):
            tensors[name] = weight
            continue
        out_features, in_features = weight.shape
        group = GROUP_SIZE if bits == 4 else in_features
        grouped = weight.float().view(out_features, -1, group)
        scales = grouped.abs().amax(-1, keepdim=True).clamp(min=1e-8) / half_range
        q = torch.round(grouped / scales).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        prefix = name.removesuffix(".weight")
        tensors[f"{prefix}.weight_packed"] = pack_int32(
            (q + 2 ** (bits - 1)).view(out_features, in_features), bits)
        tensors[f"{prefix}.weight_scale"] = scales.view(out_features, -1).to(torch.bfloat16)
        tensors[f"{prefix}.weight_shape"] = torch.tensor([out_features, in_features])
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dense / "config.json").read_text())
    strategy = {"strategy": "group", "group_size": GROUP_SIZE} if bits == 4 else \
        {"strategy": "channel", "group_size": None}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                      "weights": {"num_bits": bits, "type": "int",
                                                  "symmetric": True, **strategy}}},
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of every parameter and buffer (rotary tables aside, they are not weights), and of
    the quantizable linear layers alone (all but the embedding, the LM head and the norms)."""
    total = linears = 0
    for path, module in model.named_modules():
        if isinstance(module, RotaryEmbedding):
            continue
        own = sum(t.numel() * t.element_size()
                  for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
                  if t is not None)
        total += own
        if path.startswith("layers.") and (isinstance(module, Linear) or
                                           path.rpartition(".")[0].endswith("_proj")):
            linears += own
    # A tied head shares the embedding's matrix; it is counted once by parameters() above.
    return {"total": total, "linears": linears}


def decode_rate(llm: LLM, prompt: list[int], decode_tokens: int) -> float:
    """Tokens/s of batch-1 decode steps (the prefill step is left out)."""
    engine = llm.engine
    engine.add_request("bench", prompt, SamplingParams(temperature=0, max_tokens=decode_tokens + 1,
                                                       ignore_eos=True))
    engine.step()  # prefill and the first token
    started = time.perf_counter()
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    elapsed = time.perf_counter() - started
    engine.check_no_leaks()
    return steps / elapsed


def measure(args: argparse.Namespace, workdir: Path) -> dict:
    dense = build_dense(args.shape, workdir / "dense", args.seed)
    folders = {"fp32": dense, "bf16": dense,
               "W8": quantize_checkpoint(dense, workdir / "w8", 8),
               "W4": quantize_checkpoint(dense, workdir / "w4", 4)}
    dtypes = {"fp32": "float32", "bf16": "bfloat16", "W8": "auto", "W4": "auto"}
    common = dict(tokenizer=str(demo_model_path()), num_kv_blocks=8, block_size=16,
                  cpu_threads=args.cpu_threads, enable_prefix_caching=False)
    engines = {name: LLM(str(folders[name]), dtype=dtypes[name], **common) for name in folders}
    prompt = [1] + [3 + (7 * i) % 1000 for i in range(args.prompt_tokens - 1)]

    rounds: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, llm in engines.items():
            rounds[name].append(decode_rate(llm, prompt, args.decode_tokens))
    memory = {name: weight_bytes(llm.engine.model) for name, llm in engines.items()}
    fp32_rate = statistics.median(rounds["fp32"])
    results = {}
    for name in engines:
        rate = statistics.median(rounds[name])
        results[name] = {
            "dtype": str(engines[name].engine.dtype).removeprefix("torch."),
            "decode_tokens_per_s": round(rate, 3),
            "decode_tokens_per_s_rounds": [round(r, 3) for r in rounds[name]],
            "speedup_vs_fp32": round(rate / fp32_rate, 3),
            "weight_bytes": memory[name]["total"],
            "weight_fraction_of_fp32": round(memory[name]["total"] / memory["fp32"]["total"], 4),
            "linear_weight_bytes": memory[name]["linears"],
            "linear_weight_fraction_of_fp32": round(
                memory[name]["linears"] / memory["fp32"]["linears"], 4),
        }
    for name, goal in GOALS.items():
        results[name]["goals"] = {
            "speedup": goal["speedup"], "memory": goal["memory"],
            "speedup_met": results[name]["speedup_vs_fp32"] >= goal["speedup"],
            "memory_met_total": results[name]["weight_fraction_of_fp32"] <= goal["memory"],
            "memory_met_linears": results[name]["linear_weight_fraction_of_fp32"] <= goal["memory"],
        }
    result = {
        "benchmark": "quantization", "machine": machine_description(), "notes": args.notes,
        "shape": SHAPES[args.shape], "parameters": sum(
            p.numel() for p in engines["fp32"].engine.model.parameters()),
        "cpu_threads": torch.get_num_threads(), "rounds": args.rounds,
        "decode_tokens": args.decode_tokens, "prompt_tokens": args.prompt_tokens,
        "results": results,
    }
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--cpu-threads", type=int, default=None)
    add_run_args(parser, "the tiny shape, 1 round of 4 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.rounds, args.decode_tokens = "tiny", 1, 4
    output = output_path(args.output, "quantization-cpu.json", args.quick)

    with tempfile.TemporaryDirectory(prefix="pagoda-quant-bench-") as tmp:
        result = measure(args, Path(tmp))
    output.write_text(json.dumps(result, indent=2) + "\n")
    results = result["results"]
    for name, row in results.items():
        print(f"{name:5} {row['dtype']:9} {row['decode_tokens_per_s']:8.2f} tok/s "
              f"x{row['speedup_vs_fp32']:.2f}  weights {row['weight_bytes'] / 2**20:8.1f} MiB "
              f"({row['weight_fraction_of_fp32']:.1%}; linears "
              f"{row['linear_weight_fraction_of_fp32']:.1%})")
    return result


if __name__ == "__main__":
    main()
