"""Smoke tests of benchmarks/memory.py and benchmarks/structured.py: a tiny run on the demo model
writes a result with the fields the README and plots read. Checks shapes and bounds, never speed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def test_memory_quick_run_writes_its_fields(demo_model_dir: Path, tmp_path: Path) -> None:
    # The benchmark scripts import their helpers as top-level modules (they run as scripts).
    sys.path.insert(0, str(BENCHMARKS_DIR))
    try:
        import memory
    finally:
        sys.path.remove(str(BENCHMARKS_DIR))
    output = tmp_path / "memory.json"
    # Smaller than --quick, to stay within seconds on a 2-core machine.
    memory.main(["--model", str(demo_model_dir), "--num-requests", "2", "--length-scale", "0.05",
                 "--system-prompt-tokens", "64", "--num-kv-blocks", "128",
                 "--output", str(output)])

    result = json.loads(output.read_text())
    assert output.with_suffix(".png").exists()
    assert {"cpu", "cores", "gpu", "torch", "transformers"} <= set(result["machine"])
    assert set(result["workloads"]) == set(memory.WORKLOADS)
    for name, workload in result["workloads"].items():
        assert 0.0 <= workload["kv_waste_at_peak"] <= 1.0, name
        assert 0 < workload["peak_used_blocks"] <= workload["peak_unshared_blocks"], name
        assert workload["peak_rss_mib"] > 0, name
    assert result["workloads"]["shared_system_prompt_chat"]["prefix_cache_hit_rate"] > 0
    assert result["workloads"]["beam_width4"]["blocks_saved_at_peak"] > 0


def test_structured_quick_run_writes_its_fields(demo_model_dir: Path, tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS_DIR))
    try:
        import structured
    finally:
        sys.path.remove(str(BENCHMARKS_DIR))
    output = tmp_path / "structured.json"
    structured.main(["--model", str(demo_model_dir), "--num-requests", "2", "--max-tokens", "8",
                     "--rounds", "1", "--output", str(output)])

    result = json.loads(output.read_text())
    assert {"cpu", "cores", "gpu", "torch", "transformers"} <= set(result["machine"])
    assert result["best_ratio"] > 0 and result["median_cpu_ratio"] > 0
    (only,) = result["rounds"]
    assert only["unconstrained"]["tokens"] == only["json_schema"]["tokens"] == 16


def test_quantization_quick_run_writes_its_fields(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS_DIR))
    try:
        import quantization
    finally:
        sys.path.remove(str(BENCHMARKS_DIR))
    output = tmp_path / "quantization.json"
    quantization.main(["--quick", "--output", str(output)])

    result = json.loads(output.read_text())
    assert {"cpu", "cores", "gpu", "torch", "transformers"} <= set(result["machine"])
    rows = result["results"]
    assert list(rows) == ["fp32", "bf16", "W8", "W4"]
    assert all(row["decode_tokens_per_s"] > 0 for row in rows.values())
    linears = [rows[name]["linear_weight_bytes"] for name in rows]
    assert linears == sorted(linears, reverse=True) and linears[-1] < linears[0] / 6
    assert set(rows["W4"]["goals"]) >= {"speedup_met", "memory_met_total", "memory_met_linears"}
