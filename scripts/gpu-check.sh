#!/usr/bin/env bash
# The GPU check, run on a machine with an NVIDIA GPU, PyTorch and transformers, from the .gpu/
# bundle scripts/build-cuda.sh makes (.gpu/, or .gpu-bundle.tar.xz unpacked into it; no Rust
# toolchain needed there):
#   1. parity: the engine's reference tests (tests/engine_reference.rs, f32) and generation tests
#      (tests/engine_generation.rs, bf16/f16/q8_0 deviation printed; again with decode graphs) with
#      VLAD_TEST_DEVICE=cuda,
#      and the CUDA kernels' own tests (engine::cuda_flash against exact sums, engine::cuda_fused
#      against separate ops and exact sums);
#   2. speed: `vlad bench --device cuda` and the reference (scripts/bench_reference.py) one after
#      the other on the same GPU, same sizes, 2B shapes, bf16; scripts/bench_vs_reference.py prints
#      the ratios;
#   3. where the time goes: `vlad bench --profile` (phases), with flash attention and without;
#      `ab`: vlad alone as built, with pipelined decoding (VLAD_CUDA_PIPELINE=1), with decode steps
#      replayed from a CUDA graph as well (VLAD_CUDA_GRAPHS=1), with the cp.async flash build
#      (VLAD_CUDA_FLASH=async), without the fused decoder kernels, and without flash attention;
#   4. where the host CPU has AMX: the CPU kernels' unit tests and `vlad bench --device cpu` with
#      and without the tiles (VLAD_AMX=0).
#   5. where the GPU time goes: every kernel of one step at the largest size (Nsight Compute), and
#      the kernels of one decode token (a 640x360 step with 5 decode tokens minus one with 1).
#   6. cpu-speed: where the host CPU has AMX, vlad and the reference on that CPU (640x360, bf16).
# Logs and JSON go to $OUT (or .gpu/out). STEPS picks steps (default all: parity,speed,ab,
# phases,amx,cpu-speed,kernels,decode-kernels), e.g. STEPS=phases,amx for a short run.
#
#   scripts/gpu-check.sh [SIZES]        # default 1280x720,1920x1080
set -uo pipefail
cd "$(dirname "$0")/.."
sizes="${1:-1280x720,1920x1080}"
out="${OUT:-.gpu/out}"
mkdir -p "$out"
status=0
steps=",${STEPS:-parity,speed,ab,phases,amx,cpu-speed,kernels,decode-kernels},"
want() { [[ "$steps" == *",$1,"* ]]; }
if [[ ! -x .gpu/bin/vlad && -f .gpu-bundle.tar.xz ]]; then
  mkdir -p .gpu
  python3 -c 'import lzma, sys, tarfile; tarfile.open(fileobj=lzma.open(sys.argv[1])).extractall(sys.argv[2])' \
    .gpu-bundle.tar.xz .gpu
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
# cuBLAS, cuRAND and NVRTC 13 from the machine's Python packages; the driver's libcuda from its
# usual places; what the binary links beyond CUDA from the bundle
nvidia_libs="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null)"
export LD_LIBRARY_PATH="$PWD/.gpu/lib:${nvidia_libs}:/usr/local/nvidia/lib64:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
if ldd .gpu/bin/vlad | grep 'not found'; then
  echo "libraries missing (above): LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >&2
  exit 1
fi

if want parity; then
echo "== parity on the GPU"
export VLAD_TEST_DEVICE=cuda CARGO_MANIFEST_DIR="$PWD"
timeout 120 .gpu/bin/engine_reference --test-threads 1 2>&1 | tee "$out/parity_reference.log" | tail -15
[[ ${PIPESTATUS[0]} == 0 ]] || status=1
# the cli_ tests start the vlad binary of the build tree, which is not here
timeout 120 .gpu/bin/engine_generation --test-threads 1 --nocapture --skip cli_ 2>&1 \
  | tee "$out/parity_generation.log" | grep -E 'deviation|test result|panicked|FAILED|failed'
[[ ${PIPESTATUS[0]} == 0 ]] || status=1
# decode steps replayed from a CUDA graph (opt-in): the same replies as step by step
VLAD_CUDA_PIPELINE=1 VLAD_CUDA_GRAPHS=1 timeout 120 .gpu/bin/engine_generation --test-threads 1 --nocapture --skip cli_ \
  2>&1 | tee "$out/parity_graphs.log" | grep -E 'test result|panicked|FAILED|failed|capture'
[[ ${PIPESTATUS[0]} == 0 ]] || status=1
# the flash attention kernels against exact sums, the fused decoder kernels against candle ops
timeout 120 .gpu/bin/engine_unit engine::cuda_flash engine::cuda_fused --nocapture 2>&1 | tee "$out/parity_flash.log" \
  | grep -E 'test result|panicked|worst|no CUDA'
[[ ${PIPESTATUS[0]} == 0 ]] || status=1
unset VLAD_TEST_DEVICE CARGO_MANIFEST_DIR
fi

if want speed; then
echo "== speed: vlad and the reference on this GPU, same run"
PYTHONUNBUFFERED=1 timeout 330 python3 scripts/bench_vs_reference.py --vlad .gpu/bin/vlad --device cuda \
  --tokenizer .gpu/tokenizer --sizes "$sizes" --dtypes bf16 --quantize '' --decode-tokens 64 --runs 3 \
  --json-out "$out/bench.json" 2>&1 | tee "$out/bench.log" | grep -v '^{"size"'
