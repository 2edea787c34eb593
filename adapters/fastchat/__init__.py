"""Pagoda as a FastChat model worker: FastChat's worker protocol served from Pagoda's engine.

A worker registers with a FastChat controller and answers its peers (the controller, FastChat's
OpenAI API server, its Gradio UIs) exactly as fastchat 0.2.36's workers do. fschat itself is
optional: it is imported only to look up conversation templates when it is installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagoda.backend.lazy import lazy_attributes

if TYPE_CHECKING:
    from pagoda.adapters.fastchat.registration import ControllerRegistration
    from pagoda.adapters.fastchat.worker import FastChatWorker
    from pagoda.adapters.fastchat.worker_app import worker_routes

# Imported on first use: `pagoda worker --help` reads flags.py without the web stack.
__getattr__ = lazy_attributes(__name__, {
    "ControllerRegistration": "pagoda.adapters.fastchat.registration",
    "FastChatWorker": "pagoda.adapters.fastchat.worker",
    "worker_routes": "pagoda.adapters.fastchat.worker_app",
})

__all__ = ["ControllerRegistration", "FastChatWorker", "worker_routes"]
