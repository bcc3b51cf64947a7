"""The fine-tuning jobs fail the way pretraining does (issue 23): each case is a user's exact
mistake from the field, run through launch/finetune.py as a user runs it, and each asserts
the exit code, the one line (no traceback), a time bound and that nothing already trained is
lost.

1. a training split whose images cannot be read ends in one line, never a hang (2 ranks);
   a wrong ``data.train_images`` is refused by ``--check``;
2. a validation split that fails the final evaluation keeps the trained checkpoint and the
   export, and says how to evaluate only (2 ranks); a wrong ``data.val_images`` is refused
   by ``--check``;
3. labels beyond ``data.num_classes`` (a forgotten ``reduce_zero_label``), a checkpoint built
   for other sizes and validation categories other than training's, each in one line;
4. ``--eval-only`` without the training split (segmentation, detection) and on a timm export
   folder (classification);
5. the counts in eval.json equal the run's skip list, unreadable last images of a slice
   included;
6. metrics files are strict JSON (a class without IoU is ``null``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from data_tools.coco_synthetic import write_synthetic_coco
from finetune.segmentation.synthetic import write_synthetic_ade
from pretrain.engine.launcher import deepspeed_command
from pretrain.engine.skipped import read_skipped
from tests.conftest import ROOT
from tests.jobs import TINY_ENCODER

TINY_SEGMENTER = [*TINY_ENCODER, "--set", "data.num_classes=4", "--set", "data.classes=null",
                  "--set", "data.crop_size=32", "--set", "data.scale=[64, 32]",
                  "--set", "data.batch_size=2", "--set", "model.decoder_channels=16",
                  "--set", "model.aux_channels=8", "--set", "eval.scale=[64, 32]",
                  "--set", "eval.every=null", "--set", "checkpoint.every=1000",
                  "--set", "log.every=1", "--set", "log.progress=false",
                  "--set", "schedule.warmup_steps=1"]
TINY_DETECTOR = [*TINY_ENCODER, "--set", "data.scales=[64]", "--set", "data.max_size=96",
                 "--set", "eval.min_size=64", "--set", "eval.max_size=96",
                 "--set", "model.fpn_channels=16", "--set", "model.head_channels=16",
                 "--set", "model.fc_channels=32", "--set", "log.progress=false"]


def _run(args: list[str], ranks: int | None = None, timeout: int = 300
         ) -> tuple[int, str, str, float]:
    """launch/finetune.py ARGS as a user runs it: one plain process, or ``ranks`` DeepSpeed
    ranks. Returns (exit code, stdout, stderr, seconds); a run past ``timeout`` is a hang."""
    command = ([sys.executable, str(ROOT / "launch" / "finetune.py"), *args] if ranks is None
               else deepspeed_command("finetune.py", args, ranks))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "disabled"}
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"no exit within {timeout} s: the job hangs") from None
    return process.returncode, out, err, time.monotonic() - started


def _check(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, float]:
    """``launch/finetune.py ARGS --check`` in this process (it starts no process group):
    (exit code, stderr, seconds)."""
    from finetune.config import FinetuneConfig
    from finetune.registry import task_class
    from pretrain.engine.job_cli import run_job

    capsys.readouterr()
    started = time.monotonic()
    code = run_job([*args, "--check"], "finetune", "finetune", FinetuneConfig, task_class)
    return code, capsys.readouterr().err, time.monotonic() - started


def _one_line(err: str, start: str, ranks: int = 1) -> str:
    """The job's error line on stderr (at most one per rank: each names the files it met),
    and no traceback."""
    assert "Traceback" not in err, err[-4000:]
    lines = [line for line in err.splitlines() if line.startswith(start)]
    assert 1 <= len(lines) <= ranks, err[-4000:]
    return lines[0]


def _leftovers(run_dir: Path) -> list[psutil.Process]:
    """Processes (ranks, data workers) of the job still alive."""
    alive = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if str(run_dir) in " ".join(process.info["cmdline"] or []):
                alive.append(process)
        except psutil.Error:
            continue
    return alive


@pytest.fixture(scope="module")
def ade(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_ade(tmp_path_factory.mktemp("ade"), train=8, val=5, num_classes=4,
                               seed=7, min_side=36, max_side=70)


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_coco(tmp_path_factory.mktemp("coco"), train_images=8, val_images=5,
                                seed=3, min_size=64, max_size=96)


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _truncate(folder: Path) -> None:
    for path in folder.iterdir():
        path.write_bytes(path.read_bytes()[:100])  # truncated JPEGs behind .jpg


def _ade_args(run_dir: Path, root: Path, *extra: str) -> list[str]:
    return ["--config", "ade20k/demo", "--run-dir", str(run_dir), *TINY_SEGMENTER,
            "--set", f"data.root={root}", *extra]


# ---------------------------------------------------------------- 1. no hang


def test_unreadable_training_images_end_two_ranks_in_one_line(ade: Path, tmp_path: Path
                                                                ) -> None:
    root = _copy(ade, tmp_path / "ade")
    _truncate(root / "images" / "training")
    run_dir = tmp_path / "run"
    code, _, err, seconds = _run(_ade_args(run_dir, root, "--set", "data.workers=1",
                                           "--set", "schedule.steps=4"), ranks=2)
    assert code == 1, err[-3000:]
    line = _one_line(err, "training aborted:", ranks=2)
    assert line.startswith(f"training aborted: data.train_split 'training' "
                           f"({root / 'images' / 'training'}): the last 8 images read all "
                           "failed to decode (the train split; first ")
    assert "ADE_train_0000000" in line and f"{run_dir / 'skipped.jsonl'}" in line
    assert seconds < 240  # DeepSpeed's start-up included (about 25 s on an idle 2-core machine)
    assert not _leftovers(run_dir)  # no rank, no data worker left behind
    # every listed file is one of the truncated ones; how many each rank listed before the
    # first rank gave up depends on the ranks' interleaving (each lists a file once)
    listed = read_skipped(run_dir)
    training = root / "images" / "training"
    assert listed and {r["split"] for r in listed} == {"train"}
    assert all(Path(r["path"]).parent == training for r in listed)


@pytest.mark.slow  # two 2-rank launches
def test_images_lost_mid_run_abort_in_one_line_and_keep_the_checkpoint(ade: Path,
                                                                        tmp_path: Path) -> None:
    """The training split becomes unreadable after a checkpoint (a file system gone bad): the
    resumed run ends in one line, and the checkpoint it resumed from is still the latest."""
    root = _copy(ade, tmp_path / "ade")
    run_dir = tmp_path / "run"
    code, _, err, _ = _run(_ade_args(run_dir, root, "--set", "schedule.steps=2"), ranks=2)
    assert code == 0, err[-3000:]
    _truncate(root / "images" / "training")
    code, _, err, seconds = _run(_ade_args(run_dir, root, "--set", "schedule.steps=4",
                                           "--set", "checkpoint.every=1"), ranks=2)
    assert code == 1, err[-3000:]
    assert "the last 8 images read all failed to decode" in _one_line(err, "training aborted:",
                                                                      ranks=2)
    assert seconds < 240
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000002"
    assert (run_dir / "checkpoints" / "step_00000002" / "rank_00001.pt").is_file()
    assert (run_dir / "export" / "segmenter.pt").is_file()  # the 2-step run's deliverable
    assert not _leftovers(run_dir)


def test_check_refuses_a_training_image_folder_without_the_jsons_files(
        coco: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # the field's mistake: --set data.train_images=images on a COCO layout
    (coco / "images").mkdir(exist_ok=True)
    code, err, seconds = _check(["--config", "coco/demo", "--run-dir", str(tmp_path / "run"),
                                 *TINY_DETECTOR, "--set", f"data.root={coco}",
                                 "--set", "data.train_images=images"], capsys)
    assert code == 2, err[-3000:]
    line = _one_line(err, "input error:")
    assert line.startswith(f"input error: data.train_images {coco / 'images'}: 8 of 8 "
                           "sampled images named by the file names of ")
    assert seconds < 30
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 2. nothing lost


def test_a_failed_final_evaluation_keeps_the_checkpoint_and_the_export(ade: Path,
                                                                       tmp_path: Path) -> None:
    root = _copy(ade, tmp_path / "ade")
    originals = {p: p.read_bytes() for p in (root / "images" / "validation").iterdir()}
    _truncate(root / "images" / "validation")  # exists (passes --check), does not decode
    bad_train = sorted((root / "images" / "training").iterdir())[3]
    bad_train.write_bytes(b"<html>not an image</html>")  # skipped, counted, listed, pointed to
    run_dir = tmp_path / "run"
    code, out, err, seconds = _run(_ade_args(run_dir, root, "--set", "schedule.steps=3"),
                                   ranks=2)
    assert code == 1, err[-3000:]
    line = _one_line(err, "training aborted:", ranks=2)
    export = run_dir / "export" / "segmenter.pt"
    assert line.startswith("training aborted: evaluation at step 3 failed: data.val_split ")
    assert "none of the 5 validation images could be read" in line
    assert line.endswith(f"training is complete and kept ({run_dir / 'checkpoints'}/"
                         f"step_00000003, {export}): fix the validation data and evaluate "
                         f"only, with --eval-only {export}")
    assert seconds < 240
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    assert export.is_file() and "state_dict" in torch.load(export, weights_only=True)
    listed = read_skipped(run_dir)
    assert [r["path"] for r in listed if r["split"] == "train"] == [str(bad_train)]
    assert len([r for r in listed if r["split"] == "val"]) == 5
    assert f"training samples skipped so far (counted as skipped_samples in metrics.jsonl; " \
           f"unreadable files are listed in {run_dir / 'skipped.jsonl'})" in out
    # the fix, then the evaluation only (what the line says)
    for path, payload in originals.items():
        path.write_bytes(payload)
    code, _, err, _ = _run(_ade_args(tmp_path / "eval", root, "--eval-only", str(export)))
    assert code == 0, err[-3000:]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["results"]["images"] == 5


def test_check_refuses_a_wrong_validation_image_folder(coco: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    code, err, seconds = _check(["--config", "coco/demo", "--run-dir", str(tmp_path / "run"),
                                 *TINY_DETECTOR, "--set", f"data.root={coco}",
                                 "--set", "data.val_images=train2017"], capsys)
    assert code == 2, err[-3000:]
    line = _one_line(err, "input error:")
    assert line.startswith(f"input error: data.val_images {coco / 'train2017'}: 5 of 5 sampled "
                           "images named by the file names of ")
    assert seconds < 30


# ---------------------------------------------------------------- 3. one line each


def test_ade_labels_without_reduce_zero_label_are_refused(ade: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    # 4 classes annotated 1..4 over 0 = "other", without reduce_zero_label: label 4 is no class
    code, err, seconds = _check(_ade_args(tmp_path / "run", ade,
                                          "--set", "data.reduce_zero_label=false"), capsys)
    assert code == 2, err[-3000:]
    line = _one_line(err, "input error:")
    assert "label 4 is not a class of data.num_classes 4 (0..3) nor data.ignore_index 255" \
        in line
    assert line.endswith("need data.reduce_zero_label: true")
    assert f"{ade / 'annotations'}" in line
    assert seconds < 120  # a process start; a hang would pass 300


def test_labels_beyond_num_classes_are_refused(ade: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    code, err, _ = _check(_ade_args(tmp_path / "run", ade, "--set", "data.num_classes=2"),
                          capsys)
    assert code == 2, err[-3000:]
    line = _one_line(err, "input error:")
    assert "is not a class of data.num_classes 2 (0..1 after reduce_zero_label)" in line


def _export_segmenter(ade: Path, out: Path, decoder_channels: int) -> Path:
    """A segmenter.pt as a finished run exports it (random weights), built in this process."""
    from finetune.config import FinetuneConfig
    from finetune.segmentation.task import SegmentationTask, build_segmentation_module
    from pretrain.engine.config import load_config

    overrides = [a for a in _ade_args(out, ade) if a != "--set" and "=" in a]
    cfg = load_config(FinetuneConfig, "ade20k/demo",
                      [*overrides, f"model.decoder_channels={decoder_channels}"],
                      kind="finetune")
    task = SegmentationTask(cfg)
    module = build_segmentation_module(cfg, task.spec, None)
    out.mkdir(parents=True, exist_ok=True)
    task.export(module.state_dict(), out)
    return out / "segmenter.pt"


def test_eval_only_with_a_checkpoint_of_other_sizes_is_one_line(ade: Path,
                                                                tmp_path: Path) -> None:
    export = _export_segmenter(ade, tmp_path / "export", decoder_channels=24)
    code, _, err, seconds = _run(_ade_args(tmp_path / "eval", ade, "--eval-only", str(export)))
    assert code == 2, err[-3000:]
    line = _one_line(err, "input error:")
    assert line.startswith(f"input error: --eval-only {export}: {export}: not this config's "
                           "segmenter: ")
    assert "tensors of other shapes (e.g. model.decode_head" in line
    assert "(24, 64, 1, 1) vs (16, 64, 1, 1)" in line
    assert "'kind': 'upernet', 'decoder_channels': 24" in line
    assert line.endswith("evaluate it with the settings that trained it")
    assert seconds < 120  # a process start; a hang would pass 300


def test_validation_categories_other_than_trainings_are_refused(coco: Path,
                                                                tmp_path: Path) -> None:
    root = _copy(coco, tmp_path / "coco")
    val = root / "annotations" / "instances_val2017.json"
    data = json.loads(val.read_text())
    data["categories"] = [c for c in data["categories"] if c["id"] != 60]  # absent from val
    val.write_text(json.dumps(data))
    # the job's own start-up (the field saw two tracebacks there after --check had passed)
    code, _, err, seconds = _run(["--config", "coco/demo", "--run-dir", str(tmp_path / "run"),
                                  *TINY_DETECTOR, "--set", f"data.root={root}"])
    assert code == 2, err[-3000:]
    line = _one_line(err, "input error:")
    assert line.startswith(f"input error: data.val_annotations {val}: its category ids "
                           "differ from the training json's")
    assert "1 missing from it (e.g. [60])" in line
    assert seconds < 120  # a process start; a hang would pass 300
    assert not (tmp_path / "run").exists()  # refused before anything started


# ---------------------------------------------------------------- 4. eval-only needs less


def test_segmentation_eval_only_needs_no_training_split(ade: Path, tmp_path: Path) -> None:
    root = _copy(ade, tmp_path / "ade")
    export = _export_segmenter(root, tmp_path / "export", decoder_channels=16)
    shutil.rmtree(root / "images" / "training")
    shutil.rmtree(root / "annotations" / "training")
    # 5. an unreadable image at the end of worker 0's slice (images 0, 2, 4 of 5)
    last = sorted((root / "images" / "validation").iterdir())[4]
    last.write_bytes(b"<html>not an image</html>")
    run_dir = tmp_path / "eval"
    code, _, err, seconds = _run(_ade_args(run_dir, root, "--set", "data.workers=2",
                                           "--eval-only", str(export)))
    assert code == 0, err[-3000:]
    results = json.loads((run_dir / "eval.json").read_text())["results"]
    assert results["images"] == 4 and results["skipped"] == 1
    assert [r["path"] for r in read_skipped(run_dir)] == [str(last)]
    assert seconds < 120  # a process start; a hang would pass 300


def test_detection_eval_only_needs_no_training_json(coco: Path, tmp_path: Path) -> None:
    from finetune.config import FinetuneConfig
    from finetune.detection.coco import CocoIndex
    from finetune.detection.task import DetectionTask, build_detection_module
    from pretrain.engine.config import load_config

    root = _copy(coco, tmp_path / "coco")
    overrides = [a for a in TINY_DETECTOR if a != "--set"] + [f"data.root={root}"]
    cfg = load_config(FinetuneConfig, "coco/demo", overrides, kind="finetune")
    task = DetectionTask(cfg)
    (tmp_path / "export").mkdir()
    task.export(build_detection_module(cfg, task.spec, None, task.num_classes).state_dict(),
                tmp_path / "export")
    (root / "annotations" / "instances_train2017.json").unlink()
    shutil.rmtree(root / "train2017")
    # 5. the json's last image, at the end of worker 0's slice (images 0, 2, 4 of 5), unreadable
    val = CocoIndex(root / "annotations" / "instances_val2017.json", root / "val2017")
    last = val.image_path(val.image_ids[-1])
    last.write_bytes(last.read_bytes()[:100])
    run_dir = tmp_path / "eval"
    code, _, err, seconds = _run(["--config", "coco/demo", "--run-dir", str(run_dir),
                                  *TINY_DETECTOR, "--set", f"data.root={root}",
                                  "--set", "data.workers=2",
                                  "--eval-only", str(tmp_path / "export" / "detector.pt")])
    assert code == 0, err[-3000:]
    results = json.loads((run_dir / "eval.json").read_text())["results"]
    assert results["images"] == 4 and results["skipped"] == 1  # was images 4, skipped 0
    assert [(r["split"], r["path"]) for r in read_skipped(run_dir)] == [("val", str(last))]
    assert seconds < 120  # a process start; a hang would pass 300


def test_classification_eval_only_takes_a_timm_export_folder(tmp_path: Path) -> None:
    from data_tools.imagefolder_synthetic import write_synthetic_imagefolder
    from pretrain.encoders.spec import ModelSpec
    from pretrain.encoders.timm_export import write_timm_export

    val = tmp_path / "val"
    write_synthetic_imagefolder(val, num_classes=4, per_class=3, seed=1, image_size=32)
    spec = ModelSpec("davit_tiny", {"depths": [1, 1, 1, 1], "embed_dims": [16, 32, 48, 64],
                                    "num_heads": [1, 1, 1, 2]}, num_classes=4)
    folder = write_timm_export(spec.build_timm().state_dict(), spec,
                               {"input_size": [3, 32, 32], "crop_pct": 1.0},
                               tmp_path / "timm")
    run_dir = tmp_path / "eval"
    code, _, err, seconds = _run([
        "--config", "demo_shapes", "--run-dir", str(run_dir), *TINY_ENCODER,
        "--set", "data.layout=imagefolder", "--set", f"data.train={tmp_path / 'absent'}",
        "--set", f"data.val={val}", "--set", "data.classes=null",
        "--set", "data.num_classes=4", "--set", "data.workers=0", "--eval-only", str(folder)])
    assert code == 0, err[-3000:]
    assert json.loads((run_dir / "eval.json").read_text())["results"]["samples"] == 12
    assert seconds < 120  # a process start; a hang would pass 300


# ---------------------------------------------------------------- 6. strict JSON


def _strict(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_a_class_without_iou_is_null_in_eval_json_and_metrics(tmp_path: Path) -> None:
    from finetune.segmentation.metrics import scores
    from pretrain.engine.run_log import MetricsLogger, read_metrics, write_eval_json

    # class 2 is neither in the ground truth nor predicted: mmseg's "no IoU"
    results = scores(torch.tensor([[5, 1, 0], [0, 4, 0], [0, 0, 0]]), ["a", "b", "c"])
    assert math.isnan(results["IoU.c"])
    write_eval_json(tmp_path, {"step": 3, "results": results})
    written = _strict((tmp_path / "eval.json").read_text())
    assert written["results"]["IoU.c"] is None and written["results"]["IoU.a"] > 0
    logger = MetricsLogger(tmp_path, {}, SimpleNamespace(mode="disabled"), enabled=True)
    logger.log({"step": 3, **{f"eval/{k}": v for k, v in results.items()}})
    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    assert _strict(line)["eval/IoU.c"] is None
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["eval/mIoU"] == results["mIoU"]


# ---------------------------------------------------------------- any worker exception

_FAILING_WORKER = """
import torch
from torch.utils.data import IterableDataset
from pretrain.engine.stream import StreamState, TrainLoader

