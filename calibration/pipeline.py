"""``calibrate``: capture statistics during real sampling, quantize layer by layer, write two states.

Per layer (SVDQuant arXiv 2411.05007 with GPTQ, and the per-bin clip of arXiv 2605.27003)::

    alpha search -> smoothing s -> low-rank L1 L2 (+ refinement) -> GPTQ on the residual in the
    smoothed space (or RTN) -> unsigned grid for ffn.2 -> clip tables per bin -> W4A4Params

Order of work and memory: for each expert, for each pass (a subset of blocks, see
``CalibrationConfig.blocks_per_pass``), sampling runs over all items with hooks on that subset;
then its layers are quantized one at a time and the pass's statistics are freed. The quantized
layers (~0.56 byte per weight) stay on the host until both experts are done: the clip policy
"global" needs both, and a cancelled run then leaves no state at all. The files are written at the
end, each atomically (kernels/format.py), never over an existing file without ``overwrite``.
Each finished layer and expert is also saved in a hidden work folder, so that a run stopped in any
way resumes from there (calibration/resume.py).

Several processes (torchrun, calibration/distributed.py) share this work: each samples its share of the
items, the statistics are combined, the layers of a pass are dealt out in rounds and gathered on rank 0,
which alone holds the work folder and writes. One process is the same code with a world of one.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..kernels import format as fmt
from ..kernels import numerics
from . import budget
from . import distributed as dist
from . import report as rpt
from .capture import (
    CalibrationCancelled,
    CalibrationError,
    CalibrationItem,
    ExpertCapture,
    FingerprintWeights,
    GroupStats,
    LayerSpec,
    _seed,
    block_passes,
    check_no_weight_patches,
    handover,
    layer_weight,
    plan_layers,
    run_capture,
    schedule,
    weight_source,
    with_shift,
)
from .clip import ClipEvaluator, search_clip
from .config import CLIP_POLICY_HEADER, EXPERTS, CalibrationConfig
from .gptq import gptq_quantize, rtn_quantize
from .hessian import smoothed_hessian
from .lowrank import branch_weight, low_rank, refine_low_rank
from .progress import LAYER, SAMPLE, Tracker
from .resume import kill_point, run_key
from .smoothing import search_alpha, smooth_scales

log = logging.getLogger(__name__)
# Later capture passes of an expert replay the model outputs of its first one and stop each call after
# the last block they observe (capture.ExpertCapture); the states are the same either way
# (tests/calibration/test_replay.py compares them with this off).
REPLAY_OUTPUTS = True

Progress = Callable[[int, int, str], None]


@dataclasses.dataclass
class CalibrationResult:
    """Paths of the two states and the report, and the report itself."""

    high: Path
    low: Path
    report: Path
    data: dict


# ---------------------------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------------------------

def _split_rows(rows: torch.Tensor, eval_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit rows, held rows) of one bin's reservoir, by a seeded permutation."""
    n = rows.shape[0]
    n_eval = int(n * eval_fraction) if n >= 4 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return rows[perm[n_eval:]], rows[perm[:n_eval]]


def _rel_err(x: torch.Tensor, p: numerics.W4A4Params, y_ref: torch.Tensor) -> float:
    y = numerics.w4a4_linear(x, p, 0)
    den = float(y_ref.double().square().sum())
    return float((y.double() - y_ref.double()).square().sum()) / max(den, 1e-30)


