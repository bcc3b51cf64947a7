"""The training attention kernel: the math kernel on CPUs at bf16, PyTorch's choice elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from pretrain.config import PretrainConfig
from pretrain.engine.attention import training_attention, uses_math_kernel
from pretrain.engine.config import ConfigError, load_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(("choice", "device", "dtype", "math"), [
    ("auto", CPU, torch.bfloat16, True),
    ("auto", CPU, torch.float16, True),
    ("auto", CPU, torch.float32, False),   # flash is the faster one in fp32 on CPUs
    ("auto", CUDA, torch.bfloat16, False),  # GPUs keep flash / memory-efficient attention
    ("torch", CPU, torch.bfloat16, False),
    ("math", CUDA, torch.float32, True),
])
def test_kernel_choice(choice: str, device: torch.device, dtype: torch.dtype,
                       math: bool) -> None:
    assert uses_math_kernel(choice, device, dtype) is math


def _attention_ops(dtype: torch.dtype, choice: str) -> tuple[set[str], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 3, 49, 32, generator=generator).to(dtype).requires_grad_()
               for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU]) as trace, \
            training_attention(choice, CPU, dtype):
        out = F.scaled_dot_product_attention(q, k, v)
        out.float().square().sum().backward()
    return {event.key for event in trace.key_averages()}, q.grad.float()


def test_bf16_training_on_cpu_runs_the_math_kernel_with_the_same_gradients() -> None:
    default_ops, default_grad = _attention_ops(torch.bfloat16, "torch")
    math_ops, math_grad = _attention_ops(torch.bfloat16, "auto")
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert flash in default_ops and flash not in math_ops
    assert "aten::softmax" in math_ops or "aten::_softmax" in math_ops
    # the same gradient up to bf16 rounding (bf16 resolves ~0.4% of a value)
    assert torch.allclose(math_grad, default_grad, rtol=0.05, atol=0.02 * default_grad.abs().max())


def test_the_context_restores_every_kernel() -> None:
    before = torch.backends.cuda.flash_sdp_enabled()
    with training_attention("math", CPU, torch.float32):
        assert not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() == before


def test_an_unknown_kernel_is_named() -> None:
    with pytest.raises(ConfigError, match=r"train\.attention_kernel"):
        load_config(PretrainConfig, "demo", ["train.attention_kernel=flash2"], kind="pretrain")
