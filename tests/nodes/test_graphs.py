"""nodes/graphs.py on the CPU: where the block patches go, when a call stays eager, what a graph's replay is checked
against. The graphs themselves run on a GPU (``test_gpu_server.py::test_block_graphs_in_main_py_on_gpu``)."""
from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from wan_w4a4.nodes import graphs as g

pytestmark = pytest.mark.comfyui


def _graphs_module(model):
    """nodes/graphs.py as ComfyUI loaded the pack (the tests import it apart, as wan_w4a4)."""
    patch = next(iter(_replace(model).values()))
    return sys.modules[type(patch).__module__]


def _replace(model) -> dict:
    return g.replacements(model)


def test_apply_puts_one_block_patch_on_every_block(env):
    base = env.unet("high")
    model = env.apply(base, "tiny_high.safetensors")
    blocks = model.model.diffusion_model.blocks
    replace = _replace(model)
    assert set(replace) == {("double_block", i) for i in range(len(blocks))}
    sets = {id(p.graphs) for p in replace.values()}
    assert len(sets) == 1 and [p.index for p in replace.values()] == list(range(len(blocks)))
    assert _replace(base) == {}  # the BF16 model is not touched
    # A clone keeps the patches. ComfyUI 0.3.64 deep-copies model_options per clone (a fresh, empty set: below),
    # 0.33 shares the objects in it (one set; a clone with other tensors captures again: the fingerprint).
    clone = model.clone()
    assert set(_replace(clone)) == set(replace)
    graphs = next(iter(replace.values())).graphs
    graphs.statics[("a signature",)] = object()
    fresh = copy.deepcopy(graphs)
    assert fresh is not graphs and fresh.statics == {} and fresh.num_blocks == len(blocks)
    assert fresh.block(0) is blocks[0]
    graphs.statics.clear()


def test_another_nodes_block_replacement_is_kept(env):
    base = env.unet("high")

    def theirs(args, extra):
        return extra["original_block"](args)

    base.set_model_patch_replace(theirs, "dit", "double_block", 1)
    model = env.apply(base, "tiny_high.safetensors")
    replace = _replace(model)
    assert replace[("double_block", 1)] is theirs
    assert all(type(p).__name__ == "BlockPatch" for k, p in replace.items() if k != ("double_block", 1))


def test_comfyui_runs_the_blocks_through_the_patches(env):
    """On the CPU every block call is left eager, through the patch: ComfyUI's forward_orig calls it."""
    model = env.shifted(env.apply(env.unet("high"), "tiny_high.safetensors"))
    graphs = next(iter(_replace(model).values())).graphs
    _, out = env.two_expert(model, model, steps=2, split=1)
    calls = 2  # one model call per step (cond and uncond batched)
    assert graphs.eager == calls * graphs.num_blocks
    assert graphs.captures == graphs.replays == 0 and not graphs.statics
    assert torch.isfinite(out).all()


def _args(tokens=8, dim=16, device="cpu", **options):
    x = torch.zeros(1, tokens, dim, device=device)
    return {"img": x, "txt": torch.zeros(1, 4, dim), "vec": torch.zeros(1, 6, dim), "pe": torch.zeros(1, tokens, 1, 4),
            "transformer_options": options}


class CudnnFirst:  # named as attention.py's override: the pack's own
    pass


def test_graphs_are_on_by_default_where_comfyui_streams_the_model(monkeypatch):
    monkeypatch.delenv(g.ENV, raising=False)
    assert g.reason(_args()) == "off"  # no dynamic VRAM: only with WAN_W4A4_BLOCK_GRAPHS=1
    assert g.reason(_args(prefetch_dynamic_vbars=False)) == "off"
    assert g.reason(_args(prefetch_dynamic_vbars=True)) == "not on a GPU"
    monkeypatch.setenv(g.ENV, "1")
    assert g.reason(_args()) == "not on a GPU"
    monkeypatch.setenv(g.ENV, "0")
    assert g.reason(_args(prefetch_dynamic_vbars=True)) == "off"


