"""The Gluon int8 GEMM (kernels/gluon_gemm.py), which ``triton_w4a4.gemm`` runs on Hopper above 2048 tokens,
against Triton's TMA tile kernel: the same bits at the Wan shapes' tails, in row passes, for every output dtype
and low-rank width; and the production entry point runs it, or not with ``WAN_W4A4_GEMM=triton``. GPU only."""
import pytest
import torch

from wan_w4a4 import kernels
from wan_w4a4.kernels import numerics as nm

triton = pytest.importorskip("triton", reason="Triton is not installed (GPU machines only)")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                       reason="needs a Hopper GPU (sm_90: wgmma, TMA)"),
]

from wan_w4a4.kernels import triton_w4a4 as tw  # noqa: E402

if tw.gg.gluon is None:
    pytest.skip("this Triton has no Gluon", allow_module_level=True)

GLUON = dict(tw.gg.CONFIG, async_wgmma=True)  # one tile per program, forced at every M (also below 2048 tokens)
WS = dict(GLUON, warp_specialized=True)  # the persistent warp-specialised kernel, where it fits (rank padding <= 32)
# the persistent ping-pong kernel (two consumer warpgroups taking tiles in turn), where it fits (rank padding <= 64)
PP = dict(tw.gg.PP_CONFIG, async_wgmma=True, ping_pong=True)
# Each of them with its tiles stored in whole rows through shared memory (gluon_gemm.STORE_ROWS), and without.
CONFIGS = [dict(c, store_rows=rows) for rows in (False, True) for c in (GLUON, WS, PP)]
IDS = ["async", "ws", "pp", "async-rows", "ws-rows", "pp-rows"]


@pytest.fixture(autouse=True)
def gluon_not_given_up(monkeypatch):
    """Each test starts with the Gluon kernel available; the bit tests check it stayed so (a kernel that failed to
    build would fall back to Triton's, and the comparison would compare Triton with itself)."""
    monkeypatch.setattr(tw, "_gluon_failure", [])