def quantize_layer(spec: LayerSpec, expert: str, w: torch.Tensor, bias: torch.Tensor | None, group: GroupStats,
                   config: CalibrationConfig, device) -> tuple[numerics.W4A4Params, rpt.LayerRecord]:
    """Calibrate one Linear from its input statistics. Returns the layer (clip all 1 for now: the
    policy sets it once every bin and expert is known) and its record with the clip tables."""
    t0 = time.perf_counter()
    nb = config.bins
    w = w.to(device, torch.float32)
    b = None if bias is None else bias.to(device, torch.float32)
    rank = min(config.rank, *w.shape)

    unsigned = spec.unsigned
    if unsigned and float(group.xmin.min()) < -numerics.GELU_SHIFT - 1e-3:
        log.warning("%s %s: input goes down to %.3g, below -GELU_SHIFT; not a GELU output, so the signed "
                    "activation grid is used", expert, spec.name, float(group.xmin.min()))
        unsigned = False
    shift = numerics.GELU_SHIFT if unsigned else 0.0

    fit, held = [], []
    for k in range(nb):
        f, h = _split_rows(group.rows(k), config.eval_fraction, _seed(config.seed, expert, spec.group, k, "split"))
        fit.append(f.to(device, torch.float32))
        held.append(h.to(device, torch.float32))
    x_fit = torch.cat(fit)
    if x_fit.shape[0] == 0:
        raise CalibrationError(f"{expert} expert, {spec.name}: no input rows were captured")

    # 1. smoothing, alpha searched by the output error of the RTN W4A4 layer
    absmax = group.absmax_shifted(shift).to(device)
    if len(config.alphas) == 1:
        alpha, s = config.alphas[0], smooth_scales(absmax, w, config.alphas[0])
    else:
        alpha, s = search_alpha(x_fit, w, absmax, rank=rank, alphas=config.alphas, unsigned=unsigned)
    s = s.to(device)
    w_hat = w * s[None, :]
    h_hat = smoothed_hessian(group.hessian(shift).to(device), s)

    # 2. low-rank branch
    if config.refine_low_rank:
        l1, l2 = refine_low_rank(w_hat, rank, hessian=h_hat)
    else:
        l1, l2 = low_rank(w_hat, rank)
    resid = w_hat - branch_weight(l1, l2)

    # 3. residual: GPTQ in the smoothed space (or RTN); keep whichever fits the rows better
    def ref(x):  # the BF16 layer (its weights in fp32 arithmetic)
        return x @ w.T if b is None else x @ w.T + b

    y_fit = ref(x_fit)

    def build(q):
        return numerics.from_float(w, b, smooth=s, lr_down=l1, lr_up=l2, residual_q=q, num_bins=nb,
                                   act_unsigned=unsigned)

    p_rtn = build(rtn_quantize(resid))
    err_rtn = _rel_err(x_fit, p_rtn, y_fit)
    p, residual, err_gptq = p_rtn, "rtn", None
    if config.gptq:
        p_gptq = build(gptq_quantize(resid, h_hat, damp=config.gptq_damp, block=config.gptq_block,
                                     act_order=config.act_order))
        err_gptq = _rel_err(x_fit, p_gptq, y_fit)
        if err_gptq <= err_rtn:
            p, residual = p_gptq, "gptq"
        else:
            log.info("%s %s: GPTQ residual (%.3e) lost to RTN (%.3e) on the calibration rows; keeping RTN",
                     expert, spec.name, err_gptq, err_rtn)
    del h_hat, p_rtn

    # 4. clip tables per bin: search on fit rows, evaluate on held rows; plain RTN W4A4 for the report
    plain = numerics.from_float(w, b)
    grid = config.clip_grid
    clip_fit, clip_eval, ref_eval, plain_eval = [], [], [], []
    for k in range(nb):
        xf, xh = fit[k], held[k] if held[k].shape[0] else fit[k]  # no held rows: report on fit rows
        if xf.shape[0] == 0:
            clip_fit.append(None), clip_eval.append(None), ref_eval.append(0.0), plain_eval.append(0.0)
            continue
        _, errs = search_clip(xf, p, ref(xf), grid)
        clip_fit.append([errs[float(c)] for c in grid])
        yh = ref(xh)
        ev = ClipEvaluator(xh, p, yh)
        clip_eval.append(ev.errors(grid))
        ref_eval.append(float(yh.double().square().sum()))
        plain_eval.append(float((numerics.w4a4_linear(xh, plain, 0).double() - yh.double()).square().sum()))

    rec = rpt.LayerRecord(
        name=spec.name, expert=expert, alpha=float(alpha), rank=rank, unsigned=unsigned, residual=residual,
        err_rtn=err_rtn, err_gptq=err_gptq, clip_fit=clip_fit, clip_eval=clip_eval, ref_eval=ref_eval,
        plain_eval=plain_eval, rows_fit=[f.shape[0] for f in fit], rows_eval=[h.shape[0] for h in held],
        grid=tuple(grid), seconds=time.perf_counter() - t0)
    return p.to("cpu"), rec


# ---------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------

