"""A few-token model call's Wan blocks replayed as CUDA graphs, on W4A4 models.

Why: at one 480p frame the GPU work of a W4A4 model call (about 122 ms) is less than BF16's, yet the step was often
slower, because the host issued the call's thousands of launches no faster than the GPU ran them
(``kernels/README.md``, sessions 24-27). A graph issues one block's launches in one call.

How (ComfyUI's supported block replacement, ``patches_replace["dit"][("double_block", i)]``, read by
``WanModel.forward_orig`` on both supported versions): :class:`BlockPatch` receives block ``i``'s arguments and
ComfyUI's ``original_block``. Per input signature (:func:`signature`) a :class:`GraphSet` keeps static copies of the
four inputs (x, context, e0, the RoPE table) and, per block, a graph that runs ``original_block`` on them and writes
the block's output into the static x. The first eligible call of a block runs it eagerly on a side stream (Triton
compiles, ``kernels/replay.py`` records its calls on that stream) and captures it; later calls copy inputs that
changed into the static buffers and replay. Between graphed blocks x stays in the static buffer; the last block
returns a copy.

The same kernels get the same arguments, so a replayed block gives the eager block's bits
(``tests/nodes/test_gpu_server.py::test_block_graphs_in_main_py_on_gpu``). What a graph reads besides its inputs is
checked before each replay (:func:`fingerprint`):
- every tensor the block's modules hold (W4A4 layers: ``W4A4Core.held_tensors``, with the bin index) by address,
  shape, stride and dtype, and the block's modules and instance ``forward`` patches by identity, so a LoRA folded
  again, a moved weight or another clone's object patches capture again (an unload frees the graphs:
  ``apply.release_kernel_workspaces``);
- ComfyUI's ``block_wrap`` closes over the block and ``context_img_len`` only (:func:`wrapped_block`; Wan variants
  whose wrapper closes over per-call tensors stay eager);
- under ComfyUI 0.33's dynamic VRAM, that each streamed module (``_v``) is resident (``comfy_aimdo``'s fault
  signature, as ``comfy.ops.cast_modules_with_vbar`` checks it); pinned until the replay is queued, as
  ``comfy.ops.uncast_bias_weight`` unpins after queueing;
- the bin index is a device tensor that the timestep hook fills in place (``ops.BinSelector``): the graph reads it.

A call is left to ComfyUI's eager block (``reason`` says why) when:
- graphs are off. By default they are on only where ComfyUI streams the model with dynamic VRAM (0.33's default
  launch, the one GPU-tested); ``WAN_W4A4_BLOCK_GRAPHS=1`` turns them on elsewhere, ``=0`` off everywhere, as does
  ComfyUI's ``--disable-cuda-graphs``;
- the model is compiled, an attention patch or another node's attention override is set, or autograd records;
- the input is not on a GPU, or its rows (batch x tokens of x or of the context) are more than ``MAX_ROWS``, or
  the kernels cannot be captured now (``kernels.capture_ready``: replay off, or a profiler's launch hooks set);
- a block tensor is offloaded or not resident;
- for a block not yet captured: fewer than ``MIN_CALLS_LEFT`` calls of the sampling run remain (:func:`calls_left`),
  or comfy-kitchen's Triton backend is on (its RoPE launches Triton with tensors).
A capture that fails leaves that signature eager, with a warning.

Memory: the static inputs, the graphs' memory (one pool per model under PyTorch's allocator; cudaMallocAsync shares
graph memory between graphs launched into one stream) and the side stream's replay workspace: 0.48 GiB at one 480p
frame (``benchmarks/RESULTS.md``, thirty-first part), not seen by ComfyUI's memory planning.
"""
from __future__ import annotations

import collections
import copy
import logging
import os
import sys
import traceback
import weakref
from typing import NamedTuple

import torch

from .. import kernels
from .hook import step_of
from .ops import is_w4a4
from .rowwise import compiled

