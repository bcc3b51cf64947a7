"""Zero-shot classification and retrieval metrics: the evaluators on a real CLIP model and the
recall arithmetic on hand-made embeddings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from data_tools.synthetic import zero_shot_prompts
from pretrain.clip_eval import (
    RetrievalEvaluator,
    ZeroShotEvaluator,
    imagenet_names_for,
    retrieval_recalls,
)
from pretrain.clip_model import build_clip, build_tokenizer
from pretrain.config import ModelConfig

TINY = ModelConfig.model_validate({
    "embed_dim": 32,
    "image": {"name": "davit_tiny", "image_size": 32,
              "overrides": {"depths": [1, 1, 1, 1], "embed_dims": [16, 32, 48, 64],
                            "num_heads": [1, 1, 1, 2]}},
    "text": {"context_length": 16, "width": 32, "heads": 2, "layers": 1},
})


class _Holder(nn.Module):
    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip


class _EmbeddingsAsImages(nn.Module):
    """A CLIP whose 'images' are already their embeddings."""

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return image


def test_synthetic_prompts_cover_every_class_and_attribute() -> None:
    colors, color_templates = zero_shot_prompts("color")
    shapes, shape_templates = zero_shot_prompts("shape")
    assert len(colors) == 8 and len(shapes) == 3
    assert all("{}" in t for t in color_templates + shape_templates)


def test_zero_shot_scores_images_against_the_prompt_classifier() -> None:
    """Images whose embedding is a class's text embedding are classified as that class:
    top-1 is 1 with the right labels and 0 with every label shifted by one."""
    torch.manual_seed(0)
    holder = _Holder(build_clip(TINY).eval())
    tokenizer = build_tokenizer(16)
    shapes, templates = zero_shot_prompts("shape")
    evaluator = ZeroShotEvaluator([], shapes, templates, tokenizer)
    with torch.no_grad():
        evaluator.prepare(holder)
        embeddings = evaluator.classifier.T.clone()  # one row per class
        fake = _Holder(_EmbeddingsAsImages())
        evaluator.update(fake, {"image": embeddings, "label": torch.tensor([0, 1, 2])}, True)
        evaluator.update(fake, {"image": embeddings, "label": torch.tensor([1, 2, 0])}, True)
        evaluator.update(fake, {"image": embeddings, "label": torch.tensor([2, 2, 2])}, False)
    result = evaluator.compute()
    assert result["top1"] == 0.5 and result["samples"] == 6  # the uncounted batch is ignored
    assert result["top3"] == 1.0  # 3 classes: top-k is capped at the class count


def test_recall_counts_any_caption_of_an_image() -> None:
    # two images, three captions: image a owns captions 0 and 1, image b owns caption 2
    images = torch.eye(3)[:2]
    texts = torch.tensor([[0.9, 0.0, 0.1], [1.0, 0.0, 0.0], [0.5, 0.2, 0.8]])
    recalls = retrieval_recalls(images, texts, ["a", "b"], ["a", "a", "b"])
    # a's nearest caption is caption 1 (its own); b's nearest is caption 2 (its own)
    assert recalls["i2t_r1"] == 1.0
    # captions 0 and 1 find a; caption 2 scores 0.5 with a and 0.2 with b: missed at k=1
    assert recalls["t2i_r1"] == pytest.approx(2 / 3)
    assert recalls["t2i_r5"] == 1.0 and recalls["i2t_r10"] == 1.0  # k capped by the set


def test_recall_against_a_hand_computed_ranking() -> None:
    torch.manual_seed(1)
    images = nn.functional.normalize(torch.randn(6, 8), dim=1)
    texts = nn.functional.normalize(torch.randn(12, 8), dim=1)
    owners = [f"k{j // 2}" for j in range(12)]  # two captions per image
    keys = [f"k{i}" for i in range(6)]
    recalls = retrieval_recalls(images, texts, keys, owners)
    sim = images @ texts.T
    expected_i2t = sum(any(int(c) // 2 == i for c in sim[i].argsort(descending=True)[:1])
                       for i in range(6)) / 6
    expected_t2i = sum(int(sim[:, j].argmax()) == j // 2 for j in range(12)) / 12
    assert recalls["i2t_r1"] == pytest.approx(expected_i2t)
    assert recalls["t2i_r1"] == pytest.approx(expected_t2i)


def test_retrieval_evaluator_gathers_and_scores() -> None:
    evaluator = RetrievalEvaluator([])
    holder = _Holder(build_clip(TINY).eval())
    tokenizer = build_tokenizer(16)
    batch = {"image": torch.randn(2, 3, 32, 32), "text": tokenizer(["a", "b", "c"]),
             "caption_owner": torch.tensor([0, 0, 1]), "keys": ["x", "y"]}
    with torch.no_grad():
        evaluator.update(holder, batch, True)
    result = evaluator.compute()
    assert (result["images"], result["captions"]) == (2, 3)
    assert result["i2t_r10"] == 1.0 and result["t2i_r10"] == 1.0  # k >= everything


def test_imagenet_names_follow_the_wnids() -> None:
    assert imagenet_names_for(["n01440764", "n01443537"]) == ["tench", "goldfish"]
    with pytest.raises(ValueError, match="not ImageNet wnids"):
        imagenet_names_for(["red"])
