"""FastChatWorker: one engine behind FastChat's model-worker protocol, transport aside."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagoda.adapters.common.embeddings import base64_float32, embed_prompts
from pagoda.adapters.common.metrics import Outcome, RequestTracker, ServerMetrics
from pagoda.adapters.fastchat.chunks import ChunkBuilder
from pagoda.adapters.fastchat.flags import DEFAULT_LIMIT_WORKER_CONCURRENCY
from pagoda.adapters.fastchat.protocol import (
    EmbeddingsRequest,
    ErrorCode,
    GenerateRequest,
    WorkerError,
    engine_error,
)
from pagoda.backend.engine_client import EngineClient
from pagoda.backend.errors import EngineError

logger = logging.getLogger(__name__)


class FastChatWorker:
    """Generation, status and tokenizer answers for one engine served under `model_names`."""

    def __init__(
        self,
        client: EngineClient,
        model_names: list[str],
        conv_template: dict[str, Any],
        limit_worker_concurrency: int = DEFAULT_LIMIT_WORKER_CONCURRENCY,
        max_waiting_requests: int | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        """`metrics`: where requests are recorded (by default metrics of this worker's own)."""
        if not model_names:
            raise ValueError("model_names must name at least one model")
        if limit_worker_concurrency < 1:
            raise ValueError(
                f"limit_worker_concurrency must be >= 1, got {limit_worker_concurrency}"
            )
        if max_waiting_requests is not None and max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {max_waiting_requests}")
        self.client = client
        self.model_names = list(model_names)
        self.conv_template = conv_template
        self.limit_worker_concurrency = limit_worker_concurrency
        self.max_waiting_requests = max_waiting_requests
        self.metrics = metrics if metrics is not None else ServerMetrics(client)
        # FastChat's semantics: requests beyond the limit wait for a slot, they are not refused.
        self._slots = asyncio.Semaphore(limit_worker_concurrency)
        self._num_waiting_for_slot = 0
        # Requests handed to the engine that have no output yet: the engine's own waiting count
        # lags by up to a step, so a burst would slip past it alone.
        self._num_unstarted = 0

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.client.info.tokenizer

    @property
    def context_length(self) -> int:
        return self.client.info.max_model_len

    def queue_length(self) -> int:
        """What the controller balances on: the engine's running and waiting requests (all of
        them, OpenAI traffic included when one engine serves both), plus requests waiting here
        for a concurrency slot."""
        snapshot = self.client.snapshot
        return snapshot.num_running + snapshot.num_waiting + self._num_waiting_for_slot

    def status(self) -> dict[str, Any]:
        """FastChat's worker status; "engine" is Pagoda's addition (FastChat's controller reads
        only the first three keys)."""
        snapshot = self.client.snapshot
        return {
            "model_names": self.model_names,
            "speed": 1,
            "queue_length": self.queue_length(),
            "engine": {
                "num_running": snapshot.num_running,
                "num_waiting": snapshot.num_waiting,
                "num_kv_blocks_used": snapshot.num_kv_blocks_used,
                "num_kv_blocks_total": snapshot.num_kv_blocks_total,
            },
        }

    def count_tokens(self, prompt: str) -> int:
        """The prompt's tokens, counted as a request with this prompt runs them."""
        return len(self.client.encode(prompt))

    async def generate_stream(self, body: Any) -> AsyncIterator[dict[str, Any]]:
        """FastChat's chunks for one request; an error is the last chunk. Closing the iterator
        early (a client that went away) aborts the engine request and frees the slot."""
        tracker = self.metrics.track()
        outcome: Outcome = "aborted"  # unless it ends otherwise: the reader left
        try:
            # aclosing: closing this stream closes the inner one now, which aborts the request.
            async with contextlib.aclosing(self._generate_chunks(body, tracker)) as chunks:
                async for chunk in chunks:
                    yield chunk
            outcome = "success"
        except WorkerError as error:
            outcome = _outcome_of(error)
            yield error.chunk()
        finally:
            tracker.finish(outcome)

    async def _generate_chunks(
        self, body: Any, tracker: RequestTracker
    ) -> AsyncIterator[dict[str, Any]]:
        """generate_stream's chunks; WorkerError for a request refused or failed."""
        request = GenerateRequest.parse(body)
        self._check_model(request.model)
        params = request.sampling_params(self.client.info.sampling_defaults)
        self._check_not_overloaded()
        async with self._slot():
            builder = ChunkBuilder(request, params, self.tokenizer)
            request_id = f"fastchat-{uuid.uuid4().hex}"
            # aclosing: when this stream is closed early, the engine request is aborted now
            # rather than whenever the inner generator is garbage-collected. FastChat's
            # chunks are cumulative, as the outputs are (the default output kind): a stream
            # that fell behind gets the newest, not a backlog of ever longer stale ones.
            outputs = self.client.generate(request_id, request.prompt, params)
            self._num_unstarted += 1
            started = False
            try:
                async with contextlib.aclosing(outputs):
                    async for output in outputs:
                        if not started:
                            started = True
                            self._num_unstarted -= 1
                        tracker.observe(0, output)
                        for chunk in builder.chunks(output):
                            yield chunk
            except EngineError as error:
                if error.internal:
                    logger.warning("request %s failed: %s", request_id, error)
                raise engine_error(error) from None
            finally:
                if not started:
                    self._num_unstarted -= 1

    async def get_embeddings(self, body: Any) -> dict[str, Any]:
        """FastChat's embeddings answer, {"embedding": [...], "token_num": N} (vectors as
        floats, or base64 float32 strings), or an error chunk. Pooled as the engine's --pooling
        says (FastChat's own worker takes the mean)."""
        tracker = self.metrics.track()
        try:
            request = EmbeddingsRequest.parse(body)
            self._check_model(request.model)
            self._check_not_overloaded()
            async with self._slot():
                request_id = f"fastchat-embd-{uuid.uuid4().hex}"
                try:
                    outputs = await embed_prompts(self.client, request_id, request.texts)
                except EngineError as error:
                    raise engine_error(error) from None
        except WorkerError as error:
            tracker.finish(_outcome_of(error))
            return error.chunk()
        except asyncio.CancelledError:  # the client left
            tracker.finish("aborted")
            raise
        for index, output in enumerate(outputs):
            tracker.observe(index, output)
        tracker.finish("success")
        vectors = [output.embedding or [] for output in outputs]
        return {
            "embedding": (
                [base64_float32(v) for v in vectors] if request.encoding_format == "base64"
                else vectors
            ),
            "token_num": sum(len(output.prompt_token_ids) for output in outputs),
        }

    async def generate(self, body: Any) -> dict[str, Any]:
        """The last chunk of the stream: the whole text with usage and finish_reason."""
        last: dict[str, Any] = {}
        async for chunk in self.generate_stream(body):
            last = chunk
        return last

    def _check_model(self, model: str | None) -> None:
        # FastChat's peers always name the model; a request without one is for this worker.
        if model is not None and model not in self.model_names:
            raise WorkerError(
                ErrorCode.INVALID_MODEL,
                f"this worker serves {', '.join(self.model_names)}, not {model!r}",
            )

    def _check_not_overloaded(self) -> None:
        """42903 (FastChat's "engine overloaded": its peers may retry, elsewhere or later) when
        max_waiting_requests requests already wait, in the engine or for a slot."""
        if self.max_waiting_requests is None:
            return
        in_engine = max(self.client.snapshot.num_waiting, self._num_unstarted)
        num_waiting = in_engine + self._num_waiting_for_slot
        if num_waiting >= self.max_waiting_requests:
            raise WorkerError(
                ErrorCode.ENGINE_OVERLOADED,
                f"{num_waiting} requests are waiting (max_waiting_requests="
                f"{self.max_waiting_requests}); retry later",
            )

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        self._num_waiting_for_slot += 1
        try:
            await self._slots.acquire()
        finally:
            self._num_waiting_for_slot -= 1
        try:
            yield
        finally:
            self._slots.release()


def _outcome_of(error: WorkerError) -> Outcome:
    """How a request that ended in `error` is counted: a server fault, or a request refused."""
    return "error" if error.code == ErrorCode.INTERNAL_ERROR else "rejected"
