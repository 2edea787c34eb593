"""What every handler of one app shares: the engine client, the settings, metrics, admission."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jinja2

from pagoda.adapters.openai.errors import invalid_param, model_not_found, overloaded
from pagoda.adapters.openai.logprobs import TokenStrings
from pagoda.adapters.common.metrics import ServerMetrics
from pagoda.adapters.openai.protocol import ChatMessage
from pagoda.adapters.openai.settings import ServerSettings
from pagoda.adapters.openai.tools.messages import tool_calls
from pagoda.backend.engine_client import EngineClient

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class ServerState:
    def __init__(
        self, client: EngineClient, settings: ServerSettings, metrics: ServerMetrics | None = None
    ) -> None:
        self.client = client
        self.settings = settings
        self.max_model_len = client.info.max_model_len
        # Shared with another adapter on the same app and engine (the attached FastChat worker).
        self.metrics = metrics if metrics is not None else ServerMetrics(client)
        self.token_strings = TokenStrings(client.info.tokenizer)
        # Prompts this app submitted that have not produced their first output yet. The engine's
        # own waiting count lags by up to a step, so a burst would slip past it alone.
        self._num_queued = 0

    def resolve_model(self, requested: str | None) -> str:
        """The model name a response reports; an unknown name is a 404."""
        if requested is None:
            return self.settings.model_name
        if requested not in self.settings.served_model_names:
            raise model_not_found(requested)
        return requested

    @contextlib.contextmanager
    def admit(self, num_prompts: int) -> Iterator[None]:
        """Hold `num_prompts` places in the queue while they wait to be accepted, or refuse them
        with 503 when the waiting queue is already at its limit."""
        limit = self.settings.max_waiting_requests
        if limit is not None:
            num_waiting = max(self._num_queued, self.client.snapshot.num_waiting)
            if num_waiting + num_prompts > limit:
                raise overloaded(num_waiting)
        self._num_queued += num_prompts
        try:
            yield
        finally:
            self._num_queued -= num_prompts

    def render_chat(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool | None,
        chat_template_kwargs: dict[str, Any] | None,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        if not messages:
            raise invalid_param("messages must contain at least one message", "messages")
        conversation = [_message_dict(index, message) for index, message in enumerate(messages)]
        try:
            return self.client.render_chat(
                conversation,
                chat_template=self.settings.chat_template,
                add_generation_prompt=add_generation_prompt is not False,
                chat_template_kwargs=chat_template_kwargs,
                tools=tools,
            )
        except (ValueError, TypeError, jinja2.TemplateError) as error:
            # A template that raises (an unsupported role or turn order) refuses the conversation.
            message = f"messages: the chat template failed: {error}"
            raise invalid_param(message, "messages") from None


def _message_dict(index: int, message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it: text parts joined into one string (most templates
    only handle string content), tool calls with their arguments as objects (see tool_calls)."""
    param = f"messages[{index}]"
    if message.role not in CHAT_ROLES:
        raise invalid_param(
            f"{param}.role must be one of {', '.join(CHAT_ROLES)}, got {message.role!r}",
            f"{param}.role",
        )
    content = message.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        parts = []
        for part_index, part in enumerate(content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid_param(
                    f"{param}.content[{part_index}]: only text parts are supported, got type "
                    f"{part.get('type')!r}",
                    f"{param}.content",
                )
            parts.append(part["text"])
        text = "\n".join(parts)
    result: dict[str, Any] = {"role": message.role, "content": text}
    if message.name is not None:
        result["name"] = message.name
    if message.role == "tool":
        if message.tool_call_id is None:
            raise invalid_param(f"{param}.tool_call_id is required for a tool message",
                                f"{param}.tool_call_id")
        result["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        result["tool_calls"] = tool_calls(param, message.tool_calls)
    return result
