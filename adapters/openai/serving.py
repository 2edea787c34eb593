"""The flow chat and completions share: body -> validated job -> engine requests -> a JSON answer
or an SSE stream, with metrics and disconnects handled the same way for both.

Endpoints supply `prepare` (request fields -> Job), `response` (final outputs -> one body) and
`chunks` (outputs as they come -> stream chunks); everything about errors, admission, client
disconnects and the SSE framing lives here.
"""

from __future__ import annotations

import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagoda.adapters.common.disconnect import ClientDisconnected, unless_disconnected
from pagoda.adapters.openai.errors import OpenAIError, engine_error
from pagoda.adapters.openai.generation import PromptStreams
from pagoda.adapters.common.metrics import RequestTracker
from pagoda.adapters.openai.parsing import read_json
from pagoda.adapters.openai.protocol import SamplingRequest, UsageInfo
from pagoda.adapters.openai.state import ServerState
from pagoda.backend.engine_client import Prompt
from pagoda.backend.errors import EngineError
from pagoda.backend.outputs import RequestOutput
from pagoda.backend.sampling_params import SamplingParams

# nginx's code for "client closed the request": nobody reads it, but access logs show it.
CLIENT_CLOSED_REQUEST = 499


@dataclass(slots=True)
class Job:
    """One validated API request, ready for the engine."""

    request: SamplingRequest
    model: str
    prompts: list[Prompt]
    params: SamplingParams
    # Engine field names -> this request's, for the param of an engine error (see engine_error).
    param_names: dict[str, str]
    include_usage: bool
    request_id: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def stream(self) -> bool:
        return bool(self.request.stream)


Outputs = AsyncIterator[tuple[int, RequestOutput]]


class GenerationEndpoint(ABC):
    id_prefix: str  # "chatcmpl" or "cmpl", as OpenAI's ids start
    # The last event of a stream: chat and completions end with `data: [DONE]`; the Responses
    # API does not.
    done_event: str | None = "[DONE]"

    def __init__(self, state: ServerState) -> None:
        self.state = state

    @abstractmethod
    def prepare(self, body: Any) -> Job:
        """Validate the body; raise OpenAIError naming the bad field."""

    @abstractmethod
    def response(self, job: Job, outputs: dict[int, RequestOutput]) -> BaseModel:
        """The whole answer from each prompt's final output."""

    @abstractmethod
    def chunks(self, job: Job, outputs: Outputs) -> AsyncIterator[BaseModel]:
        """Stream chunks for outputs as they arrive, ending each choice with its finish_reason."""

    @abstractmethod
    def usage_chunk(self, job: Job, usage: UsageInfo) -> BaseModel:
        """The last chunk of a stream with usage: no choices, only usage."""

    def new_request_id(self) -> str:
        return f"{self.id_prefix}-{uuid.uuid4().hex}"

    def sse_event(self, chunk: BaseModel, exclude: set[str] | None) -> str | dict[str, str]:
        """A chunk as an SSE event: `data: {json}` (a dict adds an `event:` name)."""
        return chunk.model_dump_json(exclude=exclude)

    def sse_error(self, job: Job, error: OpenAIError) -> str | dict[str, str]:
        """The event of an engine failure after the headers went: OpenAI's SDK raises on it."""
        return json.dumps({"error": error.info.model_dump()})

    async def handle(self, request: Request) -> Response:
        tracker = self.state.metrics.track()
        try:
            job = self.prepare(await read_json(request, self.state.settings.max_request_bytes))
            streams = PromptStreams(self.state.client, job.request_id, job.prompts, job.params)
            with self.state.admit(len(job.prompts)):
                await unless_disconnected(request, self._start(job, streams))
        except OpenAIError as error:
            tracker.finish("error" if error.status_code == 500 else "rejected")
            raise
        except ClientDisconnected:
            tracker.finish("aborted")
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if job.stream:

            async def close() -> None:
                # The stream's own cleanup does this, unless the client left before it began.
                streams.cancel()
                tracker.finish("aborted")

            return EventSourceResponse(
                self._events(job, streams, tracker), sep="\n",
                ping=self.state.settings.sse_ping_seconds, background=BackgroundTask(close),
            )
        outcome = "aborted"
        try:
            finals = await unless_disconnected(request, self._collect(job, streams, tracker))
            outcome = "success"
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except OpenAIError:
            outcome = "error"
            raise
        finally:
            streams.cancel()
            tracker.finish(outcome)
        return JSONResponse(self.response(job, finals).model_dump(mode="json"))

    async def _start(self, job: Job, streams: PromptStreams) -> None:
        try:
            await streams.start()
        except EngineError as error:
            raise engine_error(error, job.param_names) from None

    async def _collect(
        self, job: Job, streams: PromptStreams, tracker: RequestTracker
    ) -> dict[int, RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        async for index, output in _tracked(job, streams, tracker):
            finals[index] = output
        return finals

    async def _events(
        self, job: Job, streams: PromptStreams, tracker: RequestTracker
    ) -> AsyncIterator[str | dict[str, str]]:
        """An event per chunk, an error event if the engine fails the request, then the done
        event. A client that goes away cancels this generator: no done event then, and the
        engine requests are aborted."""
        exclude = None if job.include_usage else {"usage"}
        finals: dict[int, RequestOutput] = {}
        outcome = "aborted"
        try:
            async for chunk in self.chunks(job, _remember(_tracked(job, streams, tracker), finals)):
                yield self.sse_event(chunk, exclude)
            if job.include_usage:
                yield self.usage_chunk(job, usage_of(finals)).model_dump_json()
            outcome = "success"
        except OpenAIError as error:
            outcome = "error"
            yield self.sse_error(job, error)  # the headers are gone already
        finally:
            streams.cancel()
            tracker.finish(outcome)
        if self.done_event is not None:
            yield self.done_event


async def _tracked(job: Job, streams: PromptStreams, tracker: RequestTracker) -> Outputs:
    """The streams' outputs, observed by the tracker, with engine failures as OpenAIErrors."""
    try:
        async for index, output in streams:
            tracker.observe(index, output)
            yield index, output
    except EngineError as error:
        raise engine_error(error, job.param_names) from None


async def _remember(outputs: Outputs, finals: dict[int, RequestOutput]) -> Outputs:
    """Pass the outputs on, keeping each prompt's whole output so far in `finals` (deltas
    added up) for the usage at the end of a stream."""
    async for index, output in outputs:
        finals[index] = finals[index].add(output) if index in finals else output
        yield index, output


def usage_of(finals: dict[int, RequestOutput]) -> UsageInfo:
    prompt_tokens = sum(len(output.prompt_token_ids) for output in finals.values())
    completion_tokens = sum(
        len(completion.token_ids) for output in finals.values() for completion in output.outputs
    )
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def include_usage(request: SamplingRequest, forced: bool) -> bool:
    options = request.stream_options
    return bool(request.stream) and (forced or bool(options and options.include_usage))
