"""Config validation: bad configs fail fast, with one line that names the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune.config import ClassificationConfig, FinetuneConfig
from pretrain.config import PretrainConfig
from pretrain.engine.config import ConfigError, EvalConfig, ScheduleConfig, load_config
from pretrain.engine.schedule import resolve_schedule

ROOT = Path(__file__).resolve().parents[1]


def _launch(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # Run the entry point directly (no launcher): validation must happen before any
    # process group exists, so a plain process is enough to see it.
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_every_shipped_config_validates() -> None:
    # _*.yaml files are bases (named by other configs' base:), not jobs
    for path in sorted((ROOT / "configs" / "pretrain").glob("[!_]*.yaml")):
        load_config(PretrainConfig, path)
    for path in sorted((ROOT / "configs" / "finetune").rglob("[!_]*.yaml")):
        load_config(FinetuneConfig, path)


def test_finetune_config_is_chosen_by_its_task(tmp_path: Path) -> None:
    cfg = load_config(FinetuneConfig, "demo_shapes", kind="finetune")
    assert isinstance(cfg, ClassificationConfig) and cfg.eval.best_metric == "top1"
    with pytest.raises(ConfigError, match=r"task: 'captioning' \(expected one of: "
                                          "classification"):
        load_config(FinetuneConfig, "demo_shapes", ["task=captioning"], kind="finetune")
    config = tmp_path / "no_task.yaml"
    config.write_text("encoder: {name: davit_tiny}\n")
    with pytest.raises(ConfigError, match="no_task.yaml: task: missing"):
        load_config(FinetuneConfig, config)


def test_pretraining_and_finetuning_share_their_sections() -> None:
    pretrain = load_config(PretrainConfig, "demo", kind="pretrain")
    finetune = load_config(FinetuneConfig, "demo_shapes", kind="finetune")
    for section in ("train", "optimizer", "schedule", "deepspeed", "log", "checkpoint"):
        assert type(getattr(pretrain, section)) is type(getattr(finetune, section)), section
    # pretraining extends the shared eval section with its zero-shot and retrieval sets
    assert isinstance(pretrain.eval, EvalConfig) and type(finetune.eval) is EvalConfig
    assert type(pretrain.data).__mro__[1] is type(finetune.data).__mro__[1]  # StreamConfig


@pytest.mark.parametrize("override", ["schedule.steps=true", "data.batch_size=false",
                                      "optimizer.lr=true"])
def test_booleans_are_not_numbers(override: str) -> None:
    with pytest.raises(ConfigError, match="expected a number, got the boolean"):
        load_config(PretrainConfig, "demo", [override], kind="pretrain")


def test_schedule_in_epochs_resolves_to_steps() -> None:
    cfg = ScheduleConfig(epochs=12, warmup_steps=500, decay="step", milestones=[8, 11],
                         warmup_start=0.001)
    # 1,000 samples at a global batch of 16: 63 steps per epoch (the last one partial)
    schedule = resolve_schedule(cfg, epoch_samples=1000, global_batch=16)
    assert (schedule.total_steps, schedule.warmup_steps, schedule.milestones) == (756, 500,
                                                                                   (504, 693))
    assert schedule.factor(0) == pytest.approx(0.001)
    assert schedule.factor(500) == 1.0
    assert schedule.factor(504) == pytest.approx(0.1) and schedule.factor(755) == pytest.approx(
        0.01)
    with pytest.raises(ValueError, match="data.epoch_samples"):
        resolve_schedule(cfg, epoch_samples=None, global_batch=16)


def test_cosine_and_poly_schedules_end_at_their_floor() -> None:
    cosine = resolve_schedule(ScheduleConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1),
                              None, 8)
    assert cosine.factor(5) == pytest.approx(0.5) and cosine.factor(10) == 1.0
    assert cosine.factor(55) == pytest.approx(0.55) and cosine.factor(100) == pytest.approx(0.1)
    poly = resolve_schedule(ScheduleConfig(steps=110, warmup_steps=10, decay="poly", power=0.9),
                            None, 8)
    assert poly.factor(60) == pytest.approx(0.5 ** 0.9) and poly.factor(110) == 0.0


def test_bare_name_resolves_and_overrides_apply() -> None:
    overrides = ["schedule.steps=7", "schedule.warmup_steps=2", "optimizer.lr=1e-4",
                 "loss.kind=siglip"]
    cfg = load_config(PretrainConfig, "demo", overrides, kind="pretrain")
    assert (cfg.schedule.steps, cfg.optimizer.lr, cfg.loss.kind) == (7, 1e-4, "siglip")


@pytest.mark.parametrize(("override", "expected"), [
    ("train.stepz=5", "train.stepz: unknown key"),
    ("schedule.steps=many", "schedule.steps: Input should be a valid integer"),
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
    (["--config", "demo", "--set", "schedule.warmup_steps=900"], "schedule: warmup_steps (900)"),
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


def _finetune_check(tmp_path: Path, weights: Path) -> subprocess.CompletedProcess:
    return _launch("finetune.py", "--config", "demo_shapes", "--check",
                   "--set", f"encoder.weights={weights}", cwd=tmp_path)


def test_finetune_check_reads_the_encoder_weights(tmp_path: Path) -> None:
    """A malicious pickle, a truncated file and another model's weights each fail --check with
    one line naming the file, before any process group."""
    import pickle

    import torch

    class Payload:  # unpickling this would call os.system
        def __reduce__(self):
            import os

            return (os.system, ("touch pwned",))

    malicious = tmp_path / "malicious.pt"
    malicious.write_bytes(pickle.dumps({"state_dict": Payload()}))
    timm_small = tmp_path / "other_model.pt"
    import timm

    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), timm_small)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(timm_small.read_bytes()[:5000])
    for weights, problem in ((malicious, "holds objects other than tensors"),
                             (truncated, "not a readable checkpoint"),
                             (timm_small, "does not say which encoder it holds")):
        result = _finetune_check(tmp_path, weights)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and str(weights) in lines[0] and problem in lines[0], lines
    assert not (tmp_path / "pwned").exists()
    result = _launch("finetune.py", "--config", "demo_shapes", "--check",
                     "--set", f"encoder.weights={timm_small}", "--set", "encoder.name=davit_tiny",
                     cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "does not fit davit_tiny" in lines[0] and "missing keys" in lines[0], lines
