"""The child process of one configuration: both experts loaded by ComfyUI's loaders (or the pack's),
then sampled through ComfyUI's own two-expert graph in each memory mode, with every model call timed
(cuda-synchronized), peak memory read per mode and, with --profile, one call under torch.profiler."""
from __future__ import annotations

import cProfile
import gc
import logging
import math
import os
import platform
import pstats
import statistics
import subprocess
import time

from .common import (
    BOUNDARY_SIGMA,
    CFG,
    CONFIGS,
    SAMPLER,
    SCHEDULER,
    SHIFT,
    TIMING_KEY,
    arch_of,
    base_dir,
    device_used_bytes,
    file_names,
    gib,
    host_peak_rss_gib,
    host_rss_gib,
    is_w4a4,
    latent_shape,
    write_json,
)
from .profiling import host_profile, kernel_profile
from .weights import bytes_lora_bf16, random_state_dict

log = logging.getLogger(__name__)


def profile_due(calls_before: int, profile_call: int, warm: bool) -> bool:
    """Whether the next model call of the profiled stage runs under the profiler: call number ``profile_call``
    (1-based) of the stage, or the first after it when that one was the process's first (``warm`` False: it
    compiles the kernels; the stage's calls before it are ``calls_before``)."""
    return warm and calls_before + 1 >= profile_call


