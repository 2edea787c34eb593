"""Random-weight checkpoints of real model shapes, built locally (nothing can be downloaded on the
GPU machines): the demo tokenizer with the real vocabulary size (ids past the tokenizer's own
vocabulary decode to nothing, which throughput does not care about).

    python benchmarks/gpu/synthetic.py --shape llama-3.2-1b --output /tmp/llama-1b [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pagoda.backend.demo import demo_model_path

SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    # For --dry-run on a CPU: the same code path in seconds.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=4096,
                 tie_word_embeddings=False, rope_theta=10000.0),
}


def build(shape: str, output: Path, dtype: torch.dtype, device: str) -> Path:
    """Write a random-weight checkpoint of `shape` (weights N(0, 0.02), as initialised by
    transformers) with the demo tokenizer into `output`; returns it."""
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, torch_dtype=dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    for item in demo_model_path().iterdir():
        if "token" in item.name or item.suffix == ".model":
            shutil.copy(item, output / item.name)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(build(args.shape, args.output, getattr(torch, args.dtype), args.device))


if __name__ == "__main__":
    main()