def test_reasons_a_call_stays_eager(monkeypatch):
    monkeypatch.setenv(g.ENV, "1")
    assert g.reason(_args()) == "not on a GPU"
    flat = _args()
    flat["img"] = flat["img"][0]
    assert g.reason(flat) == "not a Wan block's [batch, tokens, channels] input"
    assert g.rows(_args(tokens=8)) == 8 and g.rows(dict(_args(tokens=2), txt=torch.zeros(2, 5, 16))) == 10
    assert g.reason(_args(tokens=g.MAX_ROWS)) == "not on a GPU"
    assert g.reason(_args(tokens=g.MAX_ROWS + 1)) == "more rows than graphs pay for"
    assert g.reason(dict(_args(), txt=torch.zeros(2, g.MAX_ROWS // 2 + 1, 16))) == "more rows than graphs pay for"
    # one 720p frame (cond and uncond): the kernels' replay alone is as fast, graphs cost memory (graphs.MAX_ROWS)
    assert g.reason(_args(tokens=7200)) == "more rows than graphs pay for"
    from wan_w4a4.nodes import rowwise
    assert g.MAX_ROWS < rowwise.MIN_TOKENS  # rowwise's Triton launches stay out of captured calls
    assert g.reason(_args(wrappers={"apply_model": {"torch.compile": [object()]}})) == "compiled"
    assert g.reason(_args(patches={"attn2_patch": [lambda a: a]})) == "attention patches"
    assert g.reason(_args(patches={"attn1_patch": []})) == "not on a GPU"  # an empty list patches nothing
    assert g.reason(_args(optimized_attention_override=lambda *a, **k: None)) == "another attention override"
    assert g.reason(_args(optimized_attention_override=CudnnFirst())) == "not on a GPU"
    a = _args()
    a["pe"] = (a["pe"], a["pe"])
    assert g.reason(a) == "an input that is not a tensor"
    x = _args()
    x["img"].requires_grad_(True)
    assert g.reason(x) == "autograd"
    with torch.inference_mode():
        assert g.reason(_args()) == "not on a GPU"
    monkeypatch.setenv(g.ENV, "0")
    assert g.reason(_args()) == "off"
    monkeypatch.setenv(g.ENV, "1")
    cli = types.SimpleNamespace(args=types.SimpleNamespace(disable_cuda_graphs=True))  # ComfyUI 0.33's flag
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli)
    assert g.reason(_args()) == "off"


def _w4a4_block(env):
    model = env.apply(env.unet("high"), "tiny_high.safetensors")
    return model, model.model.diffusion_model.blocks[0]


def test_a_blocks_tensors_are_its_layers_and_parameters(env):
    model, block = _w4a4_block(env)
    import comfy.model_management
    comfy.model_management.load_models_gpu([model])  # object patches applied: the block holds the W4A4 layers
    try:
        graphs = _graphs_module(model)
        cpu = torch.device("cpu")
        tensors = graphs.block_tensors(block, cpu)
        ids = {id(t) for t in tensors}
        layers = [m for m in block.modules() if graphs.is_w4a4(m)]
        assert layers and all(id(t) in ids for m in layers for t in m.held_tensors(cpu))
        assert id(block.modulation) in ids
        assert graphs.block_tensors(block, torch.device("meta")) is None  # not on that device: no graph

        q = block.self_attn.q
        before = graphs.fingerprint(block, tensors)
        k, n = q.in_features, q.out_features
        q.set_lora(torch.randn(k, 2).bfloat16(), torch.randn(2, n).bfloat16(), None, "tag")  # a fold: new tensors
        try:
            assert graphs.fingerprint(block, graphs.block_tensors(block, cpu)) != before
        finally:
            q.clear_lora()
        assert graphs.fingerprint(block, graphs.block_tensors(block, cpu)) == before
        block.self_attn.forward = lambda *a, **k: None  # another clone's object patch on a module's forward
        try:
            assert graphs.fingerprint(block, graphs.block_tensors(block, cpu)) != before
        finally:
            del block.self_attn.forward
        assert graphs.fingerprint(block, graphs.block_tensors(block, cpu)) == before
        assert id(q.bin_selector.index(cpu)) in {id(t) for t in q.held_tensors(cpu)}  # the bin the graph reads

        norm = block.norm3
        norm.weight_function = [lambda w: w]  # recomputed per call: nothing a graph could keep
        try:
            assert graphs.block_tensors(block, cpu) is None
        finally:
            norm.weight_function = []
        norm._v = object()  # streamed by dynamic VRAM, not yet placed
        try:
            assert graphs.block_tensors(block, cpu) is None
            placed = torch.ones_like(norm.weight)
            norm._v_weight, norm._v_bias = placed, torch.zeros_like(norm.bias)
            ids = {id(t) for t in graphs.block_tensors(block, cpu)}
            assert id(placed) in ids and id(norm.weight) not in ids
        finally:
            for a in ("_v", "_v_weight", "_v_bias"):
                norm.__dict__.pop(a, None)
    finally:
        comfy.model_management.unload_all_models()


class FakeVbar:
    def __init__(self, resident: dict):
        self.resident, self.unpinned = resident, []

    def vbar_fault(self, v):
        return None if self.resident[v] is None else ("sig", v)

    def vbar_signature_compare(self, signature, stored):
        return signature is not None and self.resident[signature[1]] and stored == "placed"

    def vbar_unpin(self, v):
        self.unpinned.append(v)


def test_fault_in_checks_every_streamed_module(monkeypatch):
    block = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert g.fault_in(block) == (True, [])  # nothing streamed
    for i, m in enumerate(block[:2]):
        m._v, m._v_signature = f"v{i}", "placed"
    monkeypatch.setitem(sys.modules, "comfy_aimdo.model_vbar", None)
    assert g.fault_in(block) == (False, [])  # streamed, and no comfy_aimdo: never replayed
    vbar = FakeVbar({"v0": True, "v1": True})
    monkeypatch.setitem(sys.modules, "comfy_aimdo.model_vbar", vbar)
    ok, pinned = g.fault_in(block)
    assert ok and pinned == [block[0], block[1]]
    g.unpin(pinned)
    assert vbar.unpinned == ["v0", "v1"]
    vbar.resident["v1"] = False  # faulted, but its content is not the placed one
    assert g.fault_in(block) == (False, [block[0], block[1]])
    vbar.resident["v1"] = None  # could not be faulted in at all
    assert g.fault_in(block) == (False, [block[0]])


def test_static_inputs_copy_only_what_changed():
    a = _args()
    st = g.Statics(a)
    a["img"].fill_(1.0)
    a["txt"].fill_(2.0)
    st.load(a)
    assert torch.equal(st.buffers["img"], a["img"]) and torch.equal(st.buffers["txt"], a["txt"])
    a["txt"].fill_(3.0)  # the same tensor again (the next block of one model call): not copied again
    st.load(a)
    assert st.buffers["txt"].eq(2.0).all()
    b = dict(a, img=st.buffers["img"], txt=a["txt"].clone())  # x as the previous graph left it; a new context
    st.load(b)
    assert st.buffers["txt"].eq(3.0).all()
    assert g.signature(a) == g.signature(b) != g.signature(_args(tokens=4))


def test_unloading_drops_the_graphs(env):
    import comfy.model_management

    model = env.apply(env.unet("high"), "tiny_high.safetensors")
    graphs = next(iter(_replace(model).values())).graphs
    comfy.model_management.load_models_gpu([model])
    try:
        graphs.statics[("a signature",)] = object()  # as a captured call leaves them
    finally:
        comfy.model_management.unload_all_models()
    assert graphs.statics == {}


def test_the_static_x_is_contiguous():
    a = _args()
    a["img"] = torch.randn(1, 16, 8).transpose(1, 2)  # as ComfyUI 0.33 hands the first block x
    a["txt"] = torch.randn(1, 16, 4).transpose(1, 2)
    st = g.Statics(a)
    assert st.buffers["img"].is_contiguous() and st.buffers["img"].shape == a["img"].shape
    assert st.buffers["txt"].stride() == a["txt"].stride()  # the others as they come
    st.load(a)
    assert torch.equal(st.buffers["img"], a["img"]) and torch.equal(st.buffers["txt"], a["txt"])


def test_calls_left_counts_the_steps_after_the_current_one():
    sample = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.0])  # four steps
    assert g.calls_left({"sample_sigmas": sample, "sigmas": torch.tensor([1.0])}) == 3
    assert g.calls_left({"sample_sigmas": sample, "sigmas": torch.tensor([0.6, 0.6])}) == 1
    assert g.calls_left({"sample_sigmas": sample, "sigmas": torch.tensor([0.4])}) == 0
    assert g.calls_left({"sigmas": torch.tensor([0.4])}) is None and g.calls_left({}) is None