class StepTimer:
    """Keyed APPLY_MODEL wrapper: times every model call (cuda.synchronize before and after) and
    records, on the first call of each stage, which experts ComfyUI holds on the GPU."""

    def __init__(self, cuda: bool, bases: dict, profile_at: tuple | None = None, profile_call: int = 1):
        self.cuda = cuda
        self.bases = bases  # expert -> BaseModel, to name ComfyUI's loaded models
        self.profile_at = profile_at  # (mode, stage) whose model call number profile_call runs under torch.profiler
        self.profile_call = profile_call
        self.profile: dict | None = None
        self.calls: list[dict] = []
        self.mode = self.stage = None
        self.resident: dict = {}
        self.folded: dict = {}  # (mode, stage) -> W4A4 layers with a folded LoRA, at the stage's first call
        self.device_used_max = 0  # bytes, total - free as the driver sees it (what nvidia-smi shows)

    def sample_device_used(self):
        if self.cuda:
            self.device_used_max = max(self.device_used_max, device_used_bytes())

    def _sync(self):
        if self.cuda:
            import torch
            torch.cuda.synchronize()

    def resident_now(self) -> list[dict]:
        import comfy.model_management as mm
        out = []
        for lm in mm.current_loaded_models:
            patcher = lm.model
            if patcher is None:
                continue
            name = next((e for e, b in self.bases.items() if patcher.model is b), type(patcher.model).__name__)
            out.append({"model": name, "loaded_gib": gib(patcher.loaded_size()), "size_gib": gib(patcher.model_size()),
                        "device": str(lm.device)})
        return out

    def wrapper(self, expert: str):
        def wrap(executor, *args, **kwargs):
            import torch
            x, t = args[0], args[1]
            key = (self.mode, self.stage)
            if key not in self.resident:
                self.resident[key] = self.resident_now()
                self.folded[key] = folded_lora_layers(executor.class_obj.diffusion_model)
            self._sync()
            alloc0 = torch.cuda.memory_allocated() if self.cuda else None
            prof = None
            in_stage = sum(1 for c in self.calls if (c["mode"], c["stage"]) == key)
            if (self.cuda and key == self.profile_at and self.profile is None
                    and profile_due(in_stage, self.profile_call, bool(self.calls))):
                # WAN_BENCH_TRACE=<folder>: also the host side, and the call's Chrome trace written there
                acts = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU]
                                                                  if os.environ.get("WAN_BENCH_TRACE") else [])
                prof = torch.profiler.profile(activities=acts)
                prof.__enter__()
                # WAN_BENCH_PYPROF=1: also the host's Python functions of that call (cProfile, by own time)
                pyprof = cProfile.Profile() if os.environ.get("WAN_BENCH_PYPROF") else None
                if pyprof is not None:
                    pyprof.enable()
            t0 = time.perf_counter()
            out = executor(*args, **kwargs)
            self._sync()
            dt = time.perf_counter() - t0
            if prof is not None:
                if pyprof is not None:
                    pyprof.disable()
                prof.__exit__(None, None, None)
                self.profile = {"mode": self.mode, "stage": self.stage, "call": in_stage + 1, "expert": expert,
                                "batch": int(x.shape[0]),
                                "wall_s": round(dt, 4), **kernel_profile(prof)}
                if pyprof is not None:
                    stats = pstats.Stats(pyprof)
                    self.profile["host_top"] = host_profile(stats)
                    self.profile["host_cum"] = host_profile(stats, top=60, by="cum_ms")
                if os.environ.get("WAN_BENCH_TRACE"):
                    path = os.path.join(os.environ["WAN_BENCH_TRACE"], f"trace_{expert}_{os.getpid()}.json")
                    prof.export_chrome_trace(path)
                    self.profile["trace"] = path
            self.sample_device_used()
            sigma = float(t.reshape(-1)[0])
            self.calls.append({"mode": self.mode, "stage": self.stage, "expert": expert, "sigma": round(sigma, 5),
                               "t": round(float(executor.class_obj.model_sampling.timestep(t).reshape(-1)[0]), 2),
                               "batch": int(x.shape[0]), "tokens": int(math.prod(x.shape[2:]) // 4),
                               "s": round(dt, 4), "alloc_before_gib": gib(alloc0),
                               "first_of_process": not self.calls, "profiled": prof is not None})
            return out
        return wrap

    def steps(self, mode: str, stage: str) -> list[dict]:
        """The stage's steps: calls grouped by sigma (cond and uncond may be one call or two)."""
        steps: dict = {}
        for c in self.calls:
            if c["mode"] == mode and c["stage"] == stage:
                s = steps.setdefault(c["sigma"], {"sigma": c["sigma"], "t": c["t"], "s": 0.0, "batches": [],
                                                  "warmup": False})
                s["s"] = round(s["s"] + c["s"], 4)
                s["batches"].append(c["batch"])
                # profiled calls run slower (kernel tracing): left out of the step times like the warm-up
                s["warmup"] = s["warmup"] or c["first_of_process"] or c.get("profiled", False)
        out = list(steps.values())
        for i, s in enumerate(out):
            s["first_of_stage"] = i == 0
        return out


def steady_step_times(steps: list[dict]) -> list[float]:
    """The step times a stage's median is taken over: neither the warm-up (the process's first call, which compiles;
    a profiled call) nor the stage's first step, in which ComfyUI brings the stage's expert to the GPU (under dynamic
    VRAM its weights are faulted in during that step's calls: 2.6-5.6 s against 0.14-0.55 s steps at one 480p frame,
    benchmarks/RESULTS.md, twenty-seventh part). Before 2026-11-30 (session 24) that first step was left out only
    where it was also the process's first call or was profiled."""
    return [s["s"] for s in steps if not (s["warmup"] or s.get("first_of_stage"))]


def folded_lora_layers(dm) -> dict:
    """{"layers": W4A4 layers with a folded LoRA, "rank": their LoRA ranks} of a diffusion model."""
    ranks = [m.lora_rank for m in dm.modules() if getattr(m, "lora_rank", 0)]
    return {"layers": len(ranks), "ranks": sorted(set(ranks))}


def block_graph_counts(model) -> dict | None:
    """The W4A4 model's block graphs (nodes/graphs.py): captures, replays, eager calls and why; None for other
    models."""
    from wan_w4a4.nodes import graphs

    found = graphs.get(model)
    return found.counts() if found is not None else None


def conditioning(args, arch):
    """(positive, negative, latent) as WanImageToVideo sets them, with random context and image latent."""
    import node_helpers
    import torch

    shape = latent_shape(args)
    g = torch.Generator().manual_seed(args.seed)
    image = torch.randn(shape, generator=g)
    mask = torch.ones((1, 1, *shape[2:]))
    mask[:, :, :1] = 0.0  # one start image: latent frame 0 is given
    extra = {"concat_latent_image": image, "concat_mask": mask}
    conds = []
    for _ in range(2):
        context = torch.randn((1, args.text_tokens, arch.text_dim), generator=g)
        conds.append(node_helpers.conditioning_set_values([[context, {}]], extra))
    return conds[0], conds[1], {"samples": torch.zeros(shape)}


def env_info(cuda: bool) -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "host": platform.node(), "cpus": os.cpu_count()}
    try:
        from wan_w4a4.apps import runtime
        info["comfyui"] = runtime.comfyui_version()
        info["dynamic_vram"] = runtime.dynamic_vram_enabled()
    except Exception as e:  # noqa: BLE001 - the versions are information, not needed to run
        log.debug("no ComfyUI version or dynamic VRAM state: %s", e)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import psutil
        info["host_ram_gib"] = gib(psutil.virtual_memory().total)
    except ImportError:
        pass
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_mem_gib=gib(p.total_memory),
                    capability=f"{p.major}.{p.minor}",
                    # ComfyUI's launcher (cuda_malloc.py) picks cudaMallocAsync; as a library it does not.
                    # The native allocator counts a block it does not split (up to 1 MiB over the
                    # request) as allocated, so small differences of peak allocated are noise there.
                    allocator=torch.cuda.memory.get_allocator_backend(),
                    alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               check=False, capture_output=True, text=True, timeout=20)
            info["driver"] = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["gpu"] = "none (CPU)"
    return info


