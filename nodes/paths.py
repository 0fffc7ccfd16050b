"""The pack's model folder (``models/w4a4``, registered with ``folder_paths`` as ``"w4a4"``).

States and self-contained checkpoints both live there; the node lists tell them apart by the
``kind`` field of the safetensors header (read without touching tensor data, cached by mtime).
Every path a node reads or writes is resolved inside one of the folder's registered directories:
a name that escapes them (``..``, an absolute path, a link out) is refused.
"""
from __future__ import annotations

import logging
import os
import re

import folder_paths

log = logging.getLogger(__name__)

FOLDER = "w4a4"
EXTENSIONS = {".safetensors"}


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


def header_kind(path: str) -> tuple[str | None, str]:
    """(the header's ``kind``, "") of a W4A4 file, or (None, why it is not one). Reads the header only,
    through the format module's checks, and never raises: one bad file must not break the listing."""
    from ..kernels import format as fmt

    try:
        meta = fmt.read_header(path)
    except Exception as e:  # noqa: BLE001 - any reason at all means "not listed", with the reason logged
        return None, str(e)
    if meta.get("format") != fmt.FORMAT_NAME:
        return None, f"not a W4A4 file (header format {meta.get('format')!r})"
    if meta.get("kind") not in fmt.KINDS:
        return None, f"header kind {meta.get('kind')!r} is neither 'state' nor 'checkpoint'"
    return meta["kind"], ""


_warned: set[tuple[str, str]] = set()


def _warn_once(path: str, why: str) -> None:
    if (path, why) not in _warned:
        _warned.add((path, why))
        log.warning("W4A4 folder: skipping %s", why if path in why else f"{path}: {why}")


def file_kind(path: str) -> str | None:
    """The header's ``kind`` ("state", "checkpoint"), or None if the file is not a readable W4A4 file
    (logged once per file version, with the reason). Cached by mtime and size."""
    try:
        st = os.stat(path)
    except OSError as e:  # a dangling link, say
        _warn_once(path, e.strerror or str(e))
        return None
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _kind_cache.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    kind, why = header_kind(path)
    if kind is None:
        _warn_once(path, why)
    _kind_cache[path] = (stamp, kind)
    return kind


def list_files(kind: str | None = None) -> list[str]:
    """Names (relative to the folder) of the readable W4A4 files of ``kind`` (None: of both kinds).
    Files whose header cannot be read are left out and logged once each, by name: a broken file must
    not take the nodes that list the folder off the server. Stale temporary files of interrupted saves
    are removed on the way (``format.remove_stale_temps``)."""
    from ..kernels import format as fmt

    register()
    for folder in folders():
        for sub, _, _ in os.walk(folder):
            fmt.remove_stale_temps(sub)
    out = []
    for name in folder_paths.get_filename_list(FOLDER):
        path = folder_paths.get_full_path(FOLDER, name)
        k = file_kind(path) if path else None
        if k is not None and (kind is None or k == kind):
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
