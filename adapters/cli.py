"""The `pagoda` command line.

    pagoda generate [--prompt TEXT ...] [engine flags]   offline generation (demo model by default)
    pagoda chat [--message TEXT] [engine flags]          one chat turn through the chat template
    pagoda demo-model --output DIR                       write the built-in demo model to DIR
    pagoda serve [server flags] [engine flags]           serve the OpenAI-compatible HTTP API
    pagoda worker [worker flags] [engine flags]          serve as a FastChat model worker
    pagoda architectures                                 the model architectures Pagoda runs
    pagoda bench KIND [flags]                            run a benchmark of benchmarks/ (from a
                                                         checkout; `pagoda bench --help` lists them)

Engine flags follow vLLM's names (--dtype, --device, --block-size, --num-kv-blocks, ...);
`pagoda COMMAND --help` shows every flag with its default.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from pagoda.adapters.common.engine_args import add_engine_args, engine_config_from_args
from pagoda.adapters.common.startup import StartupError, check_port_free, start_engine
from pagoda.adapters.fastchat.flags import add_serve_worker_args, add_worker_args
from pagoda.adapters.openai.settings import add_server_args, settings_from_args

# NOTE: the engine, torch, transformers and the web stack are imported inside the commands that
# use them: importing them takes seconds, which `--help` and flag errors should not wait for.
if TYPE_CHECKING:
    from pagoda.backend.config import EngineConfig
    from pagoda.backend.engine_client import EngineClient, Prompt
    from pagoda.backend.outputs import RequestOutput
    from pagoda.backend.sampling_params import SamplingParams

# The benchmark scripts live in the repository, not in the installed package.
BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
# kind -> (script, what it measures)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "throughput": ("throughput.py", "offline tokens/s against transformers' generate"),
    "serving": ("serving.py", "pagoda serve under Poisson arrivals: TTFT, TPOT, sustainable rate"),
    "sharing": ("sharing.py", "KV blocks saved by parallel sampling, beams and prefix caching"),
    "memory": ("memory.py", "peak KV blocks and process memory per workload"),
    "overhead": ("overhead.py", "host time per decode step, phase by phase"),
    "cpu-threads": ("cpu_threads.py", "offline tokens/s per CPU thread count, beside a busy "
                                      "process"),
    "fastchat-worker": ("fastchat_worker.py", "pagoda worker against FastChat's model_worker "
                                              "behind its controller"),
    "compare-checkouts": ("compare_checkouts.py", "two checkouts' offline tokens/s in "
                                                  "alternating rounds (no-slowdown checks)"),
    "block-pool-startup": ("block_pool_startup.py", "KV block pool start-up and allocation "
                                                    "throughput at millions of blocks"),
    "structured": ("structured.py", "tokens/s under a JSON schema against unconstrained"),
    "quantization": ("quantization.py", "batch-1 decode tokens/s and weight memory: fp32, "
                                        "bf16, 8-bit and 4-bit weights"),
    "routing": ("routing.py", "two replicas behind sglang-router: cache_aware against "
                              "round_robin"),
    "plots": ("plots.py", "PNG plots of the result JSONs"),
}
DEFAULT_PROMPTS = ["The quick brown fox", "Once upon a time", "def fibonacci(n):"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written, and ends each flag's help with its default unless the help
    already says what the default is (`default: ...`), as it must when the default is None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or action.default in (None, argparse.SUPPRESS):
            return help_text
        return f"{help_text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """Says what was wrong in one line, where argparse would print the whole usage first."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    group.add_argument("--temperature", type=float, default=0.0,
                       help="sampling temperature; 0 is greedy")
    group.add_argument("--top-p", type=float, default=1.0,
                       help="sample from the smallest set of tokens whose probability reaches this")
    group.add_argument("--top-k", type=int, default=0,
                       help="sample from this many most likely tokens (0: all)")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    from pagoda.backend.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="pagoda", description=__doc__, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, description: str | None = None,
                epilog: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=description or help_text,
                                  epilog=epilog, formatter_class=HelpFormatter)
        # Errors found after parsing are reported by the command's parser ("pagoda serve: ...").
        sub.set_defaults(command_parser=sub)
        return sub

    generate = command("generate", "offline generation for a few prompts")
    generate.add_argument("--prompt", action="append",
                          help="a prompt; repeat for several (default: three demo prompts)")
    add_sampling_args(generate)
    add_engine_args(generate)

    chat = command("chat", "one chat turn through the model's chat template")
    chat.add_argument("--message", default="Hello! What can you do?", help="the user's message")
    add_sampling_args(chat)
    add_engine_args(chat)

    demo = command("demo-model", "write the built-in demo model to a folder")
    demo.add_argument("--output", required=True, help="folder to write (required)")

    serve = command("serve", "serve the OpenAI-compatible HTTP API")
    add_server_args(serve)
    add_serve_worker_args(serve)
    add_engine_args(serve)

    worker = command("worker", "serve the model as a FastChat model worker")
    add_worker_args(worker)
    add_engine_args(worker)

    command("architectures", "print the model architectures Pagoda runs, as a Markdown table")

    kinds = "\n".join(f"  {kind:<16} {about}" for kind, (_, about) in BENCHMARKS.items())
    bench = command("bench", "run a benchmark script of benchmarks/",
                    description="Runs benchmarks/KIND.py with the flags that follow (see\n"
                                "`pagoda bench KIND --help`); from a checkout of the repository.",
                    epilog=f"kinds:\n{kinds}")
    bench.add_argument("kind", choices=list(BENCHMARKS), help="the benchmark to run")
    bench.add_argument("flags", nargs=argparse.REMAINDER, help="flags of the script")
    return parser


