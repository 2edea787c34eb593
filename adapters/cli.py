"""The `pagoda` command line.

    pagoda generate [--prompt TEXT ...] [engine flags]   offline generation (demo model by default)
    pagoda chat [--message TEXT] [engine flags]          one chat turn through the chat template
    pagoda demo-model --output DIR                       write the built-in demo model to DIR
    pagoda serve [server flags] [engine flags]           serve the OpenAI-compatible HTTP API
    pagoda worker [worker flags] [engine flags]          serve as a FastChat model worker
    pagoda bench KIND [flags]                            run benchmarks/KIND.py from a checkout
                                                         (throughput, serving, sharing, fastchat-worker, plots)

Engine flags follow vLLM's names (--dtype, --device, --block-size, --num-kv-blocks, ...).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from dataclasses import asdict, fields
from pathlib import Path

from pagoda.adapters.fastchat.server import (
    add_serve_worker_args,
    add_worker_args,
    attached_worker_from_args,
    run_worker,
)
from pagoda.adapters.openai.settings import add_server_args, settings_from_args
from pagoda.backend import LLM, EngineConfig, SamplingParams
from pagoda.backend.demo import build_demo_model

MODEL_ENV = "PAGODA_MODEL"
# The benchmark scripts live in the repository, not in the installed package.
BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
BENCHMARKS = {"throughput": "throughput.py", "serving": "serving.py", "sharing": "sharing.py",
              "memory": "memory.py", "fastchat-worker": "fastchat_worker.py", "plots": "plots.py"}
DEFAULT_PROMPTS = ["The quick brown fox", "Once upon a time", "def fibonacci(n):"]


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


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f.name) for f in fields(EngineConfig)})


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="offline generation for a few prompts")
    generate.add_argument("--prompt", action="append", help="repeatable; default: demo prompts")
    add_sampling_args(generate)
    add_engine_args(generate)

    chat = commands.add_parser("chat", help="one chat turn through the model's chat template")
    chat.add_argument("--message", default="Hello! What can you do?")
    add_sampling_args(chat)
    add_engine_args(chat)

    demo = commands.add_parser("demo-model", help="write the built-in demo model to a folder")
    demo.add_argument("--output", required=True)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_server_args(serve)
    add_serve_worker_args(serve)
    add_engine_args(serve)

    worker = commands.add_parser("worker", help="serve the model as a FastChat model worker")
    add_worker_args(worker)
    add_engine_args(worker)

    bench = commands.add_parser("bench", help="run a benchmark script of benchmarks/",
                                description="Runs benchmarks/KIND.py with the flags that follow "
                                            "(see `pagoda bench KIND --help`).")
    bench.add_argument("kind", choices=sorted(BENCHMARKS))
    bench.add_argument("flags", nargs=argparse.REMAINDER, help="flags of the script")
    return parser


def run_benchmark(kind: str, flags: list[str]) -> int:
    script = BENCHMARKS_DIR / BENCHMARKS[kind]
    if not script.exists():
        raise SystemExit(f"pagoda bench: {script} not found; the benchmarks run from a checkout "
                         "of the repository (pip install -e '.[bench]')")
    return subprocess.run([sys.executable, str(script), *flags], check=False).returncode


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo-model":
        print(build_demo_model(args.output))
        return 0
    if args.command == "bench":
        return run_benchmark(args.kind, args.flags)
    if args.command == "serve":
        return serve_from_args(parser, args)
    if args.command == "worker":
        try:
            return run_worker(args, engine_config_from_args(args))
        except ValueError as error:
            parser.error(str(error))
    try:
        config = engine_config_from_args(args)
        params = sampling_params_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    llm = LLM(**asdict(config))
    if args.command == "chat":
        outputs = llm.chat([{"role": "user", "content": args.message}], params)
    else:
        outputs = llm.generate(args.prompt or DEFAULT_PROMPTS, params)
    for output in outputs:
        print(f"{output.prompt!r} -> {output.outputs[0].text!r}")
    return 0


def serve_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        config = engine_config_from_args(args)
        settings = settings_from_args(args)
        fastchat = attached_worker_from_args(
            args, config, settings.host, settings.port, settings.served_model_names,
            settings.max_waiting_requests,
        )
    except ValueError as error:
        parser.error(str(error))
    # Imported here: the web stack is only needed by this command.
    from pagoda.adapters.openai.server import run_server

    if fastchat is None:
        run_server(config, settings)
    else:
        run_server(config, settings, fastchat.routes, fastchat.keep_registered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
