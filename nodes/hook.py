"""The timestep-aware hook: per model call, pick this expert's clip bin from the model timestep.

A keyed ``WrappersMP.APPLY_MODEL`` wrapper (``comfy/patcher_extension.py``): it composes with other
packs' wrappers, survives ``ModelPatcher.clone()`` and leaves the single
``model_function_wrapper`` slot alone. Per call it

1. reads sigma (``transformer_options["sigmas"]``, else the ``t`` argument - both are the sigma);
   cond and uncond share one batch and one sigma, so one call has one timestep;
2. turns it into the model timestep with the model's own ``model_sampling.timestep`` (after
   ModelSamplingSD3's shift; Wan: t = 1000 sigma). Binning by timestep, not by step index, is what
   keeps it right for any step count, scheduler, shift, denoise and expert split:
   KSamplerAdvanced hands each expert a slice of the schedule, so step indices are local;
3. finds the bin in the state's edges (``numerics.bin_of``: descending edges, closed at the low end
   like the expert switch); a timestep outside the calibrated range gets the nearest
   bin and one warning per sampling run (:func:`out_of_range_message`: which step and timestep, what
   the state covers and was calibrated for, and how to fix it);
4. fills the model's ``BinSelector`` (one small device write) and records (expert, sigma, t, bin).

Cost: one device-to-host read of sigma per model call (not per layer); the sampler itself reads
sigmas on the host every step.
"""
from __future__ import annotations

import collections
import dataclasses
import logging

import torch

from ..kernels import numerics as nm
from ..kernels.format import handover_text
from .ops import BinSelector

log = logging.getLogger(__name__)

HOOK_KEY = "wan_w4a4.timestep_bins"  # wrapper/callback key on the ModelPatcher
LOG_SIZE = 4096  # records kept per hook (a 40-step run with CFG makes 40): bounded, so memory stays flat


@dataclasses.dataclass(frozen=True)
class BinRecord:
    """One model call as the hook saw it."""

    run: int  # sampling runs of this model so far (ON_PRE_RUN count)
    expert: str
    sigma: float
    t: float  # model timestep
    bin: int
    in_range: bool  # t within the calibrated edges
    batch: int  # rows of the call (cond + uncond)


class TimestepBinHook:
    """The APPLY_MODEL wrapper of one patched model (one expert, one selector)."""

    def __init__(self, expert: str, bin_edges, selector: BinSelector, source: str = "", handover: dict | None = None):
        edges = tuple(float(e) for e in bin_edges)
        if len(edges) != selector.num_bins + 1:
            raise ValueError(f"{len(edges)} bin edges for {selector.num_bins} bins")
        if any(a <= b for a, b in zip(edges, edges[1:])):
            raise ValueError(f"bin edges must be strictly descending, got {list(edges)}")
        self.expert = expert
        self.edges = edges
        self.selector = selector
        self.source = source
        self.handover = dict(handover or {})  # the state's StateMeta.handover: quoted when a run leaves the range
        self.records: collections.deque[BinRecord] = collections.deque(maxlen=LOG_SIZE)
        self.run = 0
        self._warned_run = -1

    # No ``to`` method on purpose: ComfyUI calls ``.to(device)``/``.to(dtype)`` on wrappers that have
    # one and stores what it returns (samplers.cast_to_load_options).

    def bin_of(self, t: float) -> tuple[int, bool]:
        """(bin, in calibrated range) for model timestep ``t``; the bin by ``numerics.bin_of``."""
        return nm.bin_of(t, self.edges), self.edges[-1] <= t <= self.edges[0]

    def on_pre_run(self, patcher) -> None:
        self.run += 1

    def timestep_of(self, model, sigma: torch.Tensor) -> tuple[float, float]:
        sigma = sigma.reshape(-1)[:1]
        t = model.model_sampling.timestep(sigma)
        return float(sigma.float().item()), float(t.float().item())

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                 **kwargs):
        sigma = transformer_options.get("sigmas", None)
        if not isinstance(sigma, torch.Tensor):
            sigma = t
        sigma_v, t_v = self.timestep_of(executor.class_obj, sigma)
        b, in_range = self.bin_of(t_v)
        if not in_range and self._warned_run != self.run:
            self._warned_run = self.run
            step = step_of(sigma_v, transformer_options.get("sample_sigmas", None))
            log.warning("%s", out_of_range_message(self.source, self.expert, t_v, sigma_v, step, self.edges, b,
                                                   self.handover))
        self.selector.set(b)
        self.records.append(BinRecord(self.run, self.expert, sigma_v, t_v, b, in_range, int(x.shape[0])))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def __repr__(self):
        return f"TimestepBinHook(expert={self.expert!r}, edges={list(self.edges)}, {self.selector})"


