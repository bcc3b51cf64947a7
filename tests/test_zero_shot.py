"""Zero-shot classification through text prompts: the classifier logic on a real CLIP model."""

from __future__ import annotations

import torch

from data_tools.synthetic import zero_shot_prompts
from pretrain.config import ModelConfig
from pretrain.evaluate import zero_shot_top1
from pretrain.models.clip import build_clip, build_tokenizer

TINY = ModelConfig.model_validate({
    "embed_dim": 32,
    "image": {"name": "davit_tiny", "image_size": 32,
              "overrides": {"depths": [1, 1, 1, 1], "embed_dims": [16, 32, 48, 64],
                            "num_heads": [1, 1, 1, 2]}},
    "text": {"context_length": 16, "width": 32, "heads": 2, "layers": 1},
})


def test_templates_cover_every_class_and_attribute() -> None:
    colors, color_templates = zero_shot_prompts("color")
    shapes, shape_templates = zero_shot_prompts("shape")
    assert len(colors) == 8 and len(shapes) == 3
    assert all("{}" in t for t in color_templates + shape_templates)
    assert any("background" in t for t in shape_templates)


def test_top1_scores_images_against_prompt_classifier() -> None:
    """Image features equal to a class's text embedding are classified as that class."""
    torch.manual_seed(0)
    clip = build_clip(TINY).eval()
    tokenizer = build_tokenizer(16)
    shapes, templates = zero_shot_prompts("shape")
    with torch.no_grad():
        per_class = []
        for shape in shapes:
            prompts = tokenizer([t.format(shape) for t in templates])
            embedding = clip.encode_text(prompts, normalize=True).mean(dim=0)
            per_class.append(embedding / embedding.norm())
    features = torch.stack(per_class)
    assert zero_shot_top1(clip, tokenizer, features, shapes, shapes, templates) == 1.0
    rotated = shapes[1:] + shapes[:1]
    assert zero_shot_top1(clip, tokenizer, features, rotated, shapes, templates) == 0.0
