"""``python -m wan_w4a4 calibrate``: build the two W4A4 states from two Wan2.2 expert checkpoints.

Example (the sampling of ComfyUI's current Wan2.2 14B I2V template: 20 steps, shift 5, hand-over
after step 10)::

    python -m wan_w4a4 calibrate --high wan2.2_i2v_high_noise_14B_fp16.safetensors \\
        --low wan2.2_i2v_low_noise_14B_fp16.safetensors --out states/ --items 2 \\
        --frames 33 --height 480 --width 832 --blocks-per-pass 10 --token-fraction 0.25 \\
        --steps 20 --shift 5 --handover-step 10

The checkpoints load through ComfyUI's own loader (``comfy.sd.load_diffusion_model``); ComfyUI is
found as the tests find it (``COMFYUI_PATH``, the pack's parent folders, ``~/ComfyUI``) or given with
``--comfyui``. Calibration items: ``--items N`` random I2V items (random start-image latent and text
context: for smoke tests and timing), or ``--set DIR``: a calibration set of start images and prompts
(calibration/dataset.py), encoded as ComfyUI's Wan2.2 I2V template encodes one pair: the text encoder
given with ``--text-encoder`` (loaded as CLIPLoader type "wan" loads it), the VAE given with ``--vae``
(as VAELoader loads it), CLIPTextEncode and WanImageToVideo at ``--width``/``--height``/``--frames``.
With ``--source minimodel`` the mini model's text map and linear VAE encoder stand in for them (no download).
The set is parsed and every image decoded before any model loads.

Several GPUs or processes: ``torchrun --nproc-per-node N -m wan_w4a4 calibrate ...`` (``--nnodes`` for several
hosts) runs one calibration over N processes, one GPU each (NCCL; gloo with ``--cpu``): each samples its share
of the items and quantizes its share of the layers; rank 0 alone shows the bar and writes
(calibration/distributed.py).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import runtime  # imports neither comfy nor torch

# ComfyUI's modules import only after runtime.init_comfyui() has found the tree, so they are imported in
# the functions that run after it; calibration's and the mini model's are imported where they are used,
# since __main__ imports this module for every command's --help.

if TYPE_CHECKING:
    from ..calibration.config import CalibrationConfig

log = logging.getLogger(__name__)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _keep(text: str) -> tuple:
    out = []
    for v in text.split(","):
        v = v.strip()
        if v:
            out.append(int(v) if v.isdigit() else v)
    return tuple(out)


def _bool(text: str) -> bool:
    t = text.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {text!r}")


RANDOM_FRAMES = 33  # --source random: a short clip of Wan's 1 + 4k layout, for timing and smoke tests


def frames_for(source: str, frames: int | None) -> int:
    """--frames as given, else the source's own length: the mini model's training length
    (``minimodel.data.FRAMES``) for ``minimodel``, ``RANDOM_FRAMES`` for ``random``."""
    if frames is not None:
        return frames
    if source == "minimodel":
        from ..minimodel import data
        return data.FRAMES
    return RANDOM_FRAMES


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's CPU threads set to ``n`` (None: left as they are) for the block, restored after it, so
    that in-process callers (tests, notebooks) keep their own setting."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..calibration.config import BIN_SPACINGS, CLIP_POLICIES, CalibrationConfig
    from ..minimodel.data import FRAMES as MINI_FRAMES

    d = CalibrationConfig()
    io = p.add_argument_group("models and output")
    io.add_argument("--high", required=True, type=Path, help="high-noise expert checkpoint (.safetensors)")
    io.add_argument("--low", required=True, type=Path, help="low-noise expert checkpoint (.safetensors)")
    io.add_argument("--out", required=True, type=Path, help="output folder for the states and the report")
    io.add_argument("--name", default=d.name, help="file name stem: <name>_high.safetensors, ... (default %(default)s)")
    io.add_argument("--overwrite", action="store_true", help="replace existing output files")
    io.add_argument("--restart", action="store_true",
                    help="discard the finished work that an interrupted run to this --out and --name left in its "
                         "hidden work folder (.<name>.w4a4-work), and start over; without it, a run with the same "
                         "settings resumes that work and one with other settings stops with an error")
    runtime.add_arguments(io)
    io.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's own choice)")

    it = p.add_argument_group("calibration items")
    it.add_argument("--source", choices=("random", "minimodel"), default="random",
                    help="random: random start-image latents and text contexts (timing, smoke tests); "
                         "minimodel: the embedded mini model's procedural videos and captions (its 128x128 "
                         "size; --height/--width/--text-tokens are ignored) (default %(default)s)")
    it.add_argument("--items", type=int, default=2, help="number of items (default %(default)s)")
    it.add_argument("--frames", type=int, default=None,
                    help=f"video frames, 1 + 4k (default: {RANDOM_FRAMES} with --source random; with --source "
                         f"minimodel {MINI_FRAMES}, the mini model's training length)")
    it.add_argument("--height", type=int, default=480, help="height in pixels (default %(default)s)")
    it.add_argument("--width", type=int, default=832, help="width in pixels (default %(default)s)")
    it.add_argument("--text-tokens", type=int, default=512, help="text context tokens (default %(default)s)")
    it.add_argument("--item-seed", type=int, default=0, help="seed of the items and their noise (with --set: "
                                                               "item i without a seed of its own gets seed + i)")
    it.add_argument("--set", type=Path, default=None, metavar="DIR",
                    help="calibrate on a calibration set: start images (png/jpg/webp) + prompts.txt (one prompt "
                         "per image, in sorted file-name order) or prompts.jsonl ({\"image\", \"prompt\", "
                         "\"negative\", \"seed\"} per line), encoded with --text-encoder and --vae at "
                         "--width/--height/--frames (with --source minimodel: with the mini model's text map and "
                         "linear VAE encoder); --items is then the set's size")
    it.add_argument("--text-encoder", type=Path, default=None, metavar="FILE",
                    help="with --set: Wan's umT5 text encoder (.safetensors), loaded as CLIPLoader type 'wan'")
    it.add_argument("--vae", type=Path, default=None, metavar="FILE",
                    help="with --set: Wan's VAE (.safetensors), loaded as VAELoader loads it")
    it.add_argument("--negative", default=None, metavar="TEXT",
                    help="with --set: the negative prompt of items without one (default: the Wan2.2 I2V "
                         "template's)")

    s = p.add_argument_group("sampling")
    s.add_argument("--steps", type=int, default=d.steps, help="sampling steps of your workflow")
    s.add_argument("--cfg", type=float, default=d.cfg, help="CFG of your workflow")
    s.add_argument("--shift", type=float, default=d.shift, help="ModelSamplingSD3 shift; 0 keeps the model's")
    s.add_argument("--sampler", default=d.sampler, help="ComfyUI sampler name of your workflow")
    s.add_argument("--scheduler", default=d.scheduler, help="ComfyUI scheduler name of your workflow")
    ho = s.add_mutually_exclusive_group()
    ho.add_argument("--boundary", type=float, default=d.boundary,
                    help="hand over at this model timestep: the high-noise expert runs the steps with t >= it "
                         "(Wan2.2 I2V 900, T2V 875; default %(default)s)")
    ho.add_argument("--handover-step", type=int, default=None, metavar="N",
                    help="hand over by step instead, as your workflow does: the high-noise expert runs steps "
                         "0..N-1 (its KSamplerAdvanced's end_at_step = N), the low-noise one the rest. ComfyUI's "
                         "Wan2.2 14B I2V template: --steps 20 --shift 5 --handover-step 10 (its states also cover the "
                         "template's 4-step LoRA sampling: t = 1000, 937 | 833, 625)")
    s.add_argument("--bins", type=int, default=d.bins, help="timestep bins per expert")
    s.add_argument("--bin-spacing", choices=BIN_SPACINGS, default=d.bin_spacing,
                   help="uniform: equal intervals of t; steps: an equal share of the sampling steps per bin")

    m = p.add_argument_group("method")
    m.add_argument("--rank", type=int, default=d.rank, help="rank of the BF16 low-rank branch (SVDQuant); 0: none")
    m.add_argument("--alphas", type=_floats, default=d.alphas, help="smoothing strengths searched per layer, "
                   "comma-separated in [0, 1]")
    m.add_argument("--refine-low-rank", type=_bool, default=d.refine_low_rank, metavar="on|off",
                   help="refine the low-rank branch to fit what the 4-bit residual cannot represent "
                        "(deepcompressor's iteration)")
    m.add_argument("--gptq", type=_bool, default=d.gptq, metavar="on|off",
                   help="GPTQ on the 4-bit residual (off: round to nearest)")
    m.add_argument("--gptq-damp", type=float, default=d.gptq_damp,
                   help="GPTQ damping, as a fraction of the Hessian's mean diagonal")
    m.add_argument("--gptq-block", type=int, default=d.gptq_block, help="GPTQ block size (columns per update)")
    m.add_argument("--act-order", type=_bool, default=d.act_order, metavar="on|off",
                   help="GPTQ in order of decreasing Hessian diagonal")
    m.add_argument("--unsigned-ffn2", type=_bool, default=d.unsigned_ffn2, metavar="on|off",
                   help="unsigned 4-bit activations for ffn.2 (its input is post-GELU)")
    m.add_argument("--clip-grid", type=_floats, default=d.clip_grid,
                   help="candidate activation clip ratios, comma-separated in (0, 1]")
    m.add_argument("--clip-policy", choices=CLIP_POLICIES, default=d.clip_policy,
                   help="per_bin: a ratio per layer and timestep bin; per_expert: one per layer and expert; "
                        "global: one per layer for both experts")
    m.add_argument("--keep", type=_keep, default=(), help="kept in BF16: block indices and/or name patterns, "
                                                           "comma-separated (e.g. 0,39,*.ffn.2)")

    r = p.add_argument_group("memory")
    r.add_argument("--rows-per-bin", type=int, default=d.rows_per_bin,
                   help="activation rows kept per layer input and bin for the searches")
    r.add_argument("--token-fraction", type=float, default=d.token_fraction,
                   help="fraction of each call's tokens sampled into the statistics")
    r.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help="fraction of the kept rows held out to measure the report's SQNR")
    r.add_argument("--blocks-per-pass", type=int, default=None,
                   help="blocks captured per sampling pass (default: all at once; lower it if memory runs out)")
    r.add_argument("--gpu-budget", type=float, default=None, metavar="GIB",
                   help="GPU memory calibration stays under, in GiB (default: none): blocks per pass chosen so their "
                        "statistics take 40 %% of it, and ComfyUI loads the expert within the rest, streaming the "
                        "remainder (e.g. 22 on a 24 GB GPU)")
    r.add_argument("--stats-device", default=None, help="where statistics live (default: the model's device)")
    r.add_argument("--device", default=None, help="where the per-layer math runs (default: the model's device)")
    r.add_argument("--seed", type=int, default=d.seed, help="seed of the calibration's own random choices")


def config_from_args(args) -> CalibrationConfig:
    from ..calibration.config import CalibrationConfig
    return CalibrationConfig(
        steps=args.steps, cfg=args.cfg, shift=args.shift or None, sampler=args.sampler, scheduler=args.scheduler,
        boundary=args.boundary, handover_step=args.handover_step, bins=args.bins, bin_spacing=args.bin_spacing,
        rank=args.rank, alphas=args.alphas,
        refine_low_rank=args.refine_low_rank, gptq=args.gptq, gptq_damp=args.gptq_damp,
        gptq_block=args.gptq_block, act_order=args.act_order, unsigned_ffn2=args.unsigned_ffn2,
        clip_grid=args.clip_grid, clip_policy=args.clip_policy, keep=args.keep, rows_per_bin=args.rows_per_bin,
        token_fraction=args.token_fraction, eval_fraction=args.eval_fraction, blocks_per_pass=args.blocks_per_pass,
        gpu_budget_gib=args.gpu_budget, stats_device=args.stats_device, device=args.device, seed=args.seed, out_dir=str(args.out),
        name=args.name, overwrite=args.overwrite)


def _text_dim(path) -> int:
    """The text context width of a Wan checkpoint, read from its safetensors header (4096 for Wan)."""
    from safetensors import safe_open

    from ..calibration.capture import CalibrationError

    with safe_open(str(path), framework="pt") as f:
        if "text_embedding.0.weight" not in f.keys():  # noqa: SIM118 - safe_open has no __contains__
            raise CalibrationError(f"{path}: not a Wan transformer checkpoint (no text_embedding.0.weight)")
        return int(f.get_slice("text_embedding.0.weight").get_shape()[1])


def minimodel_items(n: int, *, frames: int = 17, seed: int = 0) -> list:
    """``n`` I2V items of the embedded mini model: a procedural scene's first frame and caption through
    ComfyUI's own ``WanImageToVideo`` (minimodel/conditioning.py). Needs an initialised ComfyUI."""
    from ..calibration.capture import CalibrationError, CalibrationItem
    from ..minimodel import conditioning, data

    if n < 1:
        raise CalibrationError(f"minimodel_items: n must be >= 1, got {n}")
    if (frames - 1) % 4:
        raise CalibrationError(f"--frames must be 1 + 4k for Wan's latent layout, got {frames}")
    items = []
    for i in range(n):
        scene = data.sample_scene(seed + i)
        first = data.render([scene], frames=1)[0, 0]  # [H, W, 3] in [0, 1]
        positive, negative, latent = conditioning.i2v_conditioning(data.caption(scene), first, frames=frames)
        items.append(CalibrationItem(positive, negative, latent["samples"], seed=seed + i))
    return items


