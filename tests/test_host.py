"""What the engine takes of the machine by default: CPU threads from the cores it may use (or
cpu_threads, or $OMP_NUM_THREADS), and a CPU KV budget no larger than the configuration can fill
or the machine can spare."""

from __future__ import annotations

import os

import pytest
import torch

from pagoda.backend import LLM, host
from pagoda.backend.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from pagoda.backend.kv import cache_tensors
from pagoda.backend.kv.cache_tensors import choose_num_blocks

CPU = torch.device("cpu")
BLOCK_BYTES = 32 * 1024  # the demo model's: 4 layers x K and V x 16 tokens x 2 heads x 32 x 4 B


@pytest.fixture
def torch_threads():
    """Puts torch's thread count back after a test changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_default_to_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert host.choose_cpu_threads(None) == (1, "usable cores")


def test_a_cgroup_cpu_quota_lowers_the_thread_count(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(host, "CGROUP_DIR", tmp_path)
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker run --cpus 1.5
    assert host.usable_cpu_count() == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert host.usable_cpu_count() == 8


def test_omp_num_threads_is_honoured_and_cpu_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert host.choose_cpu_threads(None) == (3, "$OMP_NUM_THREADS")
    assert host.choose_cpu_threads(1) == (1, "cpu_threads")


def test_the_engine_runs_with_cpu_threads(demo_model_dir, torch_threads):
    LLM(str(demo_model_dir), num_kv_blocks=16, cpu_threads=1)
    assert torch.get_num_threads() == 1


def test_cpu_threads_must_be_positive():
    with pytest.raises(ValueError, match="cpu_threads"):
        EngineConfig(cpu_threads=0)


def test_default_cpu_budget_is_what_max_num_seqs_sequences_can_fill():
    # 2 sequences of 100 tokens: 7 blocks of 16 tokens each.
    config = EngineConfig(max_num_seqs=2, max_model_len=100)
    assert choose_num_blocks(config, BLOCK_BYTES, CPU, model_max_len=4096) == 14
    # The model's own length when max_model_len is unset: 256 x 256 blocks = 2 GiB.
    assert choose_num_blocks(EngineConfig(), BLOCK_BYTES, CPU, model_max_len=4096) == 65536


def test_default_cpu_budget_takes_at_most_a_quarter_of_the_machine(monkeypatch):
    monkeypatch.setattr(cache_tensors, "physical_memory_bytes", lambda: 2 * 2**30)
    blocks = choose_num_blocks(EngineConfig(), BLOCK_BYTES, CPU, model_max_len=4096)
    assert blocks * BLOCK_BYTES == 512 * 2**20


def test_a_cgroup_memory_limit_counts_as_the_machine(monkeypatch, tmp_path):
    monkeypatch.setattr(host, "CGROUP_DIR", tmp_path)
    (tmp_path / "memory.max").write_text(f"{2**30}\n")
    assert host.physical_memory_bytes() == 2**30
    (tmp_path / "memory.max").write_text("max\n")
    assert host.physical_memory_bytes() > 2**30


def test_an_explicit_budget_is_not_capped(monkeypatch):
    monkeypatch.setattr(cache_tensors, "physical_memory_bytes", lambda: 2**30)
    config = EngineConfig(max_num_seqs=1, max_model_len=16,
                          kv_cache_memory_bytes=DEFAULT_CPU_KV_CACHE_BYTES)
    assert choose_num_blocks(config, BLOCK_BYTES, CPU, model_max_len=4096) == 65536
