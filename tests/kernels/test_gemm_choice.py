"""Which int8 GEMM the Triton path runs: TMA tile loads on Hopper and later, pointer loads on sm_80..89
(RTX 30/40, A100), which have no TMA, and on Hopper above 2048 tokens the Gluon kernel (kernels/gluon_gemm.py).
The GPU test forces the sm_80..89 choice on whatever GPU runs it (an H200 here) through the production entry
point, ``kernels.w4a4_linear``; tests/kernels/test_gluon_gemm.py checks the Gluon kernel's bits."""
import pytest
import torch

from wan_w4a4 import kernels
from wan_w4a4.kernels import numerics as nm
from wan_w4a4.kernels import triton_w4a4 as tw


def test_tma_only_from_hopper_on():
    assert not tw.tma_available((8, 0)) and not tw.tma_available((8, 6)) and not tw.tma_available((8, 9))
    assert tw.tma_available((9, 0)) and tw.tma_available((10, 0)) and tw.tma_available((12, 0))


def test_the_gluon_kernel_only_on_hopper_with_gluon(monkeypatch):
    monkeypatch.delenv(tw.GEMM_ENV, raising=False)
    monkeypatch.setattr(tw, "_gluon_failure", [])
    monkeypatch.setattr(tw.gg, "gluon", object())  # a Triton with Gluon, on any machine
    assert tw.async_wgmma_available((9, 0))
    for other in [(8, 0), (8, 9), (10, 0), (12, 0)]:  # no wgmma there (Blackwell has tcgen05)
        assert not tw.async_wgmma_available(other)
    monkeypatch.setattr(tw, "_gluon_failure", ["TritonError: this Triton could not build it"])
    assert not tw.async_wgmma_available((9, 0))
    monkeypatch.setattr(tw, "_gluon_failure", [])
    monkeypatch.setattr(tw.gg, "gluon", None)  # Triton without Gluon (or none at all)
    assert not tw.async_wgmma_available((9, 0))


def test_wan_w4a4_gemm_turns_the_gluon_kernel_off_and_rejects_other_values(monkeypatch):
    monkeypatch.setattr(tw.gg, "gluon", object())
    monkeypatch.setattr(tw, "_gluon_failure", [])
    monkeypatch.setenv(tw.GEMM_ENV, "triton")
    assert not tw.async_wgmma_available((9, 0))
    monkeypatch.setenv(tw.GEMM_ENV, "auto")
    assert tw.async_wgmma_available((9, 0))
    assert tw.gemm_config(32760, async_wgmma=True)["warp_specialized"]
    monkeypatch.setenv(tw.GEMM_ENV, "pp")  # the ping-pong kernel instead of the warp-specialised one
    assert tw.async_wgmma_available((9, 0))
    pp = tw.gemm_config(32760, async_wgmma=True)
    assert pp["ping_pong"] and {k: pp[k] for k in tw.gg.PP_CONFIG} == tw.gg.PP_CONFIG
    assert tw.gemm_config(1024, async_wgmma=True) == tw.gemm_config(1024)  # few tokens: Triton's tiles still
    monkeypatch.setenv(tw.GEMM_ENV, "gluon")
    with pytest.raises(ValueError, match="WAN_W4A4_GEMM='gluon'.*auto, pp, triton"):
        tw.async_wgmma_available((9, 0))


def test_the_gluon_kernel_needs_the_gluon_api_of_triton_3_6():
    assert tw.gg.gluon_api_supported("3.6.0") and tw.gg.gluon_api_supported("3.7.1+git4f2ebca")
    assert tw.gg.gluon_api_supported("3.10.0") and tw.gg.gluon_api_supported("4.0.0")
    for older in ["3.5.1", "3.4.0", "2.3.1", "3", "", "unknown"]:
        assert not tw.gg.gluon_api_supported(older), older


