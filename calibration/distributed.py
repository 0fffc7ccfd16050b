"""Calibration over several processes with torch.distributed: one GPU each (NCCL), or CPU processes (gloo).

``torchrun --nproc-per-node N -m wan_w4a4 calibrate ...`` starts N copies of the command; each reads its
place from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK: :meth:`World.from_env`) and loads both
experts on its own device. The run then splits its work (calibration/pipeline.py):

- capture: calibration item i is sampled by rank i % N (:meth:`World.shard`); each rank's statistics are
  then combined on every rank (:func:`reduce_capture`): Hessian sums, sums and counts by SUM, minima by MIN,
  maxima by MAX, the row reservoirs by keeping the smallest keys of their union. The random draws (the token
  subset, the reservoir keys) are seeded per item (``capture.GroupStats.begin_item``), so N processes keep
  the rows one process keeps; what differs is the order of the fp32 Hessian sums.
- per-layer work (smoothing and rank search, GPTQ, clip search): the layers a pass still has to quantize are
  dealt in rounds of N, layer j of a round to rank j; after each round the finished layers are gathered on
  rank 0 (:func:`gather_layers`), which saves them in the work folder as it would its own.
- output: rank 0 alone holds the work folder (:class:`SharedWork`: what it finds there is broadcast, so
  every rank agrees on what is done) and writes the states and the report.

A world of one process is the plain run: every helper here returns at once, and torch.distributed is not
initialised. Everything travels through torch.distributed's own collectives; JSON and tensors as the bytes
of a safetensors file (never pickle). Every collective has the process group's timeout (``TIMEOUT_ENV``),
and an error in one (a peer died, a timeout) is a :class:`DistributedError` that says so.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as tdist

from .capture import CalibrationError, ExpertCapture
from .hessian import InputStats, RowReservoir
from .resume import (
    WorkFolder,
    WorkFolderBusy,
    layer_from_payload,
    layer_payload,
    work_path,
)

log = logging.getLogger(__name__)

# Seconds a collective waits for the other processes before the run stops with an error. The longest wait
# is for the slowest process to load an expert (a 14B BF16 file) or to sample its share of a pass.
TIMEOUT_ENV = "WAN_W4A4_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(RuntimeError):
    """A collective failed: another process of the run died, or did not answer within the timeout."""


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on its host."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    def __post_init__(self):
        if not (isinstance(self.size, int) and self.size >= 1 and 0 <= self.rank < self.size
                and self.local_rank >= 0):
            raise ValueError(f"bad distributed world: rank {self.rank!r} of {self.size!r} (local rank "
                             f"{self.local_rank!r}); expected 0 <= rank < size")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> World:
        """The world torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK; one process without them."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            size, rank = int(env["WORLD_SIZE"]), int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, got {env.get('RANK')!r} / "
                             f"{env.get('WORLD_SIZE')!r} / {env.get('LOCAL_RANK')!r}") from None
        return cls(rank, size, local)

    @property
    def main(self) -> bool:
        """Rank 0: the process that holds the work folder and writes the outputs."""
        return self.rank == 0

    def shard(self, n: int) -> list[int]:
        """The indices of ``n`` items this process samples: i % size == rank (deterministic)."""
        return [i for i in range(n) if i % self.size == self.rank]


def timeout_s(env: Mapping[str, str] | None = None) -> float:
    env = os.environ if env is None else env
    text = env.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


def init(world: World, use_cuda: bool) -> None:
    """Join the process group of a run over several processes (nothing for one): NCCL with this process's
    GPU (LOCAL_RANK, made the current device before ComfyUI picks its device), gloo on the CPU; the
    rendezvous is torchrun's (MASTER_ADDR, MASTER_PORT)."""
    if world.size == 1:
        return
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
    backend = "nccl" if use_cuda else "gloo"
    tdist.init_process_group(backend, rank=world.rank, world_size=world.size,
                            timeout=datetime.timedelta(seconds=timeout_s()),
                            device_id=torch.device("cuda", world.local_rank) if use_cuda else None)
    log.info("rank %d of %d (local rank %d): process group up (%s)", world.rank, world.size, world.local_rank,
             backend)


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Transport: bytes, tensors, and JSON + tensors as safetensors bytes
# ---------------------------------------------------------------------------------------------

