"""Flags both servers (`pagoda serve`, `pagoda worker`) take, and their defaults.

Kept free of the web stack's imports: the CLI builds every parser from here for `--help`, which
must not wait for uvicorn, starlette or the engine to import.
"""

from __future__ import annotations

import argparse

from pagoda.backend.config import parse_bytes

# Both servers' default body limit (FastChat's own requests are a few KiB; OpenAI's may carry
# long conversations).
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024**2
DEFAULT_SHUTDOWN_TIMEOUT = 30.0


def size_arg(text: str) -> int:
    """argparse type for byte sizes: 512MiB, 4GiB, 2G, 1.5e9, or a plain number of bytes."""
    try:
        return parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_listener_args(
    group: argparse._ArgumentGroup, *, default_port: int, overloaded: str, too_large: str
) -> None:
    """--host, --port and the limits both servers enforce; `overloaded` and `too_large` say how
    this server answers past them (its protocol's error)."""
    group.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (0.0.0.0: every interface)")
    group.add_argument("--port", type=int, default=default_port, help="port to listen on")
    group.add_argument("--max-waiting-requests", type=int, default=None,
                       help=f"answer {overloaded} to new requests while this many wait "
                            "(default: no limit)")
    group.add_argument("--max-request-bytes", type=size_arg, default=DEFAULT_MAX_REQUEST_BYTES,
                       help=f"largest accepted request body, in bytes or with a unit such as "
                            f"1MiB ({too_large} above it; default: "
                            f"{DEFAULT_MAX_REQUEST_BYTES // 2**20} MiB)")
    group.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT,
                       help="after SIGTERM: refuse new requests (503) and give those in flight "
                            "this many seconds to finish, then exit")