# Unset or "auto": graphs where ComfyUI streams the model with dynamic VRAM (0.33's default launch: the one GPU-tested,
# benchmarks/RESULTS.md thirty-first part); "1" or "on": wherever a call is eligible; "0" or "off": every block eager.
ENV = "WAN_W4A4_BLOCK_GRAPHS"
WARMUPS = 3  # eager runs before a capture at most (``GraphSet._capture``)
# A capture takes one step, 0.09-0.42 s more than a replayed one at one 480p frame on the H200, and a replay saved at
# most about 0.1 s of a step there (benchmarks/RESULTS.md, thirty-first part): no capture for fewer calls (a turbo
# LoRA's two steps per expert would pay it and replay nothing). A floor, not a measured optimum.
MIN_CALLS_LEFT = 2
MAX_SIGNATURES = 2  # input signatures with graphs at once per model; the oldest gives way
# Rows per call (batch x tokens) up to which blocks are captured: one 480p frame (3120) and calls up to the kernels'
# one-launch quantizer. Above, the GPU's work outlasts the host's once the kernels replay their calls
# (``kernels.capture_ready``): at one 720p frame (7200 rows, H200, ComfyUI 0.33 defaults) the steps were 0.273 /
# 0.270 s with graphs and 0.270 / 0.270 s without, and the graphs held 0.76 GiB more device memory
# (benchmarks/RESULTS.md, thirty-second part); a capture that fails leaves its signature eager. It stays below
# ``rowwise.MIN_TOKENS``, whose Triton launches a capture cannot take.
MAX_ROWS = 4096
INPUTS = ("img", "txt", "vec", "pe")  # the block arguments forward_orig passes (x, context, e0, freqs)
ATTENTION_PATCHES = ("attn1_patch", "attn2_patch")  # run inside WanAttentionBlock.forward from transformer_options
WRAP_FREEVARS = {"block", "context_img_len"}  # what forward_orig's block_wrap closes over (both versions)
log = logging.getLogger(__name__)


def enabled(options: dict) -> bool:
    """Graphs for a model call with ``transformer_options`` ``options`` (``ENV``; ComfyUI 0.33's
    ``--disable-cuda-graphs`` turns them off). ComfyUI 0.33 sets ``options["prefetch_dynamic_vbars"]`` to whether the
    model's patcher streams it with dynamic VRAM (``BaseModel.apply_model``)."""
    cli = sys.modules.get("comfy.cli_args")
    if getattr(getattr(cli, "args", None), "disable_cuda_graphs", False):
        return False
    setting = os.environ.get(ENV, "auto").strip().lower()
    if setting in ("0", "off", "false", "no"):
        return False
    return setting in ("1", "on", "true", "yes") or bool(options.get("prefetch_dynamic_vbars"))


def _own_override(value) -> bool:
    # attention.py's CudnnFirst, duck-typed: inside ComfyUI the pack is imported under its folder name
    return type(value).__name__ == "CudnnFirst"


def rows(args: dict) -> int:
    """The rows of the block's largest Linear calls: batch x tokens of x, or of the context (cross-attention k, v)."""
    x, ctx = args["img"], args.get("txt")
    return max(x.shape[0] * x.shape[1], ctx.shape[0] * ctx.shape[1] if ctx is not None and ctx.ndim == 3 else 0)


def reason(args: dict) -> str | None:
    """None when block arguments ``args`` may run as a graph, else why not (checks that need no block)."""
    x = args["img"]
    options = args.get("transformer_options") or {}
    if not enabled(options):
        return "off"
    if not all(args.get(k) is None or isinstance(args[k], torch.Tensor) for k in INPUTS):
        return "an input that is not a tensor"
    if compiled(options):
        return "compiled"
    patches = options.get("patches", {})
    if any(patches.get(k) for k in ATTENTION_PATCHES):
        return "attention patches"
    override = options.get("optimized_attention_override")
    if override is not None and not _own_override(override):
        return "another attention override"
    if x.ndim != 3:
        return "not a Wan block's [batch, tokens, channels] input"
    if torch.is_grad_enabled() and x.requires_grad:
        return "autograd"
    n = rows(args)
    if n > MAX_ROWS:
        return "more rows than graphs pay for"
    if not x.is_cuda:
        return "not on a GPU"
    if not kernels.capture_ready(x.device, n):
        return "the kernels cannot be captured now (replay off, or launch hooks set)"
    return None


