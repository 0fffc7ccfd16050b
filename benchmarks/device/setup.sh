# Device set-up for calls on ComfyUI 0.33 with comfy-kitchen's CUDA extension, or on 0.3.64 (source it from the
# repository root on the GPU machine). Carry the git-ignored .whl/b33/ and .comfy/gpu033.tgz (or gpu0364.tgz),
# which benchmarks/device/pack.sh builds beforehand and describes. PyAV is not carried (35 MB):
# benchmarks/device/avstub stands in for its imports; nothing here calls it.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/b33/*.whl 2>/dev/null
mkdir -p /tmp/cu /tmp/pk /tmp/kit /tmp/bench
# WAN_W4A4_DEVICE_COMFYUI=0.3.64: the 0.3.64 tree (.comfy/gpu0364.tgz, carried instead of gpu033.tgz; it does not
# import comfy-kitchen). benchmarks/device/pack.sh builds all of these.
case "${WAN_W4A4_DEVICE_COMFYUI:-0.33.0}" in
  0.3.64) tar xzf .comfy/gpu0364.tgz -C /tmp/cu ;;
  *) tar xzf .comfy/gpu033.tgz -C /tmp/cu ;;
esac
tar xJf .whl/b33/kitchen_cuda.txz -C /tmp/kit
ln -sfn "$PWD" /tmp/pk/wan_w4a4
export PYTHONPATH=/tmp/kit:/tmp/pk:/tmp/site:$PWD/benchmarks/device/avstub COMFYUI_PATH=/tmp/cu/ComfyUI PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
python3 -c "import comfy_kitchen as ck; print('comfy-kitchen backends:', {k: v['available'] for k, v in ck.list_backends().items()})"
