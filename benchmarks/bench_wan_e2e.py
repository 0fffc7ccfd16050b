"""Real-size Wan2.2-I2V-A14B end to end through ComfyUI: peak memory, step time, calibration cost.

    python benchmarks/bench_wan_e2e.py --all                     # bf16, w4a4, fp8_fast at 480p x 81
    python benchmarks/bench_wan_e2e.py --config bf16,w4a4        # some configurations
    python benchmarks/bench_wan_e2e.py --config none --calibrate # calibration timing only
    python benchmarks/bench_wan_e2e.py --arch tiny --all --cpu   # CPU smoke test, seconds

What runs. Two experts at the exact Wan2.2-I2V-A14B shapes (dim 5120, 40 blocks, 40 heads,
ffn 13824, in_dim 36) with random weights - values change neither bytes nor FLOPs - go through
ComfyUI's own nodes, in-process: loader -> ModelSamplingSD3 (shift 8) -> KSamplerAdvanced x 2, the
high-noise expert for the steps whose model timestep is >= 900, the low-noise expert after it. The
conditioning is what WanImageToVideo sets, without a text encoder or VAE: random text contexts
[1, 512, 4096] (positive and negative), ``concat_latent_image`` (random) and ``concat_mask`` (0 on
the first latent frame); cfg 3.5, so cond and uncond both run.

Configurations (one child process each, so that peak GPU memory and host RSS are per configuration;
--all runs bf16, w4a4 and fp8_fast):
  bf16      UNETLoader, weight_dtype "default"
  fp8       UNETLoader, weight_dtype "fp8_e4m3fn" (fp8 storage, bf16 compute)
  fp8_fast  UNETLoader, weight_dtype "fp8_e4m3fn_fast" (fp8 matmuls where the GPU has them - but see
            fp8_fast_eval: ComfyUI 0.3.64 leaves Wan in training mode, which turns them off there;
            on ComfyUI 0.33 the H200 profile showed no fp8 matmul either, benchmarks/README.md)
  w4a4      the pack's "Load W4A4 Wan2.2 model" node on a W4A4 checkpoint made by the pack from the
            same BF16 weights (RTN-grade: calibration.lowrank.low_rank's rank-32 branch and
            numerics.from_float per block Linear, clip 1; format.save_checkpoint). The other tensors
            stay BF16.

Memory modes (each configuration runs both unless --memory says otherwise, in the same child, with
every model unloaded and the peak counters reset between them):
  default     ComfyUI's own memory management ("smart memory"): when the low-noise expert is
              loaded, the high-noise expert stays on the GPU if ComfyUI thinks it fits.
  one-expert  only one expert resident at a time: ComfyUI's ``--disable-smart-memory`` behaviour
              (``model_management.DISABLE_SMART_MEMORY``): loading the low-noise expert unloads the
              high-noise one completely, and models are created on the CPU. This is the setting of
              the paper's -59.3 %. The report shows which experts were resident during each stage.

Where the experts come from (``--source``):
  file    ONE BF16 safetensors file (28.6 GB at real size), generated on the GPU and used for both
          experts (loaded twice, by two UNETLoader calls); the W4A4 checkpoint is made from the same
          tensors in the same pass. Files are reused when already there (same arch and seed).
  memory  no BF16 file: each child builds each expert's state dict in host memory and calls
          ``comfy.sd.load_diffusion_model_state_dict`` (what UNETLoader does after reading a file).
          The W4A4 checkpoint is still a file (8 GB).
  auto    file when the work folder has room for it, else memory (the output says which).

Reported per configuration and mode: GPU name and versions, peak GPU memory allocated and reserved
over the whole mode (loading included, ``torch.cuda.max_memory_allocated/reserved``), per-step time of
each expert (a keyed APPLY_MODEL wrapper with ``cuda.synchronize`` around each model call), wall time of
each KSamplerAdvanced stage (loading to the GPU included), the host RAM peak of the child
(``ru_maxrss``), and ratios to BF16. A table is printed, a markdown section appended to
benchmarks/RESULTS.md and everything written as JSON (``--json``).

``--calibrate`` times ``wan_w4a4.calibration.calibrate`` on both experts with a short calibration set
(2 random items x ``--calib-steps`` steps at 480p x 33) on the first ``--calib-blocks`` blocks
(the others kept BF16 by the keep-list), and extrapolates to all 40 blocks (labelled as such). It reads
the BF16 file, or with ``--calib-source fp8_scaled`` the same weights in ComfyUI's fp8_scaled layout
(the official template's experts), written next to it; ``--calib-gpu-budget`` / ``--calib-gpu-cap`` and
``--dynamic-vram`` give the memory of a smaller GPU, the device's whole use polled (``device_used_max_gib``).

Code (benchmarks/wan_e2e/): common.py (configurations, sizes, shared helpers), cli.py (options),
weights.py (the random experts, the W4A4 checkpoint, the LoRA), child.py (one configuration's run),
profiling.py (the kernel summary of --profile), calib.py (calibration timing), report.py (tables and
the RESULTS.md section), orchestrate.py (the parent: children, budget, JSON, --report-from).
"""
from __future__ import annotations

import sys

import _checkout  # noqa: F401  (makes ``import wan_w4a4`` work from a checkout)
from wan_e2e.orchestrate import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__.split("\n\n")[0]))
