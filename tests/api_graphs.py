"""The two-expert Wan2.2 I2V graph in ComfyUI's API format, as the server tests post it.

Conditioning comes from the test-only node ``WanW4A4TestI2VConditioning``
(tests/comfy_custom_nodes): random text context plus concat_latent_image / concat_mask.
"""
STEPS, CFG, SHIFT, SEED = 4, 3.5, 8.0, 7


def two_expert_graph(prefix: str, *, width: int = 64, height: int = 64, length: int = 5, seed: int = SEED,
                     steps: int = STEPS, cfg: float = CFG, shift: float = SHIFT, split: int = 2,
                     high: str = "tiny_wan_high.safetensors", low: str = "tiny_wan_low.safetensors") -> dict:
    """Nodes 1 conditioning, 2/3 UNETLoader high/low, 4/5 ModelSamplingSD3, 6/7 KSamplerAdvanced
    (the high expert takes the first ``split`` steps), 8 SaveLatent with ``prefix``."""
    sampler = {"noise_seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
               "positive": ["1", 0], "negative": ["1", 1]}
    return {
        "1": {"class_type": "WanW4A4TestI2VConditioning",
              "inputs": {"seed": seed, "width": width, "height": height, "length": length, "text_tokens": 16}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": high, "weight_dtype": "default"}},
        "3": {"class_type": "UNETLoader", "inputs": {"unet_name": low, "weight_dtype": "default"}},
        "4": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["2", 0], "shift": shift}},
        "5": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["3", 0], "shift": shift}},
        "6": {"class_type": "KSamplerAdvanced", "inputs": {**sampler, "model": ["4", 0], "add_noise": "enable",
              "latent_image": ["1", 2], "start_at_step": 0, "end_at_step": split,
              "return_with_leftover_noise": "enable"}},
        "7": {"class_type": "KSamplerAdvanced", "inputs": {**sampler, "model": ["5", 0], "add_noise": "disable",
              "latent_image": ["6", 0], "start_at_step": split, "end_at_step": 10000,
              "return_with_leftover_noise": "disable"}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}},
    }
