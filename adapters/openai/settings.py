"""Settings of the OpenAI-compatible server, and the `pagoda serve` flags that set them.

Engine flags (--model, --dtype, --block-size, ...) are the CLI's shared engine flags; these are
the server's own, named as vLLM names them where vLLM has one.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pagoda.adapters.common.listener import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_SHUTDOWN_TIMEOUT,
    add_listener_args,
)
from pagoda.adapters.openai.reasoning import REASONING_PARSERS
from pagoda.adapters.openai.tools.parsers import TOOL_PARSERS
from pagoda.backend.demo import DEMO_MODEL_NAME

API_KEY_ENV = "PAGODA_API_KEY"
# OpenAI's own limit on top_logprobs, and vLLM's default --max-logprobs.
DEFAULT_MAX_LOGPROBS = 20


@dataclass(slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    # The names clients use in `model`; the first is the one responses report.
    served_model_names: list[str] = field(default_factory=lambda: [DEMO_MODEL_NAME])
    api_key: str | None = None
    chat_template: str | None = None  # template text overriding the model's
    # Requests waiting for their first token beyond which new ones get 503 (None: no limit).
    max_waiting_requests: int | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_logprobs: int = DEFAULT_MAX_LOGPROBS
    enable_force_include_usage: bool = False
    # Comment lines that keep idle SSE connections open through proxies (0 disables them).
    sse_ping_seconds: float = 15.0
    uvicorn_log_level: str = "info"
    # Seconds requests in flight get to finish after SIGTERM.
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    # tool_choice "auto" (the default with tools): allowed, and read with this parser.
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None  # fills reasoning_content

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ValueError(
                f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}"
            )
        for name in ("max_request_bytes", "max_logprobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if self.sse_ping_seconds < 0:
            raise ValueError(f"sse_ping_seconds must be >= 0, got {self.sse_ping_seconds}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {sorted(TOOL_PARSERS)}, "
                             f"got {self.tool_call_parser!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("enable_auto_tool_choice needs a tool_call_parser")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {sorted(REASONING_PARSERS)}, "
                             f"got {self.reasoning_parser!r}")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


def add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    add_listener_args(group, default_port=_default("port"), overloaded="503",
                      too_large="413")
    group.add_argument("--served-model-name", nargs="+", default=None,
                       help="name(s) clients pass as `model` (default: --model, or the demo "
                            "model's name)")
    group.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help="require 'Authorization: Bearer KEY' on every path but /health "
                            f"(default: ${API_KEY_ENV}, else no key)")
    group.add_argument("--chat-template", default=None,
                       help="file with a Jinja chat template replacing the model's (default: the "
                            "model's own)")
    group.add_argument("--max-logprobs", type=int, default=DEFAULT_MAX_LOGPROBS,
                       help="largest logprobs / top_logprobs a request may ask for")
    group.add_argument("--enable-force-include-usage", action="store_true",
                       help="end every stream with a usage chunk, as if include_usage were set")
    group.add_argument("--sse-ping-seconds", type=float, default=_default("sse_ping_seconds"),
                       help="seconds between comment lines that keep idle streams open through "
                            "proxies (0: none)")
    group.add_argument("--uvicorn-log-level", default=_default("uvicorn_log_level"),
                       choices=["critical", "error", "warning", "info", "debug", "trace"],
                       help="uvicorn's log level (info logs every request)")
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='let the model decide whether to call tools (tool_choice "auto", the '
                            "default with tools); needs --tool-call-parser")
    group.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                       help="how the model writes tool calls (hermes: <tool_call> JSON, as "
                            "Hermes, Qwen 2.5/3 and the demo model's template; default: none)")
    group.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                       help="put the model's <think> text in message.reasoning_content "
                            "(default: none)")


def _default(name: str) -> Any:
    # NOTE: a slots dataclass keeps its defaults in its fields, not as class attributes.
    return next(item.default for item in fields(ServerSettings) if item.name == name)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """ServerSettings from parsed flags; raises ValueError naming the flag's field."""
    names = args.served_model_name or [args.model or DEMO_MODEL_NAME]
    chat_template = None
    if args.chat_template is not None:
        try:
            chat_template = Path(args.chat_template).read_text()
        except OSError as error:
            raise ValueError(f"chat_template: cannot read {args.chat_template}: {error}") from None
    return ServerSettings(
        host=args.host,
        port=args.port,
        served_model_names=names,
        api_key=args.api_key or None,
        chat_template=chat_template,
        max_waiting_requests=args.max_waiting_requests,
        max_request_bytes=args.max_request_bytes,
        max_logprobs=args.max_logprobs,
        enable_force_include_usage=args.enable_force_include_usage,
        sse_ping_seconds=args.sse_ping_seconds,
        uvicorn_log_level=args.uvicorn_log_level,
        shutdown_timeout=args.shutdown_timeout,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
    )
