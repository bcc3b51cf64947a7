"""DWNet and dynamic DWNet (arXiv 2106.04263) as timm models.

A Swin skeleton whose window attention is replaced by 1x1 conv -> k x k depth-wise conv
(static, or with per-image weights predicted from the pooled input) -> 1x1 conv, each followed
by BatchNorm. State-dict keys and shapes match the official releases
(Atten4Vis/DemystifyLocalViT): ``patch_embed.*``, ``layers.i.blocks.j.{attn2conv, bn, mlp}.*``,
``layers.i.downsample.{norm, reduction}``, ``norm``, ``head``.

The official ``DWBlock`` builds a static conv even when asked for the dynamic one (an ``if``
that should be an ``elif`` lets the ``else`` branch overwrite it), yet its released dynamic
checkpoints hold the dynamic model (51M / 162M parameters); this file builds what the
checkpoints hold.

The official model asserts a 224x224 input. Here any size works: the image is zero-padded on the
bottom/right to a multiple of the patch size and odd maps before a patch merge likewise (as
Swin's detection backbone does); at sizes that need no padding the computation is identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, SelectAdaptivePool2d, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["DWNet", "checkpoint_filter_fn"]


class DynamicDWConv(nn.Module):
    """Depth-wise conv whose k x k kernels are predicted per image from its pooled features.

    The kernel generator normalises a pooled (B, C/4, 1, 1) tensor with BatchNorm, so in training
    mode it needs more than one image per batch (PyTorch raises otherwise).
    """

    def __init__(self, dim: int, kernel_size: int, reduction: int = 4) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv1 = nn.Conv2d(dim, dim // reduction, 1, bias=False)
        self.bn = nn.BatchNorm2d(dim // reduction)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(dim // reduction, dim * kernel_size * kernel_size, 1)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        k = self.kernel_size
        weight = self.conv2(self.relu(self.bn(self.conv1(self.pool(x)))))
        # One grouped conv over the whole batch: every (image, channel) pair is its own group.
        out = F.conv2d(
            x.reshape(1, batch * channels, height, width),
            weight.reshape(batch * channels, 1, k, k),
            self.bias.repeat(batch),
            padding=k // 2,
            groups=batch * channels,
        )
        return out.reshape(batch, channels, height, width)


class DWBlock(nn.Module):
    """The token mixer that stands in for window attention (official name ``attn2conv``)."""

    def __init__(self, dim: int, kernel_size: int, dynamic: bool) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(dim)
        self.conv = (
            DynamicDWConv(dim, kernel_size)
            if dynamic
            else nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        )
        self.bn = nn.BatchNorm2d(dim)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.conv0(x)))
        x = self.relu(self.bn(self.conv(x)))
        return self.bn2(self.conv2(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SpatialBlock(nn.Module):
    """x += mixer(x); x += mlp(BatchNorm(x)) on an NCHW map (the MLP runs channels-last)."""

    def __init__(
        self, dim: int, kernel_size: int, mlp_ratio: float, dynamic: bool, drop_path: float
    ) -> None:
        super().__init__()
        self.attn2conv = DWBlock(dim, kernel_size, dynamic)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn2conv(x))
        mixed = self.mlp(self.bn(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.drop_path(mixed)


class PatchMerging(nn.Module):
    """Swin's 2x2 merge: concatenate (even/even, odd/even, even/odd, odd/odd), norm, project."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1
        )
        return self.reduction(self.norm(x)).permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = F.pad(x, (0, -x.shape[3] % p, 0, -x.shape[2] % p))
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DWNetStage(nn.Module):
    """Blocks of one resolution plus the merge that leads to the next (official ``layers.i``).

    ``forward`` runs the blocks only, so the model can tap the stage output before the merge.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        kernel_size: int,
        mlp_ratio: float,
        dynamic: bool,
        drop_path: Sequence[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(
            SpatialBlock(dim, kernel_size, mlp_ratio, dynamic, drop_path[j]) for j in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class DWNet(nn.Module):
    """(Dynamic) DWNet classifier / backbone with the timm model interface."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        kernel_size: int = 7,
        mlp_ratio: float = 4.0,
        patch_size: int = 4,
        dynamic: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        rates = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i, depth in enumerate(depths):
            self.layers.append(
                DWNetStage(
                    dims[i], depth, kernel_size, mlp_ratio, dynamic,
                    rates[sum(depths[:i]) : sum(depths[: i + 1])], downsample=i < len(depths) - 1,
                )
            )
            self.feature_info.append(
                dict(num_chs=dims[i], reduction=patch_size * 2**i, module=f"layers.{i}")
            )
        self.norm = nn.LayerNorm(dims[-1])
        self.pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)"
            if coarse
            else [
                (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                (r"^layers\.(\d+)\.downsample", (99998,)),  # after its stage's blocks
                (r"^norm", (99999,)),  # timm's MATCH_PREV_GROUP: with the last block
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
            self.pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        device = self.patch_embed.proj.weight.device
        self.head = (
            nn.Linear(self.num_features, num_classes, device=device)
            if num_classes > 0
            else nn.Identity()
        )

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (before the following patch merge) at strides 4, 8, 16, 32."""
        if output_fmt != "NCHW":
            raise ValueError("DWNet intermediates are NCHW only")
        take, max_index = feature_take_indices(len(self.layers), indices)
        final = len(self.layers) - 1
        last = max_index if stop_early else final
        intermediates = []
        x = self.patch_embed(x)
        for i in range(last + 1):
            stage = self.layers[i]
            x = stage(x)
            if i in take:
                intermediates.append(self._final_norm(x) if norm and i == final else x)
            if i < last and stage.downsample is not None:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return (self._final_norm(x) if last == final else x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        self.layers[-1].downsample = None  # its output would never be used
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
            if stage.downsample is not None:
                x = stage.downsample(x)
        return self._final_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    """Official init: truncated-normal Linear weights, zero biases; convs keep PyTorch's."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def checkpoint_filter_fn(state_dict: dict, model: DWNet) -> dict[str, torch.Tensor]:
    """Official, timm and project checkpoints share the model's key names: only unwrap them."""
    for key in ("state_dict", "model"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "dwnet_tiny.in1k": _cfg(),
        "dwnet_base.in1k": _cfg(),
        "dynamic_dwnet_tiny.in1k": _cfg(),
        "dynamic_dwnet_base.in1k": _cfg(),
    }
)

_ARCHS = {
    "dwnet_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2)),
    "dwnet_base": dict(embed_dim=128, depths=(2, 2, 18, 2)),
    "dynamic_dwnet_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), dynamic=True),
    "dynamic_dwnet_base": dict(embed_dim=128, depths=(2, 2, 18, 2), dynamic=True),
}


def _create_dwnet(variant: str, pretrained: bool = False, **kwargs) -> DWNet:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        DWNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **dict(_ARCHS[variant], **kwargs),
    )


@register_model
def dwnet_tiny(pretrained: bool = False, **kwargs) -> DWNet:
    return _create_dwnet("dwnet_tiny", pretrained, **kwargs)


@register_model
def dwnet_base(pretrained: bool = False, **kwargs) -> DWNet:
    return _create_dwnet("dwnet_base", pretrained, **kwargs)


@register_model
def dynamic_dwnet_tiny(pretrained: bool = False, **kwargs) -> DWNet:
    return _create_dwnet("dynamic_dwnet_tiny", pretrained, **kwargs)


@register_model
def dynamic_dwnet_base(pretrained: bool = False, **kwargs) -> DWNet:
    return _create_dwnet("dynamic_dwnet_base", pretrained, **kwargs)