def _safetensors_file(path: Path, what: str) -> None:
    """A text encoder or VAE file that ComfyUI will read as safetensors (never as a pickle), with a
    readable header."""
    from safetensors import safe_open

    from ..calibration.dataset import CalibrationSetError

    if not path.is_file():
        raise CalibrationSetError(f"{what} {path}: no such file")
    if not path.name.lower().endswith(".safetensors"):
        raise CalibrationSetError(f"{what} {path}: not a .safetensors file (other formats are pickles, "
                                  "which are not loaded)")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad header
        raise CalibrationSetError(f"{what} {path}: not a valid safetensors file ({e})") from None


def check_set_args(args):
    """``(CalibrationSet, EncodeSize)`` of ``--set``, checked before anything loads: the encoder files,
    the size, the prompts file and every image (decoded once)."""
    from ..calibration.dataset import (
        CalibrationSetError,
        EncodeSize,
        check_images,
        load_set,
    )

    if args.source == "minimodel":
        given = [w for w, v in (("--text-encoder", args.text_encoder), ("--vae", args.vae)) if v is not None]
        if given:
            raise CalibrationSetError(f"{' and '.join(given)}: not used with --source minimodel (the mini model's "
                                      "text map and linear VAE encoder encode the set)")
    else:
        for what, path in (("--text-encoder", args.text_encoder), ("--vae", args.vae)):
            if path is None:
                raise CalibrationSetError(f"--set needs {what} (Wan's umT5 text encoder and VAE .safetensors), or "
                                          "--source minimodel for the mini model's stand-ins")
            _safetensors_file(path, what)
    size = EncodeSize(width=args.width, height=args.height, length=frames_for(args.source, args.frames))
    cset = load_set(args.set, negative=args.negative, seed=args.item_seed)
    check_images(cset)
    return cset, size


