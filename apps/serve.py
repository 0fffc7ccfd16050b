"""``python -m wan_w4a4 serve [--comfyui PATH] -- MAIN_PY_ARGS``: ComfyUI's own ``main.py`` (the real
server and its web UI) in this process, with this pack loaded as a custom node.

Before ``main.py`` starts, one child process (``probe``) does what this process must not: it imports
torchvision and torchaudio (which import torch; ``main.py`` has to choose its CUDA allocator before
torch is imported) and ComfyUI's own argument parser and ``folder_paths`` (importing ``comfy.cli_args``
here would fix ComfyUI's arguments before ``main.py`` parses them). From what it reports:

- torchvision / torchaudio get stand-ins (``stand_ins.install_stand_ins``) only where they do not import;
- the pack must be visible as a custom node. When no custom-node folder of that ComfyUI (its
  ``custom_nodes/``, or ``--base-directory``'s) holds it, a folder outside the tree with one link to
  the pack is added through ComfyUI's ``--extra-model-paths-config`` (a ``custom_nodes:`` entry), where
  that ComfyUI's loader takes one; otherwise the command refuses and names the link to make. The
  user's ComfyUI tree is never changed;
- the web UI needs the ``comfyui-frontend-package`` pinned in that tree's ``requirements.txt``
  (unless ``--front-end-root`` or another ``--front-end-version`` is given): checked before starting.

Every argument after ``--`` goes to ``main.py`` unchanged.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from . import runtime  # imports neither comfy nor torch
from .stand_ins import PACKAGES, install_stand_ins

logger = logging.getLogger(__name__)

LINK_NAME = "ComfyUI-WanW4A4"  # the pack's folder name in custom_nodes/ (its repository's name)
FRONTEND = "comfyui-frontend-package"
EPILOG = ("Every argument after -- goes to ComfyUI's main.py unchanged, e.g. "
          "`python -m wan_w4a4 serve -- --cpu --port 8199`; `python -m wan_w4a4 serve -- --help` lists them.")


class ServeError(RuntimeError):
    """The server cannot start as asked; the message says why and what to do."""


class HelpShown(Exception):  # not an error: main.py's parser printed its help (the message)
    """``-h`` / ``--help`` was among main.py's arguments: its parser printed its help and stopped."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    runtime.add_arguments(p, device=False)  # --comfyui; the device is main.py's business (--cpu ...)
    p.add_argument("main_args", nargs="*", default=None, metavar="-- MAIN_PY_ARGS",
                   help="arguments for ComfyUI's main.py, after a lone --")
    p.epilog = EPILOG


# --- what the child process reports ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Probe:
    """What ``probe`` found about a ComfyUI tree and the arguments main.py will get."""
    stand_ins: dict  # {package: why it does not import}
    custom_node_dirs: tuple  # where that ComfyUI looks for custom nodes with these arguments
    extra_custom_nodes: bool  # whether its --extra-model-paths-config adds a custom-node folder
    frontend_package_needed: bool  # no --front-end-root, the default --front-end-version

    def __post_init__(self):
        if not isinstance(self.stand_ins, dict) or not all(isinstance(d, str) for d in self.custom_node_dirs):
            raise ValueError(f"malformed probe result: {self!r}")


def _probe_child(tree: str, main_args: list, extra_yaml: str, extra_dir: str) -> dict:
    """Runs in the child process (``probe``); returns ``Probe``'s fields."""
    reasons = install_stand_ins(PACKAGES, try_import=True)
    sys.path.insert(0, tree)
    sys.argv = [os.path.join(tree, "main.py"), *main_args]
    import comfy.options
    comfy.options.enable_args_parsing()  # as main.py does: its parser, its rules, its errors
    import folder_paths
    import utils.extra_config
    from comfy.cli_args import args, parser

    # the custom-node folders main.py will scan: its own, and those of the yaml files it loads
    configs = [os.path.join(tree, "extra_model_paths.yaml")]
    configs += [c for group in (getattr(args, "extra_model_paths_config", None) or []) for c in group]
    for config in configs:
        if os.path.isfile(config):
            utils.extra_config.load_extra_path_config(config)
    dirs = [str(Path(d).resolve()) for d in folder_paths.get_folder_paths("custom_nodes")]
    extra = False
    if hasattr(args, "extra_model_paths_config"):  # feature detection: load ours, see the folder appear
        utils.extra_config.load_extra_path_config(extra_yaml)
        extra = str(Path(extra_dir).resolve()) in (str(Path(d).resolve())
                                                    for d in folder_paths.get_folder_paths("custom_nodes"))
    return {"stand_ins": reasons, "custom_node_dirs": dirs, "extra_custom_nodes": extra,
            "frontend_package_needed": (getattr(args, "front_end_root", None) is None
                                        and getattr(args, "front_end_version", None) == parser.get_default("front_end_version"))}


