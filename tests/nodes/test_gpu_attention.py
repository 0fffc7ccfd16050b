"""cuDNN attention first (``nodes/attention.py``) on a CUDA GPU, at a Wan2.2 14B attention shape.

What the CPU tests cannot see: that the calls the override takes really run cuDNN's kernel, where
ComfyUI's own order runs another one on versions that put FlashAttention first, and that the result
agrees with ComfyUI's attention to bf16 accuracy (two different kernels, not the same bits). The time
it saves is measured by the benchmark (``benchmarks/README.md``), not asserted here."""
from __future__ import annotations

import pytest
import torch
from wan_w4a4.nodes import attention as attn

pytestmark = [pytest.mark.gpu, pytest.mark.comfyui]

# one cond of a 480p x 33 step at 14B: 40 heads of 128, 14 040 tokens (small enough for a quick test,
# large enough that ComfyUI 0.33 applies its backend order)
B, L, HEADS, D = 1, 14040, 40, 128


def _kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages() if e.device_type.name == "CUDA"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cudnn_first_runs_cudnn_and_agrees_with_comfyui(env):
    func = attn._pytorch_attention()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, L, HEADS * D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    over = attn.CudnnFirst()
    assert over.takes(func, q, k, v, {"transformer_options": {}})
    ours = over(func, q, k, v, heads=HEADS, transformer_options={})
    ref = func(q, k, v, heads=HEADS)
    exact = torch.nn.functional.scaled_dot_product_attention(
        *(t.float().view(B, L, HEADS, D).transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(B, L, -1)
    err = lambda y: ((y.float() - exact).norm() / exact.norm()).item()
    print(f"relative error vs fp32 attention: cuDNN first {err(ours):.2e}, ComfyUI's order {err(ref):.2e}")
    assert err(ours) < 1e-2 and err(ours) < 2 * err(ref) + 1e-3  # bf16 attention, as good as ComfyUI's
    names = _kernels(lambda: over(func, q, k, v, heads=HEADS, transformer_options={}))
    print("cuDNN first:", names)
    print("ComfyUI's order:", _kernels(lambda: func(q, k, v, heads=HEADS)))
    assert any("cudnn" in n.lower() for n in names), names
