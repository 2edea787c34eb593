"""One request's engine outputs as FastChat's streamed chunks.

What FastChat's peers rely on: `text` is cumulative (the prompt first when echoed) and never
shrinks; every chunk carries `usage`; `finish_reason` is null until the last chunk, then "stop" or
"length" (FastChat's API server rejects anything else).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from pagoda.adapters.fastchat.logprobs import LogprobsFormatter
from pagoda.adapters.fastchat.protocol import (
    ErrorCode,
    GenerateRequest,
    WorkerError,
    engine_error,
)
from pagoda.backend.outputs import RequestOutput
from pagoda.backend.sampling_params import SamplingParams

FASTCHAT_FINISH_REASONS = ("stop", "length")


class ChunkBuilder:
    def __init__(
        self, request: GenerateRequest, params: SamplingParams, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.prefix = request.prompt if request.wants_echo else ""
        # Which of several samples or beams wins is known only at the end: such requests send
        # their final text alone rather than a text that could change course.
        self.streams_partial_text = params.num_sequences == 1 and not params.use_beam_search
        self._logprobs: LogprobsFormatter | None = None
        self._last_text: str | None = None

    def chunks(self, output: RequestOutput) -> list[dict[str, Any]]:
        """The chunks to send for this output: none, one, or two for the final output (FastChat's
        workers send the final text once without a finish_reason and once with it, so its API
        server ends a stream with a chunk that carries only the finish_reason)."""
        if not output.finished and not self.streams_partial_text:
            return []
        completion = output.outputs[0]
        text = self.prefix + completion.text
        if not output.finished:
            if text == self._last_text:
                return []
            self._last_text = text
            return [self._chunk(output, text, None)]
        reason = completion.finish_reason
        if output.error is not None:
            raise engine_error(output.error)
        if reason not in FASTCHAT_FINISH_REASONS:
            raise WorkerError(ErrorCode.INTERNAL_ERROR, f"generation ended with {reason!r}")
        final = self._chunk(output, text, reason)
        if text == self._last_text:
            return [final]
        self._last_text = text
        return [{**final, "finish_reason": None}, final]

    def _chunk(self, output: RequestOutput, text: str, reason: str | None) -> dict[str, Any]:
        prompt_tokens = len(output.prompt_token_ids)
        completion_tokens = sum(len(completion.token_ids) for completion in output.outputs)
        return {
            "text": text,
            "error_code": 0,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "finish_reason": reason,
            "logprobs": self._format_logprobs(output),
        }

    def _format_logprobs(self, output: RequestOutput) -> dict[str, Any] | None:
        if self.request.logprobs is None:
            return None
        if self._logprobs is None:
            self._logprobs = LogprobsFormatter(
                self.tokenizer, output.prompt_token_ids, self.request.prompt,
                self.request.wants_echo,
            )
        return self._logprobs.format(output.outputs[0])
