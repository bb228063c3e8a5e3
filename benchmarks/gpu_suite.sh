#!/usr/bin/env bash
# The GPU benchmark pass, as one script: a lent GPU machine has minutes, so every measurement runs in one go,
# each bounded by its own timeout, each table appended to $OUT/gpu_benchmarks.md as soon as it exists.
#
# Usage (repository root, on a GPU host with jax[cuda] and the project's dependencies importable):
#   OUT=/tmp/out bash benchmarks/gpu_suite.sh
set -u
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"
# Autotuning every convolution of these graphs took minutes per compile on an H100: heuristics instead.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false SYNTH_DATA_DIR=${SYNTH_DATA_DIR:-/tmp/tfds}
report="$OUT/gpu_benchmarks.md"
py=${PYTHON:-python3}

run() {  # run <seconds> <description> <command...>: output to the log and the report, never stop the pass.
  local limit=$1 what=$2
  shift 2
  echo "### $what" | tee -a "$report"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>>"$OUT/stderr.log" | tee -a "$report"
  echo "(exit ${PIPESTATUS[0]}, $((SECONDS - t0)) s wall)" | tee -a "$report"
  echo | tee -a "$report"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$report"
$py -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$report"

run 150 "Stage B training + generation, 128² small (batch 8), generation fp32 and bf16" \
  $py -m benchmarks.synthesis_step --shapes 128x128 --models small --batch 8 --steps 10 --gen_batches 1,64 --dtypes float32,bfloat16
run 230 "Stage B training + generation, 512² base, training fp32 (batch 1), generation fp32 and bf16" \
  $py -m benchmarks.synthesis_step --shapes 512x512 --models base --batch 1 --steps 3 --gen_batches 1,8 --dtypes float32,bfloat16
