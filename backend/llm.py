"""Offline batch inference: `LLM(model=...).generate(prompts, params)`, `.chat(...)` and
`.embed(prompts)`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagoda.backend.config import EngineConfig
from pagoda.backend.engine import LLMEngine, Prompt
from pagoda.backend.errors import InvalidParameter, RequestRejected
from pagoda.backend.outputs import RequestOutput
from pagoda.backend.pooling_params import PoolingParams
from pagoda.backend.sampling_params import RequestOutputKind, SamplingParams

Message = dict[str, Any]


class LLM:
    """Runs batches of prompts to completion through one engine.

    Engine arguments are keywords with vLLM's names (dtype, device, block_size, num_kv_blocks,
    max_num_seqs, max_num_batched_tokens, max_model_len, enable_prefix_caching, seed,
    quantization, ...); with no model, the built-in demo model is used.
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self._request_ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string or a list of token ids); outputs in prompt order.
        Without sampling_params, the model's generation_config.json defaults apply (as vLLM's
        `LLM.get_default_sampling_params`)."""
        prompt_list = _as_prompt_list(prompts)
        params_list = self._params_list(sampling_params, len(prompt_list))
        return self._run(prompt_list, params_list, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the chat template
        (which is given `tools`, OpenAI tool definitions, when there are any)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts: list[Prompt] = [
            self.engine.render_chat(
                conversation, chat_template, add_generation_prompt, chat_template_kwargs, tools
            )
            for conversation in conversations
        ]
        params_list = self._params_list(sampling_params, len(prompts))
        return self._run(prompts, params_list, use_tqdm)

    def get_default_sampling_params(self) -> SamplingParams:
        """The parameters of a request that gives none: the model's generation_config.json
        sampling settings (with --generation-config auto), SamplingParams' own otherwise."""
        defaults = self.engine.sampling_defaults
        values = defaults.sampling_values()
        if defaults.max_tokens is not None:
            values["max_tokens"] = defaults.max_tokens
        return SamplingParams(**values)

    def _params_list(
        self, params: SamplingParams | Sequence[SamplingParams] | None, count: int
    ) -> list[SamplingParams]:
        if params is None:
            return [self.get_default_sampling_params()] * count
        return _as_params_list(params, count)

    def embed(
        self,
        prompts: Prompt | Sequence[Prompt],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Each prompt's embedding (RequestOutput.embedding): its final hidden states pooled as
        `pooling_params` asks (by default as the engine's `pooling`, L2-normalized)."""
        prompt_list = _as_prompt_list(prompts)
        params = pooling_params or PoolingParams()
        return self._run(prompt_list, [params] * len(prompt_list), use_tqdm)

    def _run(
        self,
        prompts: list[Prompt],
        params_list: Sequence[SamplingParams | PoolingParams],
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        order: dict[str, int] = {}
        try:
            for index, (prompt, params) in enumerate(zip(prompts, params_list)):
                request_id = str(next(self._request_ids))
                if isinstance(params, SamplingParams):
                    # Only the final outputs are returned: the engine need not build the others.
                    params = dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
                self.engine.add_request(request_id, prompt, params)
                order[request_id] = index
        except RequestRejected:
            for request_id in order:
                self.engine.abort(request_id)
            raise
        results: list[RequestOutput | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc="Generating", disable=not use_tqdm) as progress:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished and output.request_id in order:
                        results[order[output.request_id]] = output
                        progress.update(1)
        return [result for result in results if result is not None]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single prompt given as token ids
    return prompts


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams], count: int
) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise InvalidParameter(
            "sampling_params", f"got {len(params)} sampling_params for {count} prompts"
        )
    return params