def wrapped_block(original) -> tuple[object, object] | None:
    """(the block, ``context_img_len``) that ComfyUI's ``block_wrap`` closes over, or None if it closes over anything
    else (a Wan variant's per-call tensors, which a graph would keep from its capture) or is not a plain closure."""
    code, cells = getattr(original, "__code__", None), getattr(original, "__closure__", None)
    if code is None or cells is None or not set(code.co_freevars) <= WRAP_FREEVARS or "block" not in code.co_freevars:
        return None
    bound = {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}
    return bound["block"], bound.get("context_img_len")


def kitchen_triton() -> bool:
    """comfy-kitchen's Triton backend is on (ComfyUI's ``--enable-triton-backend``): its RoPE would run in Triton
    inside the block, launched with tensors."""
    ck = sys.modules.get("comfy_kitchen")
    if ck is None or not hasattr(ck, "list_backends"):
        return False
    t = ck.list_backends().get("triton", {})
    return bool(t.get("available")) and not t.get("disabled")


def _vbar():
    """comfy_aimdo.model_vbar where ComfyUI's dynamic VRAM runs (0.33+), else None."""
    return sys.modules.get("comfy_aimdo.model_vbar")


def block_tensors(block: torch.nn.Module, device: torch.device) -> list[torch.Tensor] | None:
    """Every tensor the block's forward reads that outlives a call, or None if one is not on ``device`` for good (an
    offloaded module, a weight function that recomputes a weight per call, a streamed module not yet placed)."""
    out = []
    for m in block.modules():
        if is_w4a4(m):
            held = m.held_tensors(device)
            if held is None:
                return None
            out += held
            continue
        if getattr(m, "weight_function", None) or getattr(m, "bias_function", None):
            return None
        streamed = hasattr(m, "_v")
        for name, t in (*m._parameters.items(), *m._buffers.items()):
            if t is None:
                continue
            if streamed and name in ("weight", "bias"):
                t = m.__dict__.get("_v_" + name)
                if t is None or type(t) not in (torch.Tensor, torch.nn.Parameter):
                    return None
            if t.device != device:
                return None
            out.append(t)
    return out


def fingerprint(block: torch.nn.Module, tensors: list[torch.Tensor]) -> tuple:
    """What a graph of ``block`` reads besides its inputs: its tensors (:func:`block_tensors`) by address, shape, stride
    and dtype; its modules and their instance ``forward`` patches (a clone's object patches), held and compared by
    identity (modules and functions compare so), so that another object cannot take a freed one's place."""
    return (tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in tensors),
            tuple((m, m.__dict__.get("forward")) for m in block.modules()))


def fault_in(block: torch.nn.Module) -> tuple[bool, list]:
    """Under dynamic VRAM: (every streamed module of the block resident, the modules pinned by the check). The caller
    unpins them (:func:`unpin`) once the work that reads them is queued, as ``comfy.ops.uncast_bias_weight`` does."""
    vbar = _vbar()
    streamed = [m for m in block.modules() if hasattr(m, "_v")]
    if not streamed:
        return True, []
    if vbar is None:
        return False, []
    pinned, resident = [], True
    for m in streamed:
        signature = vbar.vbar_fault(m._v)
        if signature is not None:
            pinned.append(m)
        if signature is None or not vbar.vbar_signature_compare(signature, getattr(m, "_v_signature", None)):
            resident = False
    return resident, pinned


def unpin(pinned: list) -> None:
    vbar = _vbar()
    for m in pinned:
        vbar.vbar_unpin(m._v)


def calls_left(options: dict) -> int | None:
    """The model calls the sampler makes after the current one, counted as its remaining steps: ComfyUI's
    ``transformer_options["sample_sigmas"]`` is the schedule slice it runs and ``["sigmas"]`` the current sigma
    (``hook.step_of`` finds the step). A step that makes more calls (cond and uncond apart, second-order samplers)
    counts once, so this is a floor; None where either is missing. Reads the sigma on the host, a device sync: only
    for a call that would capture."""
    now = options.get("sigmas")
    if not isinstance(now, torch.Tensor) or now.numel() == 0:
        return None
    where = step_of(float(now.detach().reshape(-1)[0].float().item()), options.get("sample_sigmas"))
    return None if where is None else where[1] - 1 - where[0]


def tokens(args: dict) -> int:
    return args["img"].shape[0] * args["img"].shape[1]


