"""Start a ComfyUI source tree outside ComfyUI: for the tests, the demo, benchmarks and the
calibration command line.

ComfyUI is not a pip package; we locate its source tree (``find_comfyui``), put it on ``sys.path``
and initialise it the way ``main.py`` does, minus the server (``init_comfyui``). Then node classes
can be called directly, and ``load_pack_as_custom_node`` loads this repository through ComfyUI's
own custom-node loader, so its ``NODE_CLASS_MAPPINGS`` are registered exactly as in a real install.

Importing this module imports neither ``comfy`` nor ``torch``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import sys
import types
from pathlib import Path

from .stand_ins import install_stand_ins

install_torchvision_stub = install_stand_ins  # its earlier name

logger = logging.getLogger(__name__)

ENV_VAR = "COMFYUI_PATH"
REPO_ROOT = Path(__file__).resolve().parents[1]
_state: dict = {}  # path, nodes: what init_comfyui did in this process


class ComfyUINotFound(RuntimeError):
    """No ComfyUI source tree was found; the message says where we looked and how to point at one."""


def is_comfyui_tree(path) -> bool:
    return path is not None and (Path(path) / "comfy" / "sd.py").is_file()


# Where .ci/run unpacks the ComfyUI source tarballs of ../shared/comfyui/ (one folder per version,
# the tarball's sha256 in ``.unpacked``); ``unpack_shared_comfyui`` does the same for the demo and CLI.
UNPACKED = REPO_ROOT / ".comfy"
SHARED_TARBALLS = REPO_ROOT.parent / "shared" / "comfyui"
_TARBALL_RE = re.compile(r"^comfyui-(\d+(?:\.\d+)*)\.tar\.gz$")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split("."))


def unpacked_trees(root: Path = UNPACKED) -> list[Path]:
    """ComfyUI trees unpacked under ``root`` (``<root>/<version>/<top>``), newest version first."""
    found = []
    for stamp in root.glob("*/.unpacked"):
        for tree in stamp.parent.iterdir():
            if is_comfyui_tree(tree) and re.fullmatch(r"\d+(?:\.\d+)*", stamp.parent.name):
                found.append((_version_key(stamp.parent.name), tree))
    return [tree for _, tree in sorted(found, reverse=True)]


def candidate_paths() -> list[Path]:
    """Where ``find_comfyui`` looks, in order. An explicit ``COMFYUI_PATH`` is the only candidate."""
    env = os.environ.get(ENV_VAR)
    if env:
        return [Path(env).expanduser()]
    # The pack normally sits in ComfyUI/custom_nodes/<pack>: any parent folder may be the tree; then
    # ~/ComfyUI, then the trees the tests unpacked.
    return [*REPO_ROOT.parents, Path.home() / "ComfyUI", *unpacked_trees()]


def unpack_shared_comfyui(tarballs: Path = SHARED_TARBALLS, root: Path = UNPACKED) -> Path | None:
    """Unpack the newest ``comfyui-<version>.tar.gz`` of ``tarballs`` into ``root/<version>/`` as .ci/run
    does (a temporary folder renamed into place, the tarball's sha256 in ``.unpacked``); returns its tree,
    or None when there is no tarball. Lets the demo and the CLI run on a machine with only those."""
    import hashlib
    import shutil
    import tarfile

    found = sorted(((_version_key(m.group(1)), m.group(1), p) for p in tarballs.glob("comfyui-*.tar.gz")
                    if (m := _TARBALL_RE.match(p.name))), reverse=True)
    if not found:
        return None
    _, version, tarball = found[0]
    dest = root / version
    trees = [t for t in dest.iterdir() if is_comfyui_tree(t)] if (dest / ".unpacked").is_file() else []
    if trees:
        return trees[0]
    logger.info("unpacking ComfyUI %s from %s into %s", version, tarball, dest)
    tmp = root / f"{version}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp, filter="data")  # no links or paths outside tmp
    (tmp / ".unpacked").write_text(hashlib.sha256(tarball.read_bytes()).hexdigest() + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    trees = [t for t in dest.iterdir() if is_comfyui_tree(t)]
    return trees[0] if trees else None


def find_comfyui() -> Path | None:
    """The ComfyUI source tree to use (a folder holding ``comfy/sd.py``), or None."""
    for path in candidate_paths():
        if is_comfyui_tree(path):
            return path.resolve()
    if os.environ.get(ENV_VAR):
        logger.warning("%s=%s is not a ComfyUI source tree (no comfy/sd.py in it)",
                       ENV_VAR, os.environ[ENV_VAR])
    return None


def _shared_tree() -> Path | None:
    """Without COMFYUI_PATH: the newest tree of ../shared/comfyui/, unpacked (see unpack_shared_comfyui)."""
    if os.environ.get(ENV_VAR):
        return None
    tree = unpack_shared_comfyui()
    return tree.resolve() if tree is not None else None


def not_found_message() -> str:
    """One line: why no tree was found and how to point at one."""
    env = os.environ.get(ENV_VAR)
    if env:
        return (f"ComfyUI not found: {ENV_VAR}={env} has no comfy/sd.py; set it to the folder of a "
                f"ComfyUI checkout (git clone https://github.com/comfyanonymous/ComfyUI)")
    return (f"ComfyUI not found (looked in the pack's parent folders and ~/ComfyUI): set "
            f"{ENV_VAR} to a ComfyUI checkout, or install the pack in ComfyUI/custom_nodes/")


def comfyui_tree(path=None) -> Path:
    """The ComfyUI source tree a command uses: ``path`` (its ``--comfyui``) when given, else
    ``find_comfyui()``, else the newest tree of ../shared/comfyui/, unpacked. Raises ComfyUINotFound
    saying where it looked."""
    root = Path(path).resolve() if path is not None else (find_comfyui() or _shared_tree())
    if root is None or not is_comfyui_tree(root):
        raise ComfyUINotFound(not_found_message() if path is None
                              else f"ComfyUI not found: {path} has no comfy/sd.py")
    return root


def _loop_running() -> bool:
    """Whether this thread is inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # the usual case: no loop running in this thread
        return False
    return True


def _run(coro):
    """``asyncio.run`` that also works when called from inside a running event loop.

    The coroutine runs outside any ``except`` block: run inside one, every exception or traceback it
    logs (ComfyUI logs one per optional import that fails while loading its nodes) would carry
    "During handling of the above exception ... no running event loop" from the probe."""
    if not _loop_running():
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # called from async code
        return pool.submit(asyncio.run, coro).result()


def set_base_directory(base_directory) -> Path:
    """Points ComfyUI's models/input/output/temp/user folders under ``base_directory``, as
    ``--base-directory`` does, in a process where ComfyUI is already importable."""
    import folder_paths

    base = Path(base_directory).resolve()
    old = Path(folder_paths.base_path)
    for name, (paths, exts) in list(folder_paths.folder_names_and_paths.items()):
        rebased = []
        for p in paths:
            try:
                rebased.append(str(base / Path(p).relative_to(old)))
            except ValueError:  # a path added by hand outside the old base: keep it
                rebased.append(p)
        folder_paths.folder_names_and_paths[name] = (rebased, exts)
    folder_paths.base_path = str(base)
    folder_paths.models_dir = str(base / "models")
    for name in ("output", "input", "temp", "user"):  # some nodes list input/ at import time
        (base / name).mkdir(parents=True, exist_ok=True)
        getattr(folder_paths, f"set_{name}_directory")(str(base / name))
    folder_paths.filename_list_cache.clear()
    return base


def comfyui_nodes():
    """The ``nodes`` module of the ComfyUI this process initialised (a command's ``--comfyui`` included);
    where none is, ``init_comfyui()`` of the default tree. For helpers that run inside a command."""
    return _state.get("nodes") or init_comfyui()


def init_comfyui(path=None, cpu: bool | None = None, base_directory=None, dynamic_vram: bool = False,
                 gpu_budget_gib: float | None = None):
    """Imports and initialises ComfyUI in this process; returns its ``nodes`` module.

    ``path``: the source tree (default ``find_comfyui()``). ``cpu``: force ComfyUI onto the CPU
    (default: when CUDA is unavailable). ``base_directory``: where models/input/output live (default
    the tree itself). ``dynamic_vram``: turn on ComfyUI's dynamic VRAM as its ``main.py`` does by default
    on NVIDIA GPUs (``enable_dynamic_vram``); without it, a library use of ComfyUI runs the legacy
    ModelPatcher. ``gpu_budget_gib``: with dynamic VRAM, the GiB the whole process may use on each GPU
    (``enable_dynamic_vram``). Idempotent; a second call may change ``base_directory`` but not the tree.
    """
    root = comfyui_tree(path)
    if _state:
        if root != _state["path"]:
            raise RuntimeError(f"ComfyUI from {_state['path']} is already initialised in this process; "
                               f"cannot switch to {root}")
        if base_directory is not None:
            set_base_directory(base_directory)
        return _state["nodes"]

    install_stand_ins()  # torchvision, torchaudio: only where they do not import
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    loaded = getattr(sys.modules.get("comfy"), "__file__", None)
    if loaded and Path(loaded).resolve().parents[1] != root:
        raise RuntimeError(f"a different ComfyUI is already imported from {loaded}; cannot use {root}")

    from comfy.cli_args import args
    if cpu is None:
        import torch
        cpu = not torch.cuda.is_available()
    if cpu:
        if "comfy.model_management" in sys.modules and not args.cpu:
            logger.warning("comfy.model_management was imported before init_comfyui(cpu=True): "
                           "ComfyUI keeps the device it chose then")
        args.cpu = True  # before comfy.model_management is imported, or it looks for a GPU driver

    aimdo = _aimdo_control() if dynamic_vram and not cpu else None
    # main.py imports ComfyUI's `utils` package before `nodes`, which puts comfy/ first on sys.path
    # (where comfy/utils.py would then shadow it and break comfy_extras/nodes_images.py).
    import utils.extra_config  # noqa: F401

    import nodes

    if dynamic_vram:
        enable_dynamic_vram(aimdo, gpu_budget_gib)

    if base_directory is not None:
        set_base_directory(base_directory)
    _run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    _state.update(path=root, nodes=nodes)
    logger.info("ComfyUI %s initialised from %s (%d nodes, %s)", comfyui_version(), root,
                len(nodes.NODE_CLASS_MAPPINGS), "cpu" if args.cpu else "auto device")
    return nodes


def _aimdo_control():
    """comfy-aimdo's control module, initialised as main.py does before CUDA starts; None without it."""
    try:
        from comfy_aimdo import control
    except ImportError:
        return None
    for kwargs in ({"simple_vram_headroom": None, "nvml_pressure": True}, {"simple_vram_headroom": None}, {}):
        try:  # main.py accepts three protocols of comfy-aimdo's init, newest first
            control.init(**kwargs)
            return control
        except TypeError:
            continue
    return None


def enable_dynamic_vram(control=None, gpu_budget_gib: float | None = None) -> bool:
    """Switch this process's ComfyUI to dynamic VRAM the way ``main.py`` does when ``enables_dynamic_vram``
    (ComfyUI 0.33: on by default for NVIDIA): comfy-aimdo's devices, ``ModelPatcherDynamic`` as the core
    patcher and ``memory_management.aimdo_enabled``. Feature-detected: False (and nothing changed) where
    this ComfyUI or machine has none of it.

    ``gpu_budget_gib``: raise ComfyUI's ``args.vram_headroom`` (what its ``--vram-headroom`` sets, and what
    comfy-aimdo keeps free on the whole device) so that the process stays within the budget
    (``calibration.budget.dynamic_vram_headroom``); comfy-aimdo takes it once, here."""
    import comfy.model_management as mm
    import comfy.model_patcher as mp

    memory = sys.modules.get("comfy.memory_management")
    if control is None or memory is None or not hasattr(mp, "ModelPatcherDynamic") or not mm.is_nvidia():
        logger.warning("dynamic VRAM was asked for, but this ComfyUI or machine has none; legacy ModelPatcher")
        return False
    from comfy.cli_args import args
    devices = mm.get_all_torch_devices()
    if gpu_budget_gib is not None:
        import torch

        from ..calibration.budget import GiB, dynamic_vram_headroom
        need = max(dynamic_vram_headroom(torch.cuda.get_device_properties(d).total_memory, gpu_budget_gib)
                   for d in devices)
        args.vram_headroom = max(float(getattr(args, "vram_headroom", 0) or 0), need / GiB)
        logger.info("dynamic VRAM headroom %.1f GiB: the process stays within its %.1f GiB GPU budget",
                    args.vram_headroom, gpu_budget_gib)
    try:
        ok = control.init_devices((d.index, int(getattr(args, "vram_headroom", 0) * 1024 ** 3)) for d in devices)
    except TypeError:  # comfy-aimdo 0.4.9 protocol, as main.py handles it
        ok = control.init_devices(d.index for d in devices)
    if not ok:
        logger.warning("comfy-aimdo did not initialise: legacy ModelPatcher")
        return False
    setter = getattr(control, aimdo_log_setter(logging.getLogger().getEffectiveLevel()), None)
    if setter is not None:
        setter()
    mp.CoreModelPatcher = mp.ModelPatcherDynamic
    memory.aimdo_enabled = True
    logger.info("dynamic VRAM (comfy-aimdo) enabled, as ComfyUI's main.py does")
    return True


def aimdo_log_setter(level: int) -> str:
    """The comfy-aimdo control function that ComfyUI's ``main.py`` calls for its console log level once the
    devices are up (``set_log_info`` at its default INFO). Without that call comfy-aimdo passes its debug
    messages to Python's logging, which drops them after the call: 19 989 in a one-frame W4A4 model call and
    9701 in BF16's, a large part of the host's time at that size (benchmarks/RESULTS.md, twenty-seventh part)."""
    return {logging.DEBUG: "set_log_debug", logging.WARNING: "set_log_warning", logging.ERROR: "set_log_error",
            logging.CRITICAL: "set_log_critical"}.get(level, "set_log_info")


def add_arguments(parser, device: bool = True) -> None:
    """The options of a command that starts ComfyUI in its process (``init_comfyui``'s arguments).
    ``device=False`` declares ``--comfyui`` only, for a command that chooses the device itself (the
    demo always runs on the CPU)."""
    parser.add_argument("--comfyui", type=Path, default=None,
                        help="ComfyUI source tree (default: COMFYUI_PATH, the pack's parent folders, ~/ComfyUI)")
    if not device:
        return
    parser.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU even when a GPU is present")
    parser.add_argument("--dynamic-vram", action="store_true",
                        help="ComfyUI's dynamic VRAM, as its main.py turns it on by default on NVIDIA GPUs "
                             "(ComfyUI 0.33+): weights are read from their files and streamed as needed, outside "
                             "PyTorch's allocator")


def start_cpu_script(prog: str, comfyui, threads: int) -> bool:
    """The start of a CPU script that samples with ComfyUI (the mini-model benchmarks): INFO logging,
    ``threads`` torch threads, ComfyUI on the CPU. False (after printing why, as ``prog: ...``) when no
    ComfyUI tree is found; the script then exits with status 2."""
    import torch

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, threads))
    try:
        init_comfyui(comfyui, cpu=True)
    except ComfyUINotFound as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return False
    return True


