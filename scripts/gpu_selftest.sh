#!/usr/bin/env bash
# Build and run the CUDA AtPatch kernel's self-test on a GPU machine (no onnxruntime, no
# internet needed): the device code of atpatch/ops/kernel/cuda_kernel.cu against the CPU
# kernel's arithmetic (core.cc) on fresh random maps, float32 and float16, and the fused op's
# (cuda_fused.cu: AtPatchAttention) against the host's attention, then timed against
# the CPU on [8,12,512,512]; then compute-sanitizer memcheck/initcheck on small cases, if the
# toolkit has it; then, when the onnxruntime-gpu wheel was carried into .ortgpu/
# (scripts/fetch_ort_gpu.sh), the library built with its CUDA op and run inside an onnxruntime-gpu
# session against the CPU kernel and timed against onnxruntime's fused CUDA attention
# (scripts/gpu_session_check.py, gpu_session_check.json into $OUT). Needs nvcc (CUDA 12+), cmake
# >= 3.18 and a C++17 compiler.
#
#   ATPATCH_SELFTEST_ARGS   extra arguments for atpatch_cuda_selftest (e.g. "--seed 123")
#   CUDAARCHS               CUDA architectures to build (default: 90, i.e. sm_90 + PTX)
#   OUT                     when set, the whole log is also written to $OUT/gpu_selftest.log
#
# Exit status: 0 passed; 1 a mismatch or a sanitizer report; 3 no usable GPU here (the build,
# the CPU side and the kernels on the CPU emulation of CUDA were still checked); 2 the build failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG=/dev/null
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  LOG="$OUT/gpu_selftest.log"
  : >"$LOG"
fi
say() { echo "$@" | tee -a "$LOG"; }
# Runs a command with its output in the log too; returns the command's status (call it as
# `logged ... || status=$?`: errexit does not apply there).
logged() {
  "$@" 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}

nvcc="${CUDACXX:-$(command -v nvcc || true)}"
if [ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  nvcc=/usr/local/cuda/bin/nvcc
fi
if [ -z "$nvcc" ]; then
  say "gpu_selftest: nvcc not found; put the CUDA toolkit's bin on PATH or set CUDACXX"
  exit 2
fi
cuda_bin="$(dirname "$(readlink -f "$nvcc")")"

say "gpu_selftest: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
say "gpu_selftest: $("$nvcc" --version | tail -n 2 | head -n 1)"
if command -v nvidia-smi >/dev/null 2>&1; then
  logged nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || :
fi

work="${ATPATCH_SELFTEST_BUILD:-$(mktemp -d)}"
generator=()
if command -v ninja >/dev/null 2>&1; then
  generator=(-G Ninja)
fi
start=$SECONDS
say "gpu_selftest: building atpatch_cuda_selftest in $work"
# ATPATCH_BUILD_KERNEL=OFF: the self-test needs neither onnxruntime nor its headers.
build_log="$work/build.log"
mkdir -p "$work"
if ! { cmake -S "$ROOT" -B "$work" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$nvcc" \
  -DATPATCH_BUILD_KERNEL=OFF -DATPATCH_CUDA_SELFTEST=ON &&
  cmake --build "$work" --target atpatch_cuda_selftest -j "$(nproc 2>/dev/null || echo 2)"; } >"$build_log" 2>&1; then
  tail -n 60 "$build_log" | tee -a "$LOG"
  say "gpu_selftest: BUILD FAILED (full log: $build_log)"
  exit 2
fi
cat "$build_log" >>"$LOG"
selftest="$work/atpatch_cuda_selftest"
say "gpu_selftest: built in $((SECONDS - start)) s"

status=0
# shellcheck disable=SC2086  # ATPATCH_SELFTEST_ARGS is a list of words
logged "$selftest" ${ATPATCH_SELFTEST_ARGS:-} || status=$?
if [ "$status" -eq 3 ]; then
  say "gpu_selftest: NO GPU on this machine, so the CUDA kernel did not run on a GPU. Checking the CPU side,"
  say "gpu_selftest: then the kernels' source on the CPU emulation of CUDA (cuda_emulation.h):"
  logged "$selftest" --cpu-only --cases 300 || exit 1
  cmake --build "$work" --target atpatch_cuda_selftest_emulated >>"$build_log" 2>&1 ||
    { tail -n 40 "$build_log"; say "gpu_selftest: BUILD FAILED (emulated self-test)"; exit 2; }
  logged "$work/atpatch_cuda_selftest_emulated" --cases 40 --small --no-bench || exit 1
  say "gpu_selftest: build, CPU side and emulation OK; the GPU check itself needs a machine with an NVIDIA GPU"
  exit 3
fi
if [ "$status" -ne 0 ]; then
  say "gpu_selftest: FAILED (self-test exit status $status)"
  exit 1
fi

sanitizer="$(command -v compute-sanitizer || true)"
for candidate in "$cuda_bin/compute-sanitizer" "$cuda_bin/../compute-sanitizer/compute-sanitizer"; do
  if [ -z "$sanitizer" ] && [ -x "$candidate" ]; then
    sanitizer="$candidate"
  fi
done
if [ -z "$sanitizer" ]; then
  say "gpu_selftest: compute-sanitizer not found in this toolkit; memcheck skipped"
else
  for tool in memcheck initcheck; do
    say "gpu_selftest: compute-sanitizer --tool $tool on small cases"
    logged "$sanitizer" --tool "$tool" --error-exitcode 9 "$selftest" --cases 40 --no-big --no-bench ||
      { say "gpu_selftest: FAILED: compute-sanitizer $tool reported errors"; exit 1; }
  done
fi
# The op inside an onnxruntime-gpu CUDA session (scripts/gpu_session_check.py): needs the onnxruntime-gpu
# wheel, carried in parts into .ortgpu/ (scripts/fetch_ort_gpu.sh says how), and the onnxruntime headers
# (third_party/ort, scripts/fetch_ort_headers.sh) for a CUDA build of the library.
if [ -f "$ROOT/.ortgpu/NAME" ]; then
  wheel="$work/$(cat "$ROOT/.ortgpu/NAME")"
  cat "$ROOT"/.ortgpu/*.part-* >"$wheel"
  site="$work/ortgpu-site"
  logged python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheel" ||
    { say "gpu_selftest: FAILED: the onnxruntime-gpu wheel did not install (all its parts carried?)"; exit 1; }
  say "gpu_selftest: building the AtPatch library with its CUDA op"
  if ! { cmake -S "$ROOT" -B "$work/lib" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$nvcc" \
    -DATPATCH_CUDA=ON && cmake --build "$work/lib" --target atpatch_ops -j "$(nproc 2>/dev/null || echo 2)"; } \
    >>"$build_log" 2>&1; then
    tail -n 40 "$build_log" | tee -a "$LOG"
    say "gpu_selftest: BUILD FAILED (the CUDA library; third_party/ort carried?)"
    exit 2
  fi
  logged env PYTHONPATH="$site" python3 "$ROOT/scripts/gpu_session_check.py" --library "$work/lib/libatpatch_ops.so" \
    --out "${OUT:-$work}" || { say "gpu_selftest: FAILED: the op inside onnxruntime-gpu"; exit 1; }
else
  say "gpu_selftest: no onnxruntime-gpu wheel in .ortgpu/ (scripts/fetch_ort_gpu.sh): the check inside an"
  say "gpu_selftest: onnxruntime CUDA session was not run"
fi
say "gpu_selftest: PASSED in $((SECONDS - start)) s"