def _probe_main() -> None:  # the child's entry point: argv = tree, yaml, dir, main.py's arguments
    tree, extra_yaml, extra_dir, *main_args = sys.argv[1:]
    result = _probe_child(tree, main_args, extra_yaml, extra_dir)
    sys.stdout.write("\nWAN_W4A4_PROBE " + json.dumps(result) + "\n")


def probe(tree: Path, main_args: list, extra_yaml: Path, extra_dir: Path) -> Probe:
    """Asks a child Python (this interpreter, this environment) about ``tree`` and ``main_args``."""
    code = "from wan_w4a4.apps.serve import _probe_main; _probe_main()"
    cmd = [sys.executable, "-c", code, str(tree), str(extra_yaml), str(extra_dir), *main_args]
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    found = re.search(r"^WAN_W4A4_PROBE (.*)$", r.stdout, re.MULTILINE)
    if r.returncode == 0 and not found:
        raise HelpShown(r.stdout)
    if r.returncode != 0 or not found:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
        raise ServeError(f"ComfyUI in {tree} does not accept these main.py arguments or does not import "
                         f"(exit status {r.returncode}):\n{tail}")
    return Probe(**{k: tuple(v) if k == "custom_node_dirs" else v for k, v in json.loads(found.group(1)).items()})


# --- decisions (pure) ----------------------------------------------------------------------------

def pack_links(custom_node_dirs, pack: Path = runtime.REPO_ROOT) -> list[Path]:
    """The entries of ``custom_node_dirs`` that are the pack's own folder (the pack itself, or a link to it)."""
    pack = Path(pack).resolve()
    found = []
    for d in map(Path, custom_node_dirs):
        if d.is_dir():
            found += [e for e in sorted(d.iterdir()) if e.is_dir() and e.resolve() == pack]
    return found


def custom_node_args(p: Probe, extra_yaml: Path, pack: Path = runtime.REPO_ROOT) -> list[str]:
    """The main.py arguments that make the pack a custom node: none when a custom-node folder already
    holds it, else ComfyUI's ``--extra-model-paths-config`` with ``extra_yaml`` where that ComfyUI
    supports a ``custom_nodes`` entry in it. Otherwise ServeError naming the link to make."""
    present = pack_links(p.custom_node_dirs, pack)
    if present:
        logger.info("the pack is a custom node of this ComfyUI already: %s", present[0])
        return []
    if p.extra_custom_nodes:
        logger.info("the pack is in none of this ComfyUI's custom-node folders (%s): adding it through "
                    "--extra-model-paths-config %s; the ComfyUI tree is not changed",
                    ", ".join(p.custom_node_dirs), extra_yaml)
        return ["--extra-model-paths-config", str(extra_yaml)]
    target = Path(p.custom_node_dirs[0]) / LINK_NAME if p.custom_node_dirs else Path("custom_nodes") / LINK_NAME
    raise ServeError(f"the pack {Path(pack).resolve()} is in none of this ComfyUI's custom-node folders "
                     f"({', '.join(p.custom_node_dirs) or 'none'}), and this ComfyUI has no option to add one. "
                     f"Make it a custom node and run again:\n  ln -s {Path(pack).resolve()} {target}")


def required_pins(requirements_text: str) -> dict[str, str]:
    """``{distribution: version}`` of the ``comfyui-*==version`` lines of a ComfyUI requirements.txt."""
    return {m.group(1).lower(): m.group(2) for m in
            re.finditer(r"^\s*(comfyui-[A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", requirements_text, re.MULTILINE)}


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _tree_pins(tree: Path) -> tuple[Path, dict[str, str]]:
    req = Path(tree) / "requirements.txt"
    return req, (required_pins(req.read_text(errors="replace")) if req.is_file() else {})


