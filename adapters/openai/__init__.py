"""OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models and friends."""

from pagoda.adapters.openai.app import create_app
from pagoda.adapters.openai.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
