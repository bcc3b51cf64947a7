"""The GPU smoke script keeps working: on the CPU it runs the same two jobs (fp32, tiny model)
and must report their throughput, memory and a falling loss."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~50 s: two whole jobs
def test_smoke_script_runs_both_jobs_on_the_cpu(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--device", "cpu",
         "--steps", "20", "--out", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "smoke.json").read_text())
    assert summary["device"] == "cpu"
    for job in ("pretrain", "finetune"):
        figures = summary[job]
        assert figures["samples_per_s"] > 0 and figures["peak_memory_gb"] > 0
        assert figures["last_loss"] < figures["first_loss"]
    assert 0.0 <= summary["finetune"]["eval_top1"] <= 1.0
    assert "samples/s" in result.stdout and "pretrain" in result.stdout