class FakeGraph:
    def __init__(self, body):
        self.body, self.replayed = body, 0

    def replay(self):
        self.replayed += 1
        self.body()


def _fake_gpu(monkeypatch):
    """GraphSet.run on the CPU: every check passes, and a 'capture' keeps the block's body to run at 'replay'."""
    monkeypatch.setattr(g, "reason", lambda args: None)
    monkeypatch.setattr(g, "kitchen_triton", lambda: False)
    monkeypatch.setattr(g, "fault_in", lambda block: (True, []))
    held = [torch.ones(3)]
    monkeypatch.setattr(g, "block_tensors", lambda block, device: list(held))
    runs = []

    def capture(self, i, st, args, original, device, print_):
        static_args = st.args(args)

        def body():
            st.buffers["img"].copy_(original(static_args)["img"])
        body()  # the eager run: this call's output
        runs.append(i)
        return g.Captured(FakeGraph(body), print_, ()), st.buffers["img"]

    monkeypatch.setattr(g.GraphSet, "_capture", capture)
    return held, runs


class Affine(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x, context_img_len=None):
        return x * 2 + self.k


def block_wrap_of(block, context_img_len=None):
    """A closure like forward_orig's ``block_wrap``: over the block and ``context_img_len`` only."""
    def block_wrap(args):
        out = {}
        out["img"] = block(args["img"], context_img_len)
        return out
    return block_wrap