def _load_by_node(node_cls, folder: str, path: Path, name_input: str, **inputs):
    """A model file loaded by ComfyUI's own loader node (CLIPLoader, VAELoader), which takes a name
    in one of its model folders: the file's folder is put first among that folder's paths."""
    import folder_paths

    from ..calibration.dataset import CalibrationSetError, run_node

    path = path.resolve()
    folder_paths.add_model_folder_path(folder, str(path.parent), is_default=True)
    found = folder_paths.get_full_path(folder, path.name)
    if found is None or Path(found).resolve() != path:
        raise CalibrationSetError(f"{path}: ComfyUI's {folder} folders resolve {path.name!r} to {found}")
    return run_node(node_cls, **{name_input: path.name}, **inputs)[0]


def set_items(args, cset, size) -> list:
    """The CalibrationItems of a checked calibration set (``check_set_args``), encoded through
    ComfyUI's nodes (calibration/dataset.py); the encoders are released before calibration loads
    the experts. Needs an initialised ComfyUI."""
    import gc

    import comfy.model_management
    import folder_paths

    from ..calibration.dataset import encode_set

    # LoadImage reads only from ComfyUI's input directory: in this process, that is the set's folder.
    folder_paths.set_input_directory(str(cset.folder.resolve()))
    if args.source == "minimodel":
        from ..minimodel import data
        from ..minimodel.text_clip import MiniCLIP
        clip, vae = MiniCLIP(), data.LinearVideoVAE()
    else:
        import nodes
        clip = _load_by_node(nodes.CLIPLoader, "text_encoders", args.text_encoder, "clip_name", type="wan")
        vae = _load_by_node(nodes.VAELoader, "vae", args.vae, "vae_name")
    bar = _Tqdm(desc="encode set", unit="item")
    try:
        items = encode_set(cset, clip, vae, size, progress=bar)
    finally:
        bar.close()
        del clip, vae
        gc.collect()
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
    return items


