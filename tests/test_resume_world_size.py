"""A run resumes on a different number of ranks (a node lost, or more granted): at every ZeRO
stage the weights, fp32 master weights, Adam moments, step, schedule position, samples seen and
best-checkpoint record right after the resume are the checkpoint's, bit for bit; the original
checkpoint is untouched; a refused resume changes nothing in the run directory.

Runs real DeepSpeed jobs (gloo on CPU) with a tiny model.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from pretrain.engine.checkpoint import fp32_state_dict
from pretrain.engine.launcher import deepspeed_command
from tests.conftest import ROOT, TINY_MODEL, run_deepspeed


def _args(run_dir: Path, shards: str, *extra: str) -> list[str]:
    return ["--config", "demo", "--run-dir", str(run_dir), *TINY_MODEL,
            "--set", f"data.train={shards}", "--set", "data.batch_size=6",
            "--set", "data.shuffle_buffer=32", "--set", "data.shuffle_initial=8",
            "--set", "schedule.warmup_steps=2", "--set", "log.every=1",
            "--set", "schedule.steps=3", *extra]


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _resume_state(kind: str, run_dir: Path, out: Path, ranks: int) -> dict:
    script = str(ROOT / "tests" / "scripts" / "resume_state.py")
    command = deepspeed_command(f"{kind}.py", [kind, str(run_dir), str(out)], ranks)
    command[command.index(str(ROOT / "launch" / f"{kind}.py"))] = script
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "state.json").read_text())


def _universal_tensor(path: Path) -> torch.Tensor:
    value = torch.load(path, weights_only=False)  # ZeRO 1/2: {"param": ...}; ZeRO 3: the tensor
    return torch.as_tensor(value["param"] if isinstance(value, dict) else value)


def _assert_same_optimizer_state(original: Path, resumed: Path) -> None:
    """Every parameter's fp32 master, exp_avg and exp_avg_sq: universal checkpoint files."""
    names = sorted(p.name for p in (original / "zero").iterdir() if p.is_dir())
    assert names == sorted(p.name for p in (resumed / "zero").iterdir() if p.is_dir())
    for name in names:
        for state in ("fp32", "exp_avg", "exp_avg_sq", "step"):  # step: Adam's count
            if not (original / "zero" / name / f"{state}.pt").is_file():
                # ZeRO-3 keeps Adam's step in optimizer_state.pt; a frozen parameter has
                # no optimizer state, only fp32.pt
                assert not (resumed / "zero" / name / f"{state}.pt").is_file()
                continue
            a, b = (_universal_tensor(f / "zero" / name / f"{state}.pt")
                    for f in (original, resumed))
            assert torch.equal(a, b), (name, state)
    common = [torch.load(f / "zero" / "optimizer_state.pt", weights_only=False)
              for f in (original, resumed)]
    groups = [[{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
              for state in common]
    assert groups[0] == groups[1]  # lr, weight decay, betas of every group
    if "optimizer_state_dict" in common[0]:  # ZeRO-3 keeps Adam's step count here
        steps = [[s["step"] for s in state["optimizer_state_dict"]["state"].values()]
                 for state in common]
        assert steps[0] and {float(s) for s in steps[0]} == {float(s) for s in steps[1]}


def _assert_same_stage0_state(original: Path, resumed: Path) -> None:
    a = torch.load(original / "mp_rank_00_model_states.pt", weights_only=False)
    b = torch.load(resumed / "mp_rank_00_model_states.pt", weights_only=False)
    for name, value in a["module"].items():
        assert torch.equal(value, b["module"][name]), name
    sa, sb = a["optimizer"], b["optimizer"]
    if "fp32_groups" in sa:  # bf16: the masters and the wrapped torch optimizer
        for ga, gb in zip(sa["fp32_groups"], sb["fp32_groups"], strict=True):
            assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))
        sa, sb = sa["optimizer_state_dict"], sb["optimizer_state_dict"]
    assert sa["state"].keys() == sb["state"].keys()
    for key, state in sa["state"].items():
        for field, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["state"][key][field]))