def split_step(model, steps: int) -> int:
    """Leading steps whose starting sigma is >= 0.9 (t >= 900): the high-noise expert's share."""
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), SCHEDULER, steps)
    return int((sigmas[:-1] >= BOUNDARY_SIGMA).sum().item())


def load_expert(args, nodes, loader, i: int, cuda: bool):
    """Expert ``i`` (0 high, 1 low) of ``args.config`` as its loader makes it: (ModelPatcher, how)."""
    import comfy.sd
    import torch

    name, spec, names = args.config, CONFIGS[args.config], file_names(args)
    if is_w4a4(name):
        return (loader.load(names["w4a4"], spec["cond_batch"], args.attention)[0],
                (f"WanW4A4LoadModel('{names['w4a4']}', cond_batch='{spec['cond_batch']}', "
                f"attention='{args.attention}')"))
    if args.source == "file" or spec.get("file"):
        file = names[spec.get("file", "bf16")]
        return (nodes.UNETLoader().load_unet(file, spec["weight_dtype"])[0],
                f"UNETLoader('{file}', '{spec['weight_dtype']}')")
    sd = random_state_dict(arch_of(args.arch), args.seed + 1 + i, torch.device("cuda" if cuda else "cpu"))
    opts = {}
    if spec["weight_dtype"].startswith("fp8_e4m3fn"):
        opts["dtype"] = torch.float8_e4m3fn
        if spec["weight_dtype"].endswith("_fast"):
            opts["fp8_optimizations"] = True
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=opts)
    del sd
    return model, f"load_diffusion_model_state_dict(in-memory random state dict, {opts or 'bf16'})"


def load_experts(args, nodes, cuda: bool) -> tuple[dict, dict]:
    """Both experts of ``args.config``, with the cond/uncond split, LoRA and eval mode it names:
    ({expert: ModelPatcher}, {expert: what loading took and made})."""
    import torch
    from wan_w4a4.apps import runtime
    from wan_w4a4.nodes import attention, chunking

    name, spec, names = args.config, CONFIGS[args.config], file_names(args)
    loads, experts, loader = {}, {}, None
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        if is_w4a4(name):
            runtime.load_pack_as_custom_node(nodes)
            loader = nodes.NODE_CLASS_MAPPINGS["WanW4A4LoadModel"]()
        for i, expert in enumerate(("high", "low")):
            t0 = time.perf_counter()
            experts[expert], how = load_expert(args, nodes, loader, i, cuda)
            if not is_w4a4(name) and spec["cond_batch"] != "batched":
                chunking.attach_split(experts[expert], spec["cond_batch"])
                how += f" + cond_batch '{spec['cond_batch']}' (the pack's APPLY_MODEL wrapper)"
            if not is_w4a4(name) and args.attention != "comfy":
                experts[expert] = experts[expert].clone()
                cudnn = attention.attach(experts[expert], args.attention)
                how += f" + attention '{args.attention}' (cuDNN first: {cudnn})"
            if spec.get("lora_rank"):
                experts[expert] = nodes.LoraLoaderModelOnly().load_lora_model_only(experts[expert], names["lora"],
                                                                                   1.0)[0]
                how += f" -> LoraLoaderModelOnly('{names['lora']}', 1.0)"
            dm = experts[expert].model.diffusion_model
            if spec.get("eval"):
                dm.eval()
                how += " + diffusion_model.eval()"
            w = next(dm.parameters(), None)
            # what the block Linears hold (fp8_scaled: 0.33's comfy-kitchen QuantizedTensor, 0.3.64's float8
            # Parameter; W4A4 layers none), read without the W4A4 layer's refusing ``weight`` attribute
            q = dm.blocks[0].self_attn.q._parameters.get("weight")
            loads[expert] = {"s": round(time.perf_counter() - t0, 2), "how": how,
                             "created_on": str(w.device) if w is not None else "?",
                             "model_size_gib": gib(experts[expert].model_size()),
                             "training_mode": dm.training,  # 0.3.64's fp8_e4m3fn_fast fp8 matmul needs False
                             "block_weight": "none" if q is None else " ".join(
                                 [type(q).__name__, str(q.dtype)] + [str(t.dtype) for t in q.__dict__.values()
                                                                      if isinstance(t, torch.Tensor)]),
                             "host_rss_gib": host_rss_gib()}
            log.info("%s: %s expert loaded in %.1f s (%s, %.2f GiB)", name, expert, loads[expert]["s"], how,
                     loads[expert]["model_size_gib"])
    return experts, loads