def frontend_error(tree: Path, installed=installed_version) -> str | None:
    """None when the frontend package is installed; else the message naming the pip command with the
    versions ``tree``'s requirements.txt pins (the frontend and its other comfyui-* packages not installed)."""
    if installed(FRONTEND) is not None:
        return None
    req, pins = _tree_pins(tree)
    missing = [f"{name}=={version}" for name, version in pins.items()
               if name == FRONTEND or installed(name) is None]
    if not any(m.startswith(FRONTEND + "==") for m in missing):
        missing.insert(0, FRONTEND)  # no pin in requirements.txt: the newest
    return (f"{FRONTEND} is not installed in this Python ({sys.executable}): ComfyUI's main.py serves its "
            f"web UI from it and stops without it. Install the version {req} pins:\n"
            f"  {sys.executable} -m pip install {' '.join(missing)}\n"
            f"(or give main.py --front-end-root DIR)")


def pin_warning(tree: Path, installed=installed_version) -> str | None:
    """None when every installed comfyui-* package ``tree`` pins has the pinned version; else a warning
    with the pip command. Not an error: ComfyUI itself only warns about another frontend version, but a
    workflow-templates package made for another ComfyUI can stop its start (0.3.64 with 0.11.44)."""
    req, pins = _tree_pins(tree)
    other = {name: (version, installed(name)) for name, version in pins.items()}
    other = {name: vs for name, vs in other.items() if vs[1] is not None and vs[1] != vs[0]}
    if not other:
        return None
    found = ", ".join(f"{name} {have} (pinned: {pinned})" for name, (pinned, have) in other.items())
    pip = " ".join(f"{name}=={pinned}" for name, (pinned, _) in other.items())
    return (f"{req} pins other versions than are installed: {found}. If main.py does not start, install "
            f"them:\n  {sys.executable} -m pip install {pip}")


# --- the command -------------------------------------------------------------------------------

def _write_extra_config(folder: Path, pack: Path) -> Path:
    """``folder/custom_nodes/<LINK_NAME>`` -> the pack, and the yaml naming that custom-node folder."""
    custom = folder / "custom_nodes"
    custom.mkdir()
    (custom / LINK_NAME).symlink_to(Path(pack).resolve(), target_is_directory=True)
    yaml = folder / "extra_model_paths.yaml"
    yaml.write_text(f"wan_w4a4_serve:\n  custom_nodes: {json.dumps(str(custom))}\n")
    return yaml


def _main_args(args) -> list[str]:
    main_args = list(args.main_args or [])
    return main_args[1:] if main_args[:1] == ["--"] else main_args


def run(args) -> int:
    try:
        tree = runtime.comfyui_tree(args.comfyui)
    except runtime.ComfyUINotFound as e:
        logger.error("%s", e)
        return 2
    main = tree / "main.py"
    if not main.is_file():
        logger.error("%s has no main.py: it is not a ComfyUI checkout that can serve", tree)
        return 2
    main_args = _main_args(args)
    # Outside the user's tree; removed when main.py returns or on SIGTERM (SIGKILL leaves it in the temp folder).
    folder = Path(tempfile.mkdtemp(prefix="wan_w4a4-serve-"))
    _remove_on_sigterm(folder)
    try:
        yaml = _write_extra_config(folder, runtime.REPO_ROOT)
        try:
            found = probe(tree, main_args, yaml, folder / "custom_nodes")
            main_args += custom_node_args(found, yaml)
        except HelpShown as e:
            sys.stdout.write(str(e))
            return 0
        except ServeError as e:
            logger.error("%s", e)
            return 2
        message = frontend_error(tree) if found.frontend_package_needed else None
        if message:
            logger.error("%s", message)
            return 2
        if (warning := pin_warning(tree)) is not None:
            logger.warning("%s", warning)
        if found.stand_ins:
            install_stand_ins(reasons=found.stand_ins)  # logs which and why
            logger.info("stand-ins for %s (they do not import here; Wan uses neither)", ", ".join(found.stand_ins))
        else:
            logger.info("torchvision and torchaudio import: no stand-ins")
        logger.info("starting %s %s", main, " ".join(main_args))
        return _run_main(main, main_args)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _remove_on_sigterm(folder: Path) -> None:
    """On SIGTERM, remove ``folder``, then terminate as the signal's default action would (a handler
    that raised SystemExit instead would wait for the server's threads)."""
    def handler(signum, frame):
        shutil.rmtree(folder, ignore_errors=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, handler)


def _run_main(main: Path, main_args: list) -> int:
    """ComfyUI's main.py as ``python main.py ...`` runs it, in this process."""
    root = logging.getLogger()
    for handler in list(root.handlers):  # main.py sets up its own; ours would print each line twice
        root.removeHandler(handler)
    tree = str(main.parent)
    if tree in sys.path:
        sys.path.remove(tree)
    sys.path.insert(0, tree)
    sys.argv = [str(main), *main_args]
    try:
        runpy.run_path(str(main), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