def make(k, n, m, *, rank, unsigned, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    l1 = torch.randn(k, rank, generator=g) * 0.1 if rank else None
    l2 = torch.randn(rank, n, generator=g) * 0.1 if rank else None
    p = nm.from_float(w, torch.randn(n, generator=g), smooth=torch.rand(k, generator=g) + 0.5, lr_down=l1, lr_up=l2,
                      clip=torch.tensor([1.0, 0.8]), num_bins=2, act_unsigned=unsigned).to("cuda")
    x = torch.randn(m, k, generator=g)
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    return p, x.to(torch.float16).cuda()


def operands(p, x):
    xq, sx, u = tw.quantize(x, p, torch.tensor(1, device="cuda"))
    w8, wsum = tw.expanded(p, p.act_unsigned)
    return xq, sx, u, w8, wsum


@pytest.mark.parametrize("m", [1, 300, 4099, 20000])
@pytest.mark.parametrize("k,n", [(640, 384), (1280, 640), (5120, 256)])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("rank", [0, 32])
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_same_bits_as_the_triton_tile_kernel(m, k, n, unsigned, rank, config):
    p, x = make(k, n, m, rank=rank, unsigned=unsigned)
    xq, sx, u, w8, wsum = operands(p, x)
    ref = tw.gemm(xq, sx, u, p, torch.float16, w8=w8, wsum=wsum, tma=True, config=tw.gemm_config(m))
    out = tw.gemm(xq, sx, u, p, torch.float16, w8=w8, wsum=wsum, tma=True, config=config)
    assert tw._gluon_failure == []
    assert torch.equal(out, ref)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rank", [8, 100])  # rank padding 16 and a folded LoRA's 128 (the latter: never ws)
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_same_bits_for_other_outputs_and_ranks(out_dtype, rank, config):
    p, x = make(1280, 640, 3000, rank=rank, unsigned=True, seed=1)
    xq, sx, u, w8, wsum = operands(p, x)
    ref = tw.gemm(xq, sx, u, p, out_dtype, w8=w8, wsum=wsum, tma=True, config=tw.gemm_config(3000))
    out = tw.gemm(xq, sx, u, p, out_dtype, w8=w8, wsum=wsum, tma=True, config=config)
    assert tw._gluon_failure == []
    assert torch.equal(out, ref)
    assert nm.sqnr_db(nm.w4a4_linear(x.float(), p, 1), out.float()) >= 40.0


@pytest.mark.parametrize("k,n,unsigned", [(5120, 5120, False), (13824, 5120, True), (5120, 13824, False)])
@pytest.mark.parametrize("stages", [3, 4, 5])
def test_the_ping_pong_kernel_gives_the_same_bits_at_wan_sizes(k, n, unsigned, stages):
    """Many tiles per program (8 269 x 5120: 65 x 40 tiles over one program per SM, both warpgroups taking turns
    over long K loops), against the warp-specialised kernel it would replace."""
    p, x = make(k, n, 8269, rank=32, unsigned=unsigned, seed=5)
    xq, sx, u, w8, wsum = operands(p, x)
    ref = tw.gemm(xq, sx, u, p, torch.float16, w8=w8, wsum=wsum, tma=True, config=WS)
    out = tw.gemm(xq, sx, u, p, torch.float16, w8=w8, wsum=wsum, tma=True, config=dict(PP, num_stages=stages))
    assert tw._gluon_failure == []
    assert torch.equal(out, ref)


def _gemm_kernels(fn) -> tuple[torch.Tensor, list[str]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, [e.key for e in prof.key_averages() if "_gemm_i8" in e.key]


def test_the_layer_runs_it_above_2048_tokens_and_not_when_turned_off(monkeypatch):
    p, x = make(1280, 640, 6000, rank=32, unsigned=False, seed=2)
    monkeypatch.delenv(tw.GEMM_ENV, raising=False)
    out, names = _gemm_kernels(lambda: kernels.w4a4_linear(x, p, 1, backend="triton"))
    assert names and all("_gemm_i8_ws_kernel" in s for s in names), names
    _, small_names = _gemm_kernels(lambda: kernels.w4a4_linear(x[:2048], p, 1, backend="triton"))
    assert small_names and all("_gemm_i8_tma" in s for s in small_names), small_names
    monkeypatch.setenv(tw.GEMM_ENV, "triton")
    off, off_names = _gemm_kernels(lambda: kernels.w4a4_linear(x, p, 1, backend="triton"))
    assert off_names and all("_gemm_i8_tma" in s for s in off_names), off_names
    assert torch.equal(out, off)
    # in row passes (a small pass budget): the whole call's choice in every pass, the same bits
    monkeypatch.delenv(tw.GEMM_ENV)
    passes, pass_names = _gemm_kernels(lambda: tw.w4a4_linear(x, p, 1, pass_bytes=1 << 20))
    assert len(pass_names) == 1 and "_gemm_i8_ws_kernel" in pass_names[0], pass_names
    assert torch.equal(passes, out)


def test_a_wide_low_rank_branch_takes_the_one_tile_kernel():
    """A folded LoRA's rank padding (128) does not fit beside the warp-specialised kernel's stages."""
    p, x = make(1280, 640, 6000, rank=100, unsigned=False, seed=4)
    out, names = _gemm_kernels(lambda: kernels.w4a4_linear(x, p, 1, backend="triton"))
    assert names and all("_gemm_i8_async_kernel" in s for s in names), names
    assert tw._gluon_failure == []
    assert nm.sqnr_db(nm.w4a4_linear(x.float(), p, 1), out.float()) >= 40.0


class _Unbuildable:
    """Stands in for the Gluon kernel on a Triton that cannot build it (a running kernel's fault: the host-level
    test in test_gemm_choice.py)."""

    def __init__(self, error: Exception):
        self.error = error

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise self.error
        return launch


def test_a_triton_that_cannot_build_it_gets_the_triton_kernel_after_one_warning(monkeypatch, caplog):
    from triton.errors import TritonError

    p, x = make(1280, 640, 6000, rank=32, unsigned=True, seed=3)
    monkeypatch.setenv(tw.GEMM_ENV, "triton")
    ref = kernels.w4a4_linear(x, p, 1, backend="triton")
    monkeypatch.delenv(tw.GEMM_ENV)
    for name in ("_gemm_i8_async_kernel", "_gemm_i8_ws_kernel"):
        monkeypatch.setattr(tw.gg, name, _Unbuildable(TritonError("no such Gluon builtin")))
    with caplog.at_level("WARNING", logger=tw.__name__):
        out, names = _gemm_kernels(lambda: kernels.w4a4_linear(x, p, 1, backend="triton"))
        again = kernels.w4a4_linear(x, p, 1, backend="triton")
    assert torch.equal(out, ref) and torch.equal(again, ref)
    assert names and all("_gemm_i8_tma" in s for s in names), names
    warnings = [r for r in caplog.records if "did not compile" in r.getMessage()]
    assert len(warnings) == 1 and "no such Gluon builtin" in warnings[0].getMessage()
    assert not tw.async_wgmma_available((9, 0))
