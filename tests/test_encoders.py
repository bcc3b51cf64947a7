"""DAT++ and DWNet as timm models: sizes, features, checkpointing, layer decay, attention."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import group_parameters
from timm.optim import create_optimizer_v2
from torch.utils.flop_counter import FlopCounterMode

from pretrain.encoders import ENCODERS
from pretrain.encoders.dat import NeighborhoodAttention, neighbourhood_macs
from pretrain.encoders.dwnet import DynamicDWConv, PatchMerging
from pretrain.encoders.summary import measure
from pretrain.published import published

PUBLISHED = published("classification_imagenet1k")

OURS = [name for name in ENCODERS if not name.startswith("davit")]
TINY = ["dat_pp_tiny", "dwnet_tiny", "dynamic_dwnet_tiny"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, OpenMP threads that
    spin-wait for a busy core make these small models 10-20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _meta_model(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def test_every_encoder_is_registered_with_timm():
    assert set(ENCODERS) <= set(timm.list_models())


@pytest.mark.parametrize("name", ENCODERS)
def test_parameter_count_matches_published(name):
    params = sum(p.numel() for p in _meta_model(name).parameters())
    published = PUBLISHED[name]
    assert params / 1e6 == pytest.approx(published["params_m"], rel=0.01)
    if "official_code_params" in published:  # exact: same layers as the official classes
        assert params == published["official_code_params"]


# tiny and small of every family (the summary prints the base models too; they take longer)
MAC_CHECKED = [n for n in ENCODERS if "flops_g" in PUBLISHED[n] and "base" not in n]


@pytest.mark.parametrize("name", MAC_CHECKED)
def test_macs_at_224_match_published(name):
    gmacs = measure(name, 224).macs / 1e9
    assert gmacs == pytest.approx(PUBLISHED[name]["flops_g"], rel=0.05)


OFFICIAL_KEYS = {
    # name -> {official key: shape}, read from the official model classes
    "dat_pp_tiny": {
        "patch_proj.0.weight": (32, 3, 3, 3),
        "patch_proj.4.norm.weight": (64,),
        "stages.0.attns.0.rpb": (2, 13, 13),
        "stages.0.attns.0.qkv.weight": (192, 64),
        "stages.0.attns.1.rpe_table": (2, 111, 111),
        "stages.0.attns.1.conv_offset.0.weight": (64, 1, 9, 9),
        "stages.0.attns.1.conv_offset.3.weight": (2, 64, 1, 1),
        "stages.2.layer_norms.35.norm.bias": (256,),
        "stages.3.attns.0.rpe_table": (16, 13, 13),
        "stages.3.attns.0.conv_offset.0.weight": (64, 1, 3, 3),
        "stages.1.mlps.3.linear1.0.weight": (512, 128, 1, 1),
        "stages.1.mlps.3.dwc.weight": (512, 1, 3, 3),
        "stages.1.local_perception_units.3.weight": (128, 1, 3, 3),
        "down_projs.2.0.weight": (512, 256, 3, 3),
        "cls_norm.norm.weight": (512,),
        "cls_head.weight": (1000, 512),
    },
    "dynamic_dwnet_tiny": {
        "patch_embed.proj.weight": (96, 3, 4, 4),
        "patch_embed.norm.weight": (96,),
        "layers.0.blocks.0.attn2conv.conv0.weight": (96, 96, 1, 1),
        "layers.0.blocks.0.attn2conv.conv.conv1.weight": (24, 96, 1, 1),
        "layers.0.blocks.0.attn2conv.conv.bn.running_var": (24,),
        "layers.0.blocks.0.attn2conv.conv.conv2.weight": (96 * 49, 24, 1, 1),
        "layers.0.blocks.0.attn2conv.conv.bias": (96,),
        "layers.3.blocks.1.attn2conv.bn2.num_batches_tracked": (),
        "layers.3.blocks.1.bn.weight": (768,),
        "layers.3.blocks.1.mlp.fc1.weight": (3072, 768),
        "layers.2.downsample.norm.weight": (1536,),
        "layers.2.downsample.reduction.weight": (768, 1536),
        "norm.weight": (768,),
        "head.weight": (1000, 768),
    },
    "dwnet_tiny": {
        "layers.0.blocks.0.attn2conv.conv.weight": (96, 1, 7, 7),
        "layers.0.blocks.0.attn2conv.conv.bias": (96,),
    },
}


@pytest.mark.parametrize("name", OFFICIAL_KEYS)
def test_state_dict_uses_official_key_names_and_shapes(name):
    state = _meta_model(name).state_dict()
    for key, shape in OFFICIAL_KEYS[name].items():
        assert tuple(state[key].shape) == shape, key
    # DAT++ registers no buffers, exactly like the official model
    if name.startswith("dat"):
        assert set(state) == {n for n, _ in _meta_model(name).named_parameters()}


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("size", [(224, 224), (256, 320)])
def test_features_only_shapes_and_strides(name, size):
    model = timm.create_model(name, features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        features = model(torch.randn(1, 3, *size))
    assert len(features) == 4
    for feature, channels, stride in zip(
        features, model.feature_info.channels(), [4, 8, 16, 32], strict=True
    ):
        assert feature.shape == (1, channels, size[0] // stride, size[1] // stride)
        assert torch.isfinite(feature).all()


def test_features_only_out_indices_selects_stages():
    model = timm.create_model("dwnet_tiny", features_only=True, out_indices=(1, 3)).eval()
    assert model.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 96))
    assert [f.shape for f in features] == [(1, 192, 8, 12), (1, 768, 2, 3)]
    assert not any(name.startswith(("model.head", "model.norm")) for name in model.state_dict())


@pytest.mark.parametrize("size", [(32, 32), (64, 96)])
def test_dat_accepts_any_multiple_of_32(size):
    model = timm.create_model("dat_pp_tiny", num_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


def test_dwnet_accepts_sizes_that_are_not_multiples_of_32():
    model = timm.create_model("dwnet_tiny", num_classes=5).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 50, 70))
        features = model.forward_intermediates(torch.randn(1, 3, 50, 70), intermediates_only=True)
    assert logits.shape == (1, 5)
    assert [tuple(f.shape[2:]) for f in features] == [(13, 18), (7, 9), (4, 5), (2, 3)]


@pytest.mark.parametrize("name", TINY)
def test_forward_backward_and_gradient_checkpointing_give_same_gradients(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    images = torch.randn(2, 3, 64, 64)  # two images: dynamic DWNet's pooled BatchNorm needs >1

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(images).logsumexp(dim=1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients()
    model.set_grad_checkpointing(True)
    checkpointed = gradients()
    assert all(torch.isfinite(g).all() for g in plain.values())
    assert sum(g.abs().sum() for g in plain.values()) > 0
    for key, grad in plain.items():
        torch.testing.assert_close(checkpointed[key], grad, rtol=1e-4, atol=1e-6, msg=key)


def test_create_model_options_reach_the_model():
    model = timm.create_model("dat_pp_tiny", num_classes=10, drop_path_rate=0.3)
    assert model.get_classifier().out_features == 10
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert max(rates) == pytest.approx(0.3)
    model.reset_classifier(0)
    with torch.no_grad():
        pooled = model.eval()(torch.randn(1, 3, 64, 64))
    assert pooled.shape == (1, 512)
    model.reset_classifier(0, global_pool="")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)


@pytest.mark.parametrize("name", TINY)
def test_forward_features_is_the_normed_map_before_pooling(name):
    model = timm.create_model(name).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(images)
        assert features.shape == (1, model.num_features, 2, 2)
        torch.testing.assert_close(model.forward_head(features), model(images))


@pytest.mark.parametrize("name", ["dat_pp_tiny", "dwnet_tiny"])
def test_layer_decay_groups_follow_execution_order(name):
    model = _meta_model(name)
    layer_of = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    # walk parameters in execution order: stem, then each block, then the head
    if name.startswith("dat"):
        ordered = [
            ["patch_proj.0.weight"],
            ["stages.0.local_perception_units.0.weight", "stages.0.layer_norms.0.norm.weight",
             "stages.0.attns.0.rpb", "stages.0.layer_norms.1.norm.weight",
             "stages.0.mlps.0.dwc.weight"],
            ["stages.0.layer_norms.2.norm.weight", "stages.0.attns.1.rpe_table",
             "stages.0.layer_norms.3.norm.bias"],
            ["down_projs.0.0.weight"],
            ["stages.1.layer_norms.0.norm.weight", "stages.1.attns.0.qkv.weight"],
            ["stages.3.attns.1.proj_q.weight", "stages.3.layer_norms.3.norm.weight",
             "cls_norm.norm.weight"],
            ["cls_head.weight"],
        ]
    else:
        ordered = [
            ["patch_embed.proj.weight"],
            ["layers.0.blocks.0.attn2conv.conv0.weight", "layers.0.blocks.0.mlp.fc2.bias"],
            ["layers.0.blocks.1.bn.weight"],
            ["layers.0.downsample.reduction.weight"],
            ["layers.1.blocks.0.attn2conv.conv.weight"],
            ["layers.3.blocks.1.mlp.fc1.weight", "norm.weight"],
            ["head.weight"],
        ]
    ids = [{layer_of[name] for name in group} for group in ordered]
    assert all(len(group) == 1 for group in ids), ids
    flat = [group.pop() for group in ids]
    assert flat == sorted(flat) and len(set(flat)) == len(flat)
    assert max(layer_of.values()) == flat[-1]  # the classifier is the last group


def test_layer_decay_optimizer_scales_learning_rates():
    model = timm.create_model("dwnet_tiny", num_classes=10)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.5)
    scales = sorted({group["lr_scale"] for group in optimizer.param_groups})
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.5 ** (len(scales) - 1))
    assert len(scales) == 1 + 12 + 3 + 1  # stem, 12 blocks, 3 merges, head


def _dense_reference(x: torch.Tensor, attention: NeighborhoodAttention, allowed) -> torch.Tensor:
    """Full attention over all pixels, restricted to ``allowed(qy, qx, ky, kx)``, with the
    relative position bias rpb[ky - qy + k - 1, kx - qx + k - 1]."""
    batch, channels, height, width = x.shape
    heads, k = attention.heads, attention.kernel_size
    tokens = x.flatten(2).transpose(1, 2)
    q, key, v = attention.qkv(tokens).reshape(batch, -1, 3, heads, channels // heads).unbind(2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q * attention.scale, key)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[None, :] - ys[:, None] + k - 1
    dx = xs[None, :] - xs[:, None] + k - 1
    mask = allowed(ys[:, None], xs[:, None], ys[None, :], xs[None, :])
    bias = attention.rpb[:, dy.clamp(0, 2 * k - 2), dx.clamp(0, 2 * k - 2)]
    logits = (logits + bias).masked_fill(~mask, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", logits, v).reshape(batch, -1, channels)
    return attention.proj(out).transpose(1, 2).reshape(batch, channels, height, width)


def test_neighbourhood_attention_equals_global_attention_when_the_window_covers_the_map():
    torch.manual_seed(0)
    attention = NeighborhoodAttention(dim=8, heads=2, kernel_size=7)
    with torch.no_grad():
        attention.rpb.normal_()
        x = torch.randn(2, 8, 7, 7)
        expected = _dense_reference(x, attention, lambda qy, qx, ky, kx: ky >= 0)
        torch.testing.assert_close(attention(x), expected)


def test_neighbourhood_attention_shifts_windows_at_borders():
    torch.manual_seed(0)
    attention = NeighborhoodAttention(dim=8, heads=2, kernel_size=3)

    def inside_shifted_window(qy, qx, ky, kx):
        start_y = (qy - 1).clamp(0, 9 - 3)  # a corner query sees rows 0..2, not a padded -1..1
        start_x = (qx - 1).clamp(0, 11 - 3)
        return (ky >= start_y) & (ky < start_y + 3) & (kx >= start_x) & (kx < start_x + 3)

    with torch.no_grad():
        attention.rpb.normal_()
        x = torch.randn(1, 8, 9, 11)
        torch.testing.assert_close(
            attention(x), _dense_reference(x, attention, inside_shifted_window)
        )


def test_masked_mac_accounting_matches_what_the_tiled_attention_executes():
    attention = NeighborhoodAttention(dim=64, heads=2, kernel_size=7)
    x = torch.empty(2, 64, 20, 30, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        attention.to("meta")(x)
    linear_macs = 2 * 20 * 30 * (64 * 192 + 64 * 64)  # qkv and proj
    executed, exact = neighbourhood_macs(2, 64, 20, 30, 7)
    assert counter.get_total_flops() // 2 == linear_macs + executed
    assert exact == 2 * 2 * 64 * 20 * 30 * 49 and executed > exact


def test_patch_merging_concatenates_in_swin_order():
    merge = PatchMerging(dim=1)
    with torch.no_grad():
        merge.norm.weight.fill_(1.0)
        merge.norm.bias.zero_()
    # a 2x2 map holding 0, 1 / 2, 3: Swin's order is (0,0), (1,0), (0,1), (1,1) -> 0, 2, 1, 3
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    captured = {}
    merge.norm.register_forward_hook(lambda m, args, out: captured.update(x=args[0]))
    merge(x)
    assert captured["x"].flatten().tolist() == [0.0, 2.0, 1.0, 3.0]


def test_dynamic_depthwise_conv_applies_each_images_own_kernels():
    torch.manual_seed(0)
    conv = DynamicDWConv(dim=8, kernel_size=3).eval()
    with torch.no_grad():
        conv.bias.normal_()
        x = torch.randn(3, 8, 5, 6)
        out = conv(x)
        for image in range(3):
            weight = conv.conv2(conv.relu(conv.bn(conv.conv1(conv.pool(x[image : image + 1])))))
            expected = F.conv2d(
                x[image : image + 1], weight.view(8, 1, 3, 3), conv.bias, padding=1, groups=8
            )
            torch.testing.assert_close(out[image : image + 1], expected)
        # kernels really differ per image
        assert not torch.allclose(out[0], F.conv2d(x[:1], weight.view(8, 1, 3, 3), conv.bias,
                                                    padding=1, groups=8)[0])