def _check_resume(kind: str, args: list[str], run_dir: Path, tmp_path: Path, stage: int,
                  ranks: int, global_batch: int, trained: bool = False) -> dict:
    """Train ``args`` (3 steps) on 2 ranks (unless ``trained``), resume its last checkpoint on
    ``ranks`` and check the state right after the load against the checkpoint."""
    if not trained:
        run_deepspeed(f"{kind}.py", args)
    tag = (run_dir / "checkpoints" / "latest").read_text()
    assert tag == "step_00000003"
    before = _tree_digest(run_dir / "checkpoints" / tag)
    saved = json.loads((run_dir / "checkpoints" / tag / "run_state.json").read_text())
    assert saved["world_size"] == 2 and saved["samples_seen"] == 3 * global_batch

    out = tmp_path / "out"
    state = _resume_state(kind, run_dir, out, ranks)
    assert state["notes"][0].startswith(f"checkpoint {tag} was written by 2 ranks; ")
    assert state["step"] == 3 and state["samples_seen"] == 3 * global_batch
    assert state["batch_size"] * state["grad_accum"] * ranks == global_batch  # kept
    assert _tree_digest(run_dir / "checkpoints" / tag) == before  # the original untouched
    original = fp32_state_dict(run_dir / "checkpoints", tag)
    resumed = torch.load(out / "fp32.pt", weights_only=True)
    assert original.keys() == resumed.keys()
    for name, value in original.items():
        assert torch.equal(value, resumed[name]), name
    if stage > 0:
        converted = run_dir / "checkpoints" / "universal" / tag
        assert f"converted to a universal checkpoint in {converted}" in state["notes"][0]
        _assert_same_optimizer_state(converted, out / "universal")
    else:
        _assert_same_stage0_state(run_dir / "checkpoints" / tag, out / "resumed")
    best = run_dir / "checkpoints" / tag / "best.json"
    if best.is_file():
        assert state["best"] == json.loads(best.read_text())
    for rank in range(ranks):  # the task state (EMA) of old rank `rank mod 2`
        old = torch.load(run_dir / "checkpoints" / tag / f"rank_{rank % 2:05d}.pt",
                         weights_only=True)["task"]
        if old:
            new = torch.load(out / f"task_{rank}.pt", weights_only=True)
            _assert_same_tree(old, new)
    return state


def _assert_same_tree(a: object, b: object) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_same_tree(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize(("stage", "ranks"), [
    (2, 1),
    (0, 3),
    pytest.param(0, 1, marks=pytest.mark.slow),
    pytest.param(1, 1, marks=pytest.mark.slow),
    pytest.param(1, 3, marks=pytest.mark.slow),
    pytest.param(2, 3, marks=pytest.mark.slow),
    pytest.param(3, 1, marks=pytest.mark.slow),
    pytest.param(3, 3, marks=pytest.mark.slow),
])
def test_resume_on_another_world_size_restores_state_exactly(
        stage: int, ranks: int, shape_shards: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = _args(run_dir, shape_shards["train"], "--set", f"deepspeed.zero_stage={stage}",
                 "--set", "deepspeed.precision=fp32")
    _check_resume("pretrain", args, run_dir, tmp_path, stage, ranks, global_batch=12)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "offload", "precision", "ranks"), [
    (0, False, "bf16", 3),  # stage 0 bf16: DeepSpeed's fp32 masters, replicated
    (2, True, "bf16", 1),
    (3, True, "fp32", 3),
])
def test_pretrain_resume_with_bf16_or_offload(stage: int, offload: bool, precision: str,
                                              ranks: int, shape_shards: dict,
                                              tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = _args(run_dir, shape_shards["train"], "--set", f"deepspeed.zero_stage={stage}",
                 "--set", f"deepspeed.offload_optimizer={str(offload).lower()}",
                 "--set", f"deepspeed.precision={precision}")
    _check_resume("pretrain", args, run_dir, tmp_path, stage, ranks, global_batch=12)


def _classification_args(run_dir: Path, shape_shards: dict, *extra: str) -> list[str]:
    from data_tools.synthetic import COLORS
    from tests.jobs import TINY_ENCODER

    return ["--config", "demo_shapes", "--run-dir", str(run_dir), *TINY_ENCODER,
            "--set", f"data.train={shape_shards['labelled']}",
            "--set", f"data.val={shape_shards['heldout']}",
            "--set", "data.label_key=color", "--set", f"data.classes=[{', '.join(COLORS)}]",
            "--set", "data.num_classes=8", "--set", "data.image_size=32",
            "--set", "data.batch_size=6", "--set", "data.shuffle_buffer=32",
            "--set", "data.shuffle_initial=8", "--set", "schedule.steps=3",
            "--set", "schedule.warmup_steps=1", "--set", "log.every=1", *extra]


@pytest.mark.slow
def test_linear_probe_resume_keeps_the_frozen_encoder(shape_shards: dict,
                                                      tmp_path: Path) -> None:
    """The frozen encoder of a linear probe comes from the checkpoint: the resumed build gets
    another seed, so its own initial encoder differs (DeepSpeed's universal load restores only
    the optimizer's parameters)."""
    run_dir = tmp_path / "run"
    args = _classification_args(run_dir, shape_shards, "--set", "linear_probe=true",
                                "--set", "data.randaugment=null", "--set", "data.mixup=0",
                                "--set", "data.cutmix=0", "--set", "data.random_erasing=0",
                                "--set", "deepspeed.zero_stage=2")
    run_deepspeed("finetune.py", args)
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["train"]["seed"] += 5
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _check_resume("finetune", args, run_dir, tmp_path, 2, 1, global_batch=12,
                  trained=True)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "ranks"), [(2, 1), (1, 3)])
