"""The engine requests behind one API request, and the client connection they depend on.

A completions request may carry several prompts: each becomes its own engine request, and their
outputs are read as one stream. Nothing is answered before every prompt was accepted (its first
output arrived), so a rejected prompt still gets a proper 400 even when the client asked for a
stream. Cancelling (the client left, the server stops) aborts every engine request, which frees
their KV blocks within one engine step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pagoda.backend.engine_client import EngineClient, Prompt
from pagoda.backend.outputs import RequestOutput
from pagoda.backend.sampling_params import SamplingParams


class PromptStreams:
    """Outputs of the engine requests for `prompts`, merged as they arrive.

    Each prompt's unread outputs are merged into one (RequestOutput.add, as the engine client
    merges what its reader missed): a client that reads slowly gets bigger deltas, never a
    backlog of small ones.
    """

    def __init__(
        self, client: EngineClient, request_id: str, prompts: list[Prompt], params: SamplingParams
    ) -> None:
        self._client = client
        self._request_id = request_id
        self._prompts = prompts
        self._params = params
        self._unread: dict[int, RequestOutput | Exception] = {}
        self._arrived = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._accepted: dict[int, RequestOutput] = {}  # outputs read by start(), not yet yielded
        self._num_finished = 0

    def engine_request_id(self, prompt_index: int) -> str:
        return f"{self._request_id}-{prompt_index}"

    async def start(self) -> None:
        """Submit every prompt and wait until each was accepted. A prompt the engine rejects
        raises its RequestRejected (or an EngineError as below), after the others were
        cancelled."""
        self._tasks = [
            asyncio.create_task(self._pump(index, prompt))
            for index, prompt in enumerate(self._prompts)
        ]
        try:
            while len(self._accepted) < len(self._prompts):
                self._accepted.update(await self._read())
        except BaseException:
            self.cancel()
            raise

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) until every prompt finished. A request the engine failed raises
        the EngineError its output carries; a failure of the engine itself, RequestFailed."""
        pending = self._accepted
        self._accepted = {}
        while True:
            for index, output in pending.items():
                self._num_finished += output.finished
                yield index, output
            if self._num_finished == len(self._prompts):
                return
            pending = await self._read()

    def cancel(self) -> None:
        """Abort whatever still runs. Synchronous, so it is safe in a cancelled task's cleanup."""
        for task in self._tasks:
            task.cancel()

    async def _read(self) -> dict[int, RequestOutput]:
        """The unread output of each prompt that has one; waits for at least one."""
        while not self._unread:
            self._arrived.clear()
            await self._arrived.wait()
        unread, self._unread = self._unread, {}
        outputs: dict[int, RequestOutput] = {}
        for index, item in unread.items():
            if isinstance(item, Exception):
                raise item
            _raise_if_failed(item)
            outputs[index] = item
        return outputs

    async def _pump(self, index: int, prompt: Prompt) -> None:
        request_id = self.engine_request_id(index)
        try:
            async for output in self._client.generate(request_id, prompt, self._params):
                unread = self._unread.get(index)
                merged = unread.add(output) if isinstance(unread, RequestOutput) else output
                self._unread[index] = merged
                self._arrived.set()
        except Exception as error:  # an EngineError, or a bug: the reader raises it either way
            self._unread[index] = error
            self._arrived.set()


def _raise_if_failed(output: RequestOutput) -> None:
    if output.error is not None:
        raise output.error