def test_a_block_is_captured_once_replayed_after_and_captured_again_when_its_tensors_change(monkeypatch):
    held, captured = _fake_gpu(monkeypatch)
    blocks = torch.nn.ModuleList([Affine(0), Affine(1)])
    graphs = g.GraphSet(blocks)

    def original(i):
        return block_wrap_of(blocks[i])

    def model_call(x, **options):
        a = _args(**options)
        a["img"] = x
        for i in range(2):
            a = dict(a, img=graphs.run(i, a, original(i))["img"])
        return a["img"]

    x = torch.randn(1, 8, 16)
    want = (x * 2 + 0) * 2 + 1
    assert torch.equal(model_call(x), want)  # captured: the eager runs' output
    assert captured == [0, 1] and graphs.captures == 2
    y = torch.randn(1, 8, 16)
    out = model_call(y)
    assert torch.equal(out, (y * 2) * 2 + 1) and graphs.replays == 2 and captured == [0, 1]
    assert out is not graphs.statics[g.signature(_args())].buffers["img"]  # the last block returns a copy
    held[0] = torch.ones(3)  # another tensor in the block (a LoRA folded again): captured again
    assert torch.equal(model_call(x), want) and captured == [0, 1, 0, 1]
    sample = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    held[0] = torch.ones(3)  # two calls left after this one: captured (the server test's stages capture so)
    assert torch.equal(model_call(x, sample_sigmas=sample, sigmas=torch.tensor([0.75])), want)
    assert captured == [0, 1, 0, 1, 0, 1]
    held[0] = torch.zeros(3)
    sample = torch.tensor([1.0, 0.5, 0.25, 0.0])  # one call left: not captured
    # the sampler's last step: no capture, both blocks eager (the old graphs do not fit the new tensors)
    eager = graphs.eager
    assert torch.equal(model_call(x, sample_sigmas=sample, sigmas=torch.tensor([0.5])), want)
    assert captured == [0, 1, 0, 1, 0, 1] and graphs.eager == eager + 2
    assert graphs.why["too few calls left to capture"] == 2


def test_a_wrapper_that_holds_more_than_the_block_stays_eager(monkeypatch):
    _fake_gpu(monkeypatch)
    blocks = torch.nn.ModuleList([Affine(0)])
    graphs = g.GraphSet(blocks)
    audio = torch.ones(1)
    block = blocks[0]

    def humo_wrap(args):  # as Wan variants' wrappers close over per-call tensors beside the block
        return {"img": block(args["img"]) + audio.sum()}

    x = torch.randn(1, 8, 16)
    assert torch.equal(graphs.run(0, dict(_args(), img=x), humo_wrap)["img"], x * 2 + 1)
    assert graphs.captures == 0 and graphs.why["ComfyUI's block wrapper holds more than this model's block"] == 1
    other = Affine(0)  # a wrapper around another model's block (a clone around another model, on 0.33)
    graphs.run(0, dict(_args(), img=x), block_wrap_of(other))
    assert graphs.captures == 0 and graphs.why["ComfyUI's block wrapper holds more than this model's block"] == 2
    assert g.wrapped_block(block_wrap_of(blocks[0], 257)) == (blocks[0], 257)