def test_classification_resume_carries_ema_and_best(stage: int, ranks: int,
                                                    shape_shards: dict,
                                                    tmp_path: Path) -> None:
    """Fine-tuning (classification with an EMA and a best checkpoint by top-1)."""
    from data_tools.synthetic import COLORS
    from tests.jobs import TINY_ENCODER

    run_dir = tmp_path / "run"
    args = ["--config", "demo_shapes", "--run-dir", str(run_dir), *TINY_ENCODER,
            "--set", f"data.train={shape_shards['labelled']}",
            "--set", f"data.val={shape_shards['heldout']}",
            "--set", "data.label_key=color", "--set", f"data.classes=[{', '.join(COLORS)}]",
            "--set", "data.num_classes=8", "--set", "data.image_size=32",
            "--set", "data.batch_size=6", "--set", "data.shuffle_buffer=32",
            "--set", "data.shuffle_initial=8", "--set", "schedule.steps=3",
            "--set", "schedule.warmup_steps=1", "--set", "eval.every=3",
            "--set", "eval.batch_size=32", "--set", "eval.best_metric=ema_top1",
            "--set", "ema.enabled=true", "--set", f"deepspeed.zero_stage={stage}",
            "--set", "log.every=1"]
    state = _check_resume("finetune", args, run_dir, tmp_path, stage, ranks, global_batch=12)
    assert state["best"] is not None and state["best"]["step"] == 3


@pytest.mark.slow
@pytest.mark.parametrize(("task", "stage"), [("detection", 2), ("segmentation", 3)])
def test_dense_task_resume_on_one_rank(task: str, stage: int, tmp_path: Path) -> None:
    """Fine-tuning (detection, segmentation): 2 ranks to 1."""

    run_dir = tmp_path / "run"
    if task == "detection":
        from data_tools.coco_synthetic import write_synthetic_coco
        from tests.test_detection_run import _args as task_args

        root = write_synthetic_coco(tmp_path / "coco", train_images=16, val_images=4, seed=3,
                                    min_size=80, max_size=128)
        micro = 4  # configs/finetune/coco/demo.yaml
    else:
        from finetune.segmentation.synthetic import write_synthetic_ade
        from tests.test_segmentation_run import _args as task_args

        root = write_synthetic_ade(tmp_path / "ade", train=16, val=4, num_classes=4, seed=7,
                                   min_side=36, max_side=70)
        micro = 4  # test_segmentation_run's data.batch_size
    args = task_args(run_dir, root, "--set", f"deepspeed.zero_stage={stage}",
                     "--set", "schedule.warmup_steps=1", steps=3)
    cfg_batch = 2 * micro
    _check_resume("finetune", args, run_dir, tmp_path, stage, 1, global_batch=cfg_batch)


def _run_files(run_dir: Path) -> dict[str, str]:
    """Digests of what describes the run: its config files and every checkpoint file."""
    files = {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
             for name in ("config.yaml", "deepspeed.json")}
    return files | {f"checkpoints/{k}": v
                    for k, v in _tree_digest(run_dir / "checkpoints").items()}


