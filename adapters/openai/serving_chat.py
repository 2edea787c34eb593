"""POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pagoda.adapters.openai.chat_output import ChatOutputParser, ChoiceStream
from pagoda.adapters.openai.errors import invalid_param
from pagoda.adapters.openai.logprobs import chat_logprobs, prompt_logprobs_json
from pagoda.adapters.openai.parsing import parse_body
from pagoda.adapters.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    DeltaMessage,
    UsageInfo,
)
from pagoda.adapters.openai.reasoning import REASONING_PARSERS
from pagoda.adapters.openai.sampling import (
    build_sampling_params,
    check_streamable,
    checked_logprobs,
)
from pagoda.adapters.openai.serving import GenerationEndpoint, Job, Outputs, include_usage, usage_of
from pagoda.adapters.openai.tools.modes import ToolMode
from pagoda.adapters.openai.tools.plan import plan_tools
from pagoda.backend.outputs import CompletionOutput, RequestOutput


@dataclass(slots=True)
class ChatJob(Job):
    # Reads reasoning and tool calls out of the text; None when the text is all content.
    output_parser: ChatOutputParser | None = None


class ChatEndpoint(GenerationEndpoint):
    id_prefix = "chatcmpl"

    def prepare(self, body: Any) -> ChatJob:
        request = parse_body(ChatCompletionRequest, body)
        model = self.state.resolve_model(request.model)
        tools = plan_tools(request, self.state.settings)
        prompt = self.state.render_chat(
            request.messages, request.add_generation_prompt, request.chat_template_kwargs,
            tools.template_tools,
        )
        # max_completion_tokens replaced max_tokens in OpenAI's API; either is accepted.
        max_tokens_param = "max_tokens"
        if request.max_completion_tokens is not None:
            max_tokens_param = "max_completion_tokens"
        param_names = {
            "prompt": "messages", "max_tokens": max_tokens_param, "logprobs": "top_logprobs"
        }
        params = build_sampling_params(
            request,
            max_tokens=getattr(request, max_tokens_param),
            logprobs=self._logprobs(request),
            param_names=param_names,
            prompt_logprobs=checked_logprobs(
                request.prompt_logprobs, "prompt_logprobs", self.state.settings.max_logprobs
            ),
            forced_tool_call=tools.forced,
            skip_special_tokens=False if tools.reads_special_tokens else None,
            defaults=self.state.client.info.sampling_defaults,
        )
        check_streamable(request, params)
        return ChatJob(
            request=request, model=model, prompts=[prompt], params=params,
            param_names=param_names,
            include_usage=include_usage(request, self.state.settings.enable_force_include_usage),
            request_id=self.new_request_id(),
            output_parser=self._output_parser(tools.mode, params.structured_outputs is None),
        )

    def _output_parser(self, tools: ToolMode | None, free_text: bool) -> ChatOutputParser | None:
        """Reasoning is read only from free text: a grammar constrains the output from its
        first token, so there is none to read."""
        name = self.state.settings.reasoning_parser
        reasoning = REASONING_PARSERS[name]() if name is not None and free_text else None
        if reasoning is None and tools is None:
            return None
        return ChatOutputParser(reasoning, tools)

    def _logprobs(self, request: ChatCompletionRequest) -> int | None:
        top = request.top_logprobs
        if top is not None and not request.logprobs:
            raise invalid_param("top_logprobs requires logprobs to be true", "top_logprobs")
        if top is not None and not 0 <= top <= self.state.settings.max_logprobs:
            raise invalid_param(
                f"top_logprobs must be in 0..{self.state.settings.max_logprobs}, got {top}",
                "top_logprobs",
            )
        return (top or 0) if request.logprobs else None

    def _logprobs_of(self, job: Job, completion: CompletionOutput) -> ChatLogprobs | None:
        if completion.logprobs is None:
            return None
        request = job.request
        assert isinstance(request, ChatCompletionRequest)
        return chat_logprobs(
            completion.logprobs, completion.token_ids, request.top_logprobs or 0,
            self.state.token_strings,
        )

    def _echo(self, job: Job) -> str:
        """vLLM's chat echo: the last message's content, when the reply continues its role."""
        request = job.request
        assert isinstance(request, ChatCompletionRequest)
        last = request.messages[-1]
        if not request.echo or (request.add_generation_prompt is not False
                                and last.role != "assistant"):
            return ""
        content = last.content
        if isinstance(content, str):
            return content
        # Text parts only: rendering the conversation refused any other.
        return "\n".join(part["text"] for part in content or [])

    def response(self, job: Job, outputs: dict[int, RequestOutput]) -> ChatCompletionResponse:
        assert isinstance(job, ChatJob)
        echo = self._echo(job)
        choices = []
        for completion in outputs[0].outputs:
            text = echo + completion.text
            message, called_tools = AssistantMessage(content=text), False
            if job.output_parser is not None:
                message, called_tools = job.output_parser.message(text)
            choices.append(ChatChoice(
                index=completion.index,
                message=message,
                logprobs=self._logprobs_of(job, completion),
                finish_reason=_finish_reason(completion, called_tools),
                stop_reason=completion.stop_reason,
            ))
        prompt_logprobs = outputs[0].prompt_logprobs
        return ChatCompletionResponse(
            id=job.request_id, created=job.created, model=job.model, choices=choices,
            usage=usage_of(outputs),
            prompt_logprobs=None if prompt_logprobs is None else prompt_logprobs_json(
                prompt_logprobs, self.state.token_strings
            ),
        )

    def _chunk(self, job: Job, choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=job.request_id, created=job.created, model=job.model, choices=[choice]
        )

    async def chunks(self, job: Job, outputs: Outputs) -> AsyncIterator[ChatCompletionChunk]:
        # One choice per chunk: clients such as Open WebUI read choices[0] only.
        echo = self._echo(job)
        for index in range(job.params.n):
            delta = DeltaMessage(role="assistant", content=echo)
            yield self._chunk(job, ChatChunkChoice(index=index, delta=delta))
        assert isinstance(job, ChatJob)
        if job.output_parser is not None:
            async for chunk in self._parsed_chunks(job, job.output_parser, outputs):
                yield chunk
            return
        # The outputs are deltas (RequestOutputKind.DELTA): each chunk carries one as it is.
        async for _, output in outputs:
            for completion in output.outputs:
                logprobs = self._logprobs_of(job, completion)
                if not (completion.text or completion.finished or (logprobs and logprobs.content)):
                    continue  # a token whose text is held back (a partial character or stop)
                yield self._chunk(job, ChatChunkChoice(
                    index=completion.index, delta=DeltaMessage(content=completion.text or None),
                    logprobs=logprobs, finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                ))

    async def _parsed_chunks(
        self, job: ChatJob, parser: ChatOutputParser, outputs: Outputs
    ) -> AsyncIterator[ChatCompletionChunk]:
        """Chunks of reasoning, content and tool call deltas, read from each choice's text."""
        streams = [ChoiceStream(parser) for _ in range(job.params.n)]
        async for _, output in outputs:
            for completion in output.outputs:
                stream = streams[completion.index]
                delta = stream.feed(completion.text, completion.finished)
                logprobs = self._logprobs_of(job, completion)
                if delta is None and not (completion.finished or (logprobs and logprobs.content)):
                    continue
                yield self._chunk(job, ChatChunkChoice(
                    index=completion.index, delta=delta or DeltaMessage(), logprobs=logprobs,
                    finish_reason=_finish_reason(completion, stream.called_tools),
                    stop_reason=completion.stop_reason,
                ))

    def usage_chunk(self, job: Job, usage: UsageInfo) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=job.request_id, created=job.created, model=job.model, choices=[], usage=usage
        )


def _finish_reason(completion: CompletionOutput, called_tools: bool) -> str | None:
    """"tool_calls" for a completion that ended on its own after calling tools (OpenAI's)."""
    if called_tools and completion.finish_reason == "stop":
        return "tool_calls"
    return completion.finish_reason
