"""Which int8 GEMM the Triton path runs: TMA tile loads on Hopper and later, pointer loads on sm_80..89
(RTX 30/40, A100), which have no TMA. The GPU test forces the sm_80..89 choice on whatever GPU runs it
(an H200 here) through the production entry point, ``kernels.w4a4_linear``."""
import pytest
import torch

from wan_w4a4 import kernels
from wan_w4a4.kernels import numerics as nm
from wan_w4a4.kernels import triton_w4a4 as tw


def test_tma_only_from_hopper_on():
    assert not tw.tma_available((8, 0)) and not tw.tma_available((8, 6)) and not tw.tma_available((8, 9))
    assert tw.tma_available((9, 0)) and tw.tma_available((10, 0)) and tw.tma_available((12, 0))


def _gemm_kernels(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, [e.key for e in prof.key_averages() if "_gemm_i8" in e.key]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rank", [0, 32])
def test_an_ampere_or_ada_gpu_runs_the_pointer_gemm_with_the_same_bits(monkeypatch, rank):
    pytest.importorskip("triton", reason="Triton is not installed (GPU machines only)")
    g = torch.Generator().manual_seed(0)
    k, n, m = 640, 256, 513
    p = nm.from_float(torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g),
                      smooth=torch.rand(k, generator=g) + 0.5,
                      lr_down=torch.randn(k, rank, generator=g) * 0.1 if rank else None,
                      lr_up=torch.randn(rank, n, generator=g) * 0.1 if rank else None,
                      clip=torch.linspace(1.0, 0.6, 3), num_bins=3).to("cuda")
    x = (torch.randn(m, k, generator=g)).bfloat16().cuda()
    here, here_kernels = _gemm_kernels(lambda: kernels.w4a4_linear(x, p, 1, backend="triton"))
    real = torch.cuda.get_device_capability

    def ada(device=None):
        real(device)
        return (8, 9)

    monkeypatch.setattr(torch.cuda, "get_device_capability", ada)
    out, names = _gemm_kernels(lambda: kernels.w4a4_linear(x, p, 1, backend="triton"))
    assert names and all("tma" not in s for s in names), names
    if tw.tma_available(real()):
        assert any("tma" in s for s in here_kernels), here_kernels
    ref = nm.w4a4_linear(x.float(), p, 1)
    assert nm.sqnr_db(ref, out.float()) >= 45.0
    if rank == 0:  # no low-rank branch: the two loads compute the same int32 sums and epilogue
        assert torch.equal(out, here)
