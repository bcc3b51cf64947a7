"""A real 2-rank DeepSpeed pretraining run: the loss falls, checkpoints and exports are usable."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
import timm
import torch

from data_tools.synthetic import COLORS, zero_shot_prompts
from pretrain.encoders.spec import ModelSpec
from pretrain.engine.images import OPENAI_MEAN
from pretrain.engine.run_log import read_metrics
from tests.conftest import TINY_MODEL, run_deepspeed

STEPS = 60
EVAL_EVERY = 20
MODEL = [
    *TINY_MODEL,
    # a two-layer text tower: with one layer, "red" as the shape's colour and as the
    # background's stay confused and zero-shot colour stays at chance (measured)
    "--set", "model.embed_dim=64", "--set", "model.text.width=64",
    "--set", "model.text.heads=4", "--set", "model.text.layers=2",
]


@pytest.fixture(scope="module")
def colour_folder(shape_shards: dict[str, str], tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[Path, Path]:
    """The held-out shapes as an ImageFolder with one folder per colour (the layout of
    ImageNet val), and a templates file for them."""
    from pretrain.engine.shard_stream import ordered_dataset

    root = tmp_path_factory.mktemp("colour_folder")
    images = root / "images"
    for sample in ordered_dataset(shape_shards["heldout"]):
        colour = json.loads(sample["json"])["color"]
        (images / colour).mkdir(parents=True, exist_ok=True)
        (images / colour / f"{sample['__key__']}.jpg").write_bytes(sample["jpg"])
    templates = root / "templates.txt"
    templates.write_text("\n".join(zero_shot_prompts("color")[1]) + "\n")
    return images, templates


@pytest.fixture(scope="module")
def pretrain_run(shape_shards: dict[str, str], colour_folder: tuple[Path, Path],
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    images, templates = colour_folder
    evaluations = [
        "--set", f"eval.every={EVAL_EVERY}", "--set", "eval.batch_size=50",
        "--set", f"eval.zero_shot=[{{name: colour, images: {images}, classes: folders, "
                 f"templates: {templates}}}]",
        "--set", f"eval.retrieval=[{{name: heldout, shards: '{shape_shards['heldout']}'}}]",
    ]
    result = run_deepspeed("pretrain.py", [
        "--config", "demo", "--run-dir", str(run_dir), *MODEL, *evaluations,
        "--set", f"data.train={shape_shards['train']}",
        "--set", "data.batch_size=32", "--set", "data.workers=1",
        "--set", "data.shuffle_buffer=64", "--set", "data.shuffle_initial=16",
        "--set", f"schedule.steps={STEPS}", "--set", "schedule.warmup_steps=3",
        "--set", "optimizer.lr=2e-3",
        "--set", "log.every=1", "--set", "checkpoint.every=30", "--set", "checkpoint.keep=1",
    ])
    (run_dir.parent / "launcher.log").write_text(result.stdout)
    return run_dir


def test_the_thread_choice_is_logged_once(pretrain_run: Path) -> None:
    """Each of the 2 ranks takes its share of the cores (tests/test_threads.py); the job says
    so once, not once per rank."""
    log = (pretrain_run.parent / "launcher.log").read_text()
    lines = [line for line in log.splitlines() if "intra-op threads per process" in line]
    assert len(lines) == 1, lines
    if "OMP_NUM_THREADS" not in os.environ:
        assert "/ 2 local ranks" in lines[0], lines


def test_evaluations_run_during_training_at_their_steps(pretrain_run: Path) -> None:
    """Zero-shot on an ImageFolder by colour and retrieval on caption shards, every 20 steps
    on both ranks' slices; the last ones beat chance by far."""
    evals = [r for r in read_metrics(pretrain_run / "metrics.jsonl") if "eval/colour/top1" in r]
    assert [r["step"] for r in evals] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    last = evals[-1]
    assert last["eval/colour/samples"] == 192 and last["eval/heldout/images"] == 192
    assert last["eval/colour/top1"] > 0.2  # chance 1/8 (measured 0.28 with shard prompts)
    assert last["eval/heldout/i2t_r1"] > 5 / 192 and last["eval/heldout/t2i_r1"] > 5 / 192
    assert last["eval/heldout/t2i_r10"] >= last["eval/heldout/t2i_r1"]


