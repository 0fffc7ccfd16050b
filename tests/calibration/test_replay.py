"""Later capture passes replay the model outputs of an expert's first pass and stop each call after the
last block they observe (``capture.ExpertCapture``, ``pipeline.REPLAY_OUTPUTS``): the states are
bit-identical to passes that compute whole calls, and the blocks after a pass's last one do not run."""
from __future__ import annotations

import collections

import pytest
import torch
from wan_w4a4.calibration import CalibrationConfig, calibrate, pipeline, synthetic_items
from wan_w4a4.kernels import format as fmt
from wan_w4a4.minimodel.arch import WanArch

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]  # two calibrations of a three-block model

FAST = {"steps": 4, "bins": 2, "rank": 4, "alphas": (0.5,), "clip_grid": (1.0, 0.8), "rows_per_bin": 32,
        "bin_spacing": "uniform", "blocks_per_pass": 1}


@pytest.fixture(scope="module")
def three_blocks(comfy_nodes, comfy_base_dir, wan_checkpoint_factory):
    """Experts of three blocks, calibrated one block per pass."""
    arch = WanArch(dim=128, num_layers=3, ffn_dim=256)
    models = comfy_base_dir / "models"
    return {e: wan_checkpoint_factory(models, f"three_blocks_{e}.safetensors", seed=s, arch=arch)
            for e, s in (("high", 11), ("low", 12))}


def _calibrate(paths, out, replay: bool, monkeypatch):
    """States of one run, and how many times each (expert, block) ran its forward."""
    import comfy.sd
    runs = collections.Counter()

    def loader(expert):
        def load():
            m = comfy.sd.load_diffusion_model(str(paths[expert]))
            for i, block in enumerate(m.model.diffusion_model.blocks):
                block.register_forward_hook(lambda mod, a, o, i=i: runs.update([(expert, i)]))
            return m
        return load

    monkeypatch.setattr(pipeline, "REPLAY_OUTPUTS", replay)
    res = calibrate(loader("high"), loader("low"), synthetic_items(2, frames=5, height=32, width=32, text_tokens=8),
                    CalibrationConfig(**FAST, out_dir=str(out)))
    return {e: fmt.load_state(getattr(res, e))[0] for e in ("high", "low")}, runs


def test_replayed_passes_give_the_states_of_whole_calls_and_skip_the_later_blocks(three_blocks, tmp_path,
                                                                                   monkeypatch):
    whole, whole_runs = _calibrate(three_blocks, tmp_path / "whole", False, monkeypatch)
    replayed, replay_runs = _calibrate(three_blocks, tmp_path / "replayed", True, monkeypatch)
    for expert in ("high", "low"):
        assert whole[expert].keys() == replayed[expert].keys()
        for name, a in whole[expert].items():
            b = replayed[expert][name]
            for f in fmt.FIELDS:
                x, y = getattr(a, f), getattr(b, f)
                assert (x is None and y is None) or torch.equal(x, y), (expert, name, f)
        # three passes of one block each, the last block's first: it runs every block and records the
        # outputs; the pass over block 0 then stops after block 0, the pass over block 1 after block 1
        calls = whole_runs[expert, 0] // 3
        assert calls > 0 and [whole_runs[expert, i] for i in range(3)] == [3 * calls] * 3
        assert [replay_runs[expert, i] for i in range(3)] == [3 * calls, 2 * calls, calls]
