"""Inference modes: sliding windows and multi-scale + flip agree with whole-image inference
where they must (a per-pixel 1x1-conv classifier is translation-equivariant and has no
context), on sizes that are not multiples of 32; segmenters map any size to logits of that
size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from finetune.backbone import Backbone
from finetune.segmentation.inference import (
    predict_logits,
    predict_multiscale,
    rescaled_size,
    slide_logits,
)
from finetune.segmentation.models import build_segmenter
from pretrain.encoders.spec import ModelSpec

TINY = ModelSpec("davit_tiny", {"depths": [1, 1, 1, 1], "embed_dims": [16, 32, 48, 64],
                                "num_heads": [1, 1, 1, 2]})


class PixelClassifier(nn.Module):
    """Logits from each pixel's colour alone."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(image)


def _blocks(height: int, width: int, block: int = 12) -> torch.Tensor:
    """An image of constant-colour blocks (colours far apart, so the classes are clear)."""
    torch.manual_seed(1)
    colours = torch.randn(16, 3) * 3
    rows = torch.arange(height)[:, None] // block
    cols = torch.arange(width)[None, :] // block
    index = (rows * 7 + cols * 3) % 16
    return colours[index].permute(2, 0, 1)[None]


def test_rescaled_size_fits_2048_by_512_keeping_the_aspect() -> None:
    assert rescaled_size(512, 683, (2048, 512)) == (512, 683)
    assert rescaled_size(256, 341, (2048, 512)) == (512, 682)
    assert rescaled_size(300, 2400, (2048, 512)) == (256, 2048)  # the long side binds


@pytest.mark.parametrize("size", [(83, 141), (50, 37)])
def test_sliding_windows_equal_the_whole_image_for_a_per_pixel_model(size) -> None:
    model = PixelClassifier()
    image = torch.randn(2, 3, *size)
    whole = model.logits(image)
    # windows smaller than the image, overlapping, with a partial last row/column
    torch.testing.assert_close(slide_logits(model, image, crop=32, stride=21), whole)
    # windows larger than a side: one window covers it
    torch.testing.assert_close(slide_logits(model, image, crop=64, stride=43), whole)


def test_slide_mode_through_the_rescale_equals_whole_mode() -> None:
    model = PixelClassifier()
    image = _blocks(83, 141)
    whole = predict_logits(model, image, "whole", scale=(200, 100))
    slide = predict_logits(model, image, "slide", scale=(200, 100), crop=32, stride=21)
    torch.testing.assert_close(slide, whole)


def test_flip_with_one_scale_equals_the_whole_image() -> None:
    model = PixelClassifier()
    image = _blocks(83, 141)
    probs = predict_multiscale(model, image, ratios=[1.0], flip=True, scale=(400, 83))
    torch.testing.assert_close(probs, model.logits(image).softmax(dim=1))


def test_multiscale_flip_agrees_with_the_whole_image_away_from_block_edges() -> None:
    model = PixelClassifier()
    height, width, block = 83, 141, 12
    image = _blocks(height, width, block)
    whole = predict_logits(model, image, "whole", scale=(400, 83)).argmax(1)[0]
    for mode in ("whole", "slide"):
        multi = predict_multiscale(model, image, ratios=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75],
                                   flip=True, mode=mode, scale=(400, 83), crop=48,
                                   stride=32).argmax(1)[0]
        # resizing blends neighbouring blocks only within a pixel or two of their borders
        rows = torch.arange(height)[:, None] % block
        cols = torch.arange(width)[None, :] % block
        inner = ((rows >= 2) & (rows < block - 2)) & ((cols >= 2) & (cols < block - 2))
        assert torch.equal(multi[inner], whole[inner]), mode
        assert (multi == whole).float().mean() > 0.9


@pytest.mark.parametrize("kind", ["upernet", "semantic_fpn"])
def test_segmenters_give_logits_at_any_input_size(kind: str) -> None:
    torch.manual_seed(0)
    model = build_segmenter(kind, Backbone(TINY), num_classes=6, decoder_channels=32,
                            dropout=0.1, aux_weight=0.4, aux_channels=16,
                            head_channels=16).eval()
    image = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        logits = model.logits(image)
        assert logits.shape == (1, 6, 50, 70)
        # the same as the padded image's logits, cropped: padding is at the bottom / right
        padded = torch.nn.functional.pad(image, (0, 26, 0, 14))
        torch.testing.assert_close(model.logits(padded)[..., :50, :70], logits)
    model.train()
    main, aux = model.forward_train(torch.randn(2, 3, 40, 40))
    assert main.shape == (2, 6, 40, 40)
    assert (aux is not None) == (kind == "upernet")