def architecture_table() -> str:
    """The README's table of supported architectures, generated from the model registry."""
    from pagoda.backend.models import MODEL_FAMILIES, MODEL_REGISTRY
    from pagoda.backend.models.layers import LONGROPE_ARCHITECTURES, SUPPORTED_ROPE_TYPES

    rows = [
        f"| `{name}` | {MODEL_FAMILIES[name]} | "
        f"`backend/models/{model.__module__.rsplit('.', 1)[-1]}.py` |"
        for name, model in MODEL_REGISTRY.items()
    ]
    return "\n".join([
        "| `architectures` in config.json | models | Pagoda's implementation |",
        "| --- | --- | --- |",
        *rows,
        "",
        f"Rotary position scaling (`rope_scaling` / `rope_parameters`): "
        f"{', '.join(SUPPORTED_ROPE_TYPES)}; longrope for "
        f"{', '.join(f'`{name}`' for name in LONGROPE_ARCHITECTURES)}.",
    ])


def run_benchmark(kind: str, flags: list[str]) -> int:
    script = BENCHMARKS_DIR / BENCHMARKS[kind][0]
    if not script.exists():
        raise StartupError(f"{script} not found; the benchmarks run from a checkout of the "
                           "repository (pip install -e '.[bench]')")
    return subprocess.run([sys.executable, str(script), *flags], check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_command(args.command_parser, args)
    except StartupError as error:
        print(f"pagoda {args.command}: error: {error}", file=sys.stderr)
        return 1


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "demo-model":
        from pagoda.backend.demo import build_demo_model

        print(build_demo_model(args.output))
        return 0
    if args.command == "architectures":
        print(architecture_table())
        return 0
    if args.command == "bench":
        return run_benchmark(args.kind, args.flags)
    if args.command == "serve":
        return serve_from_args(parser, args)
    if args.command == "worker":
        return worker_from_args(parser, args)
    try:
        config = engine_config_from_args(args)
        params = sampling_params_from_args(args)
        outputs = generate_offline(config, args, params)
    except ValueError as error:  # a bad flag, or a prompt the engine refuses
        parser.error(str(error))
    for output in outputs:
        print(f"{output.prompt!r} -> {output.outputs[0].text!r}")
    return 0


def generate_offline(
    config: EngineConfig, args: argparse.Namespace, params: SamplingParams
) -> list[RequestOutput]:
    """`pagoda generate` and `pagoda chat`: every prompt's final output, in order. Raises
    StartupError for a model that cannot load, RequestRejected for a prompt the engine refuses."""
    with start_engine(config) as client:
        if args.command == "chat":
            message = {"role": "user", "content": args.message}
            prompts: list[Prompt] = [client.render_chat([message])]
        else:
            prompts = list(args.prompt or DEFAULT_PROMPTS)
        return asyncio.run(_final_outputs(client, prompts, params))


async def _final_outputs(
    client: EngineClient, prompts: list[Prompt], params: SamplingParams
) -> list[RequestOutput]:
    from pagoda.backend.sampling_params import RequestOutputKind

    final_only = dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)

    async def final(request_id: str, prompt: Prompt) -> RequestOutput:
        (output,) = [output async for output in client.generate(request_id, prompt, final_only)]
        return output

    return await asyncio.gather(*(final(f"cli-{i}", p) for i, p in enumerate(prompts)))


def serve_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        config = engine_config_from_args(args)
        settings = settings_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    # Before the web stack and the model load (seconds to minutes): a busy port is found at once.
    check_port_free(settings.host, settings.port)
    from pagoda.adapters.fastchat.server import attached_worker_from_args
    from pagoda.adapters.openai.server import run_server

    try:
        fastchat = attached_worker_from_args(
            args, config, settings.host, settings.port, settings.served_model_names,
            settings.max_waiting_requests,
        )
    except ValueError as error:
        parser.error(str(error))
    if fastchat is None:
        run_server(config, settings)
    else:
        run_server(config, settings, fastchat.routes, fastchat.keep_registered)
    return 0


def worker_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        config = engine_config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    check_port_free(args.host, args.port)
    from pagoda.adapters.fastchat.server import run_worker

    try:
        return run_worker(args, config)
    except ValueError as error:  # a flag run_worker checks before it loads the model
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
