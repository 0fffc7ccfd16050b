"""The pack's model folder (``models/w4a4``, registered with ``folder_paths`` as ``"w4a4"``).

States and self-contained checkpoints both live there; the node lists tell them apart by the
``kind`` field of the safetensors header (read without touching tensor data, cached by mtime).
Every path a node reads or writes is resolved inside one of the folder's registered directories:
a name that escapes them (``..``, an absolute path, a link out) is refused.
"""
from __future__ import annotations

import json
import logging
import os
import re
import struct

import folder_paths

log = logging.getLogger(__name__)

FOLDER = "w4a4"
EXTENSIONS = {".safetensors"}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def register() -> None:
    """Add ``<models_dir>/w4a4`` (keeping folders an extra_model_paths.yaml already gave "w4a4")."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))


def folders() -> list[str]:
    register()
    return folder_paths.get_folder_paths(FOLDER)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


_kind_cache: dict[str, tuple[tuple[int, int], str | None]] = {}


def file_kind(path: str) -> str | None:
    """The header's ``kind`` ("state", "checkpoint"), or None if the file is not a readable W4A4 file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _kind_cache.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    kind = None
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if 0 < n <= _MAX_HEADER:
                meta = json.loads(f.read(n)).get("__metadata__") or {}
                if meta.get("format") == "wan-w4a4":
                    kind = meta.get("kind")
    except (OSError, ValueError, struct.error):
        kind = None
    _kind_cache[path] = (stamp, kind)
    return kind


def list_files(kind: str | None = None) -> list[str]:
    """Names (relative to the folder) of the W4A4 files of ``kind``; files whose header cannot be read
    are listed under every kind, so that choosing one shows the reason it cannot be used."""
    register()
    names = folder_paths.get_filename_list(FOLDER)
    if kind is None:
        return names
    out = []
    for name in names:
        path = folder_paths.get_full_path(FOLDER, name)
        k = file_kind(path) if path else None
        if k is None or k == kind:
            out.append(name)
    return out


def resolve(name: str) -> str:
    """The full path of an existing file ``name`` of the folder; refuses names outside it."""
    register()
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in re.split(r"[\\/]", name):
        raise ValueError(f"W4A4 file name {name!r} is not a plain name inside models/{FOLDER}")
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise FileNotFoundError(f"no W4A4 file named {name!r} in {', '.join(folders())} "
                                f"(put states and checkpoints in models/{FOLDER}/ and refresh the page)")
    if not any(_inside(path, d) for d in folders()):
        raise ValueError(f"W4A4 file {name!r} resolves outside models/{FOLDER} ({path})")
    return path


_SAFE_NAME = re.compile(r"[\w\-. ]+(/[\w\-. ]+)*")


def output_path(name: str) -> str:
    """Where a node writes ``name`` (adds .safetensors); sub-folders allowed, nothing outside the folder."""
    name = (name or "").strip().replace("\\", "/")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    parts = name.split("/")
    if not _SAFE_NAME.fullmatch(name) or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise ValueError(f"output name {name!r} must be a plain file name (letters, digits, _ - . and spaces; "
                         f"optional sub-folders), without '..' or a leading dot")
    folder = folders()[0]
    path = os.path.join(folder, *parts)
    for check in (False, True):  # before creating sub-folders, and after (a link among them)
        if not _inside(os.path.dirname(path), folder):
            raise ValueError(f"output name {name!r} resolves outside models/{FOLDER}")
        if not check:
            os.makedirs(os.path.dirname(path), exist_ok=True)
    return path
