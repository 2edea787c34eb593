"""Finished Responses API responses, kept in memory so a later request can continue one
(`previous_response_id`) or read it back (GET /v1/responses/{id}): at most `max_entries` of them,
each for `ttl_seconds` after it was stored, the oldest dropped first. Nothing is persisted: a
restarted server has forgotten them all."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_ENTRIES = 1024
DEFAULT_TTL_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class StoredResponse:
    body: dict[str, Any]  # the response object as it was returned
    # The conversation it answered and its reply (with its tool calls), as chat messages, without
    # its instructions (OpenAI does not carry instructions over to a continuation).
    messages: list[dict[str, Any]]


class ResponseStore:
    def __init__(
        self, max_entries: int = DEFAULT_MAX_ENTRIES, ttl_seconds: float = DEFAULT_TTL_SECONDS
    ) -> None:
        if max_entries < 1 or ttl_seconds <= 0:
            raise ValueError(f"need max_entries >= 1 and ttl_seconds > 0, got {max_entries}, "
                             f"{ttl_seconds}")
        self.max_entries = max_entries
        self.ttl_seconds = ttl_seconds
        # NOTE: in insertion order, which is expiry order too (one ttl for all).
        self._entries: OrderedDict[str, tuple[float, StoredResponse]] = OrderedDict()

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self._drop_expired()
        self._entries[response_id] = (time.monotonic() + self.ttl_seconds, stored)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response, or None when it is unknown, expired or was dropped."""
        self._drop_expired()
        entry = self._entries.get(response_id)
        return None if entry is None else entry[1]

    def __len__(self) -> int:
        self._drop_expired()
        return len(self._entries)

    def _drop_expired(self) -> None:
        now = time.monotonic()
        while self._entries:
            expires, _ = next(iter(self._entries.values()))
            if expires > now:
                return
            self._entries.popitem(last=False)
