#!/usr/bin/env bash
# README's second command: install what the tests need, then lint and run the whole suite.
#   bash tools/test.sh                 # everything (CPU only, offline)
#   bash tools/test.sh -m "not slow"   # extra arguments go to pytest
# A CPU build of torch comes first (PyTorch's CPU index, else the pinned release your package
# index serves), so no dependency pulls a multi-GB CUDA build on a machine without a GPU.
# JSAE_WITH_SAELENS=1 also installs the real sae-lens in a side venv (.ci-saelens) so the
# export tests load jsae's folders with it (they skip otherwise).
# JSAE_WITH_SAEBENCH=1 also installs the real sae-bench 0.6.0 in a side venv (.ci-saebench) so
# tests/test_bench_absorption.py checks jsae's absorption measure against it (it skips otherwise).
# JSAE_WITH_CIRCUIT_TRACER=1 also installs the real circuit-tracer in a side venv
# (.ci-circuit-tracer, ~1.6 GB, about 90 s) so tests/test_circuit_formats.py loads jsae's
# exports with it (it skips otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TORCH_PIN="torch==2.13.0"
export PIP_DISABLE_PIP_VERSION_CHECK=1

install_torch() {  # $1: the python whose environment gets "$TORCH_PIN"
  if [ "$(uname -s)" = "Darwin" ]; then
    "$1" -m pip install -q "$TORCH_PIN"            # macOS wheels on PyPI are CPU builds
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "$1" -m pip install -q "$TORCH_PIN"            # a GPU machine: the CUDA build is wanted
  elif ! "$1" -m pip install -q --retries 1 --timeout 20 "$TORCH_PIN" \
        --index-url https://download.pytorch.org/whl/cpu; then
    "$1" -m pip install -q "$TORCH_PIN"            # a mirror that serves the CPU build
  fi
}
if ! "$PY" -c "import torch" 2>/dev/null; then
  install_torch "$PY"
fi
"$PY" -m pip install -q -e ".[test,torch,demo,atlas,vision,notebook]"

# The side venvs are independent once this environment is installed: they build at once (each
# is mostly downloading), each one's output in .ci-<name>.log, and a failed one only skips its tests.
build_saelens() {
  "$PY" -m venv --system-site-packages .ci-saelens \
    && "$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > .ci-saelens/pin.txt \
    && .ci-saelens/bin/pip install -q -c .ci-saelens/pin.txt "sae-lens==6.54.12"
}
# sae-bench 0.6.0 pins numpy<2 (its venv then shadows this environment's numpy 2, which the
# shared transformers / scikit-learn / jax are built against) and pulls a torchvision built for
# another torch: both are removed again, so the venv runs on this environment's numpy and no
# torchvision (the absorption eval needs neither pin).
build_saebench() {
  "$PY" -m venv --system-site-packages .ci-saebench \
    && "$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > .ci-saebench/pin.txt \
    && .ci-saebench/bin/pip install -q -c .ci-saebench/pin.txt "sae-bench==0.6.0" "sae-lens==6.54.12" \
    && .ci-saebench/bin/pip uninstall -q -y numpy torchvision \
    && .ci-saebench/bin/python -c "import sae_bench.evals.absorption.main, transformer_lens"
}
# circuit-tracer 0.5.0 needs transformers<=4.57.3 (this environment has 5.x), so its venv does not
# see this one's packages; torch is pinned (a constraints file) to the CPU build installed first.
build_circuit_tracer() {
  local CT=.ci-circuit-tracer
  "$PY" -m venv "$CT" && echo "$TORCH_PIN" > "$CT/pin.txt" \
    && { "$CT/bin/python" -c "import torch" 2>/dev/null || install_torch "$CT/bin/python"; } \
    && "$CT/bin/pip" install -q -c "$CT/pin.txt" "circuit-tracer==0.5.0" "nnsight==0.6.3" \
       "transformers<=4.57.3" "gguf>=0.10.0"  # gguf: transformers reads Gemma 3 270M's GGUF
}
# Google's `gemma` library for the parity tests: its normal install resolves for ages and pulls
# TensorFlow, so it goes in --no-deps with pinned pieces (tests/test_gemma_lib.py explains).
build_gemma() {
  "$PY" -m venv --system-site-packages .ci-gemma \
    && .ci-gemma/bin/pip install -q --no-deps "gemma==3.3.0" "kauldron==1.4.2" "clu==0.0.12" \
       "ml_collections==1.1.0" "lark==1.3.1" "typeguard==4.6.1" "jaxtyping==0.3.11" "sentencepiece==0.2.3"
}
declare -A BUILDS=()
if [ "${JSAE_WITH_SAELENS:-0}" = "1" ] && [ -z "${JSAE_SAELENS_PYTHON:-}" ]; then
  build_saelens > .ci-saelens.log 2>&1 & BUILDS[saelens]=$!
