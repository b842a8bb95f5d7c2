#!/usr/bin/env bash
# Builds vlad with the `cuda` feature (release) and bundles what a GPU machine needs to run it and
# the engine's parity tests into .gpu/, packed as .gpu-bundle.tar.xz (scripts/gpu-check.sh runs
# them there):
#
#   .gpu/bin/vlad, .gpu/bin/engine_reference, .gpu/bin/engine_generation   (stripped)
#   .gpu/lib/    the X11/Wayland libraries the binary links that a headless CUDA image may lack
#   .gpu/tokenizer/   the Qwen2-VL tokenizer `vlad bench` needs (scripts/build-qwen2vl-tokenizer.sh)
#
# With a CUDA toolkit installed (nvcc on PATH, CUDA_HOME set), that toolkit is used. Without one,
# `--toolkit-from-pypi` assembles CUDA 13.0 from NVIDIA's wheels on PyPI (nvcc, headers, cuBLAS,
# cuRAND, NVRTC) in $CUDA_PYPI_DIR (default ~/.cache/vlad-cuda-13.0). The driver library is not on
# PyPI: a stub libcuda.so carrying the entry points cudarc binds to is generated for the link only;
# at run time the machine's driver provides the real one (it must support CUDA 13: driver 580 or
# newer), with cuBLAS/cuRAND/NVRTC 13 from a CUDA 13 install or the same wheels (PyTorch's cu130
# builds carry them). Kernels are compiled for CUDA_COMPUTE_CAP (default 90: H100/H200).
#
#   scripts/build-cuda.sh                       # with the installed toolkit
#   scripts/build-cuda.sh --toolkit-from-pypi   # no toolkit on this machine
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -f "$HOME/.cargo/env" ]] && source "$HOME/.cargo/env"

CUDA_VERSION=13.0
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

toolkit_from_pypi() {
  local dir="${CUDA_PYPI_DIR:-$HOME/.cache/vlad-cuda-$CUDA_VERSION}"
  if [[ ! -x "$dir/bin/nvcc" || ! -f "$dir/lib/libcuda.so" ]]; then
    local wheels
    wheels="$(mktemp -d)"
    echo "fetching the CUDA $CUDA_VERSION wheels into $dir" >&2
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 -d "$wheels" \
      "nvidia-cuda-nvcc==$CUDA_VERSION.*" "nvidia-cuda-crt==$CUDA_VERSION.*" \
      "nvidia-nvvm==$CUDA_VERSION.*" "nvidia-cuda-cccl==$CUDA_VERSION.*" \
      "nvidia-cuda-runtime==$CUDA_VERSION.*" "nvidia-cuda-nvrtc==$CUDA_VERSION.*" \
      "nvidia-cublas==$CUDA_VERSION.*" "nvidia-curand==10.4.0.*"
    rm -rf "$dir" && mkdir -p "$dir"
    for w in "$wheels"/*.whl; do
      python3 -m zipfile -e "$w" "$wheels/x"
    done
    cp -r "$wheels/x/nvidia/cu13/." "$dir/"
    rm -rf "$wheels"
    chmod +x "$dir"/bin/* "$dir"/nvvm/bin/*
    (cd "$dir/lib" && for f in libcudart.so.13 libnvrtc.so.13 libcurand.so.10 libcublasLt.so.13 libcublas.so.13; do
      ln -sf "$f" "${f%%.so*}.so"
    done)
    ln -sfn lib "$dir/lib64"
    # link-time stand-in for the driver library: every entry point of cudarc's driver bindings
    local bindings
    bindings="$(cargo metadata --format-version 1 --features cuda 2>/dev/null | python3 -c '
import json, os, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "cudarc":
        print(os.path.join(os.path.dirname(p["manifest_path"]), "src/driver/sys/mod.rs"))')"
    grep -oP '^pub unsafe fn \K\w+' "$bindings" | sort -u | sed 's/.*/void &(void) {}/' > "$dir/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$dir/lib/libcuda.so" "$dir/libcuda_stub.c"
  fi
  export CUDA_HOME="$dir" CUDA_PATH="$dir" PATH="$dir/bin:$PATH"
  export CUDARC_CUDA_VERSION="${CUDA_VERSION/./0}0"
}

if [[ "${1:-}" == "--toolkit-from-pypi" ]]; then
  toolkit_from_pypi
elif ! command -v nvcc >/dev/null; then
  echo "no nvcc on PATH: install the CUDA toolkit, or run $0 --toolkit-from-pypi" >&2
  exit 1
fi

./scripts/build-qwen2vl-tokenizer.sh >/dev/null
cargo build --release --features cuda --bin vlad
tests_json="$(cargo test --release --features cuda --no-run --message-format json \
  --lib --test engine_reference --test engine_generation)"

rm -rf .gpu && mkdir -p .gpu/bin .gpu/lib
cp target/release/vlad .gpu/bin/
# the two parity tests, and the library's unit tests as engine_unit (gpu-check.sh runs the CPU
# kernels' tests with them where the host CPU has AMX)
for t in engine_reference engine_generation engine_unit; do
  exe="$(python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if m["target"]["name"] == name or (name == "engine_unit" and "lib" in m["target"]["kind"]):
        print(m["executable"])' "$t" <<<"$tests_json" | tail -1)"
  cp "$exe" ".gpu/bin/$t"
done
strip .gpu/bin/*
# shared libraries the binary needs beyond glibc and CUDA (xcap's X11/Wayland/DRM chain)
ldd .gpu/bin/vlad | awk '/=> \// {print $3}' \
  | grep -Ev '/(libc|libm|libpthread|libdl|librt|libgcc_s|ld-linux[^/]*)\.so|libcuda|libcublas|libcurand|libnvrtc' \
  | xargs -r -I{} cp -L {} .gpu/lib/
cp -r tests/data/qwen2vl-tokenizer .gpu/tokenizer
# one compressed file to copy to the GPU machine (scripts/gpu-check.sh unpacks it there)
tar -C .gpu -cf - bin lib tokenizer | xz -T0 -6 > .gpu-bundle.tar.xz
ls -l .gpu/bin .gpu-bundle.tar.xz >&2