def _check_cancel(cancel):
    if cancel is not None and cancel():
        raise CalibrationCancelled("calibration cancelled; no state file was written")


def _device(config: CalibrationConfig, model) -> torch.device:
    return torch.device(config.device) if config.device else torch.device(model.load_device)


def _release_models(device):
    """Unload the models ComfyUI holds on the GPU once the high expert is done, so that the low
    expert and its statistics get the memory (ComfyUI reloads whatever is needed later)."""
    if torch.device(device).type == "cuda":
        import comfy.model_management
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()


def _free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def calibrate(high_model, low_model, items: Sequence[CalibrationItem], config: CalibrationConfig,
              progress: Progress | None = None, cancel: Callable[[], bool | None] | None = None,
              restart: bool = False, world: dist.World | None = None) -> CalibrationResult:
    """Calibrate both experts of a Wan2.2 I2V model and write their W4A4 states.

    high_model / low_model: ComfyUI MODELs of the high-noise and low-noise experts (BF16, as loaded
    by UNETLoader; without ModelSamplingSD3 - ``config.shift`` is applied here), or zero-argument
    callables that load them: those are loaded when their expert's turn comes and dropped after it,
    so that only one BF16 expert occupies host memory at a time (the command line does this). items: the
    calibration set (:class:`CalibrationItem`). progress(done, total, what): called as work
    completes. cancel(): called between layers and at every sampling step; it may raise (ComfyUI's
    ``throw_exception_if_processing_interrupted``) or return True to stop - either way no state is
    written. Returns the paths of ``config.state_path("high")``, ``("low")`` and the report.

    Resume (calibration/resume.py): finished layers and experts are saved in a hidden work folder
    beside the outputs; a run stopped in any way (cancel, crash, kill) and started again with the
    same settings, items and models goes on from there, with a bit-identical result. ``restart``
    discards that folder's work instead. The folder is removed once the outputs are written.

    ``world``: this process's place in a run over several processes (calibration/distributed.py; the
    process group already initialised); each process calls ``calibrate`` with the same arguments. Rank 0
    returns the result; the others return the paths, with an empty ``data``.
    """
    world = world or dist.World()
    t_start = time.perf_counter()
    items = list(items)
    if not items:
        raise CalibrationError("no calibration items: calibration needs at least one I2V item (start image "
                               "latent + prompt conditioning); pass one or more CalibrationItem")
    for i, it in enumerate(items):
        if not isinstance(it, CalibrationItem):
            raise CalibrationError(f"calibration item {i} is a {type(it).__name__}, expected CalibrationItem")
    paths = {e: config.state_path(e) for e in EXPERTS}
    paths["report"] = config.report_path

    def check_outputs():  # on rank 0, which writes them
        if not config.overwrite:
            existing = [str(p) for p in paths.values() if p.exists()]
            if existing:
                raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (set overwrite / --overwrite, "
                                      "or choose another output folder or name)")
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)

    work = dist.SharedWork.open(world, config, run_key(config, items), restart=restart, before=check_outputs)
    try:
        result = _calibrate(high_model, low_model, items, config, progress, cancel, work, paths, t_start, world)
    except BaseException:
        keep = work.has_work()
        work.close(remove=not keep)
        if keep:
            log.info("the finished work is kept in %s: start again with the same settings to resume", work.path)
        raise
    work.close(remove=True)
    return result


