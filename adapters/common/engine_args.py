"""The engine's command-line flags, shared by every `pagoda` command that loads a model."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields

from pagoda.backend.config import EngineConfig
from pagoda.backend.pooling import POOLING_TYPES

MODEL_ENV = "PAGODA_MODEL"


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags for every EngineConfig field, named as vLLM names them."""
    group = parser.add_argument_group("engine")
    # $PAGODA_MODEL lets a container image pick its model without a shell in its command line.
    group.add_argument("--model", default=os.environ.get(MODEL_ENV) or None,
                       help=f"local folder or hub id (default: ${MODEL_ENV}, else the demo model)")
    group.add_argument("--tokenizer", default=None)
    group.add_argument("--revision", default=None)
    group.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--num-kv-blocks", type=int, default=None)
    group.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                       help="KV cache budget in bytes (CPU default: 2 GiB)")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    group.add_argument("--max-num-seqs", type=int, default=256)
    group.add_argument("--max-num-batched-tokens", type=int, default=2048)
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=True)
    group.add_argument("--allow-pickle-weights", action="store_true",
                       help="allow loading pickle (.bin) weights, which can run arbitrary code")
    group.add_argument("--trust-remote-code", action="store_true")
    group.add_argument("--enforce-eager", action="store_true",
                       help="run decode steps eagerly instead of replaying CUDA graphs")
    group.add_argument("--cuda-graph-sizes", type=_batch_sizes, default=None,
                       help="decode batch sizes to capture CUDA graphs for, comma-separated "
                            "(default: 1,2,4,8, then every 8 up to 64 and every 16 up to "
                            "--max-num-seqs)")
    group.add_argument("--static-decode-buffers", action="store_true",
                       help="run decode steps through the CUDA graphs' padded static buffers "
                            "even without graphs (for testing that path on a CPU)")
    group.add_argument("--pooling", choices=POOLING_TYPES, default="last",
                       help="how /v1/embeddings pools the final hidden states: the last "
                            "token's, or their mean (L2-normalized either way)")


def _batch_sizes(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated batch sizes, got {text!r}"
        ) from None


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from parsed flags; raises ValueError naming the field of a bad value."""
    return EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig)})
