"""OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models and friends."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagoda.backend.lazy import lazy_attributes

if TYPE_CHECKING:
    from pagoda.adapters.openai.app import create_app
    from pagoda.adapters.openai.settings import ServerSettings

# Imported on first use: `pagoda serve --help` reads settings.py without the web stack.
__getattr__ = lazy_attributes(__name__, {
    "ServerSettings": "pagoda.adapters.openai.settings",
    "create_app": "pagoda.adapters.openai.app",
})

__all__ = ["ServerSettings", "create_app"]