def _calibrate(high_model, low_model, items, config, progress, cancel, work: dist.SharedWork, paths,
               t_start, world: dist.World) -> CalibrationResult:
    models = {"high": high_model, "low": low_model}
    # A zero-argument callable instead of a MODEL is loaded when its expert's turn comes and dropped
    # after it: only one BF16 expert (26.7 GiB at 14B) is then in host memory at a time.
    lazy = {e: callable(m) and not hasattr(m, "model") for e, m in models.items()}
    layers = {e: _plan(m, config, e) for e, m in models.items() if not lazy[e]}

    def load(expert):
        if lazy[expert] and not hasattr(models[expert], "model"):
            log.info("loading the %s-noise expert", expert)
            models[expert] = models[expert]()
        if expert not in layers:
            layers[expert] = _plan(models[expert], config, expert)
        return models[expert]

    load("high")
    if not layers["high"] and not lazy["low"] and not layers["low"]:
        raise CalibrationError("nothing to quantize: the keep-list keeps every block Linear in BF16")

    with torch.inference_mode(), budget.comfy_budget(config, _device(config, models["high"])):
        shifted = {"high": with_shift(models["high"], config.shift)}
        _, ts = schedule(shifted["high"], config)
        switch, boundary = handover(ts, config)
        if switch == 0 or switch == config.steps:
            who = "high" if switch == 0 else "low"
            raise CalibrationError(
                f"the {who}-noise expert gets no sampling step: with steps={config.steps}, shift={config.shift}, "
                f"scheduler={config.scheduler!r} the model timesteps are {[round(float(t), 1) for t in ts]} and "
                f"the boundary is t={config.boundary:g}; change steps, shift or boundary, or hand over by step")
        log.info("schedule: %d steps, high expert for steps 0..%d (t %.1f..%.1f), low expert for %d..%d "
                 "(t %.1f..%.1f); bins split at t = %.1f", config.steps, switch - 1, float(ts[0]),
                 float(ts[switch - 1]), switch, config.steps - 1, float(ts[switch]), float(ts[-1]), boundary)

        edges = {"high": config.edges("high", ts[:switch].tolist(), boundary),
                 "low": config.edges("low", ts[switch:].tolist(), boundary)}
        sampling = handover_meta(config, switch, boundary)
        steps_of = {"high": switch, "low": config.steps - switch}
        tracker = Tracker(progress)
        phase = ["sampling"]  # what a sampling step belongs to, set per pass (_run_pass)

        mine = world.shard(len(items))  # the items this process samples

        def plan_work(expert):  # passes and progress units (sampling steps, layers) of an expert
            passes = block_passes([s.block for s in layers[expert]], budget.blocks_per_pass(layers[expert], config))
            n_sampled = max(1, len(passes)) if expert == "high" else len(passes)
            return passes, n_sampled * len(mine) * steps_of[expert], len(layers[expert])

        def set_totals():  # the low expert's layers are known once it is loaded: until then, the high's
            hi, lo = plan_work("high"), plan_work("low" if "low" in layers else "high")
            tracker.set_total(SAMPLE, hi[1] + lo[1])
            tracker.set_total(LAYER, hi[2] + lo[2])

        def tick(kind, n=1, what="", reused=False):
            tracker.advance(kind, n, what, reused)

        def on_step():
            _check_cancel(cancel)
            tick(SAMPLE, 1, phase[0])
            kill_point("step")

        set_totals()
        records: dict[str, dict[str, rpt.LayerRecord]] = {e: {} for e in EXPERTS}
        params: dict[str, dict[str, numerics.W4A4Params]] = {e: {} for e in EXPERTS}
        info: dict[str, dict] = {}
        latents = [it.latent for it in items]
        device = _device(config, models["high"])
        for expert in EXPERTS:
            model = load(expert)
            if expert == "low":
                if not layers["high"] and not layers["low"]:
                    raise CalibrationError("nothing to quantize: the keep-list keeps every block Linear in BF16")
                if [s.name for s in layers["high"]] != [s.name for s in layers["low"]]:
                    log.warning("the two experts have different quantizable layers (architectures differ?)")
                set_totals()
                shifted["low"] = with_shift(model, config.shift)
            passes = plan_work(expert)[0]
            m = shifted[expert]
            device = _device(config, model)
            # the weights the work folder's layers were made from (a cheap sample: format.model_fingerprint),
            # and what the state records once every layer in ``layers`` is quantized
            fingerprint = _fingerprint(model, {s.name: s for s in layers[expert]})
            # CPU sums depend on the thread count (so a CPU run resumes with the same threads); GPU runs do not,
            # which lets a run of N processes (torchrun sets OMP_NUM_THREADS=1) resume as one process
            work.check_model(expert, {"fingerprint": fingerprint, "device": device.type,
                                      "threads": torch.get_num_threads() if device.type == "cpu" else None})
            info[expert] = {"bin_edges": list(edges[expert]), "steps": steps_of[expert], "handover": sampling,
                            "timesteps": [], "bin_rows": [0] * config.bins, "passes": passes,
                            "capture_s": [None] * len(passes), "quantize_s": [None] * len(passes)}
            _restore_info(info[expert], work.load_info(expert))
            saved = work.load_layers(expert, layers[expert])
            finished = work.load_expert(expert, len(items))
            if finished is not None and len(saved) == len(layers[expert]) and (expert == "low" or finished[1]):
                # a finished expert: neither sampled nor quantized again
                info[expert], out_latents = finished
                for spec in layers[expert]:
                    params[expert][spec.name], records[expert][spec.name] = saved[spec.name]
                _, n_steps, n_layers = plan_work(expert)
                tick(SAMPLE, n_steps, f"{expert} expert (saved)", reused=True)
                tick(LAYER, n_layers, f"{expert} expert (saved)", reused=True)
                log.info("%s expert: finished in an earlier run; reusing its %d layers%s from %s", expert,
                         len(saved), " and output latents" if expert == "high" else "", work.path)
            else:
                finished = None
                out_latents = None
                # one pass has no later pass to replay for it: nothing is recorded
                run = _Sampling(model, m, items, latents, switch, on_step, tick, cancel, device, phase, world, mine,
                                {} if REPLAY_OUTPUTS and len(passes) > 1 else None)
                for pi in range(len(passes)):
                    out = _run_pass(expert, pi, passes, layers[expert], saved, info[expert], params[expert],
                                    records[expert], config, work, run, edges[expert])
                    out_latents = out_latents or out
                for d in (params[expert], records[expert]):  # in layer order, whichever order the passes ran
                    ordered = {s.name: d[s.name] for s in layers[expert] if s.name in d}
                    d.clear()
                    d.update(ordered)
                del run  # it holds the expert, which must go before the next one loads
                if expert == "high" and out_latents is None:
                    # nothing sampled in this run (no layer to capture, or all saved): the low expert's start
                    phase[0] = f"{expert} expert: sampling the low expert's start latents"
                    outs = run_capture(m, expert, items, latents, config, None, switch, on_step, indices=mine)
                    out_latents = dist.gather_latents(world, mine, outs, len(items))
            info[expert]["fingerprint"] = fingerprint
            if finished is None:
                work.save_expert(expert, info[expert], out_latents if expert == "high" else None)
                kill_point("expert")
            del m, model
            if expert == "high":
                latents = out_latents
                if lazy["high"]:  # we loaded it, we drop it
                    models["high"] = shifted["high"] = None
                _release_models(device)

        if not world.main:  # rank 0 holds the layers and writes; wait until it has
            dist.barrier(world, "waiting for rank 0 to write the states")
            return CalibrationResult(high=paths["high"], low=paths["low"], report=paths["report"], data={})
        notes = rpt.choose_clips(records, config.clip_grid, config.clip_policy)
        for expert in EXPERTS:
            info[expert]["empty_bin_fallback"] = {str(b): j for b, j in notes.get(expert, {}).items()}
            for name, rec in records[expert].items():
                params[expert][name].clip = torch.tensor(rec.clip, dtype=torch.float32)

    info["resources"] = _resources(t_start, device)
    result = _write_outputs(params, records, info, config, paths)
    dist.barrier(world, "rank 0 wrote the states")
    return result


