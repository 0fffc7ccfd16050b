"""Calibration sets: N (start image, prompt) pairs, each with a negative prompt and a seed, read from a
folder, and their encoding into :class:`~.capture.CalibrationItem` as the Wan2.2 I2V template graph
encodes one pair.

A set is a folder holding the start images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``) and ONE prompts
file:

- ``prompts.txt``: one prompt per line, matched to the images in sorted file-name order (Python's
  ``sorted`` of the names); the numbers of prompts and images must match. Trailing blank lines are
  ignored, a blank line between prompts is an error.
- ``prompts.jsonl``: one JSON object per line, ``{"image": "a.png", "prompt": "...", "negative":
  "...", "seed": 3}``; ``image`` and ``prompt`` are required, ``image`` is a path inside the folder.
  Blank lines are skipped. Images the file does not name are not used.

What a pair leaves out is filled in: the negative prompt with ``negative`` (by default the official
Wan2.2 template's, :data:`WAN_NEGATIVE`), the seed with ``seed + index`` (index: the pair's position in
the set). Every problem is a :class:`CalibrationSetError` naming the file, the line and what is wrong.

Parsing and validation (:func:`load_set`, :func:`check_images`) need neither ComfyUI nor a model, so a
bad set is refused before anything is loaded. :func:`encode_set` needs an initialised ComfyUI: it calls
ComfyUI's own ``LoadImage``, ``CLIPTextEncode`` and ``WanImageToVideo`` nodes (so images decode exactly
as the template's LoadImage decodes them: ComfyUI 0.33 reads them with PyAV, 0.3.64 with PIL).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from .capture import CalibrationError, CalibrationItem

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PROMPTS_TXT = "prompts.txt"
PROMPTS_JSONL = "prompts.jsonl"
JSONL_KEYS = ("image", "prompt", "negative", "seed")
SEED_LIMIT = 2**64  # KSamplerAdvanced's noise_seed range: 0 .. 0xffffffffffffffff

# The negative prompt of ComfyUI's Wan2.2 14B I2V template (its "CLIP Text Encode (Negative Prompt)"
# node, node 7 of example_workflows/wan22_i2v_14b_w4a4.json), the negative every set item gets by default.
WAN_NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
                "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
                "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


class CalibrationSetError(CalibrationError):
    """A calibration set that cannot be used; the message names the file, the line and the problem."""


@dataclasses.dataclass(frozen=True)
class SetEntry:
    """One pair of a calibration set. ``where``: the line it came from (for messages)."""

    image: Path
    prompt: str
    negative: str
    seed: int
    where: str


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    folder: Path
    entries: tuple[SetEntry, ...]
    source: str  # the prompts file, or "prompts text" when the prompts were given as text

    def __len__(self) -> int:
        return len(self.entries)


@dataclasses.dataclass(frozen=True)
class EncodeSize:
    """What ``WanImageToVideo`` is given: width and height in pixels (multiples of 16, as its widgets
    step: Wan's latent is 1/8 of them and its patches 2 latent pixels), length in frames (1 + 4k: the
    VAE's first frame alone, then 4 frames per latent frame)."""

    width: int
    height: int
    length: int

    def __post_init__(self):
        for what in ("width", "height"):
            v = getattr(self, what)
            if not isinstance(v, int) or v < 16 or v % 16:
                raise CalibrationSetError(f"{what} must be a positive multiple of 16, got {v!r}")
        if not isinstance(self.length, int) or self.length < 1 or (self.length - 1) % 4:
            raise CalibrationSetError(f"length (frames) must be 1 + 4k for Wan's latent layout, got {self.length!r}")


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

def image_files(folder: Path) -> list[Path]:
    """The start images directly in ``folder`` (not hidden), in sorted file-name order."""
    return sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)


