"""The W4A4 linear layer: one function, several backends.

``w4a4_linear(x, params, bin_index)`` computes the function that ``numerics`` defines, on the first
backend that can run the call:

- ``"triton"`` (``triton_w4a4``): CUDA inputs, Triton installed, and the kernel accepts the shapes
  (its ``unsupported_reason(x, params)`` returns None);
- ``"reference"`` (``numerics.w4a4_linear``): eager torch, runs anywhere.

The environment variable ``WAN_W4A4_BACKEND`` or the ``backend`` argument forces one; forcing a
backend that cannot run raises :class:`BackendUnavailable` with its reason ("auto" or "" = choose).
:func:`available_backends` lists, per backend, None or why it refuses (comfy-kitchen's habit).
A CUDA input that falls back to the reference logs a warning with the reason, once per reason: the
reference is orders of magnitude slower there (it does the integer product in float64).

``addcmul(a, b, c)`` is ``torch.addcmul`` bit for bit, in one Triton pass (``triton_rowwise``) for the broadcast forms
of a Wan block's modulation and residual updates on a GPU (``nodes/rowwise.py`` sends them here).

Importing this package does not import Triton: the Triton module is imported on the first call
that could use it (a CUDA input), and its import failure is remembered as the reason.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Callable, NamedTuple

import torch

from . import numerics
from .numerics import W4A4Params

log = logging.getLogger(__name__)

ENV_VAR = "WAN_W4A4_BACKEND"
PREFERENCE = ("triton", "reference")  # the order the default choice tries


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this call (the message says why)."""


_imports: dict[str, tuple[object | None, str | None]] = {}  # module name -> (module, import error), once per process


def _lazy(name: str):
    """``kernels.<name>`` (a Triton module), or (None, why it failed to import). Imported once, on first use."""
    if name not in _imports:
        try:
            _imports[name] = (importlib.import_module(f".{name}", __name__), None)
        except Exception as e:  # ImportError, or a Triton/driver failure at import time
            _imports[name] = (None, f"kernels.{name} failed to import: {type(e).__name__}: {e}")
            log.debug("%s", _imports[name][1])
    return _imports[name]


def _triton_module():
    """The Triton backend of the linear (``triton_w4a4``), or (None, why it failed to import)."""
    return _lazy("triton_w4a4")


def _loaded(name: str):
    """Module ``name`` where a call has already imported it, else None (imports nothing: the state it keeps exists
    only once it has run)."""
    return _imports.get(name, (None, None))[0]


def _triton_device_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"needs a CUDA device, got {device.type}"
    if not torch.cuda.is_available():
        return "torch has no usable CUDA device"
    return _triton_module()[1]


def _triton_reason(x, params) -> str | None:
    reason = _triton_device_reason(x.device)
    if reason is None:
        reason = _triton_module()[0].unsupported_reason(x, params)
    return reason


def _triton_fn() -> Callable:
    # select_backend has just run the kernel's own check (``_triton_reason``): the unchecked entry point,
    # so that a layer call is checked once; few-token calls replayed where they can be (``replay.py``).
    module, _ = _lazy("replay")
    return module.run if module is not None else _triton_module()[0].run_checked


class _Backend(NamedTuple):
    device_reason: Callable  # (device) -> None if it can run there, else why not
    call_reason: Callable  # (x, params) -> None if it can run this call, else why not
    function: Callable  # () -> the w4a4_linear(x, params, bin_index) to call once call_reason accepted (imports lazily)


_BACKENDS = {
    "reference": _Backend(lambda device: None, lambda x, params: None, lambda: numerics.w4a4_linear),
    "triton": _Backend(_triton_device_reason, _triton_reason, _triton_fn),
}
BACKENDS = tuple(_BACKENDS)


def _forced(backend: str | None) -> tuple[str | None, str]:
    """(backend name or None for automatic, where the choice came from)."""
    source = "the backend argument"
    if backend is None:
        backend, source = os.environ.get(ENV_VAR), f"${ENV_VAR}"
    name = (backend or "").strip().lower()
    if name in ("", "auto"):
        return None, source
    if name not in _BACKENDS:
        raise ValueError(f"unknown W4A4 backend {backend!r} (from {source}); choose one of "
                         f"{', '.join(BACKENDS)} or 'auto'")
    return name, source