def _restore_info(info: dict, saved: dict | None) -> None:
    """What an earlier run recorded of an expert's passes: the first pass's timesteps and rows per bin
    (so that it need not be sampled again), and the timings of the passes it ran."""
    if not saved or saved.get("passes") != info["passes"]:
        return
    for key in ("timesteps", "bin_rows", "capture_s", "quantize_s"):
        value = saved.get(key)
        if isinstance(value, list) and (key == "timesteps" or len(value) == len(info[key])):
            info[key] = value


@dataclasses.dataclass
class _Sampling:
    """What a capture pass of one expert samples with, and the run's progress and cancel callables."""

    model: object  # the expert (ComfyUI MODEL)
    shifted: object  # its clone with the configured shift
    items: list
    latents: list  # its start latents
    switch: int
    on_step: Callable
    tick: Callable
    cancel: Callable | None
    device: torch.device
    phase: list  # [label of the sampling steps now running], read by on_step
    world: dist.World
    indices: list  # the items this process samples (world.shard)
    # the expert's model outputs, recorded by its first sampled pass and replayed by the later ones
    # (capture.ExpertCapture); None: every pass computes whole calls
    replay: dict | None = None


def _run_pass(expert: str, pi: int, passes: list, specs_all: list[LayerSpec], saved: dict, info: dict, params: dict,
              records: dict, config: CalibrationConfig, work: dist.SharedWork, run: _Sampling, edges) -> list | None:
    """One capture pass of ``expert`` (blocks ``passes[pi]``) and the quantization of its layers, each
    saved to the work folder as it finishes; layers in ``saved`` are reused. A pass whose layers are
    all saved is not sampled again (except the first, when the timesteps it records were lost).
    Returns the sampled output latents (None when the pass was skipped)."""
    blocks = set(passes[pi])
    specs = [s for s in specs_all if s.block in blocks]
    if all(s.name in saved for s in specs) and (pi > 0 or info["timesteps"]):
        for s in specs:
            params[s.name], records[s.name] = saved[s.name]
        what = f"{expert} expert, pass {pi + 1}/{len(passes)} (saved)"
        run.tick(SAMPLE, len(run.indices) * info["steps"], what, reused=True)
        run.tick(LAYER, len(specs), what, reused=True)
        log.info("%s expert, pass %d/%d: its %d layers were finished in an earlier run", expert, pi + 1,
                 len(passes), len(specs))
        return None
    model, device = run.model, run.device
    cap = ExpertCapture(model, expert, specs_all, config, passes[pi], edges=edges, replay=run.replay)
    where = f"{expert} expert, pass {pi + 1}/{len(passes)}"
    run.phase[0] = f"{where}: sampling {len(run.indices)} items x {info['steps']} steps"
    t0 = time.perf_counter()
    outs = run_capture(run.shifted, expert, run.items, run.latents, config, cap, run.switch, run.on_step,
                       indices=run.indices)
    dist.reduce_capture(run.world, cap)  # every process's items, on every process
    outs = dist.gather_latents(run.world, run.indices, outs, len(run.items))
    info["capture_s"][pi] = round(time.perf_counter() - t0, 3)
    log.info("%s expert, pass %d/%d (blocks %d..%d): captured in %.1f s", expert, pi + 1, len(passes),
             passes[pi][0], passes[pi][-1], info["capture_s"][pi])
    if pi == 0:
        info["timesteps"] = [round(t, 3) for t in cap.timesteps]
        info["bin_rows"] = cap.bin_rows()
        _check_bins(expert, cap, config)
    work.save_info(expert, info)
    if config.gpu_budget_gib is not None:  # the layers' work needs the GPU the loaded weights hold (budget.py)
        _release_models(device)
    t0 = time.perf_counter()
    done = {s.name: saved[s.name] for s in specs if s.name in saved}
    reused = len(done)
    for name in done:
        run.tick(LAYER, 1, f"{where}: {name} (saved)", reused=True)
    # The layers left are dealt in rounds of world.size, layer j of a round to rank j (one process: one
    # layer a round); rank 0 gets each round's layers and saves them.
    todo = [s for s in specs if s.name not in saved]
    world = run.world
    for start in range(0, len(todo), world.size):
        _check_cancel(run.cancel)
        spec = dist.quantize_round(world, todo, start)
        mine = None
        if spec is not None:
            w, b = layer_weight(model, spec.name)
            mine = quantize_layer(spec, expert, w, b, cap.groups[spec.group], config, device)
        for p, rec in dist.gather_layers(world, mine):
            done[rec.name] = p, rec
            work.save_layer(expert, p, rec)
            log.debug("%s %s: alpha %.2f, %s residual, %.2f s", expert, rec.name, rec.alpha, rec.residual,
                      rec.seconds)
        if spec is not None:
            kill_point("layer")
        for s in todo[start:start + world.size]:
            run.tick(LAYER, 1, f"{where}: quantized {s.name}")
    if world.main:  # in layer order, as one process makes them
        for s in specs:
            params[s.name], records[s.name] = done[s.name]
    if reused:
        log.info("%s expert, pass %d/%d: reused %d layers finished in an earlier run", expert, pi + 1,
                 len(passes), reused)
    info["quantize_s"][pi] = round(time.perf_counter() - t0, 3)
    work.save_info(expert, info)
    cap.free()
    del cap
    _free(device)
    return outs