def test_the_signature_leaves_out_xs_layout_and_keeps_context_img_len():
    a, b = _args(), _args()
    b["img"] = torch.zeros(1, 16, 8).transpose(1, 2)  # block 0's x on ComfyUI 0.33
    assert g.signature(a) == g.signature(b)
    assert g.signature(a, 257) != g.signature(a)
    c = _args()
    c["txt"] = torch.zeros(1, 16, 4).transpose(1, 2)
    assert g.signature(c) != g.signature(a)  # the other inputs are read as they come


def test_comfyuis_block_wrapper_holds_the_block_and_context_img_len_only(env, monkeypatch):
    """The closure check against the real forward_orig of this ComfyUI: a plain W4A4 model's blocks pass it."""
    model = env.shifted(env.apply(env.unet("high"), "tiny_high.safetensors"))
    patch = next(iter(_replace(model).values()))
    graphs_module = sys.modules[type(patch).__module__]
    seen = []
    real = type(patch).__call__

    def spy(self, args, extra):
        seen.append((self.index, graphs_module.wrapped_block(extra["original_block"]),
                     "prefetch_dynamic_vbars" in args["transformer_options"]))
        return real(self, args, extra)

    monkeypatch.setattr(type(patch), "__call__", spy)
    env.two_expert(model, model, steps=1, split=1)
    blocks = model.model.diffusion_model.blocks
    assert seen and all(w is not None and w[0] is blocks[i] for i, w, _ in seen)
    # ComfyUI 0.33 says in every block's options whether dynamic VRAM streams the model (graphs.enabled reads it)
    import comfy.model_patcher
    dynamic_comfy = hasattr(comfy.model_patcher, "ModelPatcherDynamic")
    assert all(has == dynamic_comfy for _, _, has in seen)


class FakeCapture:
    def __init__(self):
        self.began = self.ended = 0
        self.check = None

    def capture_begin(self, *a, **k):
        self.began += 1

    def capture_end(self):
        if self.check is not None:
            self.check()
        self.ended += 1


def test_a_failed_capture_frees_what_it_allocated_before_it_ends():
    import weakref
    made = []

    def body():
        t = torch.ones(4)
        made.append(weakref.ref(t))
        raise ValueError("cannot be captured")

    graph = FakeCapture()
    freed_at_end = []
    graph.check = lambda: freed_at_end.append(made[0]() is None)
    failure = g.capture(graph, body, None)
    assert "cannot be captured" in failure and graph.ended == 1 and freed_at_end == [True]
    assert g.capture(FakeCapture(), lambda: None, None) is None

    def interrupted():
        t = torch.ones(4)
        made[:] = [weakref.ref(t)]
        raise KeyboardInterrupt
    graph = FakeCapture()
    freed_at_end.clear()
    graph.check = lambda: freed_at_end.append(made[0]() is None)
    with pytest.raises(KeyboardInterrupt):
        g.capture(graph, interrupted, None)
    # the capture ended before the interrupt went on, and what the body allocated was freed first
    assert graph.ended == 1 and freed_at_end == [True]


def test_kitchen_triton_reads_comfy_kitchens_backends(monkeypatch):
    on = types.SimpleNamespace(list_backends=lambda: {"triton": {"available": True, "disabled": False}})
    off = types.SimpleNamespace(list_backends=lambda: {"triton": {"available": True, "disabled": True}})
    monkeypatch.setitem(sys.modules, "comfy_kitchen", on)
    assert g.kitchen_triton()
    monkeypatch.setitem(sys.modules, "comfy_kitchen", off)
    assert not g.kitchen_triton()
    real = pytest.importorskip("comfy_kitchen")
    monkeypatch.setitem(sys.modules, "comfy_kitchen", real)
    want = real.list_backends()["triton"]
    assert g.kitchen_triton() == (want["available"] and not want["disabled"])
