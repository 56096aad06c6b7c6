#!/usr/bin/env bash
# The CUDA checks, run from the repository root on the GPU machine the device
# tool lends (offline; everything it needs travels in .devcarry/, which
# .git/info/exclude ignores). Prepare them here first:
#
#   mkdir -p .devcarry && echo /.devcarry/ >> .git/info/exclude
#   python tests/device/shrink_gguf.py ~/.cache/llamactl/models/SmolLM2-135M-Instruct.Q4_1.gguf \
#       .devcarry/smollm2-4layers.gguf --layers 4          # the demo model is over the 64 MiB limit
#   tar czf .devcarry/llama.cpp-src.tar.gz -C ~/.cache/llamactl/sources/llama.cpp-b*/ \
#       --transform 's,^\.,llama.cpp,' --exclude=./docs --exclude=./models --exclude=./media \
#       --exclude=./tests --exclude=./examples --exclude=./benches --exclude=./gguf-py \
#       --exclude=./conversion --exclude=./pocs .   # ~10 MB: what a CUDA build of the server needs
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .devcarry gguf==0.19.0 tomli-w typer==0.28.0
#
# then: device run, carry [".devcarry"], command "bash tests/device/cuda_checks.sh".
# Results land in $OUT: nvidia-smi, detect, the pytest log (the build's JSON,
# offload and NVML figures) and, if time is left, the router benchmark.
set -uo pipefail
OUT=${OUT:-/tmp/cuda-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
started=$SECONDS
budget=${CUDA_CHECKS_SECONDS:-560}

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .devcarry/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/llama && tar xzf .devcarry/llama.cpp-src.tar.gz -C /tmp/llama || exit 1
export LLAMACTL_SOURCE=/tmp/llama/llama.cpp
[ -f "$LLAMACTL_SOURCE/CMakeLists.txt" ] || { echo "no llama.cpp/ in the source tarball"; exit 1; }
export LLAMACTL_TEST_MODEL=$PWD/.devcarry/smollm2-4layers.gguf

{ nvidia-smi; nvcc --version; nproc; python3 --version; } >"$OUT/machine.txt" 2>&1
python3 -m procman.cli detect >"$OUT/detect.txt" 2>&1
python3 -m procman.cli detect --json >"$OUT/detect.json" 2>&1

python3 -m pytest tests/integration/test_cuda.py tests/integration/test_multi_gpu.py -m gpu -v -s -rs -p no:cacheprovider \
    -o addopts="" 2>&1 | tee "$OUT/pytest.log"
tests=${PIPESTATUS[0]}
echo "[cuda_checks] pytest exit $tests after $((SECONDS - started)) s" | tee -a "$OUT/pytest.log"

left=$((budget - (SECONDS - started)))
server=$(ls -t ~/.cache/llamactl/builds/*/bin/llama-server 2>/dev/null | head -1)
# the router section on this machine (a GPU one: elsewhere `nox -s bench` measures it)
if [ "$tests" -eq 0 ] && command -v nvidia-smi >/dev/null && [ -n "$server" ] && [ "$left" -gt 120 ]; then
    timeout $((left - 15)) python3 bench/suite.py --only router --model "$LLAMACTL_TEST_MODEL" \
        --server "$server" 2>&1 | tail -40 >"$OUT/bench.log"
    cp bench/REPORT.md "$OUT/REPORT.md" 2>/dev/null
    cp "$(ls -t bench/results/*.json | head -1)" "$OUT/bench-router.json" 2>/dev/null
fi
exit "$tests"