def sample_mode(ks, shifted: dict, latent: dict, split: int, sampler_args: dict, timer: StepTimer, mode: str,
                cuda: bool) -> dict:
    """One memory mode: the two KSamplerAdvanced stages, timed; returns the mode's record."""
    import torch

    timer.mode = mode
    timer.device_used_max = 0
    r = {"stages": {}}
    r["alloc_at_start_gib"] = gib(torch.cuda.memory_allocated()) if cuda else None
    t_mode = time.perf_counter()
    lat = latent
    with torch.inference_mode():
        for stage in ("high", "low"):
            timer.stage = stage
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if stage == "high":
                (lat,) = ks.sample(shifted["high"], "enable", latent_image=lat, start_at_step=0, end_at_step=split,
                                   return_with_leftover_noise="enable", **sampler_args)
            else:
                (lat,) = ks.sample(shifted["low"], "disable", latent_image=lat, start_at_step=split,
                                   end_at_step=10000, return_with_leftover_noise="disable", **sampler_args)
            if cuda:
                torch.cuda.synchronize()
            steps = timer.steps(mode, stage)
            warm = steady_step_times(steps)
            r["stages"][stage] = {
                "wall_s": round(time.perf_counter() - t0, 3), "steps": steps,
                "step_s_median": round(statistics.median(warm), 4) if warm else None,
                "resident_during": timer.resident.get((mode, stage), []),
                "lora_folded": timer.folded.get((mode, stage)),
                "peak_alloc_so_far_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None,
                "alloc_after_gib": gib(torch.cuda.memory_allocated()) if cuda else None,
                "alloc_after_bytes": torch.cuda.memory_allocated() if cuda else None,
            }
    r["sampling_s"] = round(time.perf_counter() - t_mode, 3)
    r["compute_s"] = round(sum(s["s"] for st in r["stages"].values() for s in st["steps"]), 3)
    r["peak_alloc_gib"] = gib(torch.cuda.max_memory_allocated()) if cuda else None
    r["peak_alloc_bytes"] = torch.cuda.max_memory_allocated() if cuda else None  # exact, for small deltas
    r["peak_reserved_gib"] = gib(torch.cuda.max_memory_reserved()) if cuda else None
    timer.sample_device_used()
    r["device_used_max_gib"] = gib(timer.device_used_max) if cuda else None  # sampled after each model call
    r["output_finite"] = bool(torch.isfinite(lat["samples"]).all())
    low_res = [x["model"] for x in r["stages"]["low"]["resident_during"]]
    r["experts_resident_in_low_stage"] = low_res
    if not cuda:
        r["warning"] = "CPU run: ComfyUI keeps every model 'loaded' on the CPU, memory modes do not apply"
    elif mode == "one-expert" and "high" in low_res:
        r["warning"] = "the high-noise expert was still resident during the low stage"
    return r


