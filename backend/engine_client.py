"""EngineClient: the one door the adapters use into the engine.

It owns an AsyncEngine (an LLMEngine stepping on its own thread) and offers what a server needs:
streaming generation and aborts, embeddings, encoding, decoding and chat templates by the
engine's own rules, facts about the model, health, and the engine's counters. Adapters never reach behind it (the
scheduler, the block manager, the model), so the engine can change inside without them knowing.

Errors are typed (pagoda.backend.errors): a request the engine refuses raises its
RequestRejected from `generate`; one that fails once accepted ends with the error in its last
RequestOutput.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagoda.backend.async_engine import AsyncEngine, EngineSnapshot
from pagoda.backend.config import EngineConfig
from pagoda.backend.engine import LLMEngine, Prompt
from pagoda.backend.errors import RequestFailed
from pagoda.backend.generation_defaults import SamplingDefaults
from pagoda.backend.kv.block_manager import PrefixCacheFlush
from pagoda.backend.outputs import RequestOutput
from pagoda.backend.pooling_params import PoolingParams
from pagoda.backend.prompt import encode_prompt
from pagoda.backend.sampling_params import SamplingParams

__all__ = [
    "EngineClient", "EngineSetup", "EngineSnapshot", "ModelInfo", "PoolingParams",
    "PrefixCacheFlush", "Prompt",
]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What adapters report about the served model, or need to format its outputs."""

    model: str | None  # as configured: a local folder or a hub id; None for the demo model
    max_model_len: int  # the longest sequence (prompt and generated tokens) a request may have
    vocab_size: int  # the model's: token ids from 0 to vocab_size - 1 are valid in a prompt
    eos_token_ids: frozenset[int]
    # generation_config.json's sampling settings, for requests that leave them unset.
    sampling_defaults: SamplingDefaults
    # For the text of single tokens (logprobs) and of echoed prompt token ids; encode through
    # EngineClient.encode, which follows the engine's BOS rule.
    tokenizer: PreTrainedTokenizerBase


@dataclass(frozen=True, slots=True)
class EngineSetup:
    """How the engine is set up and sized, for servers that describe themselves to routers and
    operators (/server_info, /model_info)."""

    model_path: str  # the local folder the weights were loaded from
    tokenizer_path: str  # as configured, or the model's folder
    model_type: str  # the checkpoint's config.json model_type ("llama", "qwen2", ...)
    architectures: tuple[str, ...]  # ... and its architectures
    dtype: str  # the compute dtype, resolved ("float32", "bfloat16", ...)
    device: str
    block_size: int  # tokens per KV block
    num_kv_blocks: int  # blocks in the KV pool
    max_num_seqs: int  # sequences one step runs at most
    max_num_batched_tokens: int  # tokens one step feeds at most
    enable_prefix_caching: bool
    # One engine, one device: tensor parallelism would raise the first, and several replicas
    # behind a router are data parallelism the router sees, not this engine.
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1


class EngineClient:
    """An engine served to asyncio handlers (start it, or use it as a context manager)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        core = engine.engine
        self.info = ModelInfo(
            model=core.config.model,
            max_model_len=core.max_model_len,
            vocab_size=core.hf_config.vocab_size,
            eos_token_ids=frozenset(core.eos_token_ids),
            sampling_defaults=core.sampling_defaults,
            tokenizer=core.tokenizer,
        )
        config = core.config
        self.setup = EngineSetup(
            model_path=str(core.model_path),
            tokenizer_path=config.tokenizer or str(core.model_path),
            model_type=core.hf_config.model_type,
            architectures=tuple(core.hf_config.architectures or ()),
            dtype=str(core.dtype).removeprefix("torch."),
            device=str(core.device),
            block_size=config.block_size,
            num_kv_blocks=core.block_manager.pool.num_blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            enable_prefix_caching=config.enable_prefix_caching,
        )

    @classmethod
    def from_config(cls, config: EngineConfig) -> EngineClient:
        """Load the model and build its engine, not started yet. Raises ValueError naming the
        configuration field for a bad configuration."""
        return cls(AsyncEngine(LLMEngine(config)))

    # -- lifetime ---------------------------------------------------------------------------

    def start(self) -> None:
        self._engine.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine; requests still running fail with RequestFailed."""
        self._engine.shutdown(timeout)

    def __enter__(self) -> EngineClient:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.shutdown()

    @property
    def is_running(self) -> bool:
        """Started, not shut down, and stepping (for health checks)."""
        return self._engine.is_running

    @property
    def snapshot(self) -> EngineSnapshot:
        """The engine's counters (queues, KV blocks, prefix cache), as of its last step."""
        return self._engine.snapshot

    # -- requests ---------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt: Prompt, params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        """The request's outputs until one is finished, as `params.output_kind` asks: cumulative
        snapshots, deltas (what is new since the previous output), or only the final output. A
        reader that fell behind gets what it missed merged into one output. Raises
        RequestRejected on the first iteration for a request the engine refuses, RequestFailed
        when the engine fails or is shut down. Closing the iterator early aborts the request and
        frees its KV blocks within one step.

        A structured-outputs spec is compiled here, on a worker thread, before the request is
        submitted: the engine thread then finds it in its grammar cache instead of compiling
        between two steps, and a spec that does not compile is refused the same way."""
        if params.structured_outputs is not None:
            await asyncio.to_thread(self._engine.engine.structured.compile,
                                    params.structured_outputs)
        outputs = self._engine.generate(request_id, prompt, params)
        # Closing this generator closes the engine's at once, which aborts the request.
        async with contextlib.aclosing(outputs):
            async for output in outputs:
                yield output

    async def embed(
        self, request_id: str, prompt: Prompt, params: PoolingParams | None = None
    ) -> RequestOutput:
        """The prompt's final output, with its `embedding`: the final hidden states pooled as
        `params` asks (by default as the engine's `pooling`, L2-normalized), computed as a
        prefill-only request batched with the others. Raises RequestRejected for a request the
        engine refuses, the EngineError of one it failed, RequestFailed when the engine fails or
        is shut down. Cancelling the call aborts the request."""
        outputs = self._engine.generate(request_id, prompt, params or PoolingParams())
        async with contextlib.aclosing(outputs):
            async for output in outputs:
                if output.error is not None:
                    raise output.error
                if output.finished:
                    return output
        raise RequestFailed(f"request {request_id} ended without its embedding")

    def abort(self, request_id: str) -> None:
        self._engine.abort(request_id)

    async def flush_prefix_cache(self) -> PrefixCacheFlush:
        """Empty the prefix cache of the blocks no request holds, on the engine thread between
        two steps; requests in flight keep their blocks and go on. RequestFailed when the engine
        is not running."""
        return await self._engine.run_between_steps(LLMEngine.flush_prefix_cache)

    # -- text -------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of `text`; by default (None) exactly those a request with this prompt runs."""
        if add_special_tokens is None:
            return encode_prompt(self.info.tokenizer, text)
        return self.info.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        return self.info.tokenizer.decode(token_ids)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """A conversation as prompt text, through the model's (or the given) chat template,
        with `tools` (OpenAI tool definitions) passed to it.
        InvalidParameter("chat_template") when the model has none and none is given; whatever
        the template raises (it may refuse a role or a turn order) is raised as is."""
        return self._engine.engine.render_chat(
            messages, chat_template, add_generation_prompt, chat_template_kwargs, tools
        )
