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
import asyncio
import dataclasses
import logging
import subprocess
import sys
from pathlib import Path

from pagoda.adapters.common.engine_args import add_engine_args, engine_config_from_args
from pagoda.adapters.fastchat.server import (
    add_serve_worker_args,
    add_worker_args,
    attached_worker_from_args,
    run_worker,
)
from pagoda.adapters.openai.settings import add_server_args, settings_from_args
from pagoda.backend.config import EngineConfig
from pagoda.backend.demo import build_demo_model
from pagoda.backend.engine_client import EngineClient, Prompt
from pagoda.backend.outputs import RequestOutput
from pagoda.backend.sampling_params import RequestOutputKind, SamplingParams

# The benchmark scripts live in the repository, not in the installed package.
BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
BENCHMARKS = {"throughput": "throughput.py", "serving": "serving.py", "sharing": "sharing.py",
              "memory": "memory.py", "fastchat-worker": "fastchat_worker.py", "plots": "plots.py",
              "structured": "structured.py"}
DEFAULT_PROMPTS = ["The quick brown fox", "Once upon a time", "def fibonacci(n):"]


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
        outputs = generate_offline(config, args, params)
    except ValueError as error:
        parser.error(str(error))
    for output in outputs:
        print(f"{output.prompt!r} -> {output.outputs[0].text!r}")
    return 0


def generate_offline(
    config: EngineConfig, args: argparse.Namespace, params: SamplingParams
) -> list[RequestOutput]:
    """`pagoda generate` and `pagoda chat`: every prompt's final output, in order. Raises
    ValueError for a bad engine flag, RequestRejected for a prompt the engine refuses."""
    with EngineClient.from_config(config) as client:
        if args.command == "chat":
            message = {"role": "user", "content": args.message}
            prompts: list[Prompt] = [client.render_chat([message])]
        else:
            prompts = list(args.prompt or DEFAULT_PROMPTS)
        return asyncio.run(_final_outputs(client, prompts, params))


async def _final_outputs(
    client: EngineClient, prompts: list[Prompt], params: SamplingParams
) -> list[RequestOutput]:
    final_only = dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)

    async def final(request_id: str, prompt: Prompt) -> RequestOutput:
        (output,) = [output async for output in client.generate(request_id, prompt, final_only)]
        return output

    return await asyncio.gather(*(final(f"cli-{i}", p) for i, p in enumerate(prompts)))


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