def _device() -> torch.device:
    """Where collectives take their tensors: this process's GPU under NCCL, else the CPU."""
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(world: World, what: str, fn: Callable):
    try:
        return fn()
    except RuntimeError as e:  # torch.distributed's errors (DistBackendError, gloo's and NCCL's) are these
        raise DistributedError(
            f"rank {world.rank} of {world.size}: {what} failed: another process of the run died or did not "
            f"answer within {timeout_s():g} s ({TIMEOUT_ENV}); no state is written ({e})") from e


def _reduce_(world: World, t: torch.Tensor, op, what: str) -> None:
    """All-reduce ``t`` in place (through the collective device when ``t`` is elsewhere)."""
    dev = _device()
    x = t if t.device == dev else t.to(dev)
    _collective(world, what, lambda: tdist.all_reduce(x, op=op))
    if x is not t:
        t.copy_(x)


def _all_gather(world: World, t: torch.Tensor, what: str) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape and dtype on all ranks), in rank order, on the CPU."""
    x = t.contiguous().to(_device())
    out = [torch.empty_like(x) for _ in range(world.size)]
    _collective(world, what, lambda: tdist.all_gather(out, x))
    return [o.cpu() for o in out]


def _sizes(world: World, n: int, what: str) -> list[int]:
    return [int(s) for s in _all_gather(world, torch.tensor([n], dtype=torch.int64), what)]


def _padded(data: bytes, n: int) -> torch.Tensor:
    t = torch.zeros(n, dtype=torch.uint8)
    if data:
        t[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return t


def all_gather_bytes(world: World, data: bytes, what: str) -> list[bytes]:
    sizes = _sizes(world, len(data), what)
    parts = _all_gather(world, _padded(data, max(sizes)), what)
    return [bytes(p[:n].numpy()) for p, n in zip(parts, sizes)]


def gather_bytes(world: World, data: bytes, what: str) -> list[bytes]:
    """Every rank's ``data`` on rank 0, in rank order ([] on the others)."""
    sizes = _sizes(world, len(data), what)
    x = _padded(data, max(sizes)).to(_device())
    out = [torch.empty_like(x) for _ in range(world.size)] if world.main else None
    _collective(world, what, lambda: tdist.gather(x, out, dst=0))
    return [bytes(p[:n].cpu().numpy()) for p, n in zip(out, sizes)] if world.main else []


def broadcast_bytes(world: World, data: bytes | None, what: str) -> bytes:
    """Rank 0's ``data`` on every rank."""
    n = torch.tensor([len(data) if world.main else 0], dtype=torch.int64).to(_device())
    _collective(world, what, lambda: tdist.broadcast(n, src=0))
    x = _padded(data if world.main else b"", int(n)).to(_device())
    _collective(world, what, lambda: tdist.broadcast(x, src=0))
    return bytes(x.cpu().numpy())


