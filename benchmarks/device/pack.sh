#!/usr/bin/env bash
# Builds the git-ignored files that the device calls carry and benchmarks/device/setup.sh unpacks on the GPU
# machine (Python 3.12, torch 2.11, no package registry). Run it once from the repository root, on a machine with
# a registry and ../shared/comfyui (the two ComfyUI trees):
#   bash benchmarks/device/pack.sh
# It writes, and refuses to overwrite:
#   .whl/b33/*.whl             Python 3.12 wheels of what ComfyUI 0.33 imports beyond the GPU machine's packages
#                              (pydantic-core at the version the downloaded pydantic pins)
#   .whl/b33/kitchen_cuda.txz  comfy-kitchen 0.2.31's wheel unpacked without backends/hip (21 MB)
#   .comfy/gpu033.tgz          the 0.33.0 tree without comfy_api_nodes, blueprints, tests, tests-unit, openapi.yaml and
#                              the tokenizer files over 1 MB (2.5 MB), its folder named ComfyUI
#   .comfy/gpu0364.tgz         the 0.3.64 tree slimmed the same way (1.5 MB)
# A call then carries [".whl/b33", ".comfy/gpu033.tgz"] (or ".comfy/gpu0364.tgz" with WAN_W4A4_DEVICE_COMFYUI=0.3.64
# for setup.sh): over 64 MiB with the tracked files unless the two mini-model checkpoints
# (minimodel/{high,low}_noise.safetensors) are moved out of the working tree for the call.
set -euo pipefail
shared=${WAN_W4A4_SHARED_COMFYUI:-../shared/comfyui}
for f in .whl/b33 .comfy/gpu033.tgz .comfy/gpu0364.tgz; do
  if [ -e "$f" ]; then echo "pack.sh: $f exists; remove it first to build it again" >&2; exit 1; fi
done
for v in 0.3.64 0.33.0; do
  [ -f "$shared/comfyui-$v.tar.gz" ] || { echo "pack.sh: $shared/comfyui-$v.tar.gz not found" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
get() {  # Python 3.12 manylinux wheels, no dependencies
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$@"
}
mkdir -p "$work/whl"
get "$work/whl" comfy-aimdo==0.4.13 simpleeval blake3 SQLAlchemy greenlet alembic Mako pydantic \
  pydantic-settings annotated-types typing-inspection python-dotenv torchsde trampoline
core=$(unzip -p "$work"/whl/pydantic-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
get "$work/whl" "pydantic-core==$core"
get "$work/kitwhl" comfy-kitchen==0.2.31
unzip -q "$work"/kitwhl/comfy_kitchen-*.whl -d "$work/kit"
rm -rf "$work/kit/comfy_kitchen/backends/hip"
tar cJf "$work/whl/kitchen_cuda.txz" -C "$work/kit" .
slim() {  # $1: version, $2: output
  mkdir -p "$work/$1"
  tar xzf "$shared/comfyui-$1.tar.gz" -C "$work/$1"
  local root
  root=$(find "$work/$1" -mindepth 1 -maxdepth 1 -type d)
  rm -rf "$root"/comfy_api_nodes "$root"/blueprints "$root"/tests "$root"/tests-unit "$root"/openapi.yaml
  find "$root/comfy" -path '*tokenizer*' -type f ! -name '*.py' -size +1M -delete  # the large vocabularies
  mv "$root" "$work/$1/ComfyUI.tmp" && mv "$work/$1/ComfyUI.tmp" "$work/$1/ComfyUI"  # setup.sh's COMFYUI_PATH
  tar czf "$2" -C "$work/$1" ComfyUI
}
mkdir -p .comfy .whl
slim 0.33.0 "$work/gpu033.tgz"
slim 0.3.64 "$work/gpu0364.tgz"
mv "$work/whl" .whl/b33
mv "$work/gpu033.tgz" "$work/gpu0364.tgz" .comfy/
du -sh .whl/b33 .comfy/gpu033.tgz .comfy/gpu0364.tgz
