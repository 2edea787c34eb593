"""KV block pool start-up and throughput: how long `BlockManager(num_blocks, ...)` takes to
construct for a GPU-sized pool (4M blocks by default: ~7M fit a 141 GB GPU with a 1B model), and
how many blocks per second the pool then allocates and frees.

Allocation is timed in sequence-sized batches: first from blocks never used (a fresh pool), then
from blocks freed earlier (the LRU queue), with prefix caching on and every block published to
the cache, so the second pass also pays for evictions. The engine is not involved: this is the
block bookkeeping alone (no torch).

    python benchmarks/block_pool_startup.py [--num-blocks 4194304] [--allocate-blocks 1048576]

Writes benchmarks/results/block-pool-startup-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import machine_description, output_path

from pagoda.backend.kv.block_manager import BlockManager
from pagoda.backend.kv.block_pool import BlockKey, BlockPool, KVBlock


def time_construction(num_blocks: int, block_size: int, repeats: int) -> list[float]:
    """Seconds to construct a BlockManager (with its pool) of `num_blocks`, once per repeat."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        BlockManager(num_blocks, block_size, enable_prefix_caching=True)
        seconds.append(time.perf_counter() - started)
    return seconds


def allocate_in_batches(pool: BlockPool, num_blocks: int, batch: int) -> tuple[list, float]:
    """Allocate `num_blocks` in batches of `batch`; the tables and the seconds it took."""
    tables = []
    started = time.perf_counter()
    for _ in range(num_blocks // batch):
        tables.append(pool.allocate(batch))
    return tables, time.perf_counter() - started


def release_all(pool: BlockPool, tables: list[list[KVBlock]]) -> float:
    started = time.perf_counter()
    for table in tables:
        pool.release(reversed(table))
    return time.perf_counter() - started


def throughput(num_blocks: int, allocate_blocks: int, batch: int) -> dict[str, float]:
    """Blocks per second: fresh allocation, release, and re-allocation evicting cached blocks."""
    pool = BlockPool(num_blocks, enable_caching=True)
    tables, fresh_seconds = allocate_in_batches(pool, allocate_blocks, batch)
    for index, table in enumerate(tables):
        # One key per block, untimed: re-allocation then evicts a cached block every time.
        for offset, block in enumerate(table):
            pool.cache(block, BlockKey(None, (index, offset), hash((index, offset))))
    release_seconds = release_all(pool, tables)
    # The never-used blocks come first in the queue; take them so the timed pass reuses.
    pool.allocate(num_blocks - allocate_blocks)
    tables, reuse_seconds = allocate_in_batches(pool, allocate_blocks, batch)
    assert pool.num_evictions == allocate_blocks // batch * batch
    allocated = allocate_blocks // batch * batch
    return {
        "allocate_fresh_blocks_per_s": allocated / fresh_seconds,
        "release_blocks_per_s": allocated / release_seconds,
        "allocate_evicting_blocks_per_s": allocated / reuse_seconds,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-blocks", type=int, default=4 * 2**20)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="constructions timed")
    parser.add_argument("--allocate-blocks", type=int, default=2**20,
                        help="blocks allocated, freed and re-allocated for the throughput")
    parser.add_argument("--batch", type=int, default=16,
                        help="blocks per allocate call (16 blocks of 16: a 256-token sequence)")
    parser.add_argument("--notes", default="", help="free text stored in the result")
    parser.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    if not 0 < args.allocate_blocks <= args.num_blocks:
        parser.error("--allocate-blocks must be in 1..--num-blocks")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    seconds = time_construction(args.num_blocks, args.block_size, args.repeats)
    result = {
        "benchmark": "KV block pool start-up",
        "machine": machine_description(),
        "notes": args.notes,
        "num_blocks": args.num_blocks,
        "construction_seconds": seconds,
        "construction_seconds_median": statistics.median(seconds),
        **throughput(args.num_blocks, args.allocate_blocks, args.batch),
        "settings": vars(args),
    }
    output = output_path(args.output, "block-pool-startup-cpu.json", quick=False)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: value for key, value in result.items() if key != "machine"}, indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