def signature(args: dict, context_img_len=None) -> tuple:
    """The inputs' shapes, dtypes and devices, their strides but x's (the static x is contiguous, :class:`Statics`:
    block 0's transposed x and the later blocks' contiguous one share it), ``context_img_len``, and whether the pack's
    attention override is set (clones of one model may differ in it, and on ComfyUI 0.33 they share one
    :class:`GraphSet`)."""
    override = (args.get("transformer_options") or {}).get("optimized_attention_override")
    return (*(None if args.get(k) is None else (tuple(args[k].shape), None if k == "img" else args[k].stride(),
                                               args[k].dtype, args[k].device) for k in INPUTS),
            context_img_len, override is not None)


class Captured(NamedTuple):
    graph: torch.cuda.CUDAGraph
    fingerprint: tuple  # of the block at capture (:func:`fingerprint`)
    workspaces: tuple  # the side stream's replay workspace, which the graph's launches point into (kept alive)


def _empty_like(t: torch.Tensor, contiguous: bool) -> torch.Tensor:
    if contiguous:
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)


class Statics:
    """One input signature's static inputs and its blocks' graphs."""

    def __init__(self, args: dict):
        # x contiguous: ComfyUI 0.33 hands the first block a transposed view, which the block makes contiguous
        # (``x.contiguous()``), and every later block a contiguous tensor; a transposed static x would cost each
        # graphed block two transposing copies. The others keep their layout: every block reads them as they come.
        self.buffers = {k: None if args.get(k) is None else _empty_like(args[k], contiguous=k == "img") for k in INPUTS}
        self.sources = dict.fromkeys(INPUTS)  # the tensors last copied in (held, so their memory is not reused)
        self.graphs: dict[int, Captured] = {}

    def load(self, args: dict) -> None:
        """Copy the arguments that are not already in the buffers (x between graphed blocks is)."""
        for k in INPUTS:
            src, dst = args.get(k), self.buffers[k]
            if src is None or src is dst or src is self.sources[k]:
                continue
            dst.copy_(src)
            self.sources[k] = None if k == "img" else src

    def args(self, args: dict) -> dict:
        return {**args, **{k: v for k, v in self.buffers.items() if v is not None}}


