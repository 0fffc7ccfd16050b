"""Calibration settings: one dataclass, validated on construction.

The defaults follow the method this pack implements (arXiv 2605.27003 on top of SVDQuant,
arXiv 2411.05007) and the earlier revision of ComfyUI's Wan2.2 I2V A14B template
(``video_wan2_2_14B_i2v.json``: 20 steps, cfg 3.5, shift 8, euler/simple), whose hand-over at step 10
coincides with the Wan2.2 expert switch at t = 900. The current template uses shift 5 and still hands
over at step 10 of 20, so the high expert's last steps run at t ~ 882 and 859, below 900: calibrate it
with ``handover_step=10, shift=5`` (example_workflows/wan22_i2v_w4a4_calibrate.json does).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import re
from pathlib import Path

from ..kernels import format as fmt
from ..kernels.numerics import bin_of  # noqa: F401  (the bin rule, defined there; capture imports it from here)
# The search grids' defaults (DEFAULT_ALPHAS, DEFAULT_CLIPS) are the calibration steps' own.
from .clip import DEFAULT_CLIP_GRID as DEFAULT_CLIPS
from .smoothing import DEFAULT_ALPHAS

# The clip policies calibration offers, as the CLI and the node spell them (underscores), each mapped to
# the name a state's header records (format.CLIP_POLICIES, hyphens; its "none" is for states made
# without calibration). Look a header name up here rather than respelling it.
CLIP_POLICY_HEADER = {p.replace("-", "_"): p for p in fmt.CLIP_POLICIES if p != "none"}
CLIP_POLICIES = tuple(CLIP_POLICY_HEADER)
BIN_SPACINGS = ("uniform", "steps")
EXPERTS = ("high", "low")
# Model timesteps of a flow model after ModelSamplingSD3 run over [0, 1000] (timestep = 1000 * sigma).
T_MAX = 1000.0
# Official Wan2.2 expert boundaries (``boundary * num_train_timesteps`` in the Wan2.2 repository).
I2V_BOUNDARY = 900.0

# The Linears of a Wan block that this pack quantizes; everything outside the blocks (patch, text and
# time embeddings, time projection, modulation, head) stays in BF16, as in arXiv 2605.27003 and SVDQuant.
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
                 "ffn.0", "ffn.2")
# One file name may have at most NAME_MAX bytes (Linux ext4 / xfs / btrfs / tmpfs). Each output file (the
# states and the report) is written under a temporary name in the same folder first, which adds up to
# format.TEMP_NAME_MAX_EXTRA bytes (format.temp_name).
NAME_MAX = 255
TEMP_NAME_EXTRA = fmt.TEMP_NAME_MAX_EXTRA

# Linears fed by GELU-tanh: shifted by numerics.GELU_SHIFT onto the unsigned 4-bit grid (SVDQuant).
UNSIGNED_LINEARS = ("ffn.2",)


def bin_edges(expert: str, bins: int, boundary: float = I2V_BOUNDARY) -> tuple[float, ...]:
    """Descending model-timestep edges of the ``bins`` equal intervals of one expert.

    high: [1000, boundary], low: [boundary, 0], each cut into ``bins`` equal parts; bin i covers
    [edges[i + 1], edges[i]) (see :func:`bin_of`). ``boundary`` is the model timestep between the
    experts: the configured one, or the one a hand-over step gives (``capture.handover``).
    """
    if expert not in EXPERTS:
        raise ValueError(f"expert must be one of {EXPERTS}, got {expert!r}")
    hi, lo = (T_MAX, boundary) if expert == "high" else (boundary, 0.0)
    return tuple(hi + (lo - hi) * i / bins for i in range(bins + 1))


def step_edges(expert: str, bins: int, timesteps, boundary: float = I2V_BOUNDARY) -> tuple[float, ...]:
    """Edges that give each bin an equal share of the expert's sampling steps (``bin_spacing="steps"``).

    ``timesteps``: the model timesteps this expert samples, in sampling order. The outer edges are
    the expert's range as in :func:`bin_edges`; each inner edge lies halfway between the last step of
    one bin and the first of the next. With fewer steps than bins, falls back to :func:`bin_edges`.
    Why: with shift 8 the low-noise expert spends most steps near t = 900 (20 steps: 888 ... 296), so
    equal intervals of t leave its lowest bin empty.
    """
    ts = sorted((float(t) for t in timesteps), reverse=True)
    n = len(ts)
    if n < bins:
        return bin_edges(expert, bins, boundary)
    hi, lo = (T_MAX, boundary) if expert == "high" else (boundary, 0.0)
    cuts = [round(k * n / bins) for k in range(1, bins)]
    return (hi, *[(ts[c - 1] + ts[c]) / 2.0 for c in cuts], lo)


def output_names(name: str) -> dict[str, str]:
    """The file names a calibration named ``name`` writes: "high", "low" (states) and "report"."""
    return {**{e: f"{name}_{e}.safetensors" for e in EXPERTS}, "report": f"{name}_report.json"}


def name_length_problem(name: str) -> str | None:
    """Why ``name`` is too long for the files it names (None if it is not): the longest of them,
    under its temporary name, must fit NAME_MAX bytes."""
    longest = max(output_names(name).values(), key=lambda f: len(os.fsencode(f)))
    size = len(os.fsencode(longest)) + TEMP_NAME_EXTRA
    if size <= NAME_MAX:
        return None
    n = len(os.fsencode(name))
    return (f"name is too long: it has {n} bytes, and '<name>{longest[len(name):]}' takes {size} bytes under its "
            f"temporary name "
            f"while it is written, more than the file-system limit of {NAME_MAX} bytes per file name; "
            f"use a name of at most {n - (size - NAME_MAX)} bytes")


@dataclasses.dataclass
class CalibrationConfig:
    """Everything :func:`wan_w4a4.calibration.calibrate` needs besides the models and the items.

    Sampling (capture runs the real two-expert I2V sampling through ComfyUI):
      steps, cfg, shift (ModelSamplingSD3; None keeps the model's own), sampler, scheduler, and the
      hand-over between the experts, one of:
      - handover_step None (default): by ``boundary``, the model timestep where the low-noise expert
        takes over (I2V 900, T2V 875): the high expert runs the steps with t >= boundary;
      - handover_step N: by step, as a workflow whose high-noise KSamplerAdvanced ends at step N (and
        the low-noise one starts there): the high expert runs steps 0..N-1 whatever their timesteps.
        The bins then split halfway between the timesteps of steps N-1 and N (``capture.handover``),
        so each expert's bins cover exactly the timesteps it runs at.
    Bins: ``bins`` intervals of model timestep per expert, each with its own clip ratio; bin_spacing
      "uniform" cuts the expert's range into equal intervals, "steps" gives each bin an equal share of
      the sampling steps (:func:`step_edges`). The edges are stored in the states.
    Method: alphas (smoothing grid), rank (low-rank branch), refine_low_rank, gptq (+gptq_damp,
      gptq_block, act_order; off = round to nearest), unsigned_ffn2, clip_grid, clip_policy.
    Keep-list ``keep``: block indices (int) or fnmatch patterns on layer names relative to the
      diffusion model (e.g. "blocks.0.*", "*.ffn.2"); matching Linears stay BF16.
    Memory: rows_per_bin (per input, per bin reservoir), token_fraction (share of each call's tokens
      that enter the Hessian and the reservoirs), blocks_per_pass (capture re-runs sampling for each
      subset of blocks so that Hessians of all blocks never coexist; None = all at once),
      gpu_budget_gib (GPU memory calibration stays under: blocks_per_pass chosen to fit and ComfyUI
      told to load the model within it, ``budget.py``; None = no budget), stats_device (None = the model's device; "cpu" keeps statistics on the host), device (where
      the per-layer math runs; None = the model's device).
    Output: out_dir, name -> ``<out_dir>/<name>_high.safetensors``, ``..._low.safetensors``,
      ``<name>_report.json``; overwrite must be set to replace existing files.
    """

    steps: int = 20
    cfg: float = 3.5
    shift: float | None = 8.0
    sampler: str = "euler"
    scheduler: str = "simple"
    boundary: float = I2V_BOUNDARY
    handover_step: int | None = None  # None: hand over at ``boundary``; N: after N steps of the high expert
    bins: int = 4
    bin_spacing: str = "steps"  # equal steps per bin: "uniform" t leaves the low expert's last bin empty at 20 steps, shift 8

    rank: int = 32
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    refine_low_rank: bool = False
    gptq: bool = True
    gptq_damp: float = 0.01
    gptq_block: int = 128
    act_order: bool = True
    unsigned_ffn2: bool = True
    clip_grid: tuple[float, ...] = DEFAULT_CLIPS
    clip_policy: str = "per_bin"
    keep: tuple = ()

    rows_per_bin: int = 1024
    token_fraction: float = 1.0
    eval_fraction: float = 0.125
    blocks_per_pass: int | None = None
    gpu_budget_gib: float | None = None
    stats_device: str | None = None
    device: str | None = None
    seed: int = 0

    out_dir: str = "."
    name: str = "wan22_i2v"
    overwrite: bool = False

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"CalibrationConfig: {msg}")

        need(isinstance(self.steps, int) and self.steps >= 2, f"steps must be an int >= 2, got {self.steps!r}")
        need(self.cfg >= 0 and math.isfinite(self.cfg), f"cfg must be >= 0, got {self.cfg!r}")
        need(self.shift is None or (self.shift > 0 and math.isfinite(self.shift)),
             f"shift must be > 0 or None, got {self.shift!r}")
        need(0.0 < self.boundary < T_MAX, f"boundary is a model timestep in (0, {T_MAX:g}), got {self.boundary!r} "
             "(Wan2.2 I2V uses 900, T2V 875)")
        need(self.handover_step is None or (isinstance(self.handover_step, int) and not isinstance(
            self.handover_step, bool) and 1 <= self.handover_step < self.steps),
             f"handover_step must be None (hand over at the boundary) or a step in 1..steps-1 = 1..{self.steps - 1} "
             f"(the high-noise sampler's end_at_step), got {self.handover_step!r}")
        need(isinstance(self.bins, int) and self.bins >= 1, f"bins must be an int >= 1, got {self.bins!r}")
        need(self.bin_spacing in BIN_SPACINGS, f"bin_spacing must be one of {BIN_SPACINGS}, got {self.bin_spacing!r}")
        need(isinstance(self.rank, int) and self.rank >= 0, f"rank must be an int >= 0, got {self.rank!r}")
        self.alphas = tuple(float(a) for a in self.alphas)
        need(len(self.alphas) > 0 and all(0.0 <= a <= 1.0 for a in self.alphas),
             f"alphas must be a non-empty grid in [0, 1], got {self.alphas!r}")
        self.clip_grid = tuple(float(c) for c in self.clip_grid)
        need(len(self.clip_grid) > 0 and all(0.0 < c <= 1.0 for c in self.clip_grid),
             f"clip_grid must be a non-empty grid in (0, 1], got {self.clip_grid!r}")
        need(self.clip_policy in CLIP_POLICIES, f"clip_policy must be one of {CLIP_POLICIES}, got {self.clip_policy!r}")
        need(self.gptq_damp > 0, f"gptq_damp must be > 0, got {self.gptq_damp!r}")
        need(isinstance(self.gptq_block, int) and self.gptq_block >= 1,
             f"gptq_block must be >= 1, got {self.gptq_block!r}")
        if isinstance(self.keep, (str, int)):
            self.keep = (self.keep,)
        self.keep = tuple(self.keep)
        for k in self.keep:
            need((isinstance(k, int) and not isinstance(k, bool) and k >= 0) or (isinstance(k, str) and k),
                 f"keep entries are block indices (int >= 0) or name patterns (str), got {k!r}")
        need(isinstance(self.rows_per_bin, int) and self.rows_per_bin >= 8,
             f"rows_per_bin must be an int >= 8, got {self.rows_per_bin!r}")
        need(0.0 < self.token_fraction <= 1.0, f"token_fraction must be in (0, 1], got {self.token_fraction!r}")
        need(0.0 <= self.eval_fraction < 1.0, f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        need(self.blocks_per_pass is None or (isinstance(self.blocks_per_pass, int) and self.blocks_per_pass >= 1),
             f"blocks_per_pass must be None or an int >= 1, got {self.blocks_per_pass!r}")
        need(self.gpu_budget_gib is None or (isinstance(self.gpu_budget_gib, (int, float))
                                              and not isinstance(self.gpu_budget_gib, bool)
                                              and math.isfinite(self.gpu_budget_gib) and self.gpu_budget_gib > 0),
             f"gpu_budget_gib must be None or a number of GiB > 0, got {self.gpu_budget_gib!r}")
        need(bool(self.name) and re.fullmatch(r"[\w.\-]+", self.name) is not None,
             f"name must be a plain file-name stem, got {self.name!r}")
        problem = name_length_problem(self.name)
        need(problem is None, problem)
        self.out_dir = str(self.out_dir)

    # --- derived ----------------------------------------------------------------------------
    def edges(self, expert: str, timesteps=None, boundary: float | None = None) -> tuple[float, ...]:
        """Bin edges of ``expert``; with bin_spacing "steps", ``timesteps`` (the expert's sampled
        timesteps) place them. ``boundary``: the timestep between the experts (default: ``self.boundary``;
        with a hand-over step, the one ``capture.handover`` derives from the schedule)."""
        boundary = self.boundary if boundary is None else boundary
        if self.bin_spacing == "steps" and timesteps is not None:
            return step_edges(expert, self.bins, timesteps, boundary)
        return bin_edges(expert, self.bins, boundary)

    def state_path(self, expert: str) -> Path:
        if expert not in EXPERTS:
            raise ValueError(f"expert must be one of {EXPERTS}, got {expert!r}")
        return Path(self.out_dir) / output_names(self.name)[expert]

    @property
    def report_path(self) -> Path:
        return Path(self.out_dir) / output_names(self.name)["report"]

    def is_kept(self, name: str) -> bool:
        """Whether the Linear ``name`` (e.g. "blocks.3.ffn.2") stays BF16 by the keep-list."""
        m = re.match(r"blocks\.(\d+)\.", name)
        block = int(m.group(1)) if m else None
        for k in self.keep:
            if isinstance(k, int):
                if block == k:
                    return True
            elif fnmatch.fnmatchcase(name, k):
                return True
        return False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
