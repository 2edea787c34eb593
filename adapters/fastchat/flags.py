"""The flags of `pagoda worker`, and those that attach a FastChat worker to `pagoda serve`.

Kept free of the web stack's and the engine's imports, so that `--help` answers at once.
"""

from __future__ import annotations

import argparse

from pagoda.adapters.common.listener import add_listener_args
from pagoda.backend.demo import DEMO_MODEL_NAME

DEFAULT_CONTROLLER_ADDRESS = "http://localhost:21001"  # FastChat's default
DEFAULT_WORKER_PORT = 21002  # FastChat's default
# FastChat's vLLM worker default: a batching engine queues requests itself, so the semaphore
# only caps how many a worker accepts at once.
DEFAULT_LIMIT_WORKER_CONCURRENCY = 1024


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("FastChat worker")
    add_listener_args(group, default_port=DEFAULT_WORKER_PORT, overloaded="error 42903",
                      too_large="error 40001")
    group.add_argument("--controller-address", default=DEFAULT_CONTROLLER_ADDRESS,
                       help="URL of the FastChat controller to register with")
    group.add_argument("--worker-address", default=None,
                       help="URL the controller and FastChat's servers reach this worker at; "
                            "{hostname} stands for this machine's host name, so replicas of one "
                            "container each register their own (default: http://HOST:PORT)")
    group.add_argument("--model-names", type=_comma_list, default=None,
                       help="comma-separated names to serve the model under (default: the model "
                            f"folder's name, or {DEMO_MODEL_NAME}); FastChat's UIs pick prompt "
                            "formats by name, e.g. vicuna-* for the demo model")
    group.add_argument("--conv-template", default=None,
                       help="FastChat conversation template name (default: FastChat's choice "
                            "for the model path or names)")
    group.add_argument("--limit-worker-concurrency", type=int,
                       default=DEFAULT_LIMIT_WORKER_CONCURRENCY,
                       help="requests served at once; more wait for a slot")
    group.add_argument("--no-register", action="store_true",
                       help="do not register with the controller")


def add_serve_worker_args(parser: argparse.ArgumentParser) -> None:
    """`pagoda serve`'s flags that add the FastChat worker to it."""
    group = parser.add_argument_group("FastChat worker (optional)")
    group.add_argument("--fastchat-controller", default=None, metavar="URL",
                       help="also serve FastChat's worker protocol, registered with this "
                            "controller, under the --served-model-name names (default: off)")
    group.add_argument("--fastchat-worker-address", default=None, metavar="URL",
                       help="URL the controller reaches this server at; {hostname} stands for "
                            "this machine's host name (default: http://HOST:PORT)")
    group.add_argument("--fastchat-conv-template", default=None, metavar="NAME",
                       help="FastChat conversation template name (default: FastChat's choice "
                            "for the model path or names)")


def _comma_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names")
    return names