def test_refused_resumes_change_nothing_and_say_so_once(shape_shards: dict,
                                                        tmp_path: Path) -> None:
    """A global batch 3 ranks cannot split, and a new world size together with a new ZeRO
    stage: each refused in one line by one rank, before any "resumed", leaving config.yaml,
    deepspeed.json and every checkpoint file as they were (no universal conversion either)."""
    run_dir = tmp_path / "run"
    args = _args(run_dir, shape_shards["train"], "--set", "deepspeed.zero_stage=1",
                 "--set", "data.batch_size=5")
    run_deepspeed("pretrain.py", args)  # global batch 10
    before = _run_files(run_dir)
    attempts = [
        (3, [], "which 3 ranks cannot split evenly"),
        (1, ["--set", "deepspeed.zero_stage=2"], "change the world size or the ZeRO stage"),
    ]
    for ranks, extra, message in attempts:
        result = run_deepspeed("pretrain.py", [*args, *extra], ranks=ranks, check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output[-3000:]
        refusals = [line for line in output.splitlines() if "resume refused:" in line]
        assert len(refusals) == 1 and message in refusals[0], output[-3000:]
        assert "Traceback" not in output and "resumed from" not in output
        assert _run_files(run_dir) == before
    assert not (run_dir / "checkpoints" / "universal").exists()


@pytest.mark.parametrize(("stage", "ranks", "workers"), [
    (1, 3, 1), (1, 2, 2),
    *[pytest.param(stage, ranks, 1, marks=pytest.mark.slow)
      for stage, ranks in [(0, 1), (0, 3), (1, 1), (2, 1), (2, 3), (3, 1), (3, 3)]]])
def test_a_run_resumed_on_another_layout_trains_to_the_end(
        stage: int, ranks: int, workers: int, shape_shards: dict, tmp_path: Path) -> None:
    """Written by 2 ranks x 1 data worker at each ZeRO stage, resumed by the same command on
    3 ranks, on 1, or with 2 workers per rank: the run trains to its end, samples_seen
    continues from the saved value, the global batch is kept, and the streams were re-dealt
    (each new slot's stream is seeded as its stream says: carried over, or new)."""
    from pretrain.engine.run_log import read_training_metrics

    run_dir = tmp_path / "run"
    args = _args(run_dir, shape_shards["train"], "--set", f"deepspeed.zero_stage={stage}",
                 "--set", "deepspeed.precision=fp32", "--set", "data.workers=1")
    run_deepspeed("pretrain.py", args)  # 3 steps x 12
    result = run_deepspeed("pretrain.py", [*args, "--set", "schedule.steps=6",
                                           "--set", f"data.workers={workers}"], ranks=ranks)
    assert "pretrain completed" in result.stdout
    records = read_training_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["samples_seen"] for r in records] == [12 * step for step in range(1, 7)]
    tag = run_dir / "checkpoints" / "step_00000006"
    saved = json.loads((tag / "run_state.json").read_text())
    assert saved["world_size"] == ranks and saved["global_batch"] == 12
    streams = [torch.load(tag / f"rank_{rank:05d}.pt", weights_only=True)["data"]["workers"]
               for rank in range(ranks)]
    slots = [worker["stream"] for rank in streams for worker in rank]
    assert len(slots) == ranks * workers
    old = [[0, 0], [1, 0]][:len(slots)]
    assert slots[:2] == old  # the old slots continue where they stood
    assert all(slot[0] < 0 for slot in slots[2:])  # new slots: new streams


def test_deliberate_batch_change_continues_by_samples_seen(shape_shards: dict,
                                                           tmp_path: Path) -> None:
    """--set data.batch_size doubles the global batch on resume: samples_seen continues from
    the saved value (it used to be recomputed as step x the new batch and went backwards),
    and the schedule continues at its position in samples."""
    from pretrain.engine.run_log import read_metrics

    run_dir = tmp_path / "run"
    run_deepspeed("pretrain.py", _args(run_dir, shape_shards["train"]))  # 3 steps x 12
    result = run_deepspeed("pretrain.py", _args(run_dir, shape_shards["train"],
                                                "--set", "schedule.steps=6",
                                                "--set", "data.batch_size=12"))
    assert "global batch changed from 12 to 24" in result.stdout
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    # 6 steps at 24 = 144 samples; 36 seen at step 3, so 108 = 4.5 steps of 24 remain
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["samples_seen"] for r in records] == [12, 24, 36, 60, 84, 108, 132, 156]
    saved = json.loads((run_dir / "checkpoints" / "step_00000008" / "run_state.json")
                       .read_text())
    assert saved["samples_seen"] == 156 and saved["global_batch"] == 24
    config = (run_dir / "config.yaml").read_text()
    assert "batch_size: 12" in config  # written once the new launch took its first step
    # The lr logged at step k is the one of step k + 1: the schedule resolved for 24 per step,
    # read at k + (36 / 24 - 3) after the change (engine.md, "Counters and schedule")
    from pretrain.config import PretrainConfig
    from pretrain.engine.config import load_config
    from pretrain.engine.schedule import resolve_schedule

    schedule = resolve_schedule(load_config(PretrainConfig, run_dir / "config.yaml").schedule,
                                None, 24)
    lr = {r["step"]: r["lr"] for r in records}
    for step in range(5, 8):
        expected = schedule.factor(step - 1.5) / schedule.factor(4 - 1.5)
        assert lr[step] / lr[4] == pytest.approx(expected, rel=1e-9), step


