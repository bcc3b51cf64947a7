"""Config validation: bad configs fail fast, with one line that names the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune.config import ClassificationConfig
from pretrain.config import ConfigError, PretrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def _launch(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # Run the entry point directly (no launcher): validation must happen before any
    # process group exists, so a plain process is enough to see it.
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_every_shipped_config_validates() -> None:
    for path in sorted((ROOT / "configs" / "pretrain").glob("*.yaml")):
        load_config(PretrainConfig, path)
    for path in sorted((ROOT / "configs" / "finetune").rglob("*.yaml")):
        load_config(ClassificationConfig, path)


def test_bare_name_resolves_and_overrides_apply() -> None:
    overrides = ["train.steps=7", "train.warmup_steps=2", "train.lr=1e-4", "loss.kind=siglip"]
    cfg = load_config(PretrainConfig, "demo", overrides, kind="pretrain")
    assert (cfg.train.steps, cfg.train.lr, cfg.loss.kind) == (7, 1e-4, "siglip")


@pytest.mark.parametrize(("override", "expected"), [
    ("train.stepz=5", "train.stepz: unknown key"),
    ("train.steps=many", "train.steps: Input should be a valid integer"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("loss.kind=triplet", "loss.kind"),
])
def test_bad_field_is_named(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        load_config(PretrainConfig, "demo", [override], kind="pretrain")


@pytest.mark.parametrize(("args", "expected"), [
    (["--config", "no_such_config"], "config file not found: no_such_config"),
    (["--config", "demo", "--set", "model.image.sizee=3"], "model.image.sizee: unknown key"),
    (["--config", "demo", "--set", "data.batch_size=big"], "data.batch_size"),
    (["--config", "demo", "--set", "train.warmup_steps=900"], "train: warmup_steps (900)"),
])
def test_launcher_rejects_bad_config_in_one_line(args: list[str], expected: str,
                                                 tmp_path: Path) -> None:
    result = _launch("pretrain.py", *args, "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_finetune_launcher_rejects_bad_config(tmp_path: Path) -> None:
    result = _launch("finetune.py", "--config", "demo_shapes", "--set", "data.num_classes=1",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "data.num_classes" in result.stderr.strip().splitlines()[-1]


def test_missing_shards_are_reported_in_one_line_before_start(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(b"")
    pattern = str(tmp_path / "shards" / "{00000..00003}.tar")
    for extra in ([], ["--check"]):
        result = _launch("pretrain.py", "--config", "demo", "--set", f"data.train={pattern}",
                         "--run-dir", str(tmp_path / "run"), *extra, cwd=tmp_path)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "3 of 4 shards missing" in lines[0], result.stderr
        assert not (tmp_path / "run").exists()


def test_finetune_reports_missing_encoder_weights(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(b"")
    result = _launch("finetune.py", "--config", "demo_shapes",
                     "--set", f"data.train={shards / '00000.tar'}",
                     "--set", f"data.val={shards / '00000.tar'}",
                     "--set", "encoder.weights=missing/encoder.pt", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "input error: encoder.weights: no such file missing/encoder.pt"
