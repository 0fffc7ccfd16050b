"""Inspect W4A4 states: the chosen clip ratios as a heatmap (layers x timestep bins, one panel per
expert - the view of Figure 3 in arXiv 2605.27003) and a text summary.

Reads only the header and the small ``<layer>.clip`` tensors, so inspecting a 14B state is instant.
Per-layer output SQNR comes from the calibration report the state's header points to
(``report.path``, a JSON file beside the state), when it is there.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re

import numpy as np

from ..kernels import format as fmt

log = logging.getLogger(__name__)

# viridis, 5 anchors: perceptually ordered, readable in grey, the usual choice for a heatmap
_VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)
_MISSING = (60, 60, 60)
_BG, _FG = (24, 24, 24), (230, 230, 230)
SQNR_RANGE_DB = (0.0, 40.0)  # colour scale of the per-layer error strip


@dataclasses.dataclass
class Panel:
    """One expert's clip table and what to print beside it."""

    title: str
    meta: fmt.StateMeta
    layers: list[str]
    clips: np.ndarray  # [L, B]
    sqnr_db: dict[str, float] | None = None  # layer -> output SQNR after calibration (report)
    sqnr_rtn_db: dict[str, float] | None = None  # layer -> SQNR of plain RTN W4A4 (report)


def read_panel(path: str, kind: str | None = None) -> Panel:
    """Header + clip ratios of a state or checkpoint file, validated by the format module: any problem
    is a W4A4FormatError naming the file (and the layer) rather than a KeyError or a numpy error."""
    if kind is None:
        kind = fmt.read_header(path).get("kind")
        if kind not in fmt.KINDS:
            kind = "state"  # the format's own check then says what the header's kind is
    meta, table = fmt.read_clips(path, kind)
    layers = list(table)
    clips = np.stack([table[name].float().numpy() for name in layers])
    panel = Panel(f"{meta.expert} expert - {os.path.basename(path)}", meta, layers, clips)
    panel.sqnr_db, panel.sqnr_rtn_db = _report_sqnr(path, meta)
    return panel


_MAX_REPORT_BYTES = 64 * 2**20  # a calibration report is a few hundred kB even for 14B


def _report_sqnr(path: str, meta: fmt.StateMeta):
    """Per-layer SQNR from the calibration report beside the state; (None, None) - logged - when it is
    missing or malformed: the report is optional, the heatmap does not need it."""
    name = meta.report.get("path") if isinstance(meta.report, dict) else None
    if not name:
        return None, None
    report = os.path.join(os.path.dirname(path), os.path.basename(str(name)))

    def num(x):
        return float(x) if isinstance(x, (int, float)) else (math.inf if x == "inf" else math.nan)

    try:
        if not os.path.isfile(report) or os.path.getsize(report) > _MAX_REPORT_BYTES:  # a FIFO would hang open()
            raise ValueError("not a regular file of at most 64 MiB")
        with open(report) as f:
            data = json.load(f)
        rows = data["experts"][meta.expert]["layers"]
        return ({r["name"]: num(r.get("sqnr_after_db")) for r in rows},
                {r["name"]: num(r.get("sqnr_rtn_db")) for r in rows})
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        log.warning("%s: no per-layer errors shown: report %s is unreadable (%s: %s)", path, report,
                    type(e).__name__, e)
        return None, None


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------

def summary(panel: Panel) -> str:
    m, c = panel.meta, panel.clips
    edges = ", ".join(f"{e:g}" for e in m.bin_edges)
    lines = [f"{panel.title}",
             f"  {len(panel.layers)} W4A4 layers, {m.num_bins} timestep bins (edges t = {edges}), "
             f"clip policy {m.clip_policy}, fingerprint {m.fingerprint or '-'}, made by {m.producer or '?'}"]
    if m.handover:
        lines.append(f"  calibrated for: {fmt.handover_text(m.handover)}")
    for b in range(m.num_bins):
        col = c[:, b]
        lines.append(f"  bin {b} (t {m.bin_edges[b]:g}..{m.bin_edges[b + 1]:g}): clip mean {col.mean():.3f}, "
                     f"min {col.min():.2f}, max {col.max():.2f}, {100 * (col >= 1).mean():.0f}% unclipped")
    if panel.sqnr_db:
        vals = [panel.sqnr_db[n] for n in panel.layers if n in panel.sqnr_db and math.isfinite(panel.sqnr_db[n])]
        if vals:
            worst = sorted(((panel.sqnr_db[n], n) for n in panel.layers if n in panel.sqnr_db
                            and math.isfinite(panel.sqnr_db[n])))[:3]
            rtn = [panel.sqnr_rtn_db[n] for n in panel.layers if panel.sqnr_rtn_db and n in panel.sqnr_rtn_db
                   and math.isfinite(panel.sqnr_rtn_db[n])]
            lines.append(f"  layer output SQNR vs BF16 (held-out rows): mean {np.mean(vals):.1f} dB"
                         + (f" (plain RTN W4A4: {np.mean(rtn):.1f} dB)" if rtn else "")
                         + "; worst: " + ", ".join(f"{n} {v:.1f} dB" for v, n in worst))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Picture
