# Device set-up for benchmark calls on ComfyUI 0.33 with comfy-kitchen's CUDA extension (source it from
# the repository root on the GPU machine). Expects, carried in the git-ignored .whl/bench/ and .comfy/:
#   .whl/bench/*.whl           comfy-aimdo, simpleeval, blake3, torchsde, trampoline (Python 3.12 wheels)
#   .whl/bench/kitchen_cuda.txz comfy-kitchen 0.2.31 unpacked from its wheel without backends/hip (xz: 21 MB)
#   .whl/bench/pack.tgz        the pack as committed (git archive HEAD without the mini-model checkpoints)
#   .comfy/gpu.tgz             the slim 0.33.0 tree (benchmarks/README.md)
# PyAV is not carried (35 MB): benchmarks/device/avstub stands in for its imports; nothing here calls it.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/bench/*.whl
mkdir -p /tmp/cu /tmp/pk/wan_w4a4 /tmp/kit
tar xzf .comfy/gpu.tgz -C /tmp/cu
tar xzf .whl/bench/pack.tgz -C /tmp/pk/wan_w4a4
tar xJf .whl/bench/kitchen_cuda.txz -C /tmp/kit
export PYTHONPATH=/tmp/kit:/tmp/pk:/tmp/site:$PWD/benchmarks/device/avstub COMFYUI_PATH=/tmp/cu/ComfyUI PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
python3 -c "import comfy_kitchen as ck; print('comfy-kitchen backends:', {k: v['available'] for k, v in ck.list_backends().items()})"
