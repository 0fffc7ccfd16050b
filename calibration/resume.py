"""Resumable calibration: the work folder that lets a cancelled, crashed or killed run go on.

``<out_dir>/.<name>.w4a4-work/`` (hidden, beside the outputs, named after them) holds the finished
part of a run:

    lock                    O_EXCL file with "<pid> <host>": one run per output name at a time
    manifest.json           the key of everything that decides the result (``run_key``) and, once
                            each expert is loaded, its weights' fingerprint and the compute device
    <expert>.info.json      the expert's run info so far (timesteps and rows seen, timings)
    <expert>.layer.<layer>.tensors   one finished layer: its W4A4Params and its report LayerRecord
    <expert>.done.tensors   a finished expert: its info (and, for the high expert, the output
                            latents, which are the low expert's start)

Every file is written atomically (``format.write_bytes``: temporary file + rename) and carries a
SHA-256 of its content, checked on reading: a damaged layer or expert file is discarded with a
warning and its work redone. ``.tensors`` files are safetensors (never pickle) whose header says
``format = "wan-w4a4-calibration-work"``. They are never taken for states: ComfyUI lists
``models/w4a4`` by suffix, hidden folders included (``folder_paths.recursive_search`` walks every
sub-folder), and only ``.safetensors`` is listed; ``format.load_state`` refuses any other suffix and any
other header format.

A run started again with the same key resumes: finished experts are not sampled again, a pass whose
layers are all saved is skipped, and a pass cut short is sampled again (capture is seeded, so it is
the same) and quantizes only its missing layers. The states are then bit-identical to those of an
uninterrupted run. The folder is removed once the states and the report are written.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import __version__
from ..kernels import format as fmt
from ..kernels import numerics
from . import report as rpt
from .capture import CalibrationError, CalibrationItem, LayerSpec
from .config import CalibrationConfig

log = logging.getLogger(__name__)

WORK_FORMAT = "wan-w4a4-calibration-work"
WORK_VERSION = 1
WORK_SUFFIX = ".tensors"  # never fmt.SUFFIX: ComfyUI would list the file as a state (see module doc)
# Config fields that do not change the result: where it goes (the folder is named after them) and
# whether existing outputs may be replaced.
NOT_KEYED = ("out_dir", "name", "overwrite")
# Test hook (tests/calibration/test_resume.py): "<event>:<n>" kills this process with SIGKILL at its
# n-th <event> ("layer": a layer saved, "expert": an expert saved, "step": a sampling step), as kill -9 would;
# "<event>:<n>@<rank>" only the process of that rank in a run over several (tests/calibration/test_distributed.py).
KILL_ENV = "WAN_W4A4_TEST_KILL_AFTER"
_kill_counts: collections.Counter = collections.Counter()


class WorkFolderBusy(CalibrationError):
    """Another live process calibrates to the same output name."""


def kill_point(event: str) -> None:
    """The test hook of ``KILL_ENV``; does nothing unless that variable names ``event``."""
    spec, _, rank = os.environ.get(KILL_ENV, "").partition("@")
    want, _, n = spec.partition(":")
    if want != event or (rank and rank != os.environ.get("RANK", "0")):
        return
    _kill_counts[event] += 1
    if _kill_counts[event] == int(n):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def work_path(config: CalibrationConfig) -> Path:
    return Path(config.out_dir) / f".{config.name}.w4a4-work"


# ---------------------------------------------------------------------------------------------
# The key
# ---------------------------------------------------------------------------------------------

def _feed(h, obj, shallow: bool = False) -> None:
    """Hash ``obj`` (tensors, numbers, strings, lists, dicts) into ``h``. Other objects (a ComfyUI
    conditioning may hold some) contribute their type and their tensor and plain attributes: never
    a deeper object graph, which may reach a whole model."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"{type(obj).__name__}|{obj!r}|".encode())
    elif isinstance(obj, (list, tuple)) and not shallow:
        h.update(f"L{len(obj)}|".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, dict) and not shallow:
        h.update(f"D{len(obj)}|".encode())
        for k in sorted(obj, key=str):
            _feed(h, str(k))
            _feed(h, obj[k])
    else:
        h.update(f"O|{type(obj).__qualname__}|".encode())
        if not shallow and hasattr(obj, "__dict__"):
            for k in sorted(vars(obj)):
                _feed(h, k)
                _feed(h, vars(obj)[k], shallow=True)


def items_digest(items: Sequence[CalibrationItem]) -> str:
    """SHA-256 of the calibration items: conditioning, start latents and seeds, in order."""
    h = hashlib.sha256(b"wan-w4a4 calibration items\0")
    for it in items:
        _feed(h, [it.positive, it.negative, it.latent, it.seed])
    return h.hexdigest()


