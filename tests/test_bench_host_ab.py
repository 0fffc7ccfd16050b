"""benchmarks/host_ab.py's parts that run without a GPU: its one-frame call mix is a Wan2.2-A14B model call's, and
another checkout's ``kernels`` folder loads as a package of its own beside this one's."""
from __future__ import annotations

import shutil

import torch

from wan_w4a4 import kernels
from wan_w4a4.calibration.config import BLOCK_LINEARS
from wan_w4a4.kernels import format as fmt
from wan_w4a4.kernels import numerics as nm
from wan_w4a4.minimodel.arch import WAN22_I2V_A14B, quantizable_linears

ROWS_ONE_FRAME = 2 * 1560  # one 480p frame: 1560 tokens per sample, cond and uncond in one call
TEXT_ROWS = 2 * 512  # the cross-attention's k and v read the text's 512 tokens per sample


def test_the_call_mix_is_a_one_frame_model_calls(benchmark_module):
    host_ab = benchmark_module("host_ab")
    arch = WAN22_I2V_A14B
    assert sum(s[-1] for s in host_ab.SHAPES) == len(quantizable_linears(arch)) == 400
    want = {}
    for name in BLOCK_LINEARS:
        rows = TEXT_ROWS if name in ("cross_attn.k", "cross_attn.v") else ROWS_ONE_FRAME
        k, n = {"ffn.0": (arch.dim, arch.ffn_dim), "ffn.2": (arch.ffn_dim, arch.dim)}.get(name, (arch.dim, arch.dim))
        key = (rows, k, n, name == "ffn.2")  # ffn.2 reads the GELU's output: unsigned activations
        want[key] = want.get(key, 0) + arch.num_layers
    assert {s[:4]: s[4] for s in host_ab.SHAPES} == want


def test_another_kernels_folder_loads_as_its_own_package(benchmark_module, tmp_path):
    host_ab = benchmark_module("host_ab")
    copy = tmp_path / "kernels"
    shutil.copytree(next(iter(kernels.__path__)), copy, ignore=shutil.ignore_patterns("__pycache__"))
    other = host_ab.load_kernels(copy, name="wan_w4a4_test_other_kernels")
    assert other is not kernels and other.numerics.W4A4Params is not nm.W4A4Params
    assert other.__file__.startswith(str(copy))
    g = torch.Generator().manual_seed(0)
    p = nm.from_float(torch.randn(64, 256, generator=g), torch.randn(64, generator=g), clip=torch.tensor([1.0, 0.8]),
                      num_bins=2)
    fields = {f: getattr(p, f) for f in (*fmt.FIELDS, "act_unsigned", "act_shift")}
    x = torch.randn(5, 256, generator=g)
    # on the CPU both run the reference: the copy computes what this checkout does
    assert torch.equal(other.w4a4_linear(x, other.numerics.W4A4Params(**fields), 1), kernels.w4a4_linear(x, p, 1))