def test_loss_falls_and_metrics_are_complete(pretrain_run: Path) -> None:
    records = [r for r in read_metrics(pretrain_run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    first = sum(r["loss"] for r in records[:4]) / 4
    last = sum(r["loss"] for r in records[-4:]) / 4
    assert last < first - 0.3, (first, last)
    for key in ("samples_seen", "lr", "samples_per_s", "data_wait_fraction", "peak_memory_gb",
                "skipped_samples", "time"):
        assert key in records[-1]
    times = [r["time"] for r in records]
    assert times == sorted(times) and times[-1] - times[0] > 0
    assert records[-1]["samples_seen"] == STEPS * 32 * 2  # steps x micro-batch x ranks
    assert records[-1]["skipped_samples"] == 0


def test_run_directory_holds_config_and_checkpoints(pretrain_run: Path) -> None:
    assert (pretrain_run / "config.yaml").is_file()
    ds = json.loads((pretrain_run / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 64
    checkpoints = pretrain_run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000060"
    # keep=1: the step-30 checkpoint was pruned once step 60 was complete
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000060"]
    assert (checkpoints / "step_00000060" / "rank_00001.pt").is_file()


def test_exported_encoder_reloads_with_identical_outputs(pretrain_run: Path) -> None:
    from pretrain.encoders.weights import load_encoder_weights
    from pretrain.export import load_exported_clip

    payload = torch.load(pretrain_run / "export" / "encoder.pt", weights_only=True)
    spec = ModelSpec.from_dict(payload["spec"])
    assert spec.timm_name == "davit_tiny" and spec.num_classes == 0
    encoder = spec.build_timm().eval()
    load_encoder_weights(encoder, pretrain_run / "export" / "encoder.pt")
    clip, _ = load_exported_clip(pretrain_run / "export" / "clip.pt")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encoder(images), clip.visual.trunk(images))
    # the export holds the trained weights, not the initialisation
    fresh = spec.build_timm()
    trained = encoder.state_dict()
    assert any(not torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())


def test_finetune_from_export(pretrain_run: Path, shape_shards: dict[str, str],
                              tmp_path: Path) -> None:
    """The fine-tuning path end to end on the colour labels (which a few steps can learn; the
    demo fine-tunes on shapes, which take longer), with evaluation every 10 steps on both ranks
    and the best checkpoint kept."""
    run_dir = tmp_path / "finetune"
    colors = "[" + ", ".join(COLORS) + "]"
    run_deepspeed("finetune.py", [
        "--config", "demo_shapes", "--run-dir", str(run_dir),
        "--set", f"encoder.weights={pretrain_run / 'export' / 'encoder.pt'}",
        "--set", f"data.train={shape_shards['labelled']}",
        "--set", f"data.val={shape_shards['heldout']}",
        "--set", "data.label_key=color", "--set", f"data.classes={colors}",
        "--set", "data.num_classes=8",
        "--set", "data.image_size=32", "--set", "data.batch_size=16",
        "--set", "data.shuffle_buffer=64", "--set", "data.shuffle_initial=16",
        "--set", "schedule.steps=30", "--set", "schedule.warmup_steps=3",
        "--set", "optimizer.lr=2e-3", "--set", "log.every=1", "--set", "eval.every=10",
        "--set", "checkpoint.every=1000", "--set", "checkpoint.keep=1",
    ])
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/top1" in r]
    assert len(train) == 30
    first = sum(r["loss"] for r in train[:5]) / 5
    last = sum(r["loss"] for r in train[-5:]) / 5
    assert last < first - 0.3, (first, last)
    # evaluated at steps 10, 20 and 30, over the whole held-out split (192 images, 2 ranks)
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(r["eval/samples"] == 192 for r in evals)
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["step"] == 30 and result["results"]["top1"] > 0.4  # chance is 1/8
    # the best checkpoint is the step with the best top-1, kept beside the latest (keep=1)
    best = max(evals, key=lambda r: r["eval/top1"])
    assert result["best"] == {"step": best["step"], "metric": "top1",
                              "value": best["eval/top1"]}
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "best").read_text() == f"step_{best['step']:08d}"
    assert (checkpoints / f"step_{best['step']:08d}").is_dir()
    # the exported classifier reloads strictly and reproduces the final evaluation, through
    # the task's --eval-only interface (in this process: run_evaluation needs no group of one)
    from finetune.classification.task import ClassificationTask
    from finetune.config import FinetuneConfig
    from pretrain.engine.config import load_config
    from pretrain.engine.task import run_evaluation

    export = run_dir / "export" / "classifier.pt"
    payload = torch.load(export, weights_only=True)
    spec = ModelSpec.from_dict(payload["spec"])
    assert (spec.num_classes, spec.task) == (8, "classification")
    spec.build_timm().load_state_dict(payload["state_dict"], strict=True)
    cfg = load_config(FinetuneConfig, run_dir / "config.yaml")
    task = ClassificationTask.for_checkpoint(cfg, export)
    module, evaluator = task.checkpoint_evaluation(export, rank=0, world_size=1)
    assert run_evaluation(evaluator, module, lambda batch: batch) == result["results"]


def test_zero_shot_evaluation_of_the_export(pretrain_run: Path, shape_shards: dict) -> None:
    from pretrain.evaluate import zero_shot_accuracy

    prompts = {field: zero_shot_prompts(field) for field in ("color", "shape")}
    result = zero_shot_accuracy(pretrain_run / "export" / "clip.pt", shape_shards["heldout"],
                                prompts)
    assert result["zero_shot_samples"] == 192
    # 60 steps teach colour (chance 1/8; measured 0.28), not yet shape (chance 1/3)
    assert result["zero_shot_top1_color"] > 0.2, result
    assert 0.0 <= result["zero_shot_top1_shape"] <= 1.0


def _heldout_images(shape_shards: dict, count: int = 16) -> tuple[list, list[str]]:
    from PIL import Image

    from pretrain.engine.shard_stream import ordered_dataset

    images, colours = [], []
    for sample in ordered_dataset(shape_shards["heldout"]):
        images.append(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        colours.append(json.loads(sample["json"])["color"])
        if len(images) == count:
            break
    return images, colours


def test_open_clip_loads_the_export_and_reproduces_zero_shot(pretrain_run: Path,
                                                             shape_shards: dict) -> None:
    """open_clip's own API (model, preprocessing, tokenizer, zero-shot classifier) on the
    export gives our zero-shot logits to 1e-5."""
    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from pretrain.clip_model import build_tokenizer
    from pretrain.data import eval_transform
    from pretrain.export import load_exported_clip, register_open_clip_export

    directory = pretrain_run / "export" / "open_clip"
    register_open_clip_export(directory)  # the tests' shrunken DaViT is a registered variant
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    their_tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    ours, cfg = load_exported_clip(pretrain_run / "export" / "clip.pt")
    images, _ = _heldout_images(shape_shards)
    names, templates = zero_shot_prompts("color")
    with torch.no_grad():
        their_logits = (theirs.eval().encode_image(torch.stack([preprocess(i) for i in images]),
                                                   normalize=True)
                        @ build_zero_shot_classifier(theirs, their_tokenizer, names, templates))
        transform = eval_transform(cfg.image.image_size)
        our_logits = (ours.encode_image(torch.stack([transform(i) for i in images]),
                                        normalize=True)
                      @ build_zero_shot_classifier(ours, build_tokenizer(
                          cfg.text.context_length), names, templates))
    assert torch.allclose(their_logits, our_logits, atol=1e-5), (their_logits - our_logits).abs()
    assert their_logits.std() > 0  # a real classifier, not a constant


def test_timm_and_smp_load_the_image_tower(pretrain_run: Path) -> None:
    """The timm export rebuilds the (shrunken) encoder by timm alone, with our weights, by
    both of timm's public routes; smp's tu- encoder takes the same weights."""
    import segmentation_models_pytorch as smp

    payload = torch.load(pretrain_run / "export" / "encoder.pt", weights_only=True)
    spec = ModelSpec.from_dict(payload["spec"])
    ours = spec.build_timm().eval()
    ours.load_state_dict(payload["state_dict"])
    weights = pretrain_run / "export" / "timm" / "model.safetensors"
    from_folder = timm.create_model(f"local-dir:{weights.parent}", pretrained=True).eval()
    overlay = timm.create_model(spec.timm_name, pretrained=True, num_classes=0,
                                pretrained_cfg_overlay={"file": str(weights)},
                                **spec.overrides).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ours(images)
        assert torch.allclose(from_folder(images), expected, atol=1e-5)
        assert torch.allclose(overlay(images), expected, atol=1e-5)
    assert from_folder.pretrained_cfg["mean"] == list(OPENAI_MEAN)
    segmenter = smp.UPerNet(f"tu-{spec.timm_name}", encoder_weights=True, classes=3,
                            pretrained_cfg_overlay={"file": str(weights)}, **spec.overrides)
    # features_only flattens "stages.0" into "stages_0"
    encoder = {re.sub(r"^stages_(\d+)", r"stages.\1", k): v
               for k, v in segmenter.encoder.model.state_dict().items()}
    trunk = ours.state_dict()
    assert encoder and all(torch.equal(v, trunk[k]) for k, v in encoder.items())


def _warm_started(run_dir: Path, shape_shards: dict, stage: int, *init: str) -> None:
    """One optimizer step at a negligible lr: the run's export is its starting point."""
    run_deepspeed("pretrain.py", [
        "--config", "demo", "--run-dir", str(run_dir), *MODEL, *init,
        "--set", f"data.train={shape_shards['train']}", "--set", "data.batch_size=8",
        "--set", "data.shuffle_buffer=16", "--set", "data.shuffle_initial=8",
        "--set", "schedule.steps=1", "--set", "schedule.warmup_steps=0",
        "--set", "optimizer.lr=1e-12", "--set", f"deepspeed.zero_stage={stage}",
        "--set", "log.progress=false"])


def test_warm_start_from_an_open_clip_checkpoint_under_zero3(pretrain_run: Path,
                                                            shape_shards: dict,
                                                            tmp_path: Path) -> None:
    source = pretrain_run / "export" / "open_clip" / "open_clip_model.safetensors"
    _warm_started(tmp_path / "run", shape_shards, 3, "--set", f"model.init_from.clip={source}")
    from pretrain.export import load_exported_clip

    started, _ = load_exported_clip(tmp_path / "run" / "export" / "clip.pt")
    original, _ = load_exported_clip(pretrain_run / "export" / "clip.pt")
    original_params = dict(original.named_parameters())
    for name, value in started.named_parameters():
        assert torch.allclose(value, original_params[name], atol=1e-6), name


def test_warm_start_of_the_image_tower_only(pretrain_run: Path, shape_shards: dict,
                                            tmp_path: Path) -> None:
    source = pretrain_run / "export" / "timm" / "model.safetensors"
    _warm_started(tmp_path / "run", shape_shards, 1, "--set", f"model.init_from.image={source}")
    from pretrain.export import load_exported_clip

    started, _ = load_exported_clip(tmp_path / "run" / "export" / "clip.pt")
    original, _ = load_exported_clip(pretrain_run / "export" / "clip.pt")
    trunk = dict(original.visual.trunk.named_parameters())
    assert all(torch.allclose(v, trunk[n], atol=1e-6)
               for n, v in started.visual.trunk.named_parameters())
    # the text tower was not in the file: it starts fresh, far from the trained one
    assert not torch.allclose(started.text_projection, original.text_projection, atol=1e-3)


def test_check_rejects_a_warm_start_that_does_not_fit(pretrain_run: Path, shape_shards: dict,
                                                     tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    encoder_only = pretrain_run / "export" / "encoder.pt"
    result = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", "demo", "--check",
         *MODEL, "--set", f"data.train={shape_shards['train']}",
         "--set", f"model.init_from.clip={encoder_only}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert str(encoder_only) in lines[0] and "does not fit" in lines[0], lines[0]
