"""The engine's command-line flags, shared by every `pagoda` command that loads a model."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields

from pagoda.adapters.common.listener import size_arg
from pagoda.backend.config import DTYPES, EngineConfig
from pagoda.backend.pooling_params import POOLING_TYPES
from pagoda.backend.quantization.names import ONLINE_SCHEMES, QUANTIZATION_METHODS
from pagoda.backend.structured.params import BACKENDS, DEFAULT_BACKEND

MODEL_ENV = "PAGODA_MODEL"
CPU_THREADS_ENV = "PAGODA_CPU_THREADS"


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags for every EngineConfig field, named as vLLM names them."""
    group = parser.add_argument_group("engine")
    # Environment variables let a container image pick these without a shell in its command.
    group.add_argument("--model", default=os.environ.get(MODEL_ENV) or None,
                       help=f"local Hugging Face folder or hub id (default: ${MODEL_ENV}, else "
                            "the demo model)")
    group.add_argument("--tokenizer", default=None,
                       help="folder or hub id of the tokenizer (default: the model's)")
    group.add_argument("--revision", default=None,
                       help="hub branch, tag or commit of --model (default: the main branch)")
    group.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                       help="weights and compute type; auto: float32 on CPU, the checkpoint's "
                            "half type on CUDA")
    group.add_argument("--device", default="auto",
                       help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    # NOTE: argparse applies `type` to a string default, so a bad $PAGODA_CPU_THREADS is
    # reported as a bad --cpu-threads.
    group.add_argument("--cpu-threads", type=int, default=os.environ.get(CPU_THREADS_ENV) or None,
                       help=f"torch threads for CPU compute (default: ${CPU_THREADS_ENV}, else "
                            "$OMP_NUM_THREADS, else the cores this process may run on); next "
                            "to other busy processes, fewer threads than cores is faster")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of sampling for requests that set none")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    group.add_argument("--num-kv-blocks", type=int, default=None,
                       help="KV cache blocks (default: as many as the KV memory budget holds)")
    group.add_argument("--kv-cache-memory-bytes", type=size_arg, default=None,
                       help="KV cache budget: bytes, or with a unit: 512MiB, 4GiB, 2G (K, M, G, "
                            "T: powers of 1024; KB, MB, GB: of 1000), 1.5e9 (default on CPU: "
                            "2 GiB, capped by what max-num-seqs x max-model-len can use and by "
                            "a quarter of the machine's memory; on CUDA: see "
                            "--gpu-memory-utilization)")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="on CUDA, the fraction of free GPU memory the KV cache takes")
    group.add_argument("--max-num-seqs", type=int, default=256,
                       help="sequences one engine step may run")
    group.add_argument("--max-num-batched-tokens", type=int, default=2048,
                       help="tokens one engine step may compute (prefill chunks + decodes)")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="longest prompt + output in tokens (default: the model's maximum, "
                            "lowered to what the KV cache holds)")
    group.add_argument("--quantization", "-q", default=None, choices=QUANTIZATION_METHODS,
                       help="how the weights are quantized; default: as the checkpoint's "
                            "config.json says (gptq, awq, auto-round, compressed-tensors); for "
                            f"an unquantized checkpoint, {' or '.join(ONLINE_SCHEMES)} "
                            "quantizes its linear layers at load (weight-only, per channel)")
    group.add_argument("--enforce-eager", action="store_true",
                       help="on CUDA, run decode steps eagerly instead of through CUDA graphs")
    group.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=None,
                       help="batch sizes to capture CUDA graphs for (default: 1, 2, 4, 8, then "
                            "every 8 to 64, then every 16 to max-num-seqs)")
    group.add_argument("--static-decode-buffers", action="store_true",
                       help="run decode steps through the CUDA graphs' padded buffers even "
                            "without graphs (for testing that path on CPU)")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=True,
                       help="reuse the KV blocks of prompt prefixes seen before")
    group.add_argument("--allow-pickle-weights", action="store_true",
                       help="allow loading pickle (.bin) weights, which can run arbitrary code")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="let the hub's model repository run its own Python code (for its "
                            "config or tokenizer)")
    group.add_argument("--pooling", choices=POOLING_TYPES, default="last",
                       help="how /v1/embeddings pools the final hidden states: the last "
                            "token's, or their mean (L2-normalized either way)")
    group.add_argument("--generation-config", default="auto",
                       help="default sampling settings of requests that leave them unset: auto "
                            "(temperature, top_p, top_k, min_p, repetition_penalty from the "
                            "model's generation_config.json; its max_new_tokens caps max_tokens), "
                            "vllm (none: the API's defaults), or a folder with that file")
    group.add_argument("--structured-outputs-backend", default=DEFAULT_BACKEND,
                       choices=sorted(BACKENDS),
                       help="grammar engine for response_format, tool_choice and guided_* "
                            "(guidance and llguidance name the same one)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from parsed flags; raises ValueError naming the field of a bad value."""
    return EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig)})