class Failing(IterableDataset):
    state = StreamState.fresh(2)

    def __iter__(self):
        raise RuntimeError("a bug in a task's decode")

loader = TrainLoader(Failing(), 2)
next(loader)
"""


def test_an_exception_in_a_data_worker_does_not_hang_the_exit(tmp_path: Path) -> None:
    """Whatever a worker raises (here a bug, not bad data), the rank exits: before, the
    exception's traceback kept the workers alive and the interpreter waited on them for ever."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    started = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-c", _FAILING_WORKER], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("the process did not exit: it waits on its data workers") from None
    assert result.returncode == 1
    assert "RuntimeError: a bug in a task's decode" in result.stderr
    assert time.monotonic() - started < 60


def test_check_lets_a_few_missing_files_through(coco: Path, tmp_path: Path) -> None:
    """A real data set with a few missing files still starts (they are skipped, counted and
    listed at run time); only a folder without most of the json's files is refused."""
    from finetune.config import FinetuneConfig
    from finetune.registry import check_inputs
    from pretrain.engine.config import load_config

    root = _copy(coco, tmp_path / "coco")
    sorted((root / "train2017").iterdir())[0].unlink()
    overrides = [a for a in TINY_DETECTOR if a != "--set"] + [f"data.root={root}"]
    check_inputs(load_config(FinetuneConfig, "coco/demo", overrides, kind="finetune"))


