"""benchmarks/gpu/run.sh --dry-run: the GPU check's script, on tiny shapes on the CPU, so it
cannot rot between the rare sessions that have a GPU."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run():
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert '"tokens_per_s"' in done.stdout
