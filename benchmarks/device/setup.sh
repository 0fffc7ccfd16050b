# Device set-up for calls on ComfyUI 0.33 with comfy-kitchen's CUDA extension (source it from the repository root
# on the GPU machine). Carry the git-ignored .whl/b33/ and .comfy/gpu033.tgz, made here beforehand:
#   .whl/b33/*.whl             Python 3.12 wheels, fetched with
#       pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#           --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#           -d .whl/b33 comfy-aimdo==0.4.13 simpleeval blake3 SQLAlchemy greenlet alembic Mako pydantic \
#           pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv torchsde trampoline
#       (pydantic-core at the version the pydantic release pins)
#   .whl/b33/kitchen_cuda.txz  comfy-kitchen 0.2.31's wheel unpacked without backends/hip, tar cJf (21 MB)
#   .comfy/gpu033.tgz          the 0.33.0 tree without comfy_api_nodes, blueprints, tests, tests-unit,
#                              openapi.yaml and the tokenizer data files (2 MB)
# With the tracked files this is over the call's 64 MiB: move the two mini-model checkpoints
# (minimodel/{high,low}_noise.safetensors) out of the working tree for the call. PyAV is not carried
# (35 MB): benchmarks/device/avstub stands in for its imports; nothing here calls it.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/b33/*.whl 2>/dev/null
mkdir -p /tmp/cu /tmp/pk /tmp/kit /tmp/bench
tar xzf .comfy/gpu033.tgz -C /tmp/cu
tar xJf .whl/b33/kitchen_cuda.txz -C /tmp/kit
ln -sfn "$PWD" /tmp/pk/wan_w4a4
export PYTHONPATH=/tmp/kit:/tmp/pk:/tmp/site:$PWD/benchmarks/device/avstub COMFYUI_PATH=/tmp/cu/ComfyUI PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
python3 -c "import comfy_kitchen as ck; print('comfy-kitchen backends:', {k: v['available'] for k, v in ck.list_backends().items()})"