def _comfyui_version() -> str | None:
    try:
        import comfyui_version
    except ImportError:
        return None
    return getattr(comfyui_version, "__version__", None)


def run_key(config: CalibrationConfig, items: Sequence[CalibrationItem]) -> dict:
    """Everything but the models that decides the result (the models: ``WorkFolder.check_model``)."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in NOT_KEYED}
    key = {"config": cfg, "items": items_digest(items),
           "runtime": {"wan_w4a4": __version__, "torch": torch.__version__, "comfyui": _comfyui_version()}}
    return json.loads(json.dumps(key))  # as it reads back: tuples become lists


def _differences(saved, now, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now)):
            out += _differences(saved.get(k), now.get(k), f"{where}.{k}" if where else k)
        return out
    if saved == now:
        return []
    if where == "items":
        return ["the calibration items (prompts, images, latents or seeds)"]
    return [f"{where}: {saved!r} then, {now!r} now"]


# ---------------------------------------------------------------------------------------------
# Files: safetensors for tensors, JSON for the rest, each with a SHA-256 of its content
# ---------------------------------------------------------------------------------------------

def _digest(payload: str, tensors: dict) -> str:
    h = hashlib.sha256(payload.encode())
    for k in sorted(tensors):
        _feed(h, k)
        _feed(h, tensors[k])
    return h.hexdigest()


def _write_tensors(path: Path, kind: str, payload: dict, tensors: dict, overwrite: bool = False) -> None:
    from safetensors.torch import save

    text = json.dumps(payload)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {"format": WORK_FORMAT, "version": str(WORK_VERSION), "kind": kind, "payload": text,
            "sha256": _digest(text, tensors)}
    fmt.write_bytes(path, save(tensors, metadata=meta), overwrite=overwrite)


def _read_tensors(path: Path, kind: str) -> tuple[dict, dict]:
    """(payload, tensors) of a work file; ValueError saying what is wrong otherwise."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 - safe_open is no mapping
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:  # truncated or garbled
        raise ValueError(f"not a readable safetensors file ({e})") from None
    if meta.get("format") != WORK_FORMAT or meta.get("version") != str(WORK_VERSION) or meta.get("kind") != kind:
        raise ValueError(f"header says format {meta.get('format')!r} version {meta.get('version')!r} kind "
                         f"{meta.get('kind')!r}, expected {WORK_FORMAT!r} {WORK_VERSION} {kind!r}")
    text = meta.get("payload", "")
    if meta.get("sha256") != _digest(text, tensors):
        raise ValueError("content does not match its SHA-256 (damaged)")
    return json.loads(text), tensors


def _write_json(path: Path, payload: dict, overwrite: bool) -> None:
    text = json.dumps(payload, sort_keys=True)
    doc = {"format": WORK_FORMAT, "version": WORK_VERSION, "sha256": hashlib.sha256(text.encode()).hexdigest(),
           "payload": payload}
    fmt.write_bytes(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode(), overwrite=overwrite)


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        payload = doc["payload"]
        ok = (doc.get("format") == WORK_FORMAT and doc.get("version") == WORK_VERSION and isinstance(payload, dict)
              and doc.get("sha256") == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"not a readable work file ({e})") from None
    if not ok:
        raise ValueError("damaged or of another version (format, version or SHA-256 do not match)")
    return payload


# ---------------------------------------------------------------------------------------------
# Layers and experts
# ---------------------------------------------------------------------------------------------

_PARAM_TENSORS = ("qweight", "wscale", "wfactor", "smooth", "lr_down", "lr_up", "clip", "bias")


def layer_payload(p: numerics.W4A4Params, rec: rpt.LayerRecord) -> tuple[dict, dict]:
    """(JSON payload, tensors) of a finished layer, as its work file holds it."""
    tensors = {f: getattr(p, f) for f in _PARAM_TENSORS if getattr(p, f) is not None}
    return {"act_unsigned": p.act_unsigned, "act_shift": p.act_shift, "record": dataclasses.asdict(rec)}, tensors


def layer_from_payload(payload: dict, tensors: dict) -> tuple[numerics.W4A4Params, rpt.LayerRecord]:
    """The layer of :func:`layer_payload`."""
    rec = rpt.LayerRecord(**{**payload["record"], "grid": tuple(payload["record"]["grid"])})
    p = numerics.W4A4Params(**tensors, act_unsigned=bool(payload["act_unsigned"]),
                            act_shift=float(payload["act_shift"]))
    return p, rec


