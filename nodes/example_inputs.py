"""The example workflows' input files (their Load Image start picture), put into ComfyUI's input folder.

ComfyUI has no way for a custom node pack's templates to bring input files: the server serves
``example_workflows/`` for the template browser only, and the frontend reports a Load Image whose file
is not in the input folder's listing (``LoadImage.INPUT_TYPES``) as a missing input. So the pack ships
its own pictures in ``example_workflows/input/`` (made by ``docs/make_pictures.py``) and copies each
into ``folder_paths.get_input_directory()`` when ComfyUI loads the pack, only where no file of that name
is there: a user's file is never replaced, and a picture the user changed stays changed.

Runs at import time inside ComfyUI's start-up, so it is small, reads nothing but the few shipped
files, and never raises: a failure is a logged warning (the workflows then show the missing input).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..kernels import format as fmt

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parents[1] / "example_workflows" / "input"


def shipped_inputs(folder: Path = SOURCE) -> list[Path]:
    """The files the pack ships for ComfyUI's input folder, sorted by name (hidden files left out)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def install_inputs(sources: list[Path], input_dir: str) -> list[str]:
    """Copies each of ``sources`` into ``input_dir`` under its own name where nothing of that name
    exists (a file, a folder or a link, even a dangling one); returns the names copied. Each copy is
    written to a temporary name and published without replacing (``fmt.write_bytes``), so a file that
    appears meanwhile, from another ComfyUI say, is kept. Never raises: each failure is logged."""
    copied: list[str] = []
    try:
        os.makedirs(input_dir, exist_ok=True)
    except OSError as e:
        log.warning("WanW4A4: cannot create ComfyUI's input folder %s (%s); the example workflows' "
                    "Load Image will report its file as missing", input_dir, e.strerror or e)
        return copied
    for src in sources:
        dst = os.path.join(input_dir, src.name)
        if os.path.lexists(dst):
            continue
        try:
            fmt.write_bytes(dst, src.read_bytes())
        except FileExistsError:
            continue  # published by someone else since the check: theirs stays
        except OSError as e:
            log.warning("WanW4A4: cannot copy the example workflows' input %s into %s (%s); their Load "
                        "Image will report it as missing (copy it there by hand)", src.name, input_dir,
                        e.strerror or e)
            continue
        log.info("WanW4A4: copied the example workflows' input %s into %s", src.name, input_dir)
        copied.append(src.name)
    return copied


def install_example_inputs(folder_paths) -> list[str]:
    """``install_inputs`` of the shipped files into the input folder of ComfyUI's ``folder_paths``
    module (found by its ``get_input_directory``); never raises, whatever goes wrong."""
    get_input_directory = getattr(folder_paths, "get_input_directory", None)
    if get_input_directory is None:
        log.warning("WanW4A4: this ComfyUI's folder_paths has no get_input_directory; the example "
                    "workflows' inputs were not copied")
        return []
    try:
        return install_inputs(shipped_inputs(), get_input_directory())
    except Exception as e:  # noqa: BLE001 - called while ComfyUI imports the pack: nothing may escape
        log.warning("WanW4A4: could not copy the example workflows' inputs: %s", e)
        return []