def pack(payload, tensors: Mapping[str, torch.Tensor] | None = None) -> bytes:
    """JSON ``payload`` and ``tensors`` as the bytes of a safetensors file."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in (tensors or {}).items()}
    return save(tensors, metadata={"payload": json.dumps(payload)})


def unpack(data: bytes) -> tuple:
    """(payload, tensors) of :func:`pack`."""
    from safetensors.torch import load

    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return json.loads(header["__metadata__"]["payload"]), load(data)


# ---------------------------------------------------------------------------------------------
# What rank 0 decides
# ---------------------------------------------------------------------------------------------

_SHARED_ERRORS = (WorkFolderBusy, CalibrationError, FileExistsError)  # raised on every rank as they are


def on_main(world: World, fn: Callable, share: Callable | None = None, unshare: Callable | None = None):
    """Run ``fn`` on rank 0 only, and give every rank its outcome: rank 0 ``fn()``'s result, the others
    ``unshare(*share(result))`` (``share``: result -> (JSON payload, tensors); None without them). An error
    on rank 0 is raised on every rank: a calibration error or an existing output as itself, anything else
    as a DistributedError naming it. One process: ``fn()``."""
    if world.size == 1:
        return fn()
    what = getattr(fn, "__name__", "a step of rank 0")
    if world.main:
        try:
            result = fn()
        except BaseException as e:
            kind = next((c.__name__ for c in _SHARED_ERRORS if isinstance(e, c)), DistributedError.__name__)
            message = str(e) if kind != DistributedError.__name__ else f"rank 0 stopped: {type(e).__name__}: {e}"
            try:
                broadcast_bytes(world, pack({"error": kind, "message": message}), what)
            except DistributedError:
                pass
            raise
        payload, tensors = share(result) if share is not None else (None, {})
        broadcast_bytes(world, pack({"value": payload}, tensors), what)
        return result
    payload, tensors = unpack(broadcast_bytes(world, None, what))
    if "error" in payload:
        cls = next((c for c in _SHARED_ERRORS if c.__name__ == payload["error"]), DistributedError)
        raise cls(payload["message"])
    return unshare(payload["value"], tensors) if unshare is not None else None


def barrier(world: World, what: str) -> None:
    if world.size > 1:
        _collective(world, what, lambda: tdist.barrier())


class SharedWork:
    """The work folder (resume.WorkFolder) of a run: rank 0 holds it (lock, manifest, files); every rank
    learns what it holds through :func:`on_main`, so all agree on what is done and on any error (another
    run's settings, a busy folder). The other ranks save nothing. One process: the folder itself."""

    def __init__(self, world: World, folder: WorkFolder | None, path):
        self.world, self.folder, self.path = world, folder, path

    @classmethod
    def open(cls, world: World, config, key: dict, restart: bool = False,
             before: Callable[[], None] | None = None) -> SharedWork:
        """``before()`` (checks of the outputs) and then ``WorkFolder.open`` on rank 0."""
        def open_work_folder():
            if before is not None:
                before()
            return WorkFolder.open(config, key, restart=restart)
        return cls(world, on_main(world, open_work_folder), work_path(config))

    def _on_main(self, fn, share=None, unshare=None):
        return on_main(self.world, fn, share, unshare)

    def check_model(self, expert: str, identity: dict) -> None:
        def check_model():
            self.folder.check_model(expert, identity)
        self._on_main(check_model)

    def load_info(self, expert: str) -> dict | None:
        def load_info():
            return self.folder.load_info(expert)
        return self._on_main(load_info, lambda info: (info, {}), lambda info, _: info)

    def load_layers(self, expert: str, specs) -> dict:
        """name -> (W4A4Params, LayerRecord) on rank 0; name -> (None, None) on the others."""
        def load_layers():
            return self.folder.load_layers(expert, specs)
        return self._on_main(load_layers, lambda saved: (sorted(saved), {}),
                             lambda names, _: {n: (None, None) for n in names})

    def load_expert(self, expert: str, n_items: int):
        """(info, output latents) of a finished expert on every rank, or None."""
        def load_expert():
            return self.folder.load_expert(expert, n_items)

        def share(done):
            if done is None:
                return None, {}
            return done[0], {f"latent.{i}": t for i, t in enumerate(done[1])}
        return self._on_main(load_expert, share, lambda info, t: None if info is None else
                             (info, [t[f"latent.{i}"] for i in range(len(t))]))

    def save_info(self, expert: str, info: dict) -> None:
        if self.world.main:
            self.folder.save_info(expert, info)

    def save_layer(self, expert: str, p, rec) -> None:
        if self.world.main:
            self.folder.save_layer(expert, p, rec)

    def save_expert(self, expert: str, info: dict, latents) -> None:
        if self.world.main:
            self.folder.save_expert(expert, info, latents)

    def has_work(self) -> bool:
        return self.world.main and self.folder.has_work()

    def close(self, remove: bool = False) -> None:
        if self.world.main:
            self.folder.close(remove=remove)


# ---------------------------------------------------------------------------------------------
# Capture and layers
# ---------------------------------------------------------------------------------------------

def _reduce_stats(world: World, s: InputStats, what: str) -> None:
    op = tdist.ReduceOp
    if s.h is not None:
        _reduce_(world, s.h, op.SUM, what)
    _reduce_(world, s.xsum, op.SUM, what)
    _reduce_(world, s.xmin, op.MIN, what)
    _reduce_(world, s.xmax, op.MAX, what)
    count = torch.tensor([s.count], dtype=torch.int64)
    _reduce_(world, count, op.SUM, what)
    s.count = int(count)


def _merge_reservoir(world: World, r: RowReservoir, what: str) -> None:
    """Every rank's reservoir merged into ``r``: the ``capacity`` smallest keys of the union, in key order
    (the same rows, in the same order, as one reservoir over every item)."""
    cap, n = r.capacity, len(r)
    keys = torch.full((cap,), float("inf"), dtype=torch.float64)
    keys[:n] = r.keys
    rows = torch.zeros(cap, r.k, dtype=r.dtype)
    rows[:n] = r.rows().cpu()
    seen = torch.tensor([r.seen], dtype=torch.int64)
    _reduce_(world, seen, tdist.ReduceOp.SUM, what)
    all_keys = _all_gather(world, keys, what)
    all_rows = _all_gather(world, rows.view(torch.uint8), what)  # as bytes: any dtype, any backend
    for j in range(world.size):
        if j == world.rank:
            continue
        m = int(torch.isfinite(all_keys[j]).sum())
        part = RowReservoir(r.k, cap, 0, device=r.device, dtype=r.dtype)
        part.keys, part.data = all_keys[j][:m], all_rows[j].view(r.dtype)[:m].to(r.device)
        r.merge(part)
    r.seen = int(seen)


def reduce_capture(world: World, cap: ExpertCapture) -> None:
    """Combine every rank's capture of its items into ``cap``, on every rank (nothing for one process)."""
    if world.size == 1:
        return
    what = f"combining the {cap.expert} expert's statistics"
    for key in sorted(cap.groups):
        g = cap.groups[key]
        _reduce_stats(world, g.stats, what)
        if g.range is not None:
            _reduce_stats(world, g.range, what)
        for r in g.reservoirs:
            _merge_reservoir(world, r, what)
        calls = torch.tensor(g.calls, dtype=torch.int64)
        _reduce_(world, calls, tdist.ReduceOp.SUM, what)
        g.calls = calls.tolist()
    parts = all_gather_bytes(world, json.dumps(cap.item_timesteps).encode(), what)
    cap.item_timesteps = {int(i): ts for p in parts for i, ts in json.loads(p).items()}


def gather_latents(world: World, indices: Sequence[int], latents: Sequence[torch.Tensor],
                   n: int) -> list[torch.Tensor]:
    """The output latents of all ``n`` items, in item order, on every rank, from each rank's (``indices``)."""
    if world.size == 1:
        return list(latents)
    mine = pack(list(indices), {str(i): t for i, t in zip(indices, latents)})
    out: list = [None] * n
    for data in all_gather_bytes(world, mine, "gathering the sampled latents"):
        idx, tensors = unpack(data)
        for i in idx:
            out[i] = tensors[str(i)]
    return out


def gather_layers(world: World, done: tuple | None) -> list[tuple]:
    """The layers of a round, (W4A4Params, LayerRecord) of each rank that quantized one, in rank order, on
    rank 0 ([] on the others). One process: its own."""
    if world.size == 1:
        return [done] if done is not None else []
    data = b"" if done is None else pack(*layer_payload(*done))
    parts = gather_bytes(world, data, "gathering the quantized layers")
    return [layer_from_payload(*unpack(p)) for p in parts if p]


def quantize_round(world: World, todo: Sequence, start: int) -> object | None:
    """The layer of ``todo[start:start + size]`` this rank quantizes (layer j of the round to rank j), or None."""
    i = start + world.rank
    return todo[i] if i < min(len(todo), start + world.size) else None

