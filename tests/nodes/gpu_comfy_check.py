"""W4A4 experts inside ComfyUI on a CUDA GPU: kernels, memory management, offload.

Run by ``test_gpu_comfy.py`` in a subprocess (ComfyUI picks its device once per process, and the
CPU tests have already started it on the CPU), or by hand: ``python tests/nodes/gpu_comfy_check.py
[out.json]``. Uses only ``comfy`` (not ComfyUI's ``nodes`` module, which needs PyAV), a
Wan2.2-I2V-shaped random checkpoint big enough for memory to be measurable, and RTN states.

Checks, printed as JSON:
- the Triton backend inside a full two-expert sampling run matches the reference backend, and
  W4A4 is close to (not equal to) BF16;
- GPU memory of a loaded W4A4 expert vs the BF16 one, and after switching between a BF16 clone and
  a W4A4 clone of the same model in both orders (no BF16 Linear left behind on the GPU);
- lowvram: a partial load leaves some W4A4 layers on the CPU, and the output is unchanged;
- the idle expert is offloaded while the other samples, and three identical runs do not grow memory;
- the blocks' ``torch.addcmul`` calls in Triton at 20 480 tokens: how many, and the same bits as without.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
ARCH_KW = dict(dim=1024, num_layers=4, ffn_dim=2816)
STEPS, CFG, SHIFT, SEED = 6, 3.5, 8.0, 7
LATENT = (1, 16, 3, 16, 16)  # 3 latent frames of 128 x 128 pixels: 192 tokens


def boot():
    from wan_w4a4.apps import runtime
    root = runtime.find_comfyui()
    runtime.install_stand_ins()
    sys.path.insert(0, str(root))
    from comfy.cli_args import args
    args.cpu = not torch.cuda.is_available()  # CPU: a dry run of the logic only
    import comfy.model_management  # noqa: F401  (device chosen here, after args.cpu)
    return root


def shifted(model, shift=SHIFT):
    import comfy.model_sampling

    class ModelSamplingAdvanced(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    ms = ModelSamplingAdvanced(model.model.model_config)
    ms.set_parameters(shift=shift, multiplier=1000)
    m = model.clone()
    m.add_object_patch("model_sampling", ms)
    return m


def conditioning():
    g = torch.Generator().manual_seed(SEED)
    image = torch.randn(LATENT, generator=g)
    mask = torch.ones(1, 1, *LATENT[2:])
    mask[:, :, :1] = 0
    extra = {"concat_latent_image": image, "concat_mask": mask}
    return ([[torch.randn(1, 16, 4096, generator=g), dict(extra)]],
            [[torch.randn(1, 16, 4096, generator=g), dict(extra)]])


def two_expert(high, low, pos, neg):
    import comfy.sample
    import comfy.samplers
    ms = high.get_model_object("model_sampling")
    ts = ms.timestep(comfy.samplers.calculate_sigmas(ms, "simple", STEPS)[:-1])
    split = int((ts >= 900).sum())
    latent = torch.zeros(LATENT)
    noise = comfy.sample.prepare_noise(latent, SEED)
    common = dict(positive=pos, negative=neg, cfg=CFG, sampler_name="euler", scheduler="simple", denoise=1.0,
                  disable_pbar=True, seed=SEED)
    mid = comfy.sample.sample(high, noise, STEPS, latent_image=latent, start_step=0, last_step=split,
                              force_full_denoise=False, **common)
    return comfy.sample.sample(low, torch.zeros_like(latent), STEPS, latent_image=mid, disable_noise=True,
                               start_step=split, last_step=10000, force_full_denoise=True, **common)


DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEV.type == "cuda"


def allocated():
    if CUDA:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return 0


def mib(x):
    return round(x / 2**20, 2)


def main(out_path=None):
    boot()
    import comfy.model_management as mm
    import comfy.sd
    from wan_w4a4.kernels import format as fmt
    from wan_w4a4.kernels import numerics as nm
    from wan_w4a4.minimodel.arch import WanArch, quantizable_linears, write_wan_checkpoint
    from wan_w4a4.nodes import apply as ap
    from wan_w4a4.nodes.hook import get_hook
    from wan_w4a4.nodes.ops import is_w4a4

    res = {"device": torch.cuda.get_device_name(0) if CUDA else "cpu", "torch": torch.__version__}
    arch = WanArch(**ARCH_KW)
    tmp = Path(tempfile.mkdtemp())
    models, states = {}, {}
    for expert, seed in (("high", 1), ("low", 2)):
        path = write_wan_checkpoint(tmp / f"{expert}.safetensors", arch, seed=seed)
        m = comfy.sd.load_diffusion_model(str(path))
        sd = m.model.diffusion_model.state_dict()
        names = quantizable_linears(arch)
        edges = (1000.0, 950.0, 900.0) if expert == "high" else (900.0, 500.0, 0.0)
        layers = {n: nm.from_float(sd[f"{n}.weight"].float(), sd[f"{n}.bias"].float(), num_bins=2,
                                   clip=torch.tensor([1.0, 0.9]), act_unsigned=n.endswith("ffn.2"))
                  for n in names}
        meta = fmt.StateMeta(expert=expert, bin_edges=edges, fingerprint=fmt.model_fingerprint(sd, names))
        models[expert], states[expert] = m, (layers, meta)
    res["model_dtype"] = str(models["high"].model_dtype())
    w4 = {e: ap.apply_w4a4_state(models[e], *states[e], source=f"{e}-state") for e in models}
    pos, neg = conditioning()

    # 1. Triton vs reference vs BF16, whole two-expert runs
    bf16 = two_expert(shifted(models["high"]), shifted(models["low"]), pos, neg)
    triton_out = two_expert(shifted(w4["high"]), shifted(w4["low"]), pos, neg)
    os.environ["WAN_W4A4_BACKEND"] = "reference"
    ref_out = two_expert(shifted(w4["high"]), shifted(w4["low"]), pos, neg)
    del os.environ["WAN_W4A4_BACKEND"]
    from wan_w4a4 import kernels
    x = torch.randn(4, 1024, device=DEV, dtype=torch.bfloat16)
    res["backend_used"] = kernels.select_backend(x, w4["high"].object_patches[
        "diffusion_model.blocks.0.ffn.0"].w4a4_params(DEV))
    res["sqnr_triton_vs_reference_db"] = nm.sqnr_db(ref_out, triton_out)
    res["sqnr_w4a4_vs_bf16_db"] = nm.sqnr_db(bf16, triton_out)
    res["w4a4_equals_bf16"] = bool(torch.equal(bf16, triton_out))
    hook = get_hook(w4["high"])
    res["hook_bins_high"] = [(round(r.t, 1), r.bin) for r in hook.records][-3:]

    # 2. Memory of a loaded expert, and switching clones of one model in both orders
    def settle():
        mm.unload_all_models()
        mm.soft_empty_cache()
        return allocated()

    def loaded_bytes(patcher):
        base = settle()
        mm.load_models_gpu([patcher])
        return allocated() - base

    res["gpu_mib_bf16_expert"] = mib(loaded_bytes(models["high"]))
    res["gpu_mib_w4a4_expert"] = mib(loaded_bytes(w4["high"]))
    res["model_size_mib"] = {"bf16": mib(models["high"].model_size()), "w4a4": mib(w4["high"].model_size())}
    base = settle()
    mm.load_models_gpu([models["high"]])
    mm.load_models_gpu([w4["high"]])  # replaces the BF16 clone of the same model
    res["gpu_mib_after_bf16_then_w4a4"] = mib(allocated() - base)
    q = w4["high"].model.diffusion_model.blocks[0].self_attn.q
    res["w4a4_layer_device_after_switch"] = str(q.qweight.device) if is_w4a4(q) else f"not W4A4: {type(q).__name__}"
    mm.load_models_gpu([models["high"]])  # and back
    q = models["high"].model.diffusion_model.blocks[0].self_attn.q
    res["gpu_mib_after_w4a4_then_bf16"] = mib(allocated() - base)
    res["bf16_layer_after_switch_back"] = f"{type(q).__name__} on {q.weight.device}"

    # 3. lowvram: a partial load keeps some W4A4 layers on the CPU; the output is the same
    settle()
    m = shifted(w4["high"])
    xin = torch.randn(2, *LATENT[1:], device=DEV)
    sigma = torch.full((2,), 0.95, device=DEV)
    ctx = torch.cat([pos[0][0], neg[0][0]]).to(DEV)
    concat = torch.zeros(2, 20, *LATENT[2:], device=DEV)
    mm.load_models_gpu([m])
    full = m.model.apply_model(xin, sigma, c_concat=concat, c_crossattn=ctx).float()
    layers = [mod for mod in m.model.diffusion_model.modules() if is_w4a4(mod)]
    res["lowvram_w4a4_layers_total"] = len(layers)
    # ComfyUI's partial-load planning differs between versions (0.33 also reserves room for the next
    # modules' transfers): the smallest budget, of a few, that leaves some W4A4 layers on the CPU and
    # moves others is the partial load to check.
    tried = {}
    for fraction in (0.4, 0.55, 0.7, 0.85):
        settle()
        m.patch_model(device_to=DEV, lowvram_model_memory=int(fraction * m.model_size()))
        on_cpu = tried[fraction] = sum(mod.qweight.device.type == "cpu" for mod in layers)
        if 0 < on_cpu < len(layers) or fraction == 0.85:
            break
        m.unpatch_model(device_to=m.offload_device)
    res["lowvram_budget_fraction"], res["lowvram_on_cpu_by_fraction"] = fraction, tried
    res["lowvram_w4a4_layers_on_cpu"] = on_cpu
    partial = m.model.apply_model(xin, sigma, c_concat=concat, c_crossattn=ctx).float()
    res["lowvram_output_equal"] = bool(torch.equal(full, partial))
    m.unpatch_model(device_to=m.offload_device)

    # 4. the idle expert is offloaded; repeated runs do not grow memory
    settle()
    peaks, held = [], []
    for _ in range(3):
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        two_expert(shifted(w4["high"]), shifted(w4["low"]), pos, neg)
        peaks.append(mib(torch.cuda.max_memory_allocated() if CUDA else 0))
        held.append(mib(allocated()))
    res["run_peak_mib"], res["run_held_mib"] = peaks, held
    res["loaded_models_after_runs"] = [type(lm.model.model).__name__ for lm in mm.current_loaded_models]

    # 5. the blocks' torch.addcmul calls in Triton (nodes/rowwise.py) at 20 480 tokens (fewer stay PyTorch's): how
    # many it answered in one model call, and the output bit for bit the one with it switched off
    from wan_w4a4.nodes import rowwise
    settle()
    big = (1, 16, 5, 128, 128)  # 5 latent frames of 1024 x 1024 pixels
    g = torch.Generator().manual_seed(SEED)
    xin = torch.randn(big, generator=g).to(DEV)
    sigma = torch.full((1,), 0.95, device=DEV)
    concat = torch.zeros(1, 20, *big[2:], device=DEV)
    m = shifted(w4["high"])
    mm.load_models_gpu([m])
    res["blocks"] = len(m.model.diffusion_model.blocks)
    wrapper = rowwise.get(m)
    # what sampling passes (comfy/sampler_helpers.py merges the patcher's wrappers into the transformer options)
    options = {**m.model_options["transformer_options"], "wrappers": m.wrappers}
    before = wrapper.taken
    with torch.inference_mode():  # as ComfyUI's executor runs every node (the kernel leaves autograd to torch)
        on = m.model.apply_model(xin, sigma, c_concat=concat, c_crossattn=pos[0][0].to(DEV),
                                 transformer_options=options)
        res["rowwise_taken"] = wrapper.taken - before
        os.environ[rowwise.ENV] = "0"
        try:
            off = m.model.apply_model(xin, sigma, c_concat=concat, c_crossattn=pos[0][0].to(DEV),
                                      transformer_options=options)
        finally:
            del os.environ[rowwise.ENV]
    res["rowwise_taken_when_off"] = wrapper.taken - before - res["rowwise_taken"]
    res["rowwise_output_equal"] = bool(torch.equal(on, off))
    print(json.dumps(res, indent=1))
    if out_path:
        Path(out_path).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