def test_batch_split_keeps_the_global_batch_or_names_the_options() -> None:
    from pretrain.engine.resharding import ResumeRefused, SavedRun, batch_split, schedule_offset

    saved = SavedRun(tag="step_00000008", step=8, samples_seen=1024, global_batch=128,
                     micro_batch=32, grad_accum=1, world_size=4, zero_stage=2)
    assert batch_split(saved, 4, 32, 1) == (32, 1)
    assert batch_split(saved, 2, 32, 1) == (32, 2)  # a node lost: accumulate twice
    assert batch_split(saved, 8, 32, 1) == (16, 1)  # more ranks: smaller micro-batches
    assert batch_split(saved, 16, 32, 1) == (8, 1)
    with pytest.raises(ResumeRefused, match="3 ranks cannot split evenly.*--set train.grad_accum"):
        batch_split(saved, 3, 32, 1)
    assert batch_split(saved, 3, 32, 2) == (32, 2)  # deliberate: taken as it is
    resplit = SavedRun(tag="step_00000009", step=9, samples_seen=1152, global_batch=128,
                       micro_batch=32, grad_accum=2, world_size=2, zero_stage=2,
                       requested_micro_batch=32, requested_grad_accum=1)
    assert batch_split(resplit, 4, 32, 1) == (32, 1)  # back on 4 ranks: the split asked for
    assert schedule_offset(saved, 128) == 0
    assert schedule_offset(saved, 256) == 1024 / 256 - 8  # doubled: the schedule at 4, not 8


@pytest.mark.parametrize("ranks", [3, pytest.param(1, marks=pytest.mark.slow)])
def test_an_imagefolder_epoch_continues_on_another_world_size(ranks: int,
                                                              tmp_path: Path) -> None:
    """Classification on an ImageFolder, interrupted after half an epoch on 2 ranks and resumed
    on 3 (or 1) to the end of it: the saved stream states say that every position of the
    epoch, hence every image, was read exactly once (the items themselves are checked by
    tests/test_stream_layouts.py through the same stream)."""
    from data_tools.imagefolder_synthetic import write_synthetic_imagefolder
    from pretrain.engine.deal import Deal
    from tests.jobs import TINY_ENCODER

    root = tmp_path / "imagenet"
    write_synthetic_imagefolder(root / "train", num_classes=4, per_class=12, seed=0,
                                image_size=16)
    write_synthetic_imagefolder(root / "val", num_classes=4, per_class=3, seed=1,
                                image_size=16)
    run_dir = tmp_path / "run"
    args = ["--config", "demo_shapes", "--run-dir", str(run_dir), *TINY_ENCODER,
            "--set", "data.layout=imagefolder", "--set", f"data.train={root / 'train'}",
            "--set", f"data.val={root / 'val'}", "--set", "data.classes=null",
            "--set", "data.num_classes=4", "--set", "data.image_size=32",
            "--set", "data.batch_size=6", "--set", "data.workers=1",
            "--set", "schedule.warmup_steps=1", "--set", "eval.enabled=false",
            "--set", "ema.enabled=false", "--set", "log.every=1",
            "--set", "deepspeed.zero_stage=1"]
    run_deepspeed("finetune.py", [*args, "--set", "schedule.steps=2"])  # 24 of 48 images
    run_deepspeed("finetune.py", [*args, "--set", "schedule.steps=4"], ranks=ranks)
    tag = run_dir / "checkpoints" / "step_00000004"
    states = [torch.load(tag / f"rank_{rank:05d}.pt", weights_only=True)["data"]
              for rank in range(ranks)]
    deal = Deal.from_dict(states[0]["deal"])
    assert deal.slots == ranks and deal.base >= 24 - 2 * 6  # continued, not restarted
    read = [deal.position(rank, step) for rank, state in enumerate(states)
            for step in range(state["workers"][0]["consumed"])
            if not deal.taken_earlier(deal.position(rank, step))]
    earlier = [p for p in range(48) if deal.taken_earlier(p)]
    assert sorted(read + earlier) == list(range(48))  # the epoch, each position once