def _plan(model, config: CalibrationConfig, expert: str) -> list[LayerSpec]:
    """The layers of an expert to quantize; refuses weight patches on them (before any sampling)."""
    what = f"the {expert}-noise model"
    specs = plan_layers(model, config, what)
    check_no_weight_patches(model, specs, what)
    budget.check(specs, config, what)
    return specs


def handover_meta(config: CalibrationConfig, switch: int, boundary: float) -> dict:
    """The sampling the bins were made for, as the state records it (format.StateMeta.handover):
    what the hook's out-of-range warning quotes, and what a workflow must match."""
    return {"by": "boundary" if config.handover_step is None else "step", "boundary": round(float(boundary), 3),
            "high_steps": switch, "steps": config.steps, "shift": config.shift, "sampler": config.sampler,
            "scheduler": config.scheduler}


def _fingerprint(model, layers: dict) -> dict:
    """What the state records of the expert it was made from: {"fingerprint": format.model_fingerprint of the
    quantized layers' weights as calibration read them (an fp8_scaled file's dequantized where the fingerprint
    reads them: capture.FingerprintWeights), "source": capture.weight_source of them} ({"fingerprint": "", "source": {}}
    when none)."""
    if not layers:
        return {"fingerprint": "", "source": {}}
    return {"fingerprint": fmt.model_fingerprint(FingerprintWeights(model, layers), layers.keys()),
            "source": weight_source(model, layers)[0]}