def finish(rc: int) -> int:
    """``rc``, the exit status of a command that ran ComfyUI in its process; under dynamic VRAM the
    process ends here, with ``rc``, once its output is flushed. comfy-aimdo's buffers outlive its
    library in the interpreter's teardown, and the process then died by a signal after all its work
    was written (SIGILL, then SIGSEGV, on the H200: benchmarks/results/*dynvram*)."""
    if not dynamic_vram_enabled():
        return rc
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def dynamic_vram_enabled() -> bool:
    """Whether this process's ComfyUI streams weights with dynamic VRAM (False before it is imported)."""
    memory = sys.modules.get("comfy.memory_management")
    return bool(getattr(memory, "aimdo_enabled", False))


def comfyui_version() -> str:
    try:
        import comfyui_version as v
        return v.__version__
    except ImportError:
        return "unknown"


def load_custom_node(path, nodes_module=None) -> types.ModuleType:
    """Loads a custom-node folder or file through ComfyUI's own loader (``nodes.load_custom_node``),
    as ComfyUI does at start-up for ``custom_nodes/*``; returns the loaded module.

    Raises RuntimeError if ComfyUI reports the import as failed. Idempotent per path.
    """
    nodes = nodes_module or comfyui_nodes()
    path = Path(path).resolve()
    # the sys.modules name that nodes.load_custom_node gives a file or a folder
    name = str(path.with_suffix("")) if path.is_file() else str(path).replace(".", "_x_")
    if name not in sys.modules:
        if not _run(nodes.load_custom_node(str(path))):
            sys.modules.pop(name, None)  # ComfyUI registers the module before running it
            raise RuntimeError(f"ComfyUI failed to import {path} as a custom node (see the log above)")
    return sys.modules[name]


def load_pack_as_custom_node(nodes_module=None) -> types.ModuleType:
    """Loads this repository into ComfyUI as ``custom_nodes/<pack>`` would be; registers its
    ``NODE_CLASS_MAPPINGS`` in ``nodes.NODE_CLASS_MAPPINGS``. Returns the loaded package module."""
    return load_custom_node(REPO_ROOT, nodes_module)


def server_command(comfyui_path, *args: str) -> list[str]:
    """The command that starts ComfyUI's ``main.py`` with ``args`` in a subprocess, with stand-ins
    for torchvision and torchaudio where they are not installed (``stand_ins.install_stand_ins``; torch
    itself must not be imported before main.py chooses its CUDA allocator). Run it
    with ``cwd=comfyui_path``."""
    root = str(Path(comfyui_path).resolve())
    main = os.path.join(root, "main.py")
    code = ("import runpy, sys; "
            "from wan_w4a4.apps.stand_ins import install_stand_ins; "
            "install_stand_ins(try_import=False); "
            f"sys.path.insert(0, {root!r}); sys.argv[0] = {main!r}; "
            f"runpy.run_path({main!r}, run_name='__main__')")
    return [sys.executable, "-c", code, *args]