def _lines(text: str) -> list[tuple[int, str]]:
    """(line number from 1, line) without line ends, trailing blank lines dropped."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return list(enumerate(lines, start=1))


def parse_txt(text: str, images: Sequence[Path], where: str) -> list[tuple[Path, str, str | None, int | None, str]]:
    """``prompts.txt``: (image, prompt, None, None, where) per line, matched to ``images`` in order."""
    rows = []
    for n, line in _lines(text):
        prompt = line.strip()
        if not prompt:
            raise CalibrationSetError(f"{where}, line {n}: empty prompt (one prompt per line, matched to the "
                                      "images in sorted file-name order; remove the blank line)")
        rows.append((n, prompt))
    if len(rows) != len(images):
        names = ", ".join(p.name for p in images[:8]) + (", ..." if len(images) > 8 else "")
        raise CalibrationSetError(f"{where}: {len(rows)} prompts for {len(images)} images ({names or 'none'}); "
                                  "prompts.txt needs one line per image, in sorted file-name order")
    return [(img, prompt, None, None, f"{where}, line {n}") for img, (n, prompt) in zip(images, rows)]


def path_inside(base: Path, name, what: str) -> Path:
    """``base / name`` for a relative ``name`` that stays inside ``base`` (also after symlinks), else a
    CalibrationSetError that starts with ``what``. The path must exist."""
    if not isinstance(name, str) or not name.strip():
        raise CalibrationSetError(f"{what}: expected a non-empty relative path, got {name!r}")
    rel = Path(name.strip())
    if rel.is_absolute() or ".." in rel.parts:
        raise CalibrationSetError(f"{what}: {name!r} is not inside {base} (give a path relative to it, "
                                  "without '..')")
    path = base / rel
    try:  # a symlink may point out of the folder
        path.resolve(strict=True).relative_to(base.resolve())
    except FileNotFoundError:
        raise CalibrationSetError(f"{what}: {name!r} does not exist in {base}") from None
    except ValueError:
        raise CalibrationSetError(f"{what}: {name!r} resolves outside {base}") from None
    return path


def _image_in(folder: Path, name, at: str) -> Path:
    """``name`` from a prompts file, as a path inside ``folder`` that is an image file."""
    path = path_inside(folder, name, f"{at}: image")
    if not path.is_file():
        raise CalibrationSetError(f"{at}: image {name!r} in {folder} is not a file")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise CalibrationSetError(f"{at}: image {name!r} is not a {'/'.join(IMAGE_SUFFIXES)} file")
    return path


def _jsonl_row(obj, folder: Path, at: str) -> tuple[Path, str, str | None, int | None, str]:
    if not isinstance(obj, dict):
        raise CalibrationSetError(f"{at}: expected a JSON object such as {{\"image\": \"a.png\", \"prompt\": "
                                  f"\"...\"}}, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(JSONL_KEYS))
    if unknown:
        raise CalibrationSetError(f"{at}: unknown key(s) {', '.join(map(repr, unknown))}; the keys are "
                                  f"{', '.join(JSONL_KEYS)}")
    for key in ("image", "prompt"):
        if key not in obj:
            raise CalibrationSetError(f"{at}: missing \"{key}\"")
    image = _image_in(folder, obj["image"], at)
    prompt = obj["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise CalibrationSetError(f"{at}: empty prompt (\"prompt\" must be a non-empty string)")
    negative = obj.get("negative")
    if negative is not None and not isinstance(negative, str):
        raise CalibrationSetError(f"{at}: \"negative\" must be a string, got {type(negative).__name__}")
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT):
        raise CalibrationSetError(f"{at}: \"seed\" must be an integer in 0..2**64-1, got {seed!r}")
    return image, prompt.strip(), negative, seed, at


def parse_jsonl(text: str, folder: Path, where: str) -> list[tuple[Path, str, str | None, int | None, str]]:
    """``prompts.jsonl``: (image, prompt, negative or None, seed or None, where) per non-blank line."""
    rows, seen = [], {}
    for n, line in _lines(text):
        if not line.strip():
            continue
        at = f"{where}, line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationSetError(f"{at}: not valid JSON ({e.msg} at column {e.colno})") from None
        row = _jsonl_row(obj, folder, at)
        key = row[0].resolve()
        if key in seen:
            raise CalibrationSetError(f"{at}: image {obj['image']!r} is already used by {seen[key]}; each image "
                                      "appears once")
        seen[key] = f"line {n}"
        rows.append(row)
    if not rows:
        raise CalibrationSetError(f"{where}: no items (one JSON object per line)")
    return rows


def is_jsonl_text(text: str) -> bool:
    """Whether prompts given as text are JSON lines: their first non-blank line starts with '{'."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first.startswith("{")


def load_set(folder, *, prompts_text: str | None = None, negative: str | None = None, seed: int = 0) -> CalibrationSet:
    """The calibration set in ``folder``, parsed and checked (the images are not opened: :func:`check_images`).

    prompts_text: prompts given as text instead of the folder's prompts file (JSON lines when its first
    non-blank line starts with '{', else one prompt per line). negative: the negative prompt of items
    without one (None: :data:`WAN_NEGATIVE`). seed: item i without a seed gets ``seed + i``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationSetError(f"calibration set {folder}: no such folder")
    if not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise CalibrationSetError(f"calibration set {folder}: seed must be an integer in 0..2**64-1, got {seed!r}")
    negative = WAN_NEGATIVE if negative is None else negative
    if prompts_text is not None and prompts_text.strip():
        where = f"prompts text (for {folder})"
        source, text, jsonl = "prompts text", prompts_text, is_jsonl_text(prompts_text)
    else:
        present = [folder / f for f in (PROMPTS_TXT, PROMPTS_JSONL) if (folder / f).is_file()]
        if not present:
            raise CalibrationSetError(f"calibration set {folder}: no {PROMPTS_TXT} or {PROMPTS_JSONL} (one prompt "
                                      "per line, or one JSON object per line)")
        if len(present) > 1:
            raise CalibrationSetError(f"calibration set {folder}: both {PROMPTS_TXT} and {PROMPTS_JSONL}; keep one")
        path = present[0]
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise CalibrationSetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        where, source, jsonl = str(path), str(path), path.name == PROMPTS_JSONL
    rows = parse_jsonl(text, folder, where) if jsonl else parse_txt(text, image_files(folder), where)
    if jsonl:
        unused = sorted({p.name for p in image_files(folder)} - {r[0].name for r in rows if r[0].parent == folder})
        if unused:
            log.info("calibration set %s: %d image(s) not named in %s, not used: %s", folder, len(unused), where,
                     ", ".join(unused[:8]) + (", ..." if len(unused) > 8 else ""))
    if seed + len(rows) - 1 >= SEED_LIMIT:
        raise CalibrationSetError(f"calibration set {folder}: seed {seed} + {len(rows) - 1} passes 2**64-1")
    entries = tuple(SetEntry(image=img, prompt=p, negative=negative if neg is None else neg,
                             seed=seed + i if s is None else s, where=at)
                    for i, (img, p, neg, s, at) in enumerate(rows))
    return CalibrationSet(folder=folder, entries=entries, source=source)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def check_images(cset: CalibrationSet) -> None:
    """Decodes every image of the set once with PIL, so that a broken one stops the run before models
    load. (Encoding reads them with ComfyUI's own LoadImage: :func:`encode_set`.)"""
    from PIL import Image

    for e in cset.entries:
        try:
            with Image.open(e.image) as img:
                img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for unreadable or truncated files
            raise CalibrationSetError(f"{e.image} ({e.where}): not a readable image "
                                      f"({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------------------------------------
# Encoding (ComfyUI's own nodes)
# ---------------------------------------------------------------------------------------------

def run_node(node_cls, **inputs) -> tuple:
    """A ComfyUI node's outputs, whichever API the node class has: a V3 ``io.ComfyNode`` (a classmethod
    ``execute`` returning a NodeOutput) or a classic node (``FUNCTION`` names the method)."""
    if hasattr(node_cls, "define_schema") and callable(getattr(node_cls, "execute", None)):
        out = node_cls.execute(**inputs)
        return tuple(out.result) if hasattr(out, "result") else tuple(out)
    return tuple(getattr(node_cls(), node_cls.FUNCTION)(**inputs))


def input_name(image: Path) -> str:
    """``image`` as LoadImage names it: a path relative to ComfyUI's input directory (LoadImage reads
    only from there; ComfyUI 0.33 refuses any other path)."""
    import folder_paths

    base = Path(folder_paths.get_input_directory())
    try:
        return image.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        raise CalibrationSetError(f"{image}: not inside ComfyUI's input directory {base}, where LoadImage "
                                  "reads images") from None


def encode_pair(clip, vae, image: Path, prompt: str, negative: str, size: EncodeSize, _cache: dict | None = None):
    """``(positive, negative, latent)`` of one pair, as the template graph makes them: LoadImage on the
    start image (``image`` must lie in ComfyUI's input directory), CLIPTextEncode on both prompts, then
    WanImageToVideo(width, height, length, batch 1, start_image). ``_cache``: text -> conditioning
    already encoded with this clip (the encoder is deterministic)."""
    from comfy_extras.nodes_wan import WanImageToVideo

    import nodes

    cache = {} if _cache is None else _cache

    def text(t):
        if t not in cache:
            (cache[t],) = run_node(nodes.CLIPTextEncode, clip=clip, text=t)
        return cache[t]

    start_image = run_node(nodes.LoadImage, image=input_name(image))[0]
    return run_node(WanImageToVideo, positive=text(prompt), negative=text(negative), vae=vae, width=size.width,
                    height=size.height, length=size.length, batch_size=1, start_image=start_image)


Progress = Callable[[int, int, str], None]


def encode_set(cset: CalibrationSet, clip, vae, size: EncodeSize, progress: Progress | None = None,
               cancel: Callable[[], object] | None = None) -> list[CalibrationItem]:
    """The set's CalibrationItems (one per pair, in set order, each with its seed). The images must lie in
    ComfyUI's input directory (the node's folder does; the command line makes the set's folder its input
    directory). progress(done, total, what) after each item; cancel() before each (it may raise, as
    ComfyUI's interrupt check does)."""
    if not cset.entries:
        raise CalibrationSetError(f"calibration set {cset.folder}: no items")
    cache: dict = {}
    items = []
    for i, e in enumerate(cset.entries):
        if cancel is not None:
            cancel()
        positive, negative, latent = encode_pair(clip, vae, e.image, e.prompt, e.negative, size, cache)
        items.append(CalibrationItem(positive, negative, latent["samples"], seed=e.seed))
        if progress is not None:
            progress(i + 1, len(cset.entries), e.image.name)
    log.info("encoded %d calibration items from %s at %dx%d, %d frames", len(items), cset.source, size.width,
             size.height, size.length)
    return items