def _layer_from(payload: dict, tensors: dict, spec: LayerSpec, expert: str,
                bins: int) -> tuple[numerics.W4A4Params, rpt.LayerRecord]:
    p, rec = layer_from_payload(payload, tensors)
    if (rec.name, rec.expert) != (spec.name, expert):
        raise ValueError(f"holds {rec.expert} {rec.name}")
    if (p.in_features, p.out_features, p.num_bins) != (spec.in_features, spec.out_features, bins):
        raise ValueError(f"holds a {p.out_features}x{p.in_features} layer with {p.num_bins} bins, expected "
                         f"{spec.out_features}x{spec.in_features} with {bins}")
    return p, rec


@dataclasses.dataclass
class WorkFolder:
    """The work folder of one run, locked by this process (``open``)."""

    path: Path
    bins: int
    manifest: dict = dataclasses.field(default_factory=dict)  # {"key": run_key, "models": {expert: identity}}

    # --- lifetime ---------------------------------------------------------------------------
    @classmethod
    def open(cls, config: CalibrationConfig, key: dict, restart: bool = False) -> WorkFolder:
        """Lock the work folder of ``config``'s outputs and check its key (before any long work).
        ``restart`` discards what it holds. A folder of another key is an error that names it."""
        path = work_path(config)
        path.mkdir(parents=True, exist_ok=True)
        work = cls(path, config.bins)
        work._lock()
        try:
            work._start(key, restart)
        except BaseException:
            work.close()
            raise
        return work

    def _start(self, key: dict, restart: bool) -> None:
        for entry in os.scandir(self.path):  # we hold the lock: temporary files are from killed writers
            if fmt.TEMP_RE.match(entry.name):
                os.unlink(entry.path)
        manifest = self.path / "manifest.json"
        if restart:
            self._clear()
        elif manifest.exists():
            try:
                saved = _read_json(manifest)
            except ValueError as e:
                raise CalibrationError(f"{manifest}: {e}; {self._discard_hint()}") from None
            diffs = _differences(saved.get("key"), key)
            if diffs:
                raise CalibrationError(
                    f"{self.path} holds an interrupted calibration to the same output name with other settings: "
                    f"{'; '.join(diffs)}. Start again with the same settings to resume it; {self._discard_hint()}")
            self.manifest = saved
            log.info("resuming the interrupted calibration in %s (%d finished layers)", self.path,
                     len(list(self.path.glob(f"*.layer.*{WORK_SUFFIX}"))))
            return
        elif any(not p.name.startswith("lock") for p in self.path.iterdir()):
            raise CalibrationError(f"{self.path} holds files but no manifest.json; {self._discard_hint()}")
        self.manifest = {"key": key, "models": {}}
        _write_json(manifest, self.manifest, overwrite=True)

    def _discard_hint(self) -> str:
        return f"to discard it and start over, pass --restart (command line) or delete the folder {self.path}"

    def _clear(self) -> None:
        for p in self.path.iterdir():
            if p.name != "lock":
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        log.info("restart: discarded the work saved in %s", self.path)

    def has_work(self) -> bool:
        """Whether a finished layer or expert is saved (else there is nothing to resume from)."""
        try:
            return any(p.suffix == WORK_SUFFIX for p in self.path.iterdir())
        except OSError:  # the folder is gone
            return False

    def close(self, remove: bool = False) -> None:
        """Unlock; ``remove`` deletes the folder (the run is done, or left nothing to resume)."""
        if remove:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            (self.path / "lock").unlink()
        except FileNotFoundError:
            pass

    # --- the lock ---------------------------------------------------------------------------
    def _lock(self) -> None:
        lock = self.path / "lock"
        for _ in range(3):
            try:
                _create_lock(lock)
            except FileExistsError:
                owner = _read_lock(lock)
                if owner is None or _owner_alive(owner) is not False:
                    raise WorkFolderBusy(
                        f"another calibration to this output name is running (process {owner or '?'}, lock file "
                        f"{lock}); wait for it to finish, or, if no calibration is running, delete {lock}") from None
                self._break_stale(lock, owner)
                continue
            return
        raise WorkFolderBusy(f"could not take the lock {lock}: other processes keep taking it")

    @staticmethod
    def _break_stale(lock: Path, owner: str) -> None:
        """Remove a lock whose process is dead, unless another process replaced it meanwhile."""
        aside = lock.with_name(f"lock.stale-{os.getpid()}")
        try:
            os.replace(lock, aside)
        except FileNotFoundError:
            return
        if _read_lock(aside) != owner:  # a live lock taken between our read and the rename: give it back
            try:
                os.link(aside, lock)
            except FileExistsError:
                pass
            except OSError:  # no hard links on this file system
                if not lock.exists():
                    os.replace(aside, lock)
                    return
        else:
            log.warning("removed the lock %s of process %s, which is no longer running", lock, owner)
        aside.unlink()

    # --- models -----------------------------------------------------------------------------
    def check_model(self, expert: str, identity: dict) -> None:
        """Record the expert's identity (fingerprint of its weights, compute device) the first time;
        later, refuse another one."""
        saved = self.manifest["models"].get(expert)
        if saved is None:
            self.manifest["models"][expert] = identity
            _write_json(self.path / "manifest.json", self.manifest, overwrite=True)
            return
        diffs = _differences(saved, json.loads(json.dumps(identity)), f"{expert} expert")
        if diffs:
            raise CalibrationError(
                f"{self.path} holds an interrupted calibration of another {expert}-noise model or device: "
                f"{'; '.join(diffs)}. Start again with the same model to resume it; {self._discard_hint()}")

    # --- layers -----------------------------------------------------------------------------
    def _layer_file(self, expert: str, name: str) -> Path:
        return self.path / f"{expert}.layer.{name}{WORK_SUFFIX}"

    def save_layer(self, expert: str, p: numerics.W4A4Params, rec: rpt.LayerRecord) -> None:
        payload, tensors = layer_payload(p, rec)
        _write_tensors(self._layer_file(expert, rec.name), "layer", payload, tensors)

    def load_layers(self, expert: str, specs: Sequence[LayerSpec]) -> dict:
        """name -> (W4A4Params, LayerRecord) of the saved layers among ``specs``; a damaged file is
        deleted with a warning (its layer is then quantized again)."""
        out = {}
        for spec in specs:
            path = self._layer_file(expert, spec.name)
            if not path.exists():
                continue
            try:
                out[spec.name] = _layer_from(*_read_tensors(path, "layer"), spec, expert, self.bins)
            except (ValueError, TypeError, KeyError) as e:
                log.warning("%s: discarded (%s); the layer is quantized again", path, e)
                path.unlink()
        return out

    # --- experts ----------------------------------------------------------------------------
    def save_info(self, expert: str, info: dict) -> None:
        _write_json(self.path / f"{expert}.info.json", info, overwrite=True)

    def load_info(self, expert: str) -> dict | None:
        path = self.path / f"{expert}.info.json"
        if not path.exists():
            return None
        try:
            return _read_json(path)
        except ValueError as e:
            log.warning("%s: discarded (%s)", path, e)
            path.unlink()
            return None

    def save_expert(self, expert: str, info: dict, latents: Sequence[torch.Tensor] | None) -> None:
        tensors = {f"latent.{i}": t for i, t in enumerate(latents or [])}
        # overwrite: a done file may be left from a run whose layer files were damaged since
        _write_tensors(self.path / f"{expert}.done{WORK_SUFFIX}", "expert", {"info": info}, tensors, overwrite=True)

    def load_expert(self, expert: str, n_items: int) -> tuple[dict, list[torch.Tensor]] | None:
        """(info, output latents) of a finished expert, or None (not finished, or its file damaged)."""
        path = self.path / f"{expert}.done{WORK_SUFFIX}"
        if not path.exists():
            return None
        try:
            payload, tensors = _read_tensors(path, "expert")
            latents = [tensors[f"latent.{i}"] for i in range(len(tensors))]
            if latents and len(latents) != n_items:
                raise ValueError(f"holds {len(latents)} latents for {n_items} items")
            return payload["info"], latents
        except (ValueError, KeyError, TypeError) as e:
            log.warning("%s: discarded (%s); the %s expert's passes are checked again", path, e, expert)
            path.unlink()
            return None


def _create_lock(lock: Path) -> None:
    """Create ``lock`` holding "<pid> <host>", or FileExistsError. The content is written first and the
    file then linked into place, so that a lock is never seen empty (a crash in between leaves only a
    temporary file)."""
    tmp = lock.with_name(f"lock.{os.getpid()}.tmp")
    tmp.write_text(f"{os.getpid()} {socket.gethostname()}")
    try:
        os.link(tmp, lock)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system: create it exclusively, then fill it
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(tmp.read_text())
    finally:
        tmp.unlink()


def _read_lock(lock: Path) -> str | None:
    try:
        return lock.read_text().strip() or None
    except OSError:
        return None


def _owner_alive(owner: str) -> bool | None:
    """Whether the process "<pid> <host>" of a lock runs (None: cannot tell, e.g. another host)."""
    pid, _, host = owner.partition(" ")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    return fmt.pid_alive(int(pid))