def test_classification_validation_counts_a_slices_last_unreadable_images(tmp_path: Path
                                                                          ) -> None:
    """5. The images after a slice's last batch are counted too (they were printed, not
    counted: ``skipped: 0`` with one image fewer), and listed."""
    from data_tools.imagefolder import scan_imagefolder
    from data_tools.imagefolder_synthetic import write_synthetic_imagefolder
    from finetune.classification.data import collate_labelled
    from finetune.classification.imagefolder import ImageFolderSplit
    from pretrain.engine.skipped import SkipLog

    write_synthetic_imagefolder(tmp_path / "val", num_classes=2, per_class=5, seed=1,
                                image_size=16)
    index = scan_imagefolder(tmp_path / "val")
    for item in (8, 6):  # the last two of rank 0's slice (0, 2, 4, 6, 8 on 2 ranks)
        index.path(item).write_bytes(b"<html>not an image</html>")

    def to_tensor(image) -> torch.Tensor:  # noqa: ANN001 (a PIL image)
        return torch.zeros(3, 4, 4)

    batches = [batch for rank in range(2) for batch in ImageFolderSplit(
        index, to_tensor, collate_labelled, 2, rank, 2, SkipLog(tmp_path / "run", rank))]
    assert sum(len(b["label"]) for b in batches) == 8
    assert sum(b["skipped"] for b in batches) == 2
    assert sorted(r["path"] for r in read_skipped(tmp_path / "run")) == sorted(
        str(index.path(item)) for item in (6, 8))
