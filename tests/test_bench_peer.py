"""The peer benchmark's helpers (bench/bench_open_clip_peer.py, bench/bench_loader.py) and the
loader's JPEG draft decode they measure; fast checks only (the benchmarks themselves run for
minutes)."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_open_clip_peer as peer  # noqa: E402

from pretrain.clip_model import build_clip  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.engine.config import load_config  # noqa: E402
from pretrain.engine.images import decode_image, jpeg_draft_size  # noqa: E402


def _jpeg(width: int, height: int) -> bytes:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_open_clip_gets_the_architecture_we_train(tmp_path: Path) -> None:
    (tmp_path / f"{peer.MODEL_NAME}.json").write_text(
        __import__("json").dumps(peer.open_clip_model_config(64)))
    open_clip.add_model_config(tmp_path)
    cfg = load_config(PretrainConfig, "davit_tiny", ["model.image.image_size=64"],
                      kind="pretrain").model
    with torch.device("meta"):
        ours = build_clip(cfg)
        theirs = open_clip.create_model(peer.MODEL_NAME, device="meta")
    shapes = {name: tuple(p.shape) for name, p in ours.named_parameters()}
    # the one intended difference: our temperature is 1-element (DeepSpeed broadcasts bytes)
    assert shapes.pop("logit_scale") == (1,)
    theirs_shapes = {name: tuple(p.shape) for name, p in theirs.named_parameters()}
    assert theirs_shapes.pop("logit_scale") == ()
    assert shapes == theirs_shapes


def test_jpeg_draft_keeps_small_images_exact_and_covers_the_crop() -> None:
    draft = jpeg_draft_size(224, (0.9, 1.0))
    assert draft == (273, 273)
    small = {"jpg": _jpeg(256, 256)}
    assert decode_image(small, draft).tobytes() == decode_image(small).tobytes()
    large = decode_image({"jpg": _jpeg(1024, 768)}, draft)
    assert large.size == (512, 384) and large.mode == "RGB"
    # the smallest RandomResizedCrop (scale 0.9, ratio 4/3) of the drafted image is no upscale
    assert (0.9 * 512 * 384 / (4 / 3)) ** 0.5 >= 224
    # a wide scale range keeps large images at (nearly) full size
    assert jpeg_draft_size(224, (0.08, 1.0))[0] > 768


def test_open_clip_reads_our_shards_through_the_patches(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import tqdm.std

    from data_tools.synthetic import write_synthetic_shards

    # no tqdm monitor thread: it would outlive the test, and later tests fork only when this
    # process has one thread (tests/test_data_build.py)
    monkeypatch.setattr(tqdm.std.tqdm, "monitor_interval", 0)

    pattern = write_synthetic_shards(tmp_path / "shards", 16, seed=0, image_size=32,
                                     samples_per_shard=8, progress=False)
    peer.patch_open_clip_train()
    from open_clip.transform import image_transform
    from open_clip_train.data import get_wds_dataset

    options = argparse.Namespace(
        train_data=pattern, val_data=None, train_num_samples=16, val_num_samples=None,
        dataset_resampled=False, train_data_upsampling_factors=None, batch_size=4, workers=0,
        world_size=1, rank=0, seed=0)
    info = get_wds_dataset(options, image_transform(32, is_train=True), is_train=True,
                           tokenizer=open_clip.get_tokenizer("RN50"))
    images, texts = next(iter(info.dataloader))
    assert images.shape == (4, 3, 32, 32) and texts.shape == (4, 77)


@pytest.mark.slow
def test_peer_benchmark_smoke() -> None:
    """Both sides train 3 steps of the real benchmark (minutes on 2 CPU cores)."""
    peer.main(["--precision", "fp32", "--steps", "3", "--skip", "1", "--repeats", "1",
               "--samples", "64", "--image-size", "64"])
