"""AsyncEngine: an LLMEngine stepping on its own thread, streaming outputs to asyncio callers.

The event loop never waits for the model: requests and aborts are handed to the engine thread
through a queue, and each request's outputs come back through its own asyncio.Queue. So a server
keeps answering (health checks, metrics, new connections) while a step computes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pagoda.backend.engine import LLMEngine, Prompt
from pagoda.backend.errors import RequestFailed, RequestRejected
from pagoda.backend.outputs import RequestOutput
from pagoda.backend.pooling_params import PoolingParams
from pagoda.backend.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """Counters read by servers (metrics, FastChat queue length); refreshed after every step."""

    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks_used: int = 0
    num_kv_blocks_total: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # full prompt blocks looked up
    prefix_cache_hits: int = 0  # ... and found
    num_shared_blocks: int = 0  # blocks held by several sequences (forks, cache hits)
    num_cached_blocks: int = 0  # blocks findable by the prefix cache, free or in use
    num_copy_on_write: int = 0  # shared blocks copied before a write, since start


@dataclass(slots=True)
class _Submit:
    request_id: str
    prompt: Prompt
    params: SamplingParams | PoolingParams
    stream: _Stream


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Call:
    """A function of the engine run on the engine thread between two steps; its result (or
    error) goes to `done`, a future of the caller's event loop."""

    function: Callable[[LLMEngine], Any]
    done: asyncio.Future[Any]

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        def resolve() -> None:
            if self.done.done():  # the caller gave up waiting (cancelled)
                return
            if error is not None:
                self.done.set_exception(error)
            else:
                self.done.set_result(result)

        self.done.get_loop().call_soon_threadsafe(resolve)


class _Stream:
    """One request's outputs, pushed from the engine thread into the caller's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def get(self) -> RequestOutput | BaseException:
        """Everything that arrived since the last call, as one output: a reader that fell behind
        gets what it missed at once (RequestOutput.add: deltas concatenated, otherwise the newest)
        instead of working through a backlog. An error is always the last item a stream gets."""
        item = await self.queue.get()
        while not isinstance(item, BaseException) and not self.queue.empty():
            newer = self.queue.get_nowait()
            item = newer if isinstance(newer, BaseException) else item.add(newer)
        return item


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[_Submit | _Abort | _Call | None] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._thread = threading.Thread(target=self._loop, name="pagoda-engine", daemon=True)
        self._stopped = False
        self.snapshot = self._take_snapshot()

    def start(self) -> None:
        self._thread.start()

    @property
    def is_running(self) -> bool:
        """Started, not shut down, and its thread alive (for health checks)."""
        return self._thread.is_alive() and not self._stopped

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still running are aborted."""
        self._stopped = True
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    async def generate(
        self, request_id: str, prompt: Prompt, params: SamplingParams | PoolingParams
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes. A request the engine rejects raises
        its RequestRejected on the first iteration; RequestFailed when the engine fails (or is
        shut down) instead. Leaving the loop early (a disconnected client, a
        cancelled task) aborts the request, which frees its KV blocks within one step.

        Outputs are as `params.output_kind` asks (cumulative snapshots, deltas, or the final one
        only; PoolingParams: the final one, with the embedding); a caller that fell behind gets
        the outputs it missed merged into one."""
        if self._stopped:
            raise RequestFailed("the engine is shut down")
        stream = _Stream(asyncio.get_running_loop())
        self._inbox.put(_Submit(request_id, prompt, params, stream))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    async def run_between_steps(self, function: Callable[[LLMEngine], T]) -> T:
        """`function(engine)`, run on the engine thread between two steps (never during one), so
        it may change the engine's state without racing the step; returns what it returns or
        raises what it raises. RequestFailed when the engine is not running (never started, or
        shut down first)."""
        if not self.is_running:
            raise RequestFailed("the engine is not running")
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._inbox.put(_Call(function, done))
        return await done

    # -- engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            if not self._drain_inbox(block=not self.engine.has_unfinished_requests()):
                break
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # a model failure must not kill the server
                logger.exception("engine step failed; failing the requests in flight")
                self._fail_all(error)
                continue
            for output in outputs:
                self._deliver(output)
            self.snapshot = self._take_snapshot()
        self._fail_all(RequestFailed("the engine shut down"))
        self._refuse_leftovers()

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued submissions and aborts; False once shutdown was asked for."""
        try:
            message = self._inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            if message is None:
                return False
            self._apply(message)
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, message: _Submit | _Abort | _Call) -> None:
        if isinstance(message, _Abort):
            self._streams.pop(message.request_id, None)
            self.engine.abort(message.request_id)
            self.snapshot = self._take_snapshot()
            return
        if isinstance(message, _Call):
            try:
                result = message.function(self.engine)
            except Exception as error:  # noqa: BLE001  (the caller's error, not the engine's)
                message.settle(error=error)
            else:
                message.settle(result)
            self.snapshot = self._take_snapshot()
            return
        try:
            self.engine.add_request(message.request_id, message.prompt, message.params)
        except RequestRejected as error:
            message.stream.put(error)
            return
        except Exception as error:  # a bug must not stop the engine thread for everyone
            logger.exception("request %s could not be queued", message.request_id)
            message.stream.put(RequestFailed(
                f"the engine could not queue the request: {type(error).__name__}: {error}"
            ))
            return
        self._streams[message.request_id] = message.stream

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        if output.finished:
            del self._streams[output.request_id]
        stream.put(output)

    def _fail_all(self, error: Exception) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort(request_id)
            stream.put(RequestFailed(f"request failed inside the engine: {error}"))
        self._streams.clear()
        self.snapshot = self._take_snapshot()

    def _refuse_leftovers(self) -> None:
        """Answer what was queued behind the shutdown: nobody will apply it now."""
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(message, _Submit):
                message.stream.put(RequestFailed("the engine shut down"))
            elif isinstance(message, _Call):
                message.settle(error=RequestFailed("the engine shut down"))

    def _take_snapshot(self) -> EngineSnapshot:
        scheduler = self.engine.scheduler
        blocks = self.engine.block_manager
        return EngineSnapshot(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            num_kv_blocks_used=blocks.pool.num_used_blocks,
            num_kv_blocks_total=blocks.pool.num_blocks,
            num_preemptions=scheduler.num_preemptions,
            prefix_cache_queries=blocks.prefix_cache_queries,
            prefix_cache_hits=blocks.prefix_cache_hits,
            num_shared_blocks=blocks.pool.num_shared_blocks,
            num_cached_blocks=len(blocks.pool.cached),
            num_copy_on_write=blocks.num_copy_on_write,
        )