def _resources(t_start: float, device: torch.device) -> dict:
    """Wall time so far and peak memory (what the real-size measurement records)."""
    out = {"wall_s": round(time.perf_counter() - t_start, 3)}
    try:
        import resource
        out["peak_host_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB
    except (ImportError, OSError):
        pass
    if device.type == "cuda":
        out["peak_gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out


def _check_bins(expert: str, cap: ExpertCapture, config: CalibrationConfig) -> None:
    rows = cap.bin_rows()
    if sum(rows) == 0:
        raise CalibrationError(f"the {expert}-noise expert received no samples (timesteps seen: {cap.timesteps})")
    empty = [b for b, r in enumerate(rows) if r == 0]
    if empty:
        log.info("%s expert: timestep bins %s received no samples (edges %s, timesteps %s); they will take "
                    "a neighbouring bin's clip ratio", expert, empty, [round(e, 2) for e in cap.edges],
                    [round(t, 1) for t in sorted(set(cap.timesteps), reverse=True)])


def _write_outputs(params, records, info, config, paths) -> CalibrationResult:
    data = rpt.build_report(config, records, info, {e: paths[e] for e in EXPERTS})
    log.info("calibration summary:\n%s", rpt.table(records))
    policy = CLIP_POLICY_HEADER[config.clip_policy]
    written = []
    try:
        for expert in EXPERTS:
            if not params[expert]:
                raise CalibrationError(f"the {expert}-noise expert has no quantized layer (keep-list?)")
            meta = fmt.StateMeta(expert=expert, bin_edges=info[expert]["bin_edges"], clip_policy=policy,
                                 fingerprint=info[expert]["fingerprint"]["fingerprint"],
                                 source=info[expert]["fingerprint"]["source"],
                                 report={"path": paths["report"].name}, handover=info[expert]["handover"])
            fmt.save_state(paths[expert], params[expert], meta, overwrite=config.overwrite)
            written.append(paths[expert])
        rpt.write_json(paths["report"], data, overwrite=config.overwrite)
    except BaseException:
        if not config.overwrite:  # the files did not exist before: leave none of them behind
            for p in written:
                Path(p).unlink(missing_ok=True)
        raise
    for expert in EXPERTS:
        d = data["experts"][expert]
        log.info("%s expert: %d layers, pooled SQNR vs BF16 on held rows: RTN W4A4 %s dB -> %s dB; wrote %s",
                 expert, len(params[expert]), _fmt_db(d["sqnr_rtn_db_pooled"]), _fmt_db(d["sqnr_after_db_pooled"]),
                 paths[expert])
    return CalibrationResult(high=paths["high"], low=paths["low"], report=paths["report"], data=data)


def _fmt_db(x) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) and math.isfinite(x) else str(x)
