#!/usr/bin/env bash
# Build the native AtPatch kernel with AddressSanitizer + UndefinedBehaviorSanitizer into a
# temp dir (plain cmake, not pip), then run the hostile-input cases and time-bounded random
# fuzzing against it. Exits non-zero on any sanitizer report or failed case.
#
#   ATPATCH_FUZZ_SECONDS   fuzzing time (default 120)
#   ORT_INCLUDE_DIR        onnxruntime headers (default: third_party/ort/include, see
#                          scripts/fetch_ort_headers.sh)
#
# Python is not instrumented, so the ASan runtime is LD_PRELOADed; leak detection is off
# because the interpreter itself never frees everything at exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ_SECONDS="${ATPATCH_FUZZ_SECONDS:-120}"
PYTHON="${PYTHON:-python3}"
CXX="${CXX:-g++}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
cmake -S "$ROOT" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER="$CXX" -DATPATCH_SANITIZE=address,undefined \
  ${ORT_INCLUDE_DIR:+-DORT_INCLUDE_DIR="$ORT_INCLUDE_DIR"} >"$work/cmake.log" 2>&1 ||
  { cat "$work/cmake.log"; exit 1; }
if grep -q "headers (onnxruntime_cxx_api.h) not found" "$work/cmake.log"; then
  echo "kernel-sanitize: onnxruntime headers not found; run scripts/fetch_ort_headers.sh first" >&2
  exit 1
fi
cmake --build "$work/build" -j "$(nproc 2>/dev/null || echo 2)"
lib="$work/build/libatpatch_ops.so"
[ -f "$lib" ] || { echo "kernel-sanitize: $lib was not built" >&2; exit 1; }

asan_runtime="$("$CXX" -print-file-name=libasan.so)"
if [ ! -f "$asan_runtime" ]; then
  echo "kernel-sanitize: $CXX has no libasan.so; install the compiler's sanitizer runtime (Debian: libasan8)" >&2
  exit 1
fi

# libstdc++ is preloaded too: the python binary does not link it, and ASan's __cxa_throw
# interceptor must find the real one at start-up (onnxruntime throws C++ exceptions).
cxx_runtime="$("$CXX" -print-file-name=libstdc++.so.6)"
preload="$asan_runtime"
[ -f "$cxx_runtime" ] && preload="$asan_runtime $cxx_runtime"

reports="$work/reports"
mkdir -p "$reports"
status=0
(
  cd "$ROOT"
  export ATPATCH_NATIVE_LIBRARY="$lib"
  export LD_PRELOAD="$preload"
  export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_odr_violation=0:alloc_dealloc_mismatch=0:log_path=$reports/asan"
  export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1:log_path=$reports/ubsan"
  export PYTHONFAULTHANDLER=1
  "$PYTHON" tests/kernel_hostile_cases.py --all --fuzz "$FUZZ_SECONDS"
) || status=$?

if compgen -G "$reports/*" >/dev/null; then
  echo "kernel-sanitize: sanitizer reports:" >&2
  cat "$reports"/* >&2
  status=1
fi
if [ "$status" -ne 0 ]; then
  echo "kernel-sanitize: FAILED (exit $status)" >&2
  exit "$status"
fi
echo "kernel-sanitize: OK (hostile cases + ${FUZZ_SECONDS}s fuzzing under ASan+UBSan)"
