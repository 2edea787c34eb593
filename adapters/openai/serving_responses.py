"""POST /v1/responses (OpenAI's Responses API: text and function tools) and
GET /v1/responses/{id}.

The input (a string, text messages, an agent's function_call and function_call_output items),
the stored conversation of `previous_response_id` and the `instructions` (a first system message,
not carried over to continuations, as OpenAI does) are rendered through the chat template, with
the function tools. The reply is an output message and/or function_call items, read from the
text by chat's tool calling (tool_choice as for chat, --enable-auto-tool-choice included). A
stream sends response.created, response.in_progress, each item's events (responses_stream.py),
then response.completed (or response.incomplete when max_output_tokens cut it short).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse

from pagoda.adapters.openai.chat_output import ChatOutputParser, ChoiceStream
from pagoda.adapters.openai.errors import OpenAIError, invalid_param
from pagoda.adapters.openai.parsing import parse_body
from pagoda.adapters.openai.protocol import ChatMessage, UsageInfo
from pagoda.adapters.openai.response_store import ResponseStore, StoredResponse
from pagoda.adapters.openai.responses_protocol import (
    FunctionCallItem,
    ResponseEvent,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    input_messages,
)
from pagoda.adapters.openai.responses_stream import OutputWriter
from pagoda.adapters.openai.responses_tools import (
    OutputItem,
    assistant_message,
    new_item_id,
    output_items,
    plan_response_tools,
)
from pagoda.adapters.openai.sampling import build_sampling_params, check_streamable
from pagoda.adapters.openai.serving import GenerationEndpoint, Job, Outputs
from pagoda.adapters.openai.state import ServerState
from pagoda.backend.outputs import RequestOutput

_PARAM_NAMES = {"prompt": "input", "max_tokens": "max_output_tokens"}


@dataclass(slots=True)
class ResponsesJob(Job):
    # The conversation answered (previous turns and this input), without the instructions.
    messages: list[dict[str, Any]] = field(default_factory=list)
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    # Reads tool calls out of the text; None when the text is all content (no tools).
    output_parser: ChatOutputParser | None = None
    num_events: int = 0  # events streamed so far: the next one's sequence_number

    def event(self, kind: str, **fields: Any) -> ResponseEvent:
        self.num_events += 1
        return ResponseEvent(type=kind, sequence_number=self.num_events - 1, **fields)


@dataclass(slots=True)
class _Reply:
    output: list[OutputItem] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


class ResponsesEndpoint(GenerationEndpoint):
    id_prefix = "resp"
    done_event = None

    def __init__(self, state: ServerState, store: ResponseStore | None = None) -> None:
        super().__init__(state)
        self.store = store or ResponseStore()

    def new_request_id(self) -> str:
        return f"resp_{uuid.uuid4().hex}"  # OpenAI's response ids

    def prepare(self, body: Any) -> Job:
        request = parse_body(ResponsesRequest, body)
        model = self.state.resolve_model(request.model)
        tools = plan_response_tools(request, self.state.settings)
        text_format = (request.text or {}).get("format", {"type": "text"})
        if not isinstance(text_format, dict) or text_format.get("type") != "text":
            raise invalid_param("text.format: only {'type': 'text'} is supported", "text.format")
        if request.n not in (None, 1):
            raise invalid_param("n must be 1: a response has one reply", "n")
        messages = self._history(request.previous_response_id) + input_messages(request.input)
        conversation = messages
        if request.instructions:
            conversation = [{"role": "system", "content": request.instructions}, *messages]
        prompt = self.state.render_chat(
            [ChatMessage(**message) for message in conversation], None, None,
            tools.template_tools,
        )
        params = build_sampling_params(
            request, max_tokens=request.max_output_tokens, logprobs=None,
            param_names=_PARAM_NAMES, forced_tool_call=tools.forced,
            skip_special_tokens=False if tools.reads_special_tokens else None,
            defaults=self.state.client.info.sampling_defaults,
        )
        check_streamable(request, params)
        return ResponsesJob(
            request=request, model=model, prompts=[prompt], params=params,
            param_names=_PARAM_NAMES, include_usage=False, request_id=self.new_request_id(),
            messages=messages,
            output_parser=None if tools.mode is None else ChatOutputParser(None, tools.mode),
        )

    def _history(self, previous_response_id: str | None) -> list[dict[str, Any]]:
        if previous_response_id is None:
            return []
        stored = self.store.get(previous_response_id)
        if stored is None:
            raise invalid_param(
                f"previous response {previous_response_id!r} not found (responses are kept "
                f"{self.store.ttl_seconds:.0f} s, at most {self.store.max_entries})",
                "previous_response_id",
            )
        return list(stored.messages)

    async def retrieve(self, request: Request) -> JSONResponse:
        response_id = request.path_params["response_id"]
        stored = self.store.get(response_id)
        if stored is None:
            raise OpenAIError(404, f"response {response_id!r} not found", param="response_id")
        return JSONResponse(stored.body)

    def response(self, job: Job, outputs: dict[int, RequestOutput]) -> ResponseObject:
        job = _job(job)
        (completion,) = outputs[0].outputs
        content, calls = completion.text, []
        status = _status(completion.finish_reason)
        if job.output_parser is not None:
            message, _ = job.output_parser.message(completion.text)
            content = message.content
            calls = [
                FunctionCallItem(id=new_item_id(), call_id=call.id, name=call.function.name,
                                 arguments=call.function.arguments, status=status)
                for call in message.tool_calls
            ]
        reply = _Reply(output_items(job.message_id, status, content, calls),
                       completion.finish_reason, len(outputs[0].prompt_token_ids),
                       len(completion.token_ids))
        return self._finish(job, reply)

    async def chunks(self, job: Job, outputs: Outputs) -> AsyncIterator[ResponseEvent]:
        job = _job(job)
        event = job.event
        started = self._response(job, _Reply()).model_dump(mode="json")
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        writer = OutputWriter(event, job.message_id)
        stream = None
        if job.output_parser is None:
            for item_event in writer.open_message():
                yield item_event
        else:
            stream = ChoiceStream(job.output_parser)
        reply = _Reply()
        async for _, output in outputs:
            reply.num_prompt_tokens = len(output.prompt_token_ids)
            for completion in output.outputs:
                reply.num_output_tokens += len(completion.token_ids)
                reply.finish_reason = completion.finish_reason
                content, calls = completion.text, []
                if stream is not None:
                    delta = stream.feed(completion.text, completion.finished)
                    if delta is None:
                        continue
                    content, calls = delta.content, delta.tool_calls or []
                if content:
                    for item_event in writer.content(content):
                        yield item_event
                for call in calls:
                    for item_event in writer.call(call):
                        yield item_event
        for item_event in writer.finish(_status(reply.finish_reason)):
            yield item_event
        reply.output = writer.items
        final = self._finish(job, reply)
        kind = "response.completed" if final.status == "completed" else "response.incomplete"
        yield event(kind, response=final.model_dump(mode="json"))

    def usage_chunk(self, job: Job, usage: UsageInfo) -> BaseModel:
        raise AssertionError("a Responses stream carries its usage in its last event")

    def sse_event(self, chunk: BaseModel, exclude: set[str] | None) -> dict[str, str]:
        assert isinstance(chunk, ResponseEvent)
        return {"event": chunk.type, "data": chunk.model_dump_json()}

    def sse_error(self, job: Job, error: OpenAIError) -> dict[str, str]:
        info = error.info
        event = _job(job).event("error", code=info.code or info.type, message=info.message,
                                param=info.param)
        return {"event": "error", "data": event.model_dump_json()}

    def _finish(self, job: ResponsesJob, reply: _Reply) -> ResponseObject:
        """The finished response, stored for continuations unless `store` is false."""
        final = self._response(job, reply)
        request = _request(job)
        if request.store is not False:
            messages = [*job.messages, assistant_message(reply.output)]
            self.store.put(final.id, StoredResponse(final.model_dump(mode="json"), messages))
        return final

    def _response(self, job: ResponsesJob, reply: _Reply) -> ResponseObject:
        """The response object: in progress until the reply has its finish_reason."""
        request = _request(job)
        if reply.finish_reason is None:
            status, output, usage, incomplete = "in_progress", [], None, None
        else:
            status = _status(reply.finish_reason)
            incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
            output = reply.output
            usage = ResponseUsage(
                input_tokens=reply.num_prompt_tokens, output_tokens=reply.num_output_tokens,
                total_tokens=reply.num_prompt_tokens + reply.num_output_tokens,
            )
        return ResponseObject(
            id=job.request_id, created_at=job.created, status=status,
            incomplete_details=incomplete, instructions=request.instructions,
            max_output_tokens=request.max_output_tokens, model=job.model, output=output,
            previous_response_id=request.previous_response_id,
            temperature=job.params.temperature, top_p=job.params.top_p,
            metadata=request.metadata or {}, store=request.store is not False, usage=usage,
            tools=request.tools or [], tool_choice=request.tool_choice or "auto",
            parallel_tool_calls=request.parallel_tool_calls is not False,
        )


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _job(job: Job) -> ResponsesJob:
    assert isinstance(job, ResponsesJob)
    return job


def _request(job: Job) -> ResponsesRequest:
    assert isinstance(job.request, ResponsesRequest)
    return job.request

