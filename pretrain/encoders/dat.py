"""DAT++ (Vision Transformer with Deformable Attention, arXiv 2309.01430) as timm models.

Plain PyTorch: deformable attention samples keys with ``grid_sample`` and the neighbourhood
attention that the official code takes from NATTEN 0.14 is written here as masked dense products
of query tiles with their key regions, so the model runs on CPU and GPU without compiled
extensions.

State-dict keys and shapes are those of the official classification checkpoints
(LeapLabTHU/DAT, stored under ``'model'``): ``patch_proj.*``, ``stages.i.{layer_norms, mlps,
attns, local_perception_units}.*``, ``down_projs.*``, ``cls_norm``, ``cls_head``. The official
model registers no buffers for this configuration, so neither does this one.

Two places where the official forward is undefined and this one chooses:
- an axis of length 1 (a 1-pixel stage-4 map, or a single offset row at 32-pixel inputs) is
  normalised to coordinate 0 where the official code divides by zero;
- neighbourhood attention on maps smaller than its kernel pads keys and values on the bottom
  and right with zero tokens before the qkv projection, exactly as the official module does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, SelectAdaptivePool2d, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["DAT", "checkpoint_filter_fn"]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map; the ``norm`` child keeps official key names."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvMlp(nn.Module):
    """1x1 expand, residual 3x3 depth-wise conv on the hidden map, GELU, 1x1 project."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        hidden = dim * ratio
        # Single-element Sequentials reproduce the official ``linear1.0`` / ``linear2.0`` keys.
        self.linear1 = nn.Sequential(nn.Conv2d(dim, hidden, 1))
        self.dwc = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.linear2 = nn.Sequential(nn.Conv2d(hidden, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear1(x)
        x = self.act(x + self.dwc(x))
        return self.linear2(x)


class _AxisTiles(NamedTuple):
    keys: torch.Tensor  # (tiles, region): key positions each query tile can see
    bias: torch.Tensor  # (tiles, tile, region): bias-table index of (query, key)
    inside: torch.Tensor  # (tiles, tile, region): whether the key is in the query's window


def _axis_tiles(length: int, kernel: int, device: torch.device) -> _AxisTiles:
    """Split one axis into query tiles of ``kernel`` positions and find the key region of each.

    NATTEN keeps a query's window inside the map: near a border it is shifted inwards rather
    than zero-padded, so every query sees exactly ``kernel`` keys per axis, starting at
    ``clamp(q - kernel // 2, 0, length - kernel)``. All windows of a tile fall inside one region
    of ``2 * kernel - 1`` keys (clamped the same way), so a tile attends densely to its region
    with the keys outside each query's window masked. The bias table is indexed by the relative
    offset ``key - query`` shifted by ``kernel - 1``, whichever way the window was shifted.
    Queries past the end (the last tile's padding) get valid windows and are discarded later.
    """
    region = min(2 * kernel - 1, length)
    tiles = -(-length // kernel)
    starts = (torch.arange(tiles, device=device) * kernel - kernel // 2).clamp(0, length - region)
    keys = starts[:, None] + torch.arange(region, device=device)
    query = torch.arange(tiles * kernel, device=device).view(tiles, kernel, 1)
    window = (query - kernel // 2).clamp(0, length - kernel)
    key = keys[:, None, :]
    inside = (key >= window) & (key < window + kernel)
    return _AxisTiles(keys, (key - query + kernel - 1).clamp(0, 2 * kernel - 2), inside)


def _tiled_neighbourhood_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor, kernel: int
) -> torch.Tensor:
    """Neighbourhood attention of (B, heads, H, W, d) tensors with H, W >= kernel.

    Dense products of each kernel x kernel query tile with its (2 kernel - 1)^2 key region
    replace a per-query gather of k*k keys: about 3.4x the multiply-adds of the exact
    neighbourhood (counted by FLOP counters), but plain batched matmuls instead of
    memory-bound gathers whose backward is a serial scatter on CPU, which is far slower.
    """
    batch, heads, height, width, dim = q.shape
    rows, cols = _axis_tiles(height, kernel, q.device), _axis_tiles(width, kernel, q.device)
    th, tw = rows.keys.shape[0], cols.keys.shape[0]
    rh, rw = rows.keys.shape[1], cols.keys.shape[1]

    def regions(t: torch.Tensor) -> torch.Tensor:  # B, heads, th, tw, rh*rw, d
        t = t.index_select(2, rows.keys.flatten()).index_select(3, cols.keys.flatten())
        t = t.view(batch, heads, th, rh, tw, rw, dim).permute(0, 1, 2, 4, 3, 5, 6)
        return t.reshape(batch, heads, th, tw, rh * rw, dim)

    q = F.pad(q, (0, 0, 0, tw * kernel - width, 0, th * kernel - height))
    q = q.view(batch, heads, th, kernel, tw, kernel, dim).permute(0, 1, 2, 4, 3, 5, 6)
    q = q.reshape(batch, heads, th, tw, kernel * kernel, dim)
    row_index = rows.bias[:, None, :, None, :, None]
    col_index = cols.bias[None, :, None, :, None, :]
    inside = rows.inside[:, None, :, None, :, None] & cols.inside[None, :, None, :, None, :]
    bias = rpb[:, row_index, col_index].masked_fill(~inside, float("-inf"))
    bias = bias.reshape(heads, th, tw, kernel * kernel, rh * rw)
    attn = (q @ regions(k).transpose(-1, -2) + bias).softmax(dim=-1)
    out = (attn @ regions(v)).view(batch, heads, th, tw, kernel, kernel, dim)
    out = out.permute(0, 1, 2, 4, 3, 5, 6).reshape(batch, heads, th * kernel, tw * kernel, dim)
    return out[:, :, :height, :width]


def neighbourhood_macs(
    batch: int, channels: int, height: int, width: int, kernel: int
) -> tuple[int, int]:
    """(executed, exact) multiply-adds of the q.k and attn.v products of one neighbourhood
    attention call: what the tiled computation runs versus the k*k keys per query it keeps."""
    height, width = max(height, kernel), max(width, kernel)
    tiles = -(-height // kernel) * -(-width // kernel)
    region = min(2 * kernel - 1, height) * min(2 * kernel - 1, width)
    executed = 2 * batch * channels * tiles * kernel * kernel * region
    return executed, 2 * batch * channels * height * width * kernel * kernel


class NeighborhoodAttention(nn.Module):
    """2-D neighbourhood attention with relative position bias (NATTEN 0.14, dilation 1)."""

    def __init__(self, dim: int, heads: int, kernel_size: int) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.heads = heads
        self.kernel_size = kernel_size
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.rpb = nn.Parameter(torch.zeros(heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        batch, height, width, channels = x.shape
        k = self.kernel_size
        # Maps smaller than the window get zero tokens bottom/right (their keys carry the qkv bias).
        x = F.pad(x, (0, 0, 0, max(0, k - width), 0, max(0, k - height)))
        ph, pw = x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(batch, ph, pw, 3, self.heads, channels // self.heads)
        q, key, value = qkv.permute(3, 0, 4, 1, 2, 5).unbind(0)  # each B, heads, H, W, d
        out = _tiled_neighbourhood_attention(q * self.scale, key, value, self.rpb, k)
        out = out.permute(0, 2, 3, 1, 4).reshape(batch, ph, pw, channels)[:, :height, :width]
        return self.proj(out).permute(0, 3, 1, 2)


def _normalised_grid(coords: torch.Tensor, length: int) -> torch.Tensor:
    """Map pixel coordinates to grid_sample's [-1, 1] (align_corners) range, as DAT does."""
    if length == 1:
        return torch.zeros_like(coords)
    return coords.div(length - 1.0).mul(2.0).sub(1.0)


class DeformableAttention(nn.Module):
    """Deformable multi-head attention: queries attend to keys sampled at learned offsets.

    Each offset group predicts one (dy, dx) per point of a grid ``kv_stride`` times coarser than
    the map; keys and values are bilinearly sampled there. The relative position bias is a
    continuous table sampled at the query-to-key displacement, which is why the model accepts
    input sizes other than the one the table was built for.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        groups: int,
        kv_stride: int,
        offset_kernel: int,
        q_size: tuple[int, int],
    ) -> None:
        super().__init__()
        self.heads = heads
        self.groups = groups
        self.scale = (dim // heads) ** -0.5
        group_dim = dim // groups
        padding = offset_kernel // 2 if offset_kernel != kv_stride else 0
        self.conv_offset = nn.Sequential(
            nn.Conv2d(group_dim, group_dim, offset_kernel, kv_stride, padding, groups=group_dim),
            ChannelLayerNorm(group_dim),
            nn.GELU(),
            nn.Conv2d(group_dim, 2, 1, bias=False),
        )
        self.proj_q = nn.Conv2d(dim, dim, 1)
        self.proj_k = nn.Conv2d(dim, dim, 1)
        self.proj_v = nn.Conv2d(dim, dim, 1)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.rpe_table = nn.Parameter(torch.zeros(heads, 2 * q_size[0] - 1, 2 * q_size[1] - 1))
        trunc_normal_(self.rpe_table, std=0.01)

    @staticmethod
    def _grid(ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """(len(ys), len(xs), 2) grid of normalised (y, x) coordinates."""
        gy, gx = torch.meshgrid(
            _normalised_grid(ys, len(ys)), _normalised_grid(xs, len(xs)), indexing="ij"
        )
        return torch.stack((gy, gx), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        groups, heads = self.groups, self.heads
        dtype, device = x.dtype, x.device

        q = self.proj_q(x)
        offset = self.conv_offset(q.reshape(batch * groups, channels // groups, height, width))
        hk, wk = offset.shape[2:]
        samples = hk * wk
        with torch.no_grad():
            # Reference points sit at half-cell positions of the coarse grid, normalised by
            # (n - 1) like the official code (so they do not span [-1, 1] symmetrically).
            reference = self._grid(
                torch.linspace(0.5, hk - 0.5, hk, dtype=dtype, device=device),
                torch.linspace(0.5, wk - 0.5, wk, dtype=dtype, device=device),
            )
            q_grid = self._grid(
                torch.arange(height, dtype=dtype, device=device),
                torch.arange(width, dtype=dtype, device=device),
            )
        pos = (offset.permute(0, 2, 3, 1) + reference).clamp(-1.0, 1.0)  # B*g, Hk, Wk, (y, x)

        sampled = F.grid_sample(
            x.reshape(batch * groups, channels // groups, height, width),
            pos[..., (1, 0)],
            mode="bilinear",
            align_corners=True,
        ).reshape(batch, channels, 1, samples)
        q = q.reshape(batch * heads, channels // heads, height * width)
        k = self.proj_k(sampled).reshape(batch * heads, channels // heads, samples)
        v = self.proj_v(sampled).reshape(batch * heads, channels // heads, samples)

        attn = torch.einsum("bcm,bcn->bmn", q, k).mul(self.scale)
        attn = attn + self._position_bias(pos, q_grid, batch)
        attn = attn.softmax(dim=2)
        out = torch.einsum("bmn,bcn->bcm", attn, v).reshape(batch, channels, height, width)
        return self.proj_out(out)

    def _position_bias(self, pos: torch.Tensor, q_grid: torch.Tensor, batch: int) -> torch.Tensor:
        """Bias (B*heads, HW, samples) read from the table at half the query-key displacement."""
        groups = self.groups
        table = self.rpe_table[None].expand(batch, -1, -1, -1)
        table = table.reshape(batch * groups, self.heads // groups, *self.rpe_table.shape[1:])
        queries = q_grid.reshape(1, -1, 1, 2)
        keys = pos.reshape(batch * groups, 1, -1, 2)
        displacement = (queries - keys).mul(0.5)  # B*g, HW, samples, (y, x)
        bias = F.grid_sample(table, displacement[..., (1, 0)], mode="bilinear", align_corners=True)
        return bias.reshape(batch * self.heads, q_grid.shape[0] * q_grid.shape[1], -1)


class DATStage(nn.Module):
    """Blocks of one resolution; parameters live in per-kind lists to keep official key names.

    A block is: x += dwconv3x3(x) (local perception unit); x += attn(LN(x)); x += mlp(LN(x)).
    ``layer_norms[2d]`` and ``layer_norms[2d + 1]`` belong to block ``d``.
    """

    def __init__(
        self,
        dim: int,
        attn_types: str,
        heads: int,
        groups: int,
        kv_stride: int,
        offset_kernel: int,
        na_kernel: int,
        q_size: tuple[int, int],
        mlp_ratio: int,
        drop_path: Sequence[float],
    ) -> None:
        super().__init__()
        depth = len(attn_types)
        self.grad_checkpointing = False
        self.layer_norms = nn.ModuleList(ChannelLayerNorm(dim) for _ in range(2 * depth))
        self.mlps = nn.ModuleList(ConvMlp(dim, mlp_ratio) for _ in range(depth))
        self.attns = nn.ModuleList(
            NeighborhoodAttention(dim, heads, na_kernel)
            if kind == "N"
            else DeformableAttention(dim, heads, groups, kv_stride, offset_kernel, q_size)
            for kind in attn_types
        )
        self.local_perception_units = nn.ModuleList(
            nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in range(depth)
        )
        self.drop_path = nn.ModuleList(
            DropPath(rate) if rate > 0.0 else nn.Identity() for rate in drop_path
        )

    def block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        drop_path = self.drop_path[index]
        x = x + self.local_perception_units[index](x)
        x = x + drop_path(self.attns[index](self.layer_norms[2 * index](x)))
        return x + drop_path(self.mlps[index](self.layer_norms[2 * index + 1](x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index in range(len(self.attns)):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self.block, index, x, use_reentrant=False)
            else:
                x = self.block(index, x)
        return x


class DAT(nn.Module):
    """DAT++ classifier / backbone with the timm model interface."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        dim_stem: int = 64,
        dims: Sequence[int] = (64, 128, 256, 512),
        attn_types: Sequence[str] = ("ND", "NDND", "ND" * 9, "DD"),
        heads: Sequence[int] = (2, 4, 8, 16),
        groups: Sequence[int] = (1, 2, 4, 8),
        kv_strides: Sequence[int] = (8, 4, 2, 1),
        offset_kernels: Sequence[int] = (9, 7, 5, 3),
        na_kernel: int = 7,
        mlp_ratio: int = 4,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if any(set(spec) - {"N", "D"} for spec in attn_types):
            raise ValueError(f"attn_types may only use 'N' and 'D', got {attn_types}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False

        self.patch_proj = nn.Sequential(
            nn.Conv2d(in_chans, dim_stem // 2, 3, 2, 1),
            ChannelLayerNorm(dim_stem // 2),
            nn.GELU(),
            nn.Conv2d(dim_stem // 2, dim_stem, 3, 2, 1),
            ChannelLayerNorm(dim_stem),
        )
        if dim_stem != dims[0]:
            raise ValueError("DAT++ stages start at the stem width: dim_stem must equal dims[0]")

        depths = [len(spec) for spec in attn_types]
        rates = _linear_rates(drop_path_rate, sum(depths))
        q_size = tuple(side // 4 for side in to_2tuple(img_size))
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i, spec in enumerate(attn_types):
            self.stages.append(
                DATStage(
                    dims[i], spec, heads[i], groups[i], kv_strides[i], offset_kernels[i],
                    na_kernel, q_size, mlp_ratio, rates[sum(depths[:i]) : sum(depths[: i + 1])],
                )
            )
            self.feature_info.append(
                dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}")
            )
            q_size = (q_size[0] // 2, q_size[1] // 2)
        self.down_projs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dims[i], dims[i + 1], 3, 2, 1, bias=False), ChannelLayerNorm(dims[i + 1])
            )
            for i in range(len(dims) - 1)
        )
        self.cls_norm = ChannelLayerNorm(dims[-1])
        self.pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_drop = nn.Dropout(drop_rate)
        # Linear and conv layers keep PyTorch's default initialisation: the official
        # ``reset_parameters`` walks ``parameters()`` looking for modules, so it never fires and
        # the published models were trained from the defaults too.
        self.cls_head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"*rpe_table"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict | Callable[[str], tuple[int, ...]]:
        if coarse:
            return dict(stem=r"^patch_proj", blocks=r"^(?:stages|down_projs)\.(\d+)")
        return _block_ordinal

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.cls_head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
            self.pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        device = self.patch_proj[0].weight.device
        self.cls_head = (
            nn.Linear(self.num_features, num_classes, device=device)
            if num_classes > 0
            else nn.Identity()
        )

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (before the following down-projection) at strides 4, 8, 16, 32."""
        if output_fmt != "NCHW":
            raise ValueError("DAT++ intermediates are NCHW only")
        take, max_index = feature_take_indices(len(self.stages), indices)
        final = len(self.stages) - 1
        last = max_index if stop_early else final
        intermediates = []
        x = self.patch_proj(x)
        for i in range(last + 1):
            x = self.stages[i](x)
            if i in take:
                intermediates.append(self.cls_norm(x) if norm and i == final else x)
            if i < last:
                x = self.down_projs[i](x)
        if intermediates_only:
            return intermediates
        return (self.cls_norm(x) if last == final else x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        self.down_projs = self.down_projs[:max_index]
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.cls_norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_proj(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.down_projs):
                x = self.down_projs[i](x)
        return self.cls_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.cls_head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _linear_rates(top: float, count: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to ``top`` (plain floats: meta-device safe)."""
    return [top * i / max(count - 1, 1) for i in range(count)]


def _block_ordinal(name: str) -> tuple[int, ...]:
    """Layer-decay ordinal of a parameter: stem, then blocks in execution order, then the head.

    A callable rather than timm's regex dict because ``layer_norms.{2d, 2d+1}`` belong to block
    ``d``, which a regex cannot compute.
    """
    parts = name.split(".")
    if parts[0] == "patch_proj":
        return (0,)
    if parts[0] == "down_projs":  # first layer of the next stage
        return (1, int(parts[1]) + 1, -1)
    if parts[0] == "stages":
        block = int(parts[3])
        return (1, int(parts[1]), block // 2 if parts[2] == "layer_norms" else block)
    if parts[0] == "cls_norm":
        return (99999,)  # timm's MATCH_PREV_GROUP: merge with the last block
    return (float("inf"),)


def checkpoint_filter_fn(state_dict: dict, model: DAT) -> dict[str, torch.Tensor]:
    """Official, timm and project checkpoints share the model's key names: unwrap the container
    and resample ``rpe_table`` when the checkpoint was trained at another resolution."""
    for key in ("state_dict", "model"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    target = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        wanted = target.get(key)
        if key.endswith("rpe_table") and wanted is not None and wanted.shape != value.shape:
            # align_corners=True: the table is read by grid_sample with aligned corners, so its
            # end points stand for the extreme displacements at every resolution.
            value = F.interpolate(
                value[None].float(), size=wanted.shape[1:], mode="bicubic", align_corners=True
            )[0]
        out[key] = value
    return out


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
        "first_conv": "patch_proj.0",
        "classifier": "cls_head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "dat_pp_tiny.in1k": _cfg(),
        "dat_pp_small.in1k": _cfg(),
        "dat_pp_base.in1k": _cfg(),
        "dat_pp_base.in1k_384": _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
    }
)

# Official configs: attention alternates neighbourhood / deformable except stage 4 (all
# deformable); widths double per stage from the stem width.
_ARCHS = {
    "dat_pp_tiny": dict(dim_stem=64, heads=(2, 4, 8, 16), groups=(1, 2, 4, 8)),
    "dat_pp_small": dict(dim_stem=96, heads=(3, 6, 12, 24), groups=(1, 2, 3, 6)),
    "dat_pp_base": dict(dim_stem=128, heads=(4, 8, 16, 32), groups=(2, 4, 8, 16)),
}


def _create_dat(variant: str, pretrained: bool = False, **kwargs) -> DAT:
    arch = dict(_ARCHS[variant])
    arch["dims"] = tuple(arch["dim_stem"] * 2**i for i in range(4))
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        DAT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **dict(arch, **kwargs),
    )


@register_model
def dat_pp_tiny(pretrained: bool = False, **kwargs) -> DAT:
    return _create_dat("dat_pp_tiny", pretrained, **kwargs)


@register_model
def dat_pp_small(pretrained: bool = False, **kwargs) -> DAT:
    return _create_dat("dat_pp_small", pretrained, **kwargs)


@register_model
def dat_pp_base(pretrained: bool = False, **kwargs) -> DAT:
    return _create_dat("dat_pp_base", pretrained, **kwargs)