fi
if [ "${JSAE_WITH_SAEBENCH:-0}" = "1" ] && [ -z "${JSAE_SAEBENCH_PYTHON:-}" ]; then
  # the slowest side venv (about 3 min): the tests do not wait for it; its one test waits for
  # the marker (tests/saebench_side.py), so the build overlaps the suite
  rm -f .ci-saebench.done .ci-saebench.failed
  ( if build_saebench > .ci-saebench.log 2>&1; then touch .ci-saebench.done
    else touch .ci-saebench.failed; fi ) &
  export JSAE_SAEBENCH_PYTHON="$PWD/.ci-saebench/bin/python" JSAE_SAEBENCH_MARKER="$PWD/.ci-saebench"
fi
if [ "${JSAE_WITH_CIRCUIT_TRACER:-0}" = "1" ] && [ -z "${JSAE_CIRCUIT_TRACER_PYTHON:-}" ]; then
  build_circuit_tracer > .ci-circuit-tracer.log 2>&1 & BUILDS[circuit_tracer]=$!
fi
if [ $# -eq 0 ] || [ "${JSAE_WITH_GEMMA:-0}" = "1" ]; then
  build_gemma > .ci-gemma.log 2>&1 & BUILDS[gemma]=$!
fi
GEMMA_PY=""
for name in "${!BUILDS[@]}"; do
  if wait "${BUILDS[$name]}"; then
    case $name in
      saelens) export JSAE_SAELENS_PYTHON="$PWD/.ci-saelens/bin/python" ;;
      circuit_tracer) export JSAE_CIRCUIT_TRACER_PYTHON="$PWD/.ci-circuit-tracer/bin/python" ;;
      gemma) GEMMA_PY="$PWD/.ci-gemma/bin/python" ;;
    esac
  else
    echo "the $name side venv could not be installed (.ci-${name//_/-}.log); its tests skip"
    tail -n 5 ".ci-${name//_/-}.log" || true
  fi
done

# JSAE_WAIT_FOR=FILE: wait (up to 10 min) for FILE before the tests; CI installs the browser for
# the atlas site tests meanwhile and touches FILE when done.
if [ -n "${JSAE_WAIT_FOR:-}" ]; then
  for _ in $(seq 600); do [ -e "$JSAE_WAIT_FOR" ] && break; sleep 1; done
fi

"$PY" -m ruff check jsae tests benchmarks tools
# Two workers, one test file each at a time (module fixtures are built once); JSAE_TEST_WORKERS=0 runs serially.
# One persistent XLA compilation cache for the run: the test workers, the notebooks' kernels and
# the CLI subprocesses compile the same Gemma 3 programs many times (a notebook ran 20% faster
# with the cache warm). Its size limit turns on JAX's file lock, so concurrent workers never read
# a half-written entry; without `filelock` there is no cache.
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ] && "$PY" -c "import filelock" 2>/dev/null; then
  export JAX_COMPILATION_CACHE_DIR="$PWD/.jax-cache" JAX_COMPILATION_CACHE_MAX_SIZE=4000000000
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5
fi
"$PY" -m pytest -q -n "${JSAE_TEST_WORKERS:-2}" --dist loadfile --durations=25 "$@"
if [ -n "$GEMMA_PY" ]; then
  "$GEMMA_PY" -m pytest -q -p no:cacheprovider tests/test_gemma_lib.py   # parity with gm.nn (Gemma 3 270M)
fi
