"""The engine's command-line flags, shared by every `pagoda` command that loads a model."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields

from pagoda.backend.config import EngineConfig
from pagoda.backend.structured import BACKENDS, DEFAULT_BACKEND

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
    group.add_argument("--structured-outputs-backend", default=DEFAULT_BACKEND,
                       choices=sorted(BACKENDS),
                       help="grammar engine for response_format, tool_choice and guided_* "
                            "(guidance and llguidance name the same one)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from parsed flags; raises ValueError naming the field of a bad value."""
    return EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig)})