@pytest.mark.parametrize("m", [1, 1024, 2048, 2049, 8192, 32760, 75600])
def test_gemm_config_takes_the_gluon_tiles_above_2048_tokens(m):
    triton_cfg, cfg = tw.gemm_config(m), tw.gemm_config(m, async_wgmma=True)
    assert not triton_cfg.get("async_wgmma")
    if m <= 2048:  # the Triton kernel's narrow tiles: faster there (kernels/README.md, session 13)
        assert cfg == triton_cfg
    else:
        assert cfg["async_wgmma"] and {k: cfg[k] for k in tw.gg.CONFIG} == tw.gg.CONFIG
        assert cfg["warp_specialized"]  # where its shared memory fits (test below)
        assert cfg["fallback"] == triton_cfg  # the whole call's Triton tiles, should Gluon fail to build
    # row passes end on row-tile boundaries, whichever kernel runs (triton_w4a4.pass_rows)
    assert tw.PASS_ROW_TILE % cfg["BM"] == 0


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
    monkeypatch.setattr(tw, "_capability", lambda index: (8, 9))  # what the layer's call reads
    out, names = _gemm_kernels(lambda: kernels.w4a4_linear(x, p, 1, backend="triton"))
    assert names and all("tma" not in s for s in names), names
    if tw.tma_available(real()):
        assert any("tma" in s for s in here_kernels), here_kernels
    ref = nm.w4a4_linear(x.float(), p, 1)
    assert nm.sqnr_db(ref, out.float()) >= 45.0
    if rank == 0:  # no low-rank branch: the two loads compute the same int32 sums and epilogue
        assert torch.equal(out, here)


SMS = 132  # an H100/H200's SMs, for the persistent kernel's grid


class _Launches:
    """Stands in for a compiled kernel: records (name, grid, keyword arguments) of each launch, or raises."""

    def __init__(self, name, record, error=None):
        self.name, self.record, self.error = name, record, error

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.error is not None:
                raise self.error
            self.record.append((self.name, grid, kwargs))
        return launch


def _host_only(monkeypatch, gluon_error):
    """triton_w4a4's host code on CPU tensors, as on an H200: stand-in kernels, quantizer and weight expansion."""
    pytest.importorskip("triton", reason="Triton is not installed (the host code builds TMA descriptors)")
    if tw.gg.gluon is None:
        pytest.skip("this Triton has no Gluon")
    record = []
    for name in ("_gemm_i8_tma_kernel", "_gemm_i8_kernel", "_gemm_i8_persistent_kernel"):
        monkeypatch.setattr(tw, name, _Launches(name, record))
    for name in ("_gemm_i8_async_kernel", "_gemm_i8_ws_kernel", "_gemm_i8_pp_kernel"):
        monkeypatch.setattr(tw.gg, name, _Launches(name, record, gluon_error))
    monkeypatch.setattr(tw, "_num_sms", lambda index: SMS)
    monkeypatch.setattr(tw, "_gluon_failure", [])
    monkeypatch.setattr(tw, "unsupported_reason", lambda x, p: None)
    monkeypatch.setattr(tw, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(tw, "_index", lambda device: 0)
    monkeypatch.delenv(tw.GEMM_ENV, raising=False)

    def quantize(x2d, p, b, plan=None, inv_smooth=None, arena=None):
        m, k = x2d.shape
        return (torch.zeros(m, k, dtype=torch.int8), torch.zeros(m),
                torch.zeros(m, p.rank, dtype=torch.bfloat16) if p.rank else None)

    def expand_weight(p, with_sum=False, arena=None):
        w8 = torch.zeros(p.out_features, p.in_features, dtype=torch.int8)
        return (w8, torch.zeros(p.out_features, dtype=torch.int32)) if with_sum else w8

    monkeypatch.setattr(tw, "quantize", quantize)
    monkeypatch.setattr(tw, "expand_weight", expand_weight)
    g = torch.Generator().manual_seed(0)
    k, n = 1280, 640
    p = nm.from_float(torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g),
                      smooth=torch.rand(k, generator=g) + 0.5, lr_down=torch.randn(k, 32, generator=g),
                      lr_up=torch.randn(32, n, generator=g), clip=torch.tensor([1.0, 0.8]), num_bins=2)
    return record, p, torch.zeros(40000, k, dtype=torch.float16)


