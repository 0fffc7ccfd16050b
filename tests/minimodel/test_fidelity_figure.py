"""The activation-range figure (``minimodel/fidelity.py``: ``draw_activation_ranges``) gives every block of the
shipped 6-block experts its own colour, with synthetic ranges: no ComfyUI, no sampling."""
from __future__ import annotations

from PIL import Image
from wan_w4a4.calibration.config import BLOCK_LINEARS
from wan_w4a4.minimodel import fidelity


def synthetic_ranges(blocks: int) -> dict:
    # block b sits at its own level (1 + b), both experts' timesteps on either side of the switch at t = 900
    ts = (1000.0, 980.0, 950.0, 920.0, 880.0, 700.0, 500.0)
    return {f"blocks.{b}.{lin}": [(t, 1.0 + b) for t in ts] for b in range(blocks) for lin in BLOCK_LINEARS}


def test_each_of_six_blocks_has_its_own_colour(tmp_path):
    path = tmp_path / "ranges.png"
    fidelity.draw_activation_ranges(synthetic_ranges(6), path)
    colours = {c for _, c in Image.open(path).convert("RGB").getcolors(maxcolors=1 << 20)}
    block_colours = fidelity.TYPE_COLORS[:6]
    assert len(set(block_colours)) == 6
    assert all(c in colours for c in block_colours)
