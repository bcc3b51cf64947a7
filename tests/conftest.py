"""Shared fixtures: small synthetic shards and a runner for real multi-rank DeepSpeed jobs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import tqdm

from pretrain.engine.launcher import deepspeed_command

# No tqdm monitor thread in the test process: once started it lives as long as the process, and
# code that forks only from a single-threaded process (data_tools.workers) would then spawn,
# whichever test happened to create the first progress bar (tests/test_data_build.py checks it).
tqdm.tqdm.monitor_interval = 0

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shape_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Small synthetic splits (train / labelled / heldout) as shard patterns."""
    from data_tools.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("shapes")
    splits = {"train": (512, 0, 128), "labelled": (256, 2, 128), "heldout": (192, 1, 96)}
    return {name: write_synthetic_shards(root / name, count, seed, samples_per_shard=per_shard,
                                         progress=False)
            for name, (count, seed, per_shard) in splits.items()}


def run_deepspeed(script: str, args: list[str], ranks: int = 2, timeout: int = 600,
                  check: bool = True) -> subprocess.CompletedProcess:
    """Launch ``launch/<script>`` on ``ranks`` local processes with DeepSpeed's launcher."""
    command = deepspeed_command(script, args, ranks)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    return result


TINY_MODEL = [
    "--set", "model.embed_dim=32",
    "--set", "model.image.overrides={depths: [1, 1, 1, 1], embed_dims: [16, 32, 48, 64], "
             "num_heads: [1, 1, 1, 2]}",
    "--set", "model.image.image_size=32",
    "--set", "model.text.width=32", "--set", "model.text.heads=2", "--set", "model.text.layers=1",
    "--set", "model.text.context_length=16",
]