def _with_rank(p, rank: int):
    """The layer with a low-rank branch of ``rank`` (100: a folded LoRA's width, padded to 128)."""
    if rank != p.rank:
        g = torch.Generator().manual_seed(1)
        p.lr_down = torch.randn(p.in_features, rank, generator=g).bfloat16()
        p.lr_up = torch.randn(rank, p.out_features, generator=g).bfloat16()
    return p


@pytest.mark.parametrize("rank", [32, 100])  # the warp-specialised kernel, and the one-tile one
def test_a_build_failure_of_the_gluon_kernel_falls_back_to_the_calls_triton_tiles_once(monkeypatch, caplog, rank):
    errors = pytest.importorskip("triton.errors", reason="Triton is not installed")
    record, p, x = _host_only(monkeypatch, errors.TritonError("at 12:4: no attribute warpgroup_mma_wait"))
    p = _with_rank(p, rank)
    with caplog.at_level("WARNING", logger=tw.__name__):
        tw.w4a4_linear(x, p, torch.tensor(1), pass_bytes=1 << 22)  # row passes: the failure is in the first
        tw.w4a4_linear(x, p, torch.tensor(1))
    whole = tw.gemm_config(x.shape[0])  # the whole call's Triton tiles, in every pass
    assert len(record) > 2 and all(name == "_gemm_i8_tma_kernel" for name, _, _ in record)
    assert all((kw["BM"], kw["BN"], kw["num_stages"]) == (whole["BM"], whole["BN"], whole["num_stages"])
               for _, _, kw in record)
    warnings = [r.getMessage() for r in caplog.records if "did not compile" in r.getMessage()]
    assert len(warnings) == 1 and "no attribute warpgroup_mma_wait" in warnings[0]
    assert not tw.async_wgmma_available((9, 0))