[[ ${PIPESTATUS[0]} == 0 ]] || status=1
fi

# where the time goes, phase by phase (device drained around each: host and GPU time together)
if want ab; then
echo "== vlad alone: as built, pipelined decoding, with decode graphs, cp.async flash, without the fused decoder kernels, without flash attention"
for switch in "" VLAD_CUDA_PIPELINE=1 "VLAD_CUDA_PIPELINE=1 VLAD_CUDA_GRAPHS=1" VLAD_CUDA_FLASH=async \
  VLAD_CUDA_FUSED=0 VLAD_CUDA_FLASH=0; do
  echo "-- ${switch:-as built}"
  env $switch timeout 150 .gpu/bin/vlad bench --config 2b --tokenizer .gpu/tokenizer --device cuda \
    --dtype bf16 --sizes "$sizes" --decode-tokens 64 --runs 3 2>&1 | tee -a "$out/ab.txt" | grep -v '^model'
done
fi

if want phases; then
echo "== phases of a ${sizes##*,} step"
timeout 120 .gpu/bin/vlad bench --config 2b --tokenizer .gpu/tokenizer --device cuda --dtype bf16 \
  --sizes "${sizes##*,}" --decode-tokens 16 --runs 2 --profile 2>&1 | tee "$out/phases.txt" | head -40
echo "== the same without flash attention (VLAD_CUDA_FLASH=0: cuBLAS scores, fused softmax)"
VLAD_CUDA_FLASH=0 timeout 120 .gpu/bin/vlad bench --config 2b --tokenizer .gpu/tokenizer --device cuda \
  --dtype bf16 --sizes "${sizes##*,}" --decode-tokens 16 --runs 2 --profile 2>&1 \
  | tee "$out/phases_cublas.txt" | head -40
fi

# the CPU's AMX path (src/engine/amx.rs), where this host's CPU has AMX (the machines the project
# builds on have none): the CPU kernels' unit tests, then the CPU bench with the tiles and without
if want amx && ! grep -qw amx_bf16 /proc/cpuinfo; then
  echo "== no AMX on this host's CPU:$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
elif want amx; then
  echo "== AMX on this host's CPU:$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  if [[ -x .gpu/bin/engine_unit ]]; then
    timeout 120 .gpu/bin/engine_unit engine::amx engine::gemm engine::attention engine::vector_math 2>&1 \
      | tee "$out/amx_tests.log" | grep -E 'test result|panicked|FAILED'
    [[ ${PIPESTATUS[0]} == 0 ]] || status=1
  fi
  for amx in 1 0; do
    VLAD_AMX=$amx timeout 120 .gpu/bin/vlad bench --config 2b --tokenizer .gpu/tokenizer --device cpu \
      --dtype bf16 --sizes 640x360 --decode-tokens 4 2>&1 | tee "$out/amx_bench_$amx.txt" \
      | grep -E 'CPU kernels|640x360'
  done
fi

# the issue's CPU target where it was set: vlad and the reference on this host's CPU (the project's
# reference numbers come from an Intel Xeon with AMX; the machines it builds on have none)
if want cpu-speed && grep -qw amx_bf16 /proc/cpuinfo; then
  echo "== vlad and the reference on this host's CPU (AMX), same run"
  PYTHONUNBUFFERED=1 timeout 300 python3 scripts/bench_vs_reference.py --vlad .gpu/bin/vlad \
    --device cpu --tokenizer .gpu/tokenizer --sizes 640x360 --dtypes bf16 --quantize '' \
    --decode-tokens 16 --runs 2 --json-out "$out/cpu_bench.json" 2>&1 | tee "$out/cpu_bench.log" \
    | grep -v '^{"size"'
fi

# where the GPU time goes: every kernel of one step at the largest size (one decode token),
# timed by Nsight Compute and summed per kernel name
ncu="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)"
if want kernels && [[ -n "$ncu" ]]; then
  echo "== kernels of one ${sizes##*,} step (vision + prefill + 1 token), by GPU time"
  timeout 150 "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --log-file "$out/ncu.csv" \
    .gpu/bin/vlad bench --config 2b --tokenizer .gpu/tokenizer --device cuda --dtype bf16 \
    --sizes "${sizes##*,}" --decode-tokens 1 --runs 0 > "$out/ncu-bench.txt" 2>&1
  python3 scripts/ncu_kernels.py "$out/ncu.csv" | tee "$out/kernels.txt"
fi
if want decode-kernels && [[ -n "$ncu" ]]; then
  # one decode token's kernels: a small step with 5 decode tokens minus the same step with 1
  echo "== kernels of one decode token (640x360: 5 tokens minus 1, divided by 4)"
  for n in 1 5; do
    timeout 90 "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv \
      --log-file "$out/ncu_decode_$n.csv" .gpu/bin/vlad bench --config 2b --tokenizer .gpu/tokenizer \
      --device cuda --dtype bf16 --sizes 640x360 --decode-tokens $n --runs 0 > "$out/ncu_decode_$n.txt" 2>&1
  done
  python3 scripts/ncu_kernels.py "$out/ncu_decode_5.csv" "$out/ncu_decode_1.csv" 4 \
    | tee "$out/decode_kernels.txt"
  rm -f "$out"/ncu_decode_*.csv "$out"/ncu_decode_*.txt
fi
exit $status