class _Tqdm:
    """progress(done, total, what) on a tqdm bar."""

    def __init__(self, desc: str = "calibrate", unit: str = "step", eta_in_text: bool = False):
        from tqdm import tqdm
        # eta_in_text: the phase and the ETA come in ``what`` (calibration/progress.py); tqdm's own guess
        # would average sampling steps and layers together, so the bar leaves it out
        fmt = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}] {postfix}" if eta_in_text else None
        self.bar = tqdm(total=1, unit=unit, dynamic_ncols=True, desc=desc, bar_format=fmt)

    def __call__(self, done, total, what=""):
        self.bar.total = total
        self.bar.n = done
        if what:
            self.bar.set_postfix_str(what, refresh=False)
        self.bar.refresh()

    def close(self):
        self.bar.close()


def run(args) -> int:
    with torch_threads(getattr(args, "threads", None)):
        rc = _run(args)
    return runtime.finish(rc)


def _run(args) -> int:
    from ..calibration import distributed
    from ..calibration.capture import CalibrationError

    try:
        world = distributed.World.from_env()
        distributed.timeout_s()  # a bad timeout is an error now, not at the first collective
    except ValueError as e:
        print(f"calibrate: {e}", file=sys.stderr)
        return 2

    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"calibrate: {e}", file=sys.stderr)
        return 2
    if args.items < 1:
        print(f"calibrate: --items must be >= 1, got {args.items}", file=sys.stderr)
        return 2
    for what, path in (("--high", args.high), ("--low", args.low)):
        if not path.is_file():
            print(f"calibrate: {what} {path}: no such file", file=sys.stderr)
            return 2
    if not config.overwrite:
        existing = [str(p) for p in (config.state_path("high"), config.state_path("low"), config.report_path)
                    if p.exists()]
        if existing:
            print(f"calibrate: refusing to overwrite {', '.join(existing)} (pass --overwrite)", file=sys.stderr)
            return 1
    cset = size = None
    if args.set is not None:
        try:
            cset, size = check_set_args(args)
        except CalibrationError as e:
            print(f"calibrate: {e}", file=sys.stderr)
            return 2
    elif args.text_encoder is not None or args.vae is not None or args.negative is not None:
        print("calibrate: --text-encoder, --vae and --negative are for --set", file=sys.stderr)
        return 2

    import torch

    # before ComfyUI picks its device: this process's GPU (LOCAL_RANK) is the current one
    distributed.init(world, use_cuda=not args.cpu and torch.cuda.is_available())
    if not world.main:  # rank 0 tells the run; the others only their warnings and errors
        logging.getLogger(__package__.rpartition(".")[0]).setLevel(logging.WARNING)
    try:
        return _calibrate(args, config, cset, size, world)
    except distributed.DistributedError as e:
        print(f"calibrate: {e}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()


def _calibrate(args, config, cset, size, world) -> int:
    from ..calibration.capture import CalibrationError, synthetic_items
    from ..calibration.pipeline import calibrate

    try:
        runtime.init_comfyui(args.comfyui, cpu=True if args.cpu else None, dynamic_vram=args.dynamic_vram,
                             gpu_budget_gib=args.gpu_budget)
    except runtime.ComfyUINotFound as e:
        print(f"calibrate: {e}", file=sys.stderr)
        return 2
    import comfy.sd
    import torch

    def loader(path):  # loaded when its expert's turn comes: one BF16 expert in host memory at a time
        def load():
            # inside inference mode, as ComfyUI runs UNETLoader: 0.33 cannot sample fp8_scaled layers made
            # outside it (capture.check_weight_source says why)
            with torch.inference_mode():
                return comfy.sd.load_diffusion_model(str(path))
        return load

    bar = None
    try:
        frames = frames_for(args.source, args.frames)
        if cset is not None:
            items = set_items(args, cset, size)
            print(f"calibration set {cset.source}: {len(items)} items")
        elif args.source == "minimodel":
            items = minimodel_items(args.items, frames=frames, seed=args.item_seed)
        else:
            items = synthetic_items(args.items, frames=frames, height=args.height, width=args.width,
                                    text_tokens=args.text_tokens, text_dim=_text_dim(args.high),
                                    seed=args.item_seed)
        bar = _Tqdm(unit="unit", eta_in_text=True) if world.main else None  # one bar: rank 0's
        with _sigterm_stops(world):
            result = calibrate(loader(args.high), loader(args.low), items, config, progress=bar,
                               restart=getattr(args, "restart", False), world=world)
    except (CalibrationError, FileExistsError) as e:
        print(f"calibrate: {e}", file=sys.stderr)
        return 2 if isinstance(e, CalibrationError) else 1
    except KeyboardInterrupt:
        print("calibrate: interrupted; run the same command again to resume from the last finished layer",
              file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    if world.main:
        print(f"high: {result.high}\nlow: {result.low}\nreport: {result.report}")
    return 0


@contextlib.contextmanager
def _sigterm_stops(world):
    """In a run over several processes, SIGTERM (what torchrun sends the others when one fails) stops this
    one with an error that says so; the work folder keeps the finished work and is unlocked. One process:
    unchanged."""
    import signal

    from ..calibration import distributed

    if world.size == 1:
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun may send it again while this process unwinds
        raise distributed.DistributedError(
            f"rank {world.rank} of {world.size}: stopped by SIGTERM: torchrun stops every process of the run "
            "when another process of it fails (its report names which); no state is written, the finished work "
            "is kept: run the same command again (with any number of processes) to resume")

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except BaseException:
        # The run is stopping (this SIGTERM, or a collective that failed because another process died), and
        # torchrun's SIGTERM can come before the CLI has printed why, after this block: ignore it from here on,
        # or its default action kills the process first (both seen in CI runs of test_distributed.py).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
    signal.signal(signal.SIGTERM, before)
