#!/usr/bin/env bash
# Fetch the onnxruntime-gpu wheel for a GPU machine that cannot download (Python 3.12 and CUDA 13, as
# the lent H200 image has them) and cut it into parts that fit one transfer, in .ortgpu/ (ignored by
# git). scripts/gpu_selftest.sh joins them there, installs the wheel into a private folder and runs
# scripts/gpu_session_check.py (the op inside an onnxruntime-gpu CUDA session).
#
# The wheel (~256 MB) is larger than what one call to the GPU machine carries (64 MiB). Carry one part
# per call, in calls made back to back (what a call leaves in an ignored folder stays while the machine
# is warm), third_party/ort (the headers the CUDA library builds against) with the last, then run
# `bash scripts/gpu_selftest.sh` in that call.
#
#   ORT_GPU_VERSION   the onnxruntime-gpu version (default 1.31.1, built for CUDA 13)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${ORT_GPU_VERSION:-1.31.1}"
dest="$ROOT/.ortgpu"
rm -rf "$dest"
mkdir -p "$dest/download"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$dest/download" "onnxruntime-gpu==$VERSION"
wheel="$(ls "$dest"/download/*.whl)"
name="$(basename "$wheel")"
(cd "$dest" && split -b 56m -d "$wheel" "$name.part-")
rm -rf "$dest/download"
echo "$name" >"$dest/NAME"
echo "fetch_ort_gpu: $name in $(ls "$dest"/*.part-* | wc -l) parts of at most 56 MiB (a call carries 64 MiB, the working tree included) in .ortgpu/:"
ls -l "$dest"
