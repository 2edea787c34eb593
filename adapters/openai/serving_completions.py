"""POST /v1/completions: one or many prompts, choices ordered prompt-major."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pagoda.adapters.openai.errors import invalid_param
from pagoda.adapters.openai.logprobs import completion_logprobs
from pagoda.adapters.openai.parsing import parse_body
from pagoda.adapters.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptInput,
    UsageInfo,
)
from pagoda.adapters.openai.sampling import build_sampling_params, check_streamable
from pagoda.adapters.openai.serving import GenerationEndpoint, Job, Outputs, include_usage, usage_of
from pagoda.backend.engine_client import Prompt
from pagoda.backend.outputs import CompletionOutput, RequestOutput

# OpenAI's default for completions (chat's default is "until the context is full").
DEFAULT_MAX_TOKENS = 16


class CompletionsEndpoint(GenerationEndpoint):
    id_prefix = "cmpl"

    def prepare(self, body: Any) -> Job:
        request = parse_body(CompletionRequest, body)
        model = self.state.resolve_model(request.model)
        prompts = _prompts(request.prompt)
        logprobs = request.logprobs
        if logprobs is not None and not 0 <= logprobs <= self.state.settings.max_logprobs:
            raise invalid_param(
                f"logprobs must be in 0..{self.state.settings.max_logprobs}, got {logprobs}",
                "logprobs",
            )
        if request.echo and logprobs is not None:
            raise invalid_param(
                "echo with logprobs is not supported: prompt logprobs are not computed", "echo"
            )
        param_names: dict[str, str] = {}
        params = build_sampling_params(
            request,
            max_tokens=DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens,
            logprobs=logprobs,
            param_names=param_names,
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
        request = job.request
        assert isinstance(request, CompletionRequest)
        if not request.echo:
            return ""
        if output.prompt is not None:
            return output.prompt
        return self.state.client.decode(output.prompt_token_ids)

    def _logprobs_of(
        self, completion: CompletionOutput, text_offset: int
    ) -> CompletionLogprobs | None:
        if completion.logprobs is None:
            return None
        return completion_logprobs(
            completion.logprobs, completion.token_ids, text_offset, self.state.token_strings
        )

    def response(self, job: Job, outputs: dict[int, RequestOutput]) -> CompletionResponse:
        choices = []
        for prompt_index in sorted(outputs):
            output = outputs[prompt_index]
            echo = self._echo(job, output)
            for completion in output.outputs:
                choices.append(CompletionChoice(
                    index=self._choice_index(job, prompt_index, completion),
                    text=echo + completion.text,
                    logprobs=self._logprobs_of(completion, len(echo)),
                    finish_reason=completion.finish_reason,
                    stop_reason=completion.stop_reason,
                ))
        choices.sort(key=lambda choice: choice.index)
        return CompletionResponse(
            id=job.request_id, created=job.created, model=job.model, choices=choices,
            usage=usage_of(outputs),
        )

    async def chunks(self, job: Job, outputs: Outputs) -> AsyncIterator[CompletionResponse]:
        # The outputs are deltas (RequestOutputKind.DELTA); the echoed prompt goes first.
        text_offsets: dict[int, int] = {}  # each choice's next token's text offset
        async for prompt_index, output in outputs:
            for completion in output.outputs:
                index = self._choice_index(job, prompt_index, completion)
                started = index in text_offsets
                echo = "" if started else self._echo(job, output)
                offset = text_offsets.get(index, 0) + len(echo)
                text = echo + completion.text
                logprobs = self._logprobs_of(completion, offset)
                if not (text or completion.finished or (logprobs and logprobs.tokens)):
                    continue  # a token whose text is held back (a partial character or stop)
                if logprobs is not None:
                    offset += sum(len(token) for token in logprobs.tokens)
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


def _prompts(prompt: PromptInput) -> list[Prompt]:
    """One engine prompt per entry: a string, a list of strings, token ids or lists of them."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise invalid_param("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]
