"""Keeping a worker registered with a FastChat controller: register, heartbeats, re-register.

The controller forgets workers whose heartbeats stop (after 90 s) and all of them when it
restarts; it answers a heartbeat from a worker it does not know with `exist: false`. So: register
at start, retrying with backoff while the controller is unreachable (a worker must outlive its
controller, never crash because of it); send a heartbeat with the queue length every
FASTCHAT_WORKER_HEART_BEAT_INTERVAL seconds (FastChat's variable and default); register again
when a heartbeat answers `exist: false`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

import httpx

logger = logging.getLogger(__name__)

HEART_BEAT_INTERVAL_ENV = "FASTCHAT_WORKER_HEART_BEAT_INTERVAL"
DEFAULT_HEART_BEAT_INTERVAL = 45.0
FIRST_RETRY_DELAY = 0.5
REQUEST_TIMEOUT = 5.0  # FastChat's workers give the controller 5 s per call


def heart_beat_interval_from_env() -> float:
    """Whole seconds, as FastChat reads the variable: fastchat.constants fails to import with
    anything else, so both sides agree on what is valid."""
    raw = os.environ.get(HEART_BEAT_INTERVAL_ENV)
    if raw is None:
        return DEFAULT_HEART_BEAT_INTERVAL
    try:
        interval = int(raw)
    except ValueError:
        interval = 0
    if interval <= 0:
        raise ValueError(
            f"{HEART_BEAT_INTERVAL_ENV} must be a positive whole number of seconds, got {raw!r}"
        )
    return float(interval)


def check_http_url(name: str, url: str) -> str:
    """`url` without a trailing slash; ValueError naming `name` unless it is an http(s) URL."""
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{name} must be an http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


class ControllerRegistration:
    def __init__(
        self,
        controller_address: str,
        worker_address: str,
        status: Callable[[], dict[str, Any]],
        heart_beat_interval: float = DEFAULT_HEART_BEAT_INTERVAL,
    ) -> None:
        self.controller_address = check_http_url("controller address", controller_address)
        self.worker_address = check_http_url("worker address", worker_address)
        self.status = status
        self.heart_beat_interval = heart_beat_interval

    async def run(self) -> None:
        """Register, then keep the registration alive; runs until cancelled."""
        async with httpx.AsyncClient(base_url=self.controller_address,
                                     timeout=REQUEST_TIMEOUT) as client:
            await self._register_until_accepted(client)
            while True:
                await asyncio.sleep(self.heart_beat_interval)
                if not await self._heart_beat(client):
                    logger.info("the controller no longer knows this worker; registering again")
                    await self._register_until_accepted(client)

    async def _register_until_accepted(self, client: httpx.AsyncClient) -> None:
        # Retries double from FIRST_RETRY_DELAY up to one heartbeat interval, so a worker is
        # back at most one interval after its controller.
        delay = min(FIRST_RETRY_DELAY, self.heart_beat_interval)
        while True:
            payload = {
                "worker_name": self.worker_address,
                "check_heart_beat": True,
                "worker_status": self.status(),
                "multimodal": False,
            }
            try:
                response = await client.post("/register_worker", json=payload)
                response.raise_for_status()
            except httpx.HTTPError as error:
                logger.warning(
                    "registering with %s failed (%s: %s); retrying in %.1f s",
                    self.controller_address, type(error).__name__, error, delay,
                )
            else:
                logger.info("registered %s as %s with %s", self.status()["model_names"],
                            self.worker_address, self.controller_address)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.heart_beat_interval)

    async def _heart_beat(self, client: httpx.AsyncClient) -> bool:
        """False when the controller answered that it does not know this worker. An unreachable
        controller counts as knowing it: the next heartbeat will tell."""
        payload = {
            "worker_name": self.worker_address,
            "queue_length": self.status()["queue_length"],
        }
        try:
            response = await client.post("/receive_heart_beat", json=payload)
            response.raise_for_status()
            exist = response.json()["exist"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
            logger.warning("heartbeat to %s failed (%s: %s)", self.controller_address,
                           type(error).__name__, error)
            return True
        return bool(exist)