def run_config(args, result: dict) -> dict:
    """Loads both experts of ``args.config`` and samples in each memory mode; fills ``result`` (and
    writes it to the child's JSON after each mode, so a later failure or kill keeps what ran)."""
    import torch
    from wan_w4a4.apps import runtime

    t_start = time.perf_counter()
    name, spec = args.config, CONFIGS[args.config]
    arch = arch_of(args.arch)
    cuda = torch.cuda.is_available() and not args.cpu
    nodes = runtime.init_comfyui(args.comfyui, cpu=not cuda, base_directory=base_dir(args),
                                 dynamic_vram=args.dynamic_vram)
    import comfy.model_management as mm
    import comfy.patcher_extension as pe

    modes = args.memory
    result.update({"config": name, **spec, "modes": {}, "env": env_info(cuda), "arch": args.arch,
                   "source": args.source, "attention": args.attention})
    mm.DISABLE_SMART_MEMORY = modes[0] == "one-expert"  # decides where UNETLoader creates the models
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    experts, result["load"] = load_experts(args, nodes, cuda)
    if spec.get("lora_rank"):
        result["lora"] = {"rank": spec["lora_rank"], "file": file_names(args)["lora"],
                          "bf16_gib_per_expert": gib(bytes_lora_bf16(arch, spec["lora_rank"])),
                          "bf16_bytes_per_expert": bytes_lora_bf16(arch, spec["lora_rank"]),
                          "patches_per_expert": {e: len(m.patches) for e, m in experts.items()}}
    result["load_peak_alloc_gib"] = gib(torch.cuda.max_memory_allocated()) if cuda else None

    bases = {e: m.model for e, m in experts.items()}
    # --profile: model call --profile-call (default the first) of the low stage in the last memory mode
    timer = StepTimer(cuda, bases, profile_at=(modes[-1], "low") if args.profile else None,
                      profile_call=args.profile_call)
    shifted = {}
    shift_node = nodes.NODE_CLASS_MAPPINGS["ModelSamplingSD3"]()
    for e, m in experts.items():
        m = shift_node.patch(m, SHIFT)[0].clone()
        m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, TIMING_KEY, timer.wrapper(e))
        shifted[e] = m
    positive, negative, latent = conditioning(args, arch)
    split = split_step(shifted["high"], args.steps)
    if not 0 < split < args.steps:
        raise ValueError(f"--steps {args.steps}: the split at t=900 gives the high-noise expert {split} steps; "
                         f"both experts need at least one (use --steps 4 or more)")
    result.update(split=split, steps=args.steps, latent=list(latent_shape(args)),
                  tokens=math.prod(latent_shape(args)[2:]) // 4, text_tokens=args.text_tokens, cfg=CFG, shift=SHIFT)

    ks = nodes.KSamplerAdvanced()
    sampler_args = {"noise_seed": args.seed, "steps": args.steps, "cfg": CFG, "sampler_name": SAMPLER,
                    "scheduler": SCHEDULER, "positive": positive, "negative": negative}
    for mi, mode in enumerate(modes):
        mm.DISABLE_SMART_MEMORY = mode == "one-expert"
        if mi > 0:  # start from nothing on the GPU, as a fresh ComfyUI would
            mm.unload_all_models()
            gc.collect()
            mm.soft_empty_cache()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
        r = sample_mode(ks, shifted, latent, split, sampler_args, timer, mode, cuda)
        if mi == 0:
            r["includes_loading"] = True  # the peak counters ran from process start
        result["modes"][mode] = r
        result["host_peak_rss_gib"] = host_peak_rss_gib()
        write_json(args._child_out, result)
        log.info("%s / %s: sampling %.1f s, peak allocated %s GiB, reserved %s GiB, resident in low stage: %s",
                 name, mode, r["sampling_s"], r["peak_alloc_gib"], r["peak_reserved_gib"],
                 r["experts_resident_in_low_stage"])
    result["calls"] = timer.calls
    result["block_graphs"] = {e: block_graph_counts(m) for e, m in shifted.items()}
    if args.profile:
        result["profile"] = timer.profile or {"error": "no model call was profiled (CPU run, or no warm call)"}
    result["host_peak_rss_gib"] = host_peak_rss_gib()
    result["wall_s"] = round(time.perf_counter() - t_start, 2)
    return result