def available_backends(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """Per backend: None when it can run on ``device``, else why not. Shape limits are per call."""
    device = torch.device(device)
    return {name: b.device_reason(device) for name, b in _BACKENDS.items()}


def select_backend(x: torch.Tensor, params: W4A4Params, backend: str | None = None) -> str:
    """The backend that :func:`w4a4_linear` will use for this call."""
    name, source = _forced(backend)
    if name is not None:
        reason = _BACKENDS[name].call_reason(x, params)
        if reason is not None:
            raise BackendUnavailable(f"W4A4 backend {name!r} was forced by {source} but cannot run: {reason}")
        return name
    refusals = {}
    for name in PREFERENCE:
        refusals[name] = _BACKENDS[name].call_reason(x, params)
        if refusals[name] is None:
            break
    else:
        raise AssertionError(f"every W4A4 backend refused: {refusals}")  # the reference never does
    if name == "reference" and x.device.type == "cuda":
        why = "; ".join(f"{n}: {r}" for n, r in refusals.items() if r)
        _warn_once(f"W4A4 layers on {x.device} run on the slow torch reference ({why})")
    return name


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def w4a4_linear(x: torch.Tensor, params: W4A4Params, bin_index: int | torch.Tensor = 0,
                backend: str | None = None) -> torch.Tensor:
    """y = W4A4(x) as defined by ``numerics.w4a4_linear``, on the chosen backend."""
    return _BACKENDS[select_backend(x, params, backend)].function()(x, params, bin_index)


def release_workspaces() -> None:
    """Free what the Triton backend keeps between layer calls: ``replay.py``'s workspaces (per stream and host thread;
    at most 208 MB, Wan's ffn.2 at rank 32 and 9661 rows) and its recordings, which point into them (the next
    call of each signature records again). Nothing to do, and nothing imported, where no call has
    loaded that module."""
    module = _loaded("replay")
    if module is not None:
        module.release()


def widest_rank(device: torch.device) -> int | None:
    """The widest low-rank branch (a layer's own rank and its folded LoRAs') the Triton kernels take on ``device``
    (``triton_w4a4.max_rank_pad``); None where they do not run there. Imports Triton only for a CUDA device."""
    if device.type != "cuda" or _triton_device_reason(device) is not None:
        return None
    tw = _triton_module()[0]
    return tw.max_rank_pad(tw._capability(tw._index(device)))


def capture_ready(device: torch.device, rows: int) -> bool:
    """Whether Triton calls of up to ``rows`` rows on ``device`` can be captured in a CUDA graph now: they are replayed
    from integer addresses (``replay.capturable``). Imports Triton only for a CUDA device."""
    if device.type != "cuda" or _triton_device_reason(device) is not None:
        return False
    module, _ = _lazy("replay")
    return module is not None and module.capturable(rows)


def held_workspaces(stream: int | None = None) -> tuple[torch.Tensor, ...]:
    """The workspaces replayed calls write into now, or only ``stream``'s (``replay.workspaces``); empty where none
    was made."""
    module = _loaded("replay")
    return module.workspaces(stream) if module is not None else ()


def recordings_dropped() -> int:
    """How many replay recordings have been forgotten so far (``replay.dropped``); 0 where none was made."""
    module = _loaded("replay")
    return module.dropped() if module is not None else 0


def _rowwise_module():
    """``triton_rowwise``, or (None, why it failed to import)."""
    return _lazy("triton_rowwise")


def addcmul_reason(a, b, c) -> str | None:
    """None when :func:`addcmul` runs this call in Triton (``triton_rowwise.rowwise_reason``), else why not."""
    if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in (a, b, c)):
        return "not all operands are CUDA tensors"
    if torch.cuda.is_current_stream_capturing():  # Triton's launcher checks each tensor's pointer with the
        # driver, which fails inside a capture under cudaMallocAsync (replay.capturable); nodes/graphs.py captures
        # calls of fewer rows than nodes/rowwise.py's mode takes, this holds for any other capture
        return "a CUDA graph capture is under way on the current stream"
    module, why = _rowwise_module()
    return why if module is None else module.rowwise_reason(a, b, c)


def addcmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``torch.addcmul(a, b, c)``, bit for bit: one Triton pass where :func:`addcmul_reason` is None (a Wan block's
    modulation and residual updates on a GPU), PyTorch otherwise."""
    if addcmul_reason(a, b, c) is None:
        return _rowwise_module()[0].addcmul(a, b, c)
    return torch.addcmul(a, b, c)


__all__ = ["BACKENDS", "BackendUnavailable", "ENV_VAR", "W4A4Params", "addcmul", "addcmul_reason",
           "available_backends", "capture_ready", "held_workspaces", "numerics", "recordings_dropped",
           "release_workspaces", "select_backend", "w4a4_linear"]