class GraphSet:
    """The graphs of one patched model (ModelPatcher). ComfyUI 0.3.64 deep-copies ``model_options`` per clone, and a
    clone gets its own, empty set (``__deepcopy__``); 0.33 copies only its dicts and lists, so clones share one set,
    and a clone whose tensors differ (another LoRA) captures again (the fingerprint)."""

    def __init__(self, blocks):
        self._blocks = weakref.ref(blocks)
        self.num_blocks = len(blocks)
        self.statics: dict[tuple, Statics] = {}
        self.failed: set[tuple] = set()
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.captures = self.replays = self.eager = 0
        self.why = collections.Counter()  # why calls ran eagerly
        self._left = None  # (the sigmas tensor of the model call, calls_left of it)
        self.logged = set()

    def __deepcopy__(self, memo):
        blocks = self._blocks()
        return GraphSet(blocks) if blocks is not None else copy.copy(self)

    def drop(self) -> None:
        """Free every graph and static buffer (an unloaded model; ``apply.release_kernel_workspaces``)."""
        if self.statics and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # a replay may still be queued: its memory goes back to the allocator here
        self.statics.clear()
        self.failed.clear()

    def block(self, i: int):
        blocks = self._blocks()
        return None if blocks is None else blocks[i]

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        s = self.streams.get(device)
        if s is None:
            s = self.streams[device] = torch.cuda.Stream(device=device)
        return s

    def _statics(self, key: tuple, args: dict) -> Statics:
        st = self.statics.pop(key, None)  # re-inserted last: the dict's order is the use order
        if st is None:
            if len(self.statics) >= MAX_SIGNATURES and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # as in drop
            while len(self.statics) >= MAX_SIGNATURES:
                self.statics.pop(next(iter(self.statics)))
            st = Statics(args)
        self.statics[key] = st
        return st

    def _log_once(self, what: str, message: str, *a) -> None:
        if what not in self.logged:
            self.logged.add(what)
            log.info(message, *a)

    def run(self, i: int, args: dict, original) -> dict:
        why = reason(args)
        wrapped = wrapped_block(original) if why is None else None
        block = self.block(i) if wrapped is not None else None
        if why is None and (block is None or wrapped[0] is not block):
            why = "ComfyUI's block wrapper holds more than this model's block"
        key = signature(args, wrapped[1]) if why is None else None
        if why is None and key in self.failed:
            why = "capture failed before"
        if why is not None:
            return self._eager(args, original, why)
        device = args["img"].device
        resident, pinned = fault_in(block)
        tensors = block_tensors(block, device) if resident else None
        if tensors is None:
            unpin(pinned)
            return self._eager(args, original, "not resident" if not resident else "a tensor not held on the GPU")
        print_ = fingerprint(block, tensors)
        st = self.statics.get(key)
        entry = st.graphs.get(i) if st is not None else None
        replay = entry is not None and entry.fingerprint == print_
        if not replay:
            why = "comfy-kitchen's Triton backend" if kitchen_triton() else None
            if why is None:
                left = self._calls_left(args.get("transformer_options") or {})  # a host sync: only where due
                why = "too few calls left to capture" if left is not None and left < MIN_CALLS_LEFT else None
            if why is not None:
                unpin(pinned)
                return self._eager(args, original, why)
        try:
            st = self._statics(key, args)
            st.load(args)
            if replay:
                entry.graph.replay()
                self.replays += 1
                self._log_once("replay", "W4A4: Wan blocks replayed as CUDA graphs (%d-token calls; nodes/graphs.py)",
                               tokens(args))
            else:
                st.graphs.pop(i, None)
                captured, out = self._capture(i, st, args, original, device, print_)
                if captured is None:  # the output of its eager run, on the side stream
                    self.failed.add(key)
                    torch.cuda.synchronize()  # the signature's other graphs may still be queued (as in drop)
                    self.statics.pop(key, None)
                    self.eager += 1
                    self.why["capture failed"] += 1
                    return {"img": out}
                st.graphs[i] = captured
                self.captures += 1
        finally:
            unpin(pinned)
        x = st.buffers["img"]
        return {"img": x.clone() if i == self.num_blocks - 1 else x}

    def _calls_left(self, options: dict) -> int | None:
        """:func:`calls_left`, once per model call (the blocks of one call share its ``sigmas`` tensor)."""
        now = options.get("sigmas")
        if self._left is None or self._left[0] is not now:
            self._left = (now, calls_left(options))
        return self._left[1]

    def _eager(self, args: dict, original, why: str) -> dict:
        self.eager += 1
        self.why[why] += 1
        return original(args)

    def counts(self) -> dict:
        """Captures, replays and eager calls so far, and why calls ran eagerly (for logs and benchmarks)."""
        return {"captures": self.captures, "replays": self.replays, "eager": self.eager, "why": dict(self.why)}

    def _capture(self, i: int, st: Statics, args: dict, original, device: torch.device, print_: tuple):
        """Run block ``i`` eagerly on the side stream (Triton compiles and ``kernels/replay.py`` records there) and
        capture it there: (the graph, the static x holding the eager output: a capture queues nothing), or, with a
        warning, (None, the eager output) if the capture failed."""
        stream = self._stream(device)
        current = torch.cuda.current_stream(device)
        static_args = st.args(args)

        def body():
            out = original(static_args)["img"]
            if out is not st.buffers["img"]:
                st.buffers["img"].copy_(out)

        stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            # Eagerly until no replay recording is forgotten: the first calls on a stream outgrow its workspace, and
            # a call whose recording was forgotten would record again inside the capture, launching with tensors.
            for _ in range(WARMUPS):
                dropped = kernels.recordings_dropped()
                out = original(static_args)["img"]
                settled = kernels.recordings_dropped() == dropped
                if settled:
                    break
            failure = (capture(graph, body, self._pool()) if settled else
                       f"replay recordings were still being forgotten after {WARMUPS} eager runs")
        if failure is not None:
            current.wait_stream(stream)
            out.record_stream(current)  # made on the side stream, used on the current one
            log.warning("W4A4: block %d of %d-token calls could not be captured in a CUDA graph; these calls run "
                        "eagerly (nodes/graphs.py):\n%s", i, tokens(args), failure)
            return None, out
        with torch.cuda.stream(stream):
            st.buffers["img"].copy_(out)  # this call's output: the eager one (the capture ran nothing)
        current.wait_stream(stream)
        self._log_once("capture", "W4A4: capturing the Wan blocks of %d-token calls as CUDA graphs (nodes/graphs.py)",
                       tokens(args))
        return Captured(graph, print_, kernels.held_workspaces(stream.cuda_stream)), st.buffers["img"]

    def _pool(self):
        """The memory pool of the model's live graphs under PyTorch's own allocator (a block's transients are freed
        inside its capture, so the next block's capture reuses them: the graphs replay one after the other on one
        stream), a new one where none lives (PyTorch frees a pool with its last graph). None under cudaMallocAsync,
        which shares graph memory itself between graphs launched into one stream."""
        if torch.cuda.memory.get_allocator_backend() != "native":
            return None
        for st in self.statics.values():
            for c in st.graphs.values():
                return c.graph.pool()
        return torch.cuda.graph_pool_handle()


