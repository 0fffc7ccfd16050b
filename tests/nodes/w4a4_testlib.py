"""Shared code of the node tests (``conftest.py`` here builds the ``env`` fixture from it): RTN states
for the tiny experts, conditioning, the two-expert run of the Wan2.2 I2V template.

States are made without calibration: ``numerics.from_float`` (round to nearest, smoothing 1,
rank 0) on each block Linear of a tiny expert, with per-bin clip ratios, written with
``format.save_state`` into the in-process ComfyUI's ``models/w4a4``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from wan_w4a4.kernels import format as fmt
from wan_w4a4.kernels import numerics as nm
from wan_w4a4.minimodel.arch import quantizable_linears

TEST_NODES_FILE = Path(__file__).resolve().parents[1] / "comfy_custom_nodes" / "wan_w4a4_test_nodes.py"
BOUNDARY = 900.0
EDGES = {"high": (1000.0, 975.0, 950.0, 925.0, 900.0), "low": (900.0, 600.0, 300.0, 0.0)}
CLIPS = {"high": (1.0, 0.95, 0.9, 0.85), "low": (0.9, 0.8, 0.7)}
SHIFT, CFG, SEED = 8.0, 3.5, 7
WIDTH = HEIGHT = 64
LENGTH = 5


def make_state(model, expert: str, path: Path, *, edges=None, clips=None, fingerprint_model=None,
               layers=None) -> Path:
    """An RTN W4A4 state of ``model`` (a tiny Wan ModelPatcher) written to ``path``."""
    edges = EDGES[expert] if edges is None else edges
    clips = CLIPS[expert] if clips is None else clips
    sd = model.model.diffusion_model.state_dict()
    names = layers or quantizable_linears_of(model)
    params = {n: nm.from_float(sd[f"{n}.weight"].float(), sd[f"{n}.bias"].float(), num_bins=len(clips),
                               clip=torch.tensor(clips), act_unsigned=n.endswith("ffn.2")) for n in names}
    fp_sd = (fingerprint_model or model).model.diffusion_model.state_dict()
    meta = fmt.StateMeta(expert=expert, bin_edges=edges, clip_policy="per-bin",
                         fingerprint=fmt.model_fingerprint(fp_sd, names))
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt.save_state(path, params, meta, overwrite=True)
    return path


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside: small SVDs on a busy 2-core machine are 10-50x slower on two
    (tests/calibration/conftest.py measured it); the node tests' module fixtures run outside that
    directory's per-test fixture."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def quantizable_linears_of(model) -> list[str]:
    from wan_w4a4.minimodel.arch import WanArch
    sd = model.model.diffusion_model.state_dict()
    return quantizable_linears(WanArch.from_shapes(sd))


@dataclasses.dataclass
class Env:
    nodes: object  # ComfyUI's nodes module
    models_dir: Path
    w4a4_dir: Path
    checkpoints: dict
    positive: list
    negative: list
    latent: dict

    def node(self, name):
        return self.nodes.NODE_CLASS_MAPPINGS[name]()

    def unet(self, expert):
        (m,) = self.nodes.UNETLoader().load_unet(self.checkpoints[expert].name, "default")
        return m

    def shifted(self, model, shift=SHIFT):
        (m,) = self.node("ModelSamplingSD3").patch(model, shift)
        return m

    def apply(self, model, state_name):
        (m,) = self.node("WanW4A4ApplyState").apply(model, state_name)
        return m

    def two_expert(self, high, low, steps=4, cfg=CFG, scheduler="simple", split=None, seed=SEED):
        """The Wan2.2 I2V template's two KSamplerAdvanced stages; returns (latent after high, final)."""
        import comfy.samplers
        if split is None:
            ms = high.get_model_object("model_sampling")
            ts = ms.timestep(comfy.samplers.calculate_sigmas(ms, scheduler, steps)[:-1])
            split = int((ts >= BOUNDARY).sum())
        k = self.nodes.KSamplerAdvanced()
        common = dict(noise_seed=seed, steps=steps, cfg=cfg, sampler_name="euler", scheduler=scheduler,
                      positive=self.positive, negative=self.negative)
        (mid,) = k.sample(high, "enable", latent_image=self.latent, start_at_step=0, end_at_step=split,
                          return_with_leftover_noise="enable", **common)
        (out,) = k.sample(low, "disable", latent_image=mid, start_at_step=split, end_at_step=10000,
                          return_with_leftover_noise="disable", **common)
        return mid["samples"], out["samples"]