def step_of(sigma: float, sample_sigmas) -> tuple[int, int] | None:
    """(index, count) of the step at ``sigma`` among the steps this sampler runs, or None if unknown.

    ``sample_sigmas`` is ComfyUI's ``transformer_options["sample_sigmas"]``: the schedule slice the
    sampler was given, so for a KSamplerAdvanced the index counts from its start_at_step.
    """
    if not isinstance(sample_sigmas, torch.Tensor) or sample_sigmas.numel() < 2:
        return None
    s = sample_sigmas.detach().reshape(-1)[:-1].float().cpu()
    return int((s - sigma).abs().argmin()), s.numel()


def out_of_range_message(source: str, expert: str, t: float, sigma: float, step, edges, b: int,
                         handover: dict) -> str:
    """The warning for a model call outside a state's calibrated timesteps: where, what the state
    covers, what it was calibrated for, and the fix."""
    where = (f"step {step[0]} (0-based) of the {step[1]} steps this sampler runs with it"
             if step is not None else "a sampling step")
    made_for = handover_text(handover)
    made_for = f"; calibrated for: {made_for}" if made_for else ""
    return (f"W4A4 state {source or '?'} (expert {expert!r}): {where} is at model timestep {t:.1f} (sigma "
            f"{sigma:.4f}), outside its calibrated range t {edges[-1]:.1f}..{edges[0]:.1f}{made_for}. It uses the "
            f"nearest bin ({b}), whose clip ratios were not calibrated for this timestep. Fix: re-calibrate the "
            f"states with this workflow's hand-over (Calibrate node: handover 'step', handover_step = the "
            f"high-noise KSamplerAdvanced's end_at_step, and the workflow's steps, shift and scheduler; CLI: "
            f"python -m wan_w4a4 calibrate --steps S --shift X --handover-step N), or move the workflow's expert "
            f"switch into the calibrated range; also check that the state is on the right expert. "
            f"(Warned once per run.)")


def attach_hook(model, hook: TimestepBinHook) -> None:
    """Register ``hook`` on a ModelPatcher (replacing an earlier W4A4 hook on the same patcher)."""
    import comfy.patcher_extension as pe

    model.remove_wrappers_with_key(pe.WrappersMP.APPLY_MODEL, HOOK_KEY)
    model.remove_callbacks_with_key(pe.CallbacksMP.ON_PRE_RUN, HOOK_KEY)
    model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, HOOK_KEY, hook)
    model.add_callback_with_key(pe.CallbacksMP.ON_PRE_RUN, HOOK_KEY, hook.on_pre_run)


def get_hook(model) -> TimestepBinHook | None:
    """The W4A4 hook of a ModelPatcher (or of a clone of a patched one), if any."""
    import comfy.patcher_extension as pe

    # By key, not isinstance: inside ComfyUI the pack is imported under its folder name, and tests
    # may hold the same classes imported as ``wan_w4a4``.
    wrappers = model.get_wrappers(pe.WrappersMP.APPLY_MODEL, HOOK_KEY)
    return wrappers[0] if wrappers else None
