"""Start-up failures said in one line (what was wrong, what to do), found before the slow part
where possible: a server's port is checked before its model loads.

Light on imports: the CLI catches StartupError without loading the engine's modules.
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagoda.backend.config import EngineConfig
    from pagoda.backend.engine_client import EngineClient

_PORT_HINTS = {
    errno.EADDRINUSE: "stop what uses it or choose another --port",
    errno.EADDRNOTAVAIL: "--host must be an address of this machine (127.0.0.1, 0.0.0.0, ...)",
    errno.EACCES: "ports below 1024 need privileges: choose a --port above 1023",
}


class StartupError(Exception):
    """Why a command cannot start, as one line a user can act on."""


def check_port_free(host: str, port: int) -> None:
    """Raise StartupError unless a server can listen on host:port now. Bound as uvicorn binds
    (SO_REUSEADDR), so a port whose old connections linger in TIME_WAIT counts as free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except (OSError, OverflowError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            hint = _PORT_HINTS.get(getattr(error, "errno", None), "check --host and --port")
            raise StartupError(f"cannot listen on {host}:{port} ({reason}): {hint}") from None


def start_engine(config: EngineConfig) -> EngineClient:
    """Load the model and build its engine (EngineClient.from_config); a model that cannot be
    found or read, or a configuration that cannot work with it, is a StartupError."""
    # NOTE: imported here, not above: the CLI imports this module to catch StartupError, and
    # must stay quick for --help and for errors found before the model loads.
    from pagoda.backend.engine_client import EngineClient

    try:
        return EngineClient.from_config(config)
    except (ValueError, OSError) as error:
        # transformers' OSErrors span lines (a URL to check, advice about the hub); the first
        # line says what is missing.
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        model = config.model or "the demo model"
        if isinstance(error, OSError):
            reason = (f"cannot read model {model}: {reason} (--model takes a Hugging Face "
                      "checkpoint folder or hub id)")
        raise StartupError(reason) from error