# ---------------------------------------------------------------------------------------------

def colormap(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (viridis); NaN -> grey."""
    v = np.asarray(v, dtype=np.float64)
    nan = ~np.isfinite(v)
    x = np.clip(np.nan_to_num(v), 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(x.astype(int), len(_VIRIDIS) - 2)
    f = (x - i)[..., None]
    rgb = _VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f
    rgb[nan] = _MISSING
    return rgb.round().astype(np.uint8)


def _block_of(name: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def render(panels: list[Panel], width: int = 1280) -> np.ndarray:
    """The heatmap of ``panels`` as uint8 [H, W, 3]: per panel a title, bins (rows) x layers
    (columns) coloured by clip ratio, block ticks, and a strip of per-layer SQNR when known."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    left, right, top_title, gap = 112, 96, 22, 18
    n_layers = max(len(p.layers) for p in panels)
    cell_w = max(1, min(48, (width - left - right) // max(1, n_layers)))
    plot_w = cell_w * n_layers
    width = left + plot_w + right
    lo = min(0.5, min(float(np.nanmin(p.clips)) for p in panels))
    heights = []
    for p in panels:
        cell_h = max(12, min(40, 160 // p.meta.num_bins))
        strip = 16 if p.sqnr_db else 0
        heights.append((cell_h, strip))
    height = sum(top_title + ch * p.meta.num_bins + (strip + 4 if strip else 0) + 16 + gap
                 for p, (ch, strip) in zip(panels, heights)) + 24
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    y = 6
    for p, (cell_h, strip) in zip(panels, heights):
        draw.text((8, y), f"{p.title}  -  clip ratio per layer and timestep bin ({p.meta.clip_policy})",
                  fill=_FG, font=font)
        y += top_title
        grid = colormap((p.clips.T - lo) / max(1e-6, 1.0 - lo))  # [B, L, 3]
        cells = np.repeat(np.repeat(grid, cell_h, axis=0), cell_w, axis=1)
        img.paste(Image.fromarray(cells), (left, y))
        for b in range(p.meta.num_bins):
            draw.text((8, y + b * cell_h + max(0, cell_h // 2 - 6)),
                      f"t {p.meta.bin_edges[b]:g}-{p.meta.bin_edges[b + 1]:g}", fill=_FG, font=font)
        y_plot_end = y + cell_h * p.meta.num_bins
        if strip:
            vals = np.array([p.sqnr_db.get(n, math.nan) for n in p.layers])
            span = SQNR_RANGE_DB[1] - SQNR_RANGE_DB[0]
            row = colormap((vals - SQNR_RANGE_DB[0]) / span)[None]
            img.paste(Image.fromarray(np.repeat(np.repeat(row, strip, 0), cell_w, 1)), (left, y_plot_end + 4))
            draw.text((8, y_plot_end + 4 + max(0, strip // 2 - 6)), "SQNR 0-40dB", fill=_FG, font=font)
            y_plot_end += strip + 4
        # block ticks: a label every k blocks so that labels never overlap
        blocks = [_block_of(n) for n in p.layers]
        starts = [i for i, b in enumerate(blocks) if b is not None and (i == 0 or blocks[i - 1] != b)]
        per_label = max(1, math.ceil(36 / max(1, cell_w * (len(p.layers) / max(1, len(starts))))))
        for j, i in enumerate(starts):
            x = left + i * cell_w
            draw.line([(x, y_plot_end), (x, y_plot_end + 3)], fill=_FG)
            if j % per_label == 0:
                draw.text((x + 1, y_plot_end + 3), str(blocks[i]), fill=_FG, font=font)
        y = y_plot_end + 16 + gap
    # colour bar for the clip ratio
    bar_x, bar_top, bar_h = left + plot_w + 24, 28, 160
    ramp = colormap(np.linspace(1, 0, bar_h))[:, None, :].repeat(14, axis=1)
    img.paste(Image.fromarray(ramp), (bar_x, bar_top))
    draw.text((bar_x + 18, bar_top - 4), "1.00", fill=_FG, font=font)
    draw.text((bar_x + 18, bar_top + bar_h - 8), f"{lo:.2f}", fill=_FG, font=font)
    draw.text((bar_x - 6, bar_top + bar_h + 6), "clip", fill=_FG, font=font)
    draw.text((left, height - 14), "x: layers in file order (ticks: block index); y: timestep bins", fill=_FG,
              font=font)
    return np.asarray(img)
