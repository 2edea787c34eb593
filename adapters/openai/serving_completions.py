"""POST /v1/completions: one or many prompts, choices ordered prompt-major."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pagoda.adapters.openai.errors import invalid_param
from pagoda.adapters.openai.logprobs import completion_logprobs, prompt_logprobs_json
from pagoda.adapters.openai.parsing import parse_body
from pagoda.adapters.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptInput,
    PromptLogprobsField,
    UsageInfo,
)
from pagoda.adapters.openai.sampling import (
    build_sampling_params,
    check_streamable,
    checked_logprobs,
)
from pagoda.adapters.openai.serving import GenerationEndpoint, Job, Outputs, include_usage, usage_of
from pagoda.backend.engine_client import Prompt
from pagoda.backend.outputs import CompletionOutput, PromptLogprobs, RequestOutput

# OpenAI's default for completions (chat's default is "until the context is full").
DEFAULT_MAX_TOKENS = 16


class CompletionsEndpoint(GenerationEndpoint):
    id_prefix = "cmpl"

    def prepare(self, body: Any) -> Job:
        request = parse_body(CompletionRequest, body)
        model = self.state.resolve_model(request.model)
        prompts = prompt_list(request.prompt)
        max_logprobs = self.state.settings.max_logprobs
        logprobs = checked_logprobs(request.logprobs, "logprobs", max_logprobs)
        prompt_logprobs = checked_logprobs(request.prompt_logprobs, "prompt_logprobs", max_logprobs)
        if request.echo and logprobs is not None and prompt_logprobs is None:
            prompt_logprobs = logprobs  # the echoed prompt's tokens get logprobs too
        param_names: dict[str, str] = {}
        params = build_sampling_params(
            request,
            max_tokens=DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens,
            logprobs=logprobs,
            param_names=param_names,
            prompt_logprobs=prompt_logprobs,
            echo=bool(request.echo),
            defaults=self.state.client.info.sampling_defaults,
        )
        check_streamable(request, params)
        return Job(
            request=request, model=model, prompts=prompts, params=params, param_names=param_names,
            include_usage=include_usage(request, self.state.settings.enable_force_include_usage),
            request_id=self.new_request_id(),
        )

    def _choice_index(self, job: Job, prompt_index: int, completion: CompletionOutput) -> int:
        return prompt_index * job.params.n + completion.index

    def _echo(self, job: Job, output: RequestOutput) -> str:
        if not _request(job).echo:
            return ""
        if output.prompt is not None:
            return output.prompt
        return self.state.client.decode(output.prompt_token_ids)

    def _logprobs_of(
        self, completion: CompletionOutput, text_offset: int, echoed: _EchoedLogprobs | None
    ) -> CompletionLogprobs | None:
        """The completion's logprobs, after the echoed prompt's when it starts the text."""
        if completion.logprobs is None:
            return None
        result = None
        if echoed is not None:
            # The prompt's tokens are offset from the start of the echoed prompt text.
            result = completion_logprobs(
                echoed.steps, echoed.token_ids, text_offset - echoed.text_length,
                self.state.token_strings,
            )
        return completion_logprobs(
            completion.logprobs, completion.token_ids, text_offset, self.state.token_strings,
            result,
        )

    def _echoed_logprobs(
        self, job: Job, output: RequestOutput, echo: str
    ) -> _EchoedLogprobs | None:
        if not _request(job).echo or output.prompt_logprobs is None:
            return None
        return _EchoedLogprobs(output.prompt_logprobs, output.prompt_token_ids, len(echo))

    def _prompt_logprobs_field(self, job: Job, output: RequestOutput) -> PromptLogprobsField:
        if _request(job).prompt_logprobs is None or output.prompt_logprobs is None:
            return None
        return prompt_logprobs_json(output.prompt_logprobs, self.state.token_strings)

    def response(self, job: Job, outputs: dict[int, RequestOutput]) -> CompletionResponse:
        choices = []
        for prompt_index in sorted(outputs):
            output = outputs[prompt_index]
            echo = self._echo(job, output)
            echoed = self._echoed_logprobs(job, output, echo)
            prompt_logprobs = self._prompt_logprobs_field(job, output)
            for completion in output.outputs:
                choices.append(CompletionChoice(
                    index=self._choice_index(job, prompt_index, completion),
                    text=echo + completion.text,
                    logprobs=self._logprobs_of(completion, len(echo), echoed),
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                    prompt_logprobs=prompt_logprobs,
                ))
        choices.sort(key=lambda choice: choice.index)
        return CompletionResponse(
            id=job.request_id, created=job.created, model=job.model, choices=choices,
            usage=usage_of(outputs),
        )

    async def chunks(self, job: Job, outputs: Outputs) -> AsyncIterator[CompletionResponse]:
        # The outputs are deltas (RequestOutputKind.DELTA); the echoed prompt goes first, with
        # its logprobs (which only a prompt's first output carries).
        text_offsets: dict[int, int] = {}  # each choice's next token's text offset
        echoed: dict[int, _EchoedLogprobs | None] = {}
        async for prompt_index, output in outputs:
            echo = self._echo(job, output)
            if prompt_index not in echoed:
                echoed[prompt_index] = self._echoed_logprobs(job, output, echo)
            for completion in output.outputs:
                index = self._choice_index(job, prompt_index, completion)
                started = index in text_offsets
                prefix = "" if started else echo
                offset = text_offsets.get(index, 0) + len(prefix)
                text = prefix + completion.text
                logprobs = self._logprobs_of(
                    completion, offset, None if started else echoed[prompt_index]
                )
                if not (text or completion.finished or (logprobs and logprobs.tokens)):
                    continue  # a token whose text is held back (a partial character or stop)
                if logprobs is not None:
                    generated = logprobs.tokens[len(logprobs.tokens) - len(completion.token_ids):]
                    offset += sum(len(token) for token in generated)
                text_offsets[index] = offset
                yield CompletionResponse(
                    id=job.request_id, created=job.created, model=job.model,
                    choices=[CompletionChoice(
                        index=index, text=text, logprobs=logprobs,
                        finish_reason=completion.finish_reason,
                        stop_reason=completion.stop_reason,
                    )],
                )

    def usage_chunk(self, job: Job, usage: UsageInfo) -> CompletionResponse:
        return CompletionResponse(
            id=job.request_id, created=job.created, model=job.model, choices=[], usage=usage
        )


@dataclass(slots=True)
class _EchoedLogprobs:
    """An echoed prompt's logprobs, and the length of its echoed text."""

    steps: PromptLogprobs
    token_ids: list[int]
    text_length: int


def _request(job: Job) -> CompletionRequest:
    request = job.request
    assert isinstance(request, CompletionRequest)
    return request


def prompt_list(prompt: PromptInput, param: str = "prompt") -> list[Prompt]:
    """One engine prompt per entry: a string, a list of strings, token ids or lists of them;
    an empty list is a 400 naming `param`."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise invalid_param(f"{param} must not be empty", param)
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]