def test_a_fault_of_a_running_gluon_kernel_propagates(monkeypatch):
    record, p, x = _host_only(monkeypatch, RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        tw.w4a4_linear(x, p, torch.tensor(1))
    assert record == [] and tw._gluon_failure == [] and tw.async_wgmma_available((9, 0))


def test_the_gluon_kernel_runs_in_every_row_pass_with_the_calls_tiles(monkeypatch):
    record, p, x = _host_only(monkeypatch, None)
    tw.w4a4_linear(x, p, torch.tensor(1), pass_bytes=1 << 22)
    assert len(record) > 2 and all(name == "_gemm_i8_ws_kernel" for name, _, _ in record)
    assert all((kw["BM"], kw["BN"], kw["STAGES"], kw["num_warps"], kw["R_PAD"], kw["STORE_ROWS"])
               == (256, 128, 4, 8, 32, tw.gg.STORE_ROWS) for _, _, kw in record)
    # passes end on 256-row boundaries (pass_rows), so the passes' tiles are the call's tiles, each once; the
    # persistent kernel walks a pass's tiles with one program per SM, or one per tile where there are fewer
    rows = tw.pass_rows(x.shape[0], p.in_features, p.rank, 1 << 22)
    tiles = [-(-min(rows, x.shape[0] - a) // 256) * (p.out_features // 128) for a in range(0, x.shape[0], rows)]
    assert sum(tiles) == -(-x.shape[0] // 256) * (p.out_features // 128)
    assert [grid[0] for _, grid, _ in record] == [min(SMS, t) for t in tiles] == tiles  # fewer tiles than SMs
    record.clear()
    tw.w4a4_linear(x, p, torch.tensor(1))  # one pass of 785 tiles: one program per SM
    assert [(name, grid[0]) for name, grid, _ in record] == [("_gemm_i8_ws_kernel", SMS)]


def test_the_ping_pong_kernel_when_asked_and_the_256_row_kernels_where_it_does_not_fit(monkeypatch):
    record, p, x = _host_only(monkeypatch, None)
    monkeypatch.setenv(tw.GEMM_ENV, "pp")
    tw.w4a4_linear(x, p, torch.tensor(1))  # 40 000 x 640: 313 x 5 tiles of 128 x 128, one program per SM
    assert [(name, grid[0]) for name, grid, _ in record] == [("_gemm_i8_pp_kernel", SMS)]
    kw = record[0][2]
    assert (kw["BM"], kw["BN"], kw["STAGES"], kw["num_warps"], kw["MMA_REGS"]) == (128, 128, 4, 4, tw.gg.PP_MMA_REGS)
    record.clear()
    tw.w4a4_linear(x, _with_rank(p, 100), torch.tensor(1))  # rank padding 128 > PP_MAX_RANK_PAD
    assert [(name, kw["BM"], kw["R_PAD"]) for name, _, kw in record] == [("_gemm_i8_async_kernel", 256, 128)]
    assert tw.gg.ping_pong(dict(ping_pong=True), tw.gg.PP_MAX_RANK_PAD)
    assert not tw.gg.ping_pong(dict(ping_pong=True), 2 * tw.gg.PP_MAX_RANK_PAD)
    assert not tw.gg.ping_pong(dict(tw.gg.CONFIG), 32)


def test_a_wide_low_rank_branch_takes_the_one_tile_gluon_kernel(monkeypatch):
    record, p, x = _host_only(monkeypatch, None)
    p = _with_rank(p, 100)
    tw.w4a4_linear(x, p, torch.tensor(1))
    assert [(name, grid[0], kw["R_PAD"]) for name, grid, kw in record] == [
        ("_gemm_i8_async_kernel", -(-x.shape[0] // 256) * (p.out_features // 128), 128)]


@pytest.mark.parametrize("ws", [False, True])
def test_row_stores_only_where_their_staging_tile_fits(ws):
    rows = dict(tw.gg.CONFIG, async_wgmma=True, store_rows=True)
    assert tw.gg.store_rows(rows, ws, torch.float16) and tw.gg.store_rows(rows, ws, torch.bfloat16)
    assert tw.gg.store_rows(rows, ws, torch.float32) == (not ws)  # tests/kernels/test_shared_memory.py
    assert not tw.gg.store_rows(dict(rows, store_rows=False), ws, torch.float16)
    assert tw.gg.store_rows(dict(tw.gg.CONFIG), ws, torch.float16) == tw.gg.STORE_ROWS


@pytest.mark.parametrize("r_pad", [16, 32, 64, 128])
def test_the_warp_specialised_kernel_only_where_its_shared_memory_fits(r_pad):
    ws = dict(tw.gg.CONFIG, async_wgmma=True, warp_specialized=True)
    assert tw.gg.warp_specialized(ws, r_pad) == (r_pad <= 32)
    assert not tw.gg.warp_specialized(dict(tw.gg.CONFIG, async_wgmma=True), r_pad)


def test_a_host_side_gluon_api_change_also_falls_back(monkeypatch, caplog):
    record, p, x = _host_only(monkeypatch, None)

    def descriptors(*args, **kwargs):
        raise TypeError("get_default_for() got an unexpected keyword argument")

    monkeypatch.setattr(tw.gg, "descriptors", descriptors)
    with caplog.at_level("WARNING", logger=tw.__name__):
        tw.w4a4_linear(x, p, torch.tensor(1))
    assert [name for name, _, _ in record] == ["_gemm_i8_tma_kernel"]
    assert len([r for r in caplog.records if "unexpected keyword" in r.getMessage()]) == 1


def test_a_gluon_configuration_without_gluon_takes_its_triton_tiles(monkeypatch):
    record, p, x = _host_only(monkeypatch, None)
    monkeypatch.setattr(tw.gg, "gluon", None)
    xq, sx, u = tw.quantize(x, p, None)
    tw.gemm(xq, sx, u, p, torch.float16, config=tw.gemm_config(x.shape[0], async_wgmma=True), tma=True)
    whole = tw.gemm_config(x.shape[0])
    assert [(name, kw["BM"], kw["BN"]) for name, _, kw in record] == [("_gemm_i8_tma_kernel", whole["BM"], whole["BN"])]
    assert tw._gluon_failure == []  # nothing failed: this Triton simply has no Gluon
