"""``kernels.addcmul``: ``torch.addcmul`` bit for bit, in one Triton pass for a Wan block's broadcast forms (GPU), and
PyTorch's own call for everything else (CPU here)."""
import pytest
import torch

from wan_w4a4 import kernels


def _wan_operands(B, L, C, dtype, device, seed=0):
    """The operands of a Wan block's two addcmul forms: e rows as ComfyUI makes them (a chunk of [B, 6, C], so a
    sample stride of 6 C), x and the normalised input [B, L, C]."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(B, L, C, device=device, generator=g) * 3).to(dtype)
    y = torch.randn(B, L, C, device=device, generator=g).to(dtype)
    e = (torch.randn(B, 6, C, device=device, generator=g) * 0.3).to(dtype).chunk(6, dim=1)
    return x, y, e


def test_cpu_calls_are_torchs_own():
    x, y, e = _wan_operands(2, 5, 64, torch.bfloat16, "cpu")
    assert kernels.addcmul_reason(e[0], y, 1 + e[1]) == "not all operands are CUDA tensors"
    assert torch.equal(kernels.addcmul(e[0], y, 1 + e[1]), torch.addcmul(e[0], y, 1 + e[1]))
    assert torch.equal(kernels.addcmul(x, y, e[2]), torch.addcmul(x, y, e[2]))


def test_the_program_shape_follows_the_layout():
    """Row-major operands get the row-major tile, any channels-first one the square tile that coalesces either way."""
    from wan_w4a4.kernels import triton_rowwise as trw
    x, y, e = _wan_operands(1, 40, 64, torch.bfloat16, "cpu")
    x_cf = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert trw.tile([x, y, x]) == trw.ROW_MAJOR_TILE
    assert trw.tile([x_cf, y, x_cf]) == trw.tile([x, y, x_cf]) == (trw.BLOCK_L, trw.BLOCK_C, 4)


@pytest.mark.gpu  # (conftest skips these without CUDA and Triton)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,L,C", [(1, 32760, 640), (2, 1000, 5120), (1, 7, 1536), (3, 4099, 384)])
def test_wan_forms_are_torchs_bits(dtype, B, L, C):
    """The modulation (e rows, the normalised input, 1 + e rows), the residual update (x, y, e rows) with x row-major
    or channels-first, and other placements of the row operands and layouts, against ``torch.addcmul``: equal
    tensors, same dtype, shape and strides."""
    x, y, e = _wan_operands(B, L, C, dtype, "cuda", seed=L)
    s1 = 1 + e[1]
    x_cf = x.transpose(1, 2).contiguous().transpose(1, 2)  # channels-first: ComfyUI 0.3.64's residual stream
    assert x_cf.stride() == (L * C, 1, L)
    for a, b, c in ((e[0], y, s1), (x, y, e[2]), (x_cf, y, e[2]), (x, x_cf, e[2]), (x_cf, x_cf, s1), (x, y, s1),
                    (e[0], y, y), (e[0], x_cf, x)):
        assert kernels.addcmul_reason(a, b, c) is None
        out = kernels.addcmul(a, b, c)
        ref = torch.addcmul(a, b, c)
        assert out.dtype == ref.dtype and out.shape == ref.shape and out.stride() == ref.stride()
        assert torch.equal(out, ref)


@pytest.mark.gpu
def test_other_forms_are_left_to_torch_and_say_why():
    x, y, e = _wan_operands(2, 64, 256, torch.bfloat16, "cuda")
    cases = {
        "dtypes": (e[0].float(), y, e[1]),
        "either layout": (x, torch.cat([y, y], dim=2)[:, :, ::2], e[2]),
        "neither": (x, y, e[2][:1]),
    }
    for words, args in cases.items():
        reason = kernels.addcmul_reason(*args)
        assert reason and words in reason, (words, reason)
        assert torch.equal(kernels.addcmul(*args), torch.addcmul(*args))
    assert "CUDA" in kernels.addcmul_reason(x.cpu(), y, e[2])
    w = y.clone().requires_grad_()
    assert "grad" in kernels.addcmul_reason(x, w, e[2])
    torch.addcmul(x, kernels.addcmul(x, w, e[2]), e[2]).sum().backward()  # torch's own call: autograd works
    assert w.grad is not None
    with torch.no_grad():
        assert kernels.addcmul_reason(x, w, e[2]) is None


@pytest.mark.gpu
def test_a_capture_takes_torchs_call():
    """Inside a CUDA graph capture the call is PyTorch's (Triton's launcher would check pointers there), and the
    replayed graph gives the eager Triton pass's bits."""
    x, y, e = _wan_operands(2, 4099, 384, torch.bfloat16, "cuda")
    want = kernels.addcmul(x, y, e[2])
    assert kernels.addcmul_reason(x, y, e[2]) is None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        reason = kernels.addcmul_reason(x, y, e[2])
        out = kernels.addcmul(x, y, e[2])
    graph.replay()
    torch.cuda.synchronize()
    assert reason == "a CUDA graph capture is under way on the current stream"
    assert torch.equal(out, want)