def _clear(e: BaseException) -> None:
    """Free what an exception's frames hold, through its chain."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__


def capture(graph: torch.cuda.CUDAGraph, body, pool) -> str | None:
    """Capture ``body`` into ``graph`` on the current stream; None, or why it failed (the traceback). The tensors a
    failed body allocated are held by its exception's frames, so the exception is dropped (an interrupt, raised again
    after the capture has ended, with its frames cleared) before the capture ends. Freed after the capture, memory of
    a graph that never ran is an invalid argument to cudaMallocAsync, and PyTorch aborts the process from a destructor
    (``benchmarks/results/*s28_graphs_attempt1.log``, where the capture ended while the exception propagated)."""
    try:
        graph.capture_begin(*(() if pool is None else (pool,)), capture_error_mode="thread_local")
    except Exception as e:
        return "".join(traceback.format_exception(e))
    failure, interrupt = None, None
    try:
        body()
    except BaseException as e:  # an operation that cannot be captured: this signature stays eager
        failure = "".join(traceback.format_exception(e))
        interrupt = None if isinstance(e, Exception) else e
        _clear(e)
        del e
    try:
        graph.capture_end()
    except Exception as e:
        failure = failure or "".join(traceback.format_exception(e))
    if interrupt is not None:
        raise interrupt
    return failure


class BlockPatch:
    """The ``patches_replace["dit"][("double_block", i)]`` entry of block ``i``: runs it through the model's
    :class:`GraphSet`."""

    def __init__(self, graphs: GraphSet, index: int):
        self.graphs, self.index = graphs, index

    def __call__(self, args: dict, extra: dict) -> dict:
        return self.graphs.run(self.index, args, extra["original_block"])

    def __repr__(self):
        return f"BlockPatch({self.index})"


def attach(model) -> bool:
    """Install the block patches on ModelPatcher ``model`` (a Wan model with ``diffusion_model.blocks``); blocks that
    another node already replaces are left to it. True if any was installed."""
    blocks = getattr(getattr(model.model, "diffusion_model", None), "blocks", None)
    if blocks is None:
        return False
    replace = replacements(model)
    graphs = GraphSet(blocks)
    installed = False
    for i in range(len(blocks)):
        current = replace.get(("double_block", i))
        if current is not None and _graph_set(current) is None:
            continue
        model.set_model_patch_replace(BlockPatch(graphs, i), "dit", "double_block", i)
        installed = True
    return installed


def replacements(model) -> dict:
    """ModelPatcher ``model``'s DiT block replacements: (kind, index) -> patch."""
    return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})


def _graph_set(patch) -> GraphSet | None:
    """The :class:`GraphSet` a block replacement runs through, None for another node's (duck-typed: the pack may be
    imported under another name)."""
    graphs = getattr(patch, "graphs", None)
    return graphs if type(graphs).__name__ == "GraphSet" else None


def get(model) -> GraphSet | None:
    """The model's :class:`GraphSet`, or None."""
    return next((g for g in map(_graph_set, replacements(model).values()) if g is not None), None)


def drop(model) -> None:
    graphs = get(model)
    if graphs is not None:
        graphs.drop()
