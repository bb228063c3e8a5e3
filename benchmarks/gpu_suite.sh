#!/usr/bin/env bash
# The GPU benchmark pass, as one script: a lent GPU machine has minutes, so every measurement runs in one go.
#
# The benchmarks start side by side: XLA's compiles (minutes for these graphs on a GPU, mostly host CPU work)
# then overlap, while the timed calls take turns through `BENCHMARK_LOCK` (benchmarks/common.py), so no
# timing shares the GPU with another. Each benchmark has its own memory cap, its own time limit and its own
# report file under $OUT; rows are printed as soon as they are measured, so a run cut off keeps its rows.
#
# Usage (repository root, on a GPU host with jax[cuda] and the project's dependencies importable):
#   OUT=/tmp/out LIMIT=480 [MEMORY=1] bash benchmarks/gpu_suite.sh
set -u
OUT=${OUT:-/tmp/gpu_bench}
LIMIT=${LIMIT:-480}
mkdir -p "$OUT"
# Autotuning level 1 times cuDNN's algorithms on uninitialised buffers, without XLA's slow correctness checks
# (level 4, the default, took minutes per compile here and tried 130 GiB workspaces). Level 0 is no answer:
# it runs cuDNN's algorithm 0 (implicit GEMM, no tensor cores), which made an H200 as slow as ~400 GFLOP/s
# and bf16 no faster than float32 (2026-11-26).
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=${AUTOTUNE_LEVEL:-1}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false BENCHMARK_LOCK="$OUT/.timing_lock"
py=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
$py -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  | tee -a "$OUT/machine.txt"

start() {  # start <name> <memory fraction> <command...>: in the background, bounded by $LIMIT.
  local name=$1 fraction=$2
  shift 2
  XLA_PYTHON_CLIENT_MEM_FRACTION=$fraction timeout "$LIMIT" "$@" >"$OUT/$name.md" 2>"$OUT/$name.log" &
}

GEN_BATCHES=${GEN_BATCHES:-1,8}
start synthesis_128 0.10 $py -m benchmarks.synthesis_step --shapes 128x128 --models small --batch 8 \
  --steps 10 --gen_batches 32 --dtypes float32,bfloat16 --train_dtypes float32,bfloat16
start synthesis_512 0.45 $py -m benchmarks.synthesis_step --shapes 512x512 --models base --batch 1 \
  --steps 3 --gen_batches "$GEN_BATCHES" --dtypes float32,bfloat16 --train_dtypes float32,bfloat16
start retina_512 0.35 $py -m benchmarks.family_step --family retina --size 512 --model base --batch 2 \
  --steps 3 --gen_batch 8 --dtypes float32,bfloat16 --train_dtypes float32,bfloat16
wait
for name in synthesis_128 synthesis_512 retina_512; do
  echo "=== $name"
  cat "$OUT/$name.md"
  grep -E "^\[|Error|error:" "$OUT/$name.log" | tail -8
done

# Opt-in (MEMORY=1): the GPU's compiled memory of the paper's steps with and without rematerialised U-Net
# blocks (`model.remat`; XLA:CPU merges the recomputation back, so only a GPU shows its effect), and the
# ~130 GiB question of the 2026-11-26 run. Compiles only, one after the other, after the timings.
if [ "${MEMORY:-0}" = 1 ]; then
  for remat in "" --remat; do
    for hw in "" 512x512; do  # The paper's sizes; BRATS' K = 4 at 512² (the ~130 GiB step).
      name=memory${remat:+_remat}${hw:+_$hw}
      timeout "$LIMIT" $py -m benchmarks.memory --configs brats2015${hw:-,lung_ct} --generators gan $remat \
        ${hw:+--hw $hw} --json "$OUT/$name.json" >"$OUT/$name.md" 2>"$OUT/$name.log"
      echo "=== $name"
      cat "$OUT/$name.md"
    done
  done
fi
