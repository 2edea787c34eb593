"""Soak: steady load on a real `pagoda serve` for a fixed time; resident memory and KV use must
stay flat, and at the end nothing may be running, waiting or holding KV blocks.

    python integration/soak.py --duration 600 --output benchmarks/results/soak-cpu.json

Loopback only; stops by itself after --duration seconds (plus the drain). The server runs the
demo model with a KV pool small enough that long prompts are prefilled in chunks and requests
are preempted; a fifth of the clients hang up part-way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

# The load clients are shared with the test suite's load test.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from load_clients import engine_gauges, mixed_request, openai_stream  # noqa: E402
from openai_server import free_port, wait_until_healthy  # noqa: E402

logger = logging.getLogger("soak")

DISCONNECT_FRACTION = 0.2
WARMUP_SECONDS = 60.0  # RSS settles (allocator arenas, caches) before it is the baseline


async def client_loop(worker: int, base_url: str, deadline: float, tally: Counter) -> None:
    rng = random.Random(worker)
    async with httpx.AsyncClient(timeout=120.0) as client:
        index = worker
        while time.monotonic() < deadline:
            body = mixed_request(index, rng)
            index += 1
            hang_up = rng.random() < DISCONNECT_FRACTION
            outcome = await openai_stream(client, f"{base_url}/v1/completions", body, {},
                                          rng.randint(1, 3) if hang_up else None)
            tally[f"{outcome.kind}_{outcome.status}"] += 1
            if outcome.status >= 500 or outcome.kind == "error":
                logger.error("request failed: %s %s", outcome.status, outcome.detail)


async def sampler(pid: int, base_url: str, deadline: float, every: float,
                  samples: list[dict[str, float]]) -> None:
    process = psutil.Process(pid)
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=30.0) as client:
        while time.monotonic() < deadline:
            gauges = await engine_gauges(client, base_url)
            samples.append({"t": round(time.monotonic() - started, 1),
                            "rss_mib": process.memory_info().rss / 2**20, **gauges})
            logger.info("%s", samples[-1])
            await asyncio.sleep(every)


async def drain(base_url: str, timeout: float = 60.0) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=30.0) as client:
        deadline = time.monotonic() + timeout
        while True:
            gauges = await engine_gauges(client, base_url)
            idle = not (gauges["running"] or gauges["waiting"] or gauges["kv_blocks_used"])
            if idle or time.monotonic() > deadline:
                return gauges
            await asyncio.sleep(0.2)


async def soak(args: argparse.Namespace, base_url: str, pid: int) -> dict:
    deadline = time.monotonic() + args.duration
    tally: Counter = Counter()
    samples: list[dict[str, float]] = []
    await asyncio.gather(
        sampler(pid, base_url, deadline, args.sample_seconds, samples),
        *(client_loop(worker, base_url, deadline, tally) for worker in range(args.clients)),
    )
    final = await drain(base_url)
    final["rss_mib"] = psutil.Process(pid).memory_info().rss / 2**20
    baseline = next((s for s in samples if s["t"] >= WARMUP_SECONDS), samples[0])
    return {
        "duration_s": args.duration,
        "clients": args.clients,
        "disconnect_fraction": DISCONNECT_FRACTION,
        "server": args.server_flags,
        "requests": dict(tally),
        "requests_total": sum(tally.values()),
        "rss_mib": {
            "first_sample": round(samples[0]["rss_mib"], 1),
            "after_warmup": round(baseline["rss_mib"], 1),
            "end": round(final["rss_mib"], 1),
            "max": round(max(s["rss_mib"] for s in samples), 1),
            "growth_after_warmup": round(final["rss_mib"] - baseline["rss_mib"], 1),
        },
        "kv_blocks_used_max": max(s["kv_blocks_used"] for s in samples),
        "kv_blocks_total": final["kv_blocks_total"],
        "preemptions": final["preemptions"],
        "final": final,
        "samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--sample-seconds", type=float, default=15.0)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--server-flags", default="--num-kv-blocks 48 --max-num-batched-tokens 128 "
                                                  "--max-model-len 512")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "pagoda.adapters.cli", "serve", "--port", str(port),
         "--uvicorn-log-level", "warning", *args.server_flags.split()],
    )
    try:
        wait_until_healthy(base_url, timeout=120)
        report = asyncio.run(soak(args, base_url, server.pid))
    finally:
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(60)
    report["server_exit_code"] = exit_code
    final = report["final"]
    leaked = final["running"] or final["waiting"] or final["kv_blocks_used"]
    errors = sum(n for key, n in report["requests"].items() if not key.endswith("_200"))
    summary = {k: v for k, v in report.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if leaked or errors else 0


if __name__ == "__main__":
    sys.exit(main())
