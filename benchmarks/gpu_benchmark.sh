#!/usr/bin/env bash
# The one GPU benchmark: JAX against PyTorch on the same GPU, in one run, table last.
#
#   bash benchmarks/gpu_benchmark.sh              # one GPU, under 8 minutes
#   BENCH_TINY=1 PYTHON=.venv/bin/python bash benchmarks/gpu_benchmark.sh   # CPU check
#
# Phases, each under its own time limit so one failure or hang keeps the others:
#   setup   wheels from .whl/ (offline hosts) installed if grain/ml_collections/clu are missing;
#           versions, nvidia-smi; XLA_FLAGS probed before use.
#   data    a synthetic DeepFashion of 300-px JPEGs converted to TFRecord shards
#           (data_pipeline.conversion.synthetic + data_pipeline.conversion.deepfashion; no TensorFlow).
#   jax     launch.py --mode benchmark: resnet50, msff_ecomnet, mobilenet_v3_large,
#           efficientnet_b0 at 224 px, bf16, batch 256, synthetic on-device batches;
#           then msff_ecomnet's compiled step fed from the shards (end-to-end).
#   torch   benchmarks/torch_peers.py: torch.compile on for resnet50 and msff_ecomnet,
#           eager for all four, then compile on for the other two if time is left.
#   flags   (if time is left) resnet50 and msff_ecomnet again with extra XLA flags,
#           as rows 'jax[xla-flags]', to measure what the flags change.
#   table   benchmarks/plot_results.py merges every CSV and prints the table last.
#
# Results go to $OUT if set (e.g. a batch system's output directory), else to
# runs/gpu_benchmark. At most 8 files land there: the log, the CSVs, the JSON details,
# comparison.md and comparison.png.
#
# Environment: BENCH_TINY=1 (tiny models, 32 px, CPU), BENCH_BUDGET_S (total seconds,
# default 470; tiny: 2820), BENCH_XLA_FLAGS (extra flags for the main JAX run, probed first),
# BENCH_VARIANT_XLA_FLAGS (flags of the 'flags' phase; empty skips it), BENCH_MODEL_OPTIONS
# (per-model module options of every JAX run, a dict literal; see speed_experiments.py),
# PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
TINY="${BENCH_TINY:-0}"
RESULTS="${OUT:-runs/gpu_benchmark}"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/msff_bench.XXXXXX")"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_benchmark.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

START=$(date +%s)
# Phase limits are written for one H100 host; a tiny run on a small shared CPU
# machine (imports alone take a minute there) stretches them by TIME_SCALE.
if [[ "$TINY" == 1 ]]; then TIME_SCALE=6; else TIME_SCALE=1; fi
BUDGET="${BENCH_BUDGET_S:-$((470 * TIME_SCALE))}"
TABLE_RESERVE=20  # Always left for the final table.

elapsed() { echo $(($(date +%s) - START)); }

# phase NAME LIMIT_S COMMAND...: runs COMMAND under the smaller of LIMIT_S and what is
# left of the budget; skips it when under MIN_PHASE_S are left. Returns its status.
MIN_PHASE_S=30  # A phase with less time than this is skipped.
phase() {
  local name=$1 limit=$(($2 * TIME_SCALE))
  shift 2
  local left=$((BUDGET - $(elapsed) - TABLE_RESERVE))
  ((limit > left)) && limit=$left
  if ((limit < MIN_PHASE_S)); then
    echo "=== SKIPPED $name: ${left}s of the budget left"
    return 99
  fi
  echo "=== $name (limit ${limit}s, at $(elapsed)s)"
  local phase_start=$(date +%s) status
  timeout --kill-after=15 "$limit" "$@"
  status=$?
  echo "=== $name: exit $status after $(($(date +%s) - phase_start))s"
  ((status == 124)) && echo "=== $name: stopped at its time limit"
  return $status
}

# ----------------------------------------------------------------------- setup
if [[ "$TINY" == 1 ]]; then
  JAX_CONFIG="configs/benchmark.py:cpu_tiny"
  JAX_EXTRA=()
  DATA_IMAGES=150
  DATA_PIXELS=64
  WORKERS=1
  TORCH_COMMON=(--image_size 32 --batch_size 8 --warmup 1 --steps 2 --repeats 2 --dtype float32)
  TORCH_FIRST=(msff_ecomnet)
  TORCH_EAGER=(msff_ecomnet)
  TORCH_LATER=()
  VARIANT_MODELS="('msff_ecomnet',)"
  VARIANT_FLAGS_DEFAULT="--xla_cpu_enable_fast_math=false"  # A CPU flag: checks the plumbing.
else
  JAX_CONFIG="configs/benchmark.py"
  JAX_EXTRA=()
  DATA_IMAGES=4000  # ~1,500 of them fall in the 15 classes.
  DATA_PIXELS=300
  WORKERS=14  # Of 16 cores: the rest for the training process and its feed thread.
  TORCH_COMMON=(--image_size 224 --batch_size 256 --warmup 5 --steps 15 --repeats 5 --dtype bfloat16)
  TORCH_FIRST=(resnet50 msff_ecomnet)
  TORCH_EAGER=(resnet50 msff_ecomnet mobilenet_v3_large efficientnet_b0)
  TORCH_LATER=(mobilenet_v3_large efficientnet_b0)
  VARIANT_MODELS="('resnet50','msff_ecomnet')"
  VARIANT_FLAGS_DEFAULT="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"
fi
VARIANT_FLAGS="${BENCH_VARIANT_XLA_FLAGS-$VARIANT_FLAGS_DEFAULT}"
# Module options per model for every JAX run, as a Python dict literal, e.g.
# "{'msff_ecomnet': {'max_pool_backward': 'scatter', 'fuse_pointwise': True}}".
if [[ -n "${BENCH_MODEL_OPTIONS:-}" ]]; then
  JAX_EXTRA+=("--config.benchmark.per_model_overrides=$BENCH_MODEL_OPTIONS")
fi

echo "=== gpu_benchmark.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC') tiny=$TINY budget=${BUDGET}s results=$RESULTS"
# find_spec looks a package up without importing it (importing torch alone takes seconds).
have() { "$PY" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in sys.argv[1:]))" "$@"; }
if ! have grain ml_collections clu; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "=== installing carried wheels from .whl/ into $SCRATCH/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$SCRATCH/site" .whl/*.whl
    export PYTHONPATH="$SCRATCH/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  have grain ml_collections clu ||
    echo "=== WARNING: grain/ml_collections/clu still missing; the JAX phases will fail"
fi
command -v nvidia-smi >/dev/null &&
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
"$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version(), "on", platform.machine(), "cpus:", __import__("os").cpu_count())
for name in ("jax", "jaxlib", "flax", "optax", "grain", "torch", "torchvision"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:
        print(name, "unavailable:", type(error).__name__)
try:
    import jax
    print("jax devices:", jax.devices())
except Exception as error:
    print("jax devices unavailable:", error)
EOF

# An unknown XLA flag aborts the process, so each flag set is tried on a toy program
# first and dropped if that fails.
# Joins flag strings with single spaces: XLA reads a value that does not start with
# "--" (a lone space, say) as a file name and aborts.
join_flags() { set -f; echo $*; set +f; }
probe_xla_flags() {
  local flags=$1
  [[ -z "$flags" ]] && return 0
  XLA_FLAGS="$(join_flags "${XLA_FLAGS:-}" "$flags")" timeout $((120 * TIME_SCALE)) "$PY" -c \
    'import jax, jax.numpy as jnp; jax.jit(lambda x: jnp.tanh(x @ x))(jnp.ones((64, 64))).block_until_ready()' \
    >/dev/null 2>&1
}
MAIN_FLAGS="${BENCH_XLA_FLAGS:-}"
if ! probe_xla_flags "$MAIN_FLAGS"; then
  echo "=== XLA flags '$MAIN_FLAGS' rejected by this XLA; running without them"
  MAIN_FLAGS=""
fi

# ------------------------------------------------------------------------ data
DATA_DIR="$SCRATCH/shards"
export PY SCRATCH DATA_DIR DATA_IMAGES DATA_PIXELS
MAKE_SHARDS='"$PY" -m data_pipeline.conversion.synthetic --output_dir "$SCRATCH/deepfashion" \
    --num_images "$DATA_IMAGES" --image_size "$DATA_PIXELS" &&
  "$PY" -m data_pipeline.conversion.deepfashion --deepfashion_dir "$SCRATCH/deepfashion" \
    --output_dir "$DATA_DIR" --max_images 0 --split 8:1:1 2>"$SCRATCH/convert.err" ||
  { tail -n 20 "$SCRATCH/convert.err"; exit 1; }'
E2E=(--config.benchmark.end_to_end=False)
if phase data 90 bash -c "$MAKE_SHARDS" && [[ -f "$DATA_DIR/manifest.json" ]]; then
  E2E=(--config.benchmark.end_to_end=True "--config.data_dir=$DATA_DIR"
    "--config.data.worker_count=$WORKERS")
else
  echo "=== no shards: the JAX run skips the end-to-end measurement"
fi

# ------------------------------------------------------------------------- jax
JAX_DIR="$SCRATCH/jax"
XLA_FLAGS="$(join_flags "${XLA_FLAGS:-}" "$MAIN_FLAGS")" phase jax 260 "$PY" launch.py --mode benchmark \
  --config "$JAX_CONFIG" --workdir "$JAX_DIR" \
  --config.benchmark.continue_on_error=True "${E2E[@]}" "${JAX_EXTRA[@]}"
cp "$JAX_DIR/benchmark.csv" "$RESULTS/jax_benchmark.csv" 2>/dev/null
cp "$JAX_DIR/benchmark.json" "$RESULTS/jax_benchmark.json" 2>/dev/null

# ----------------------------------------------------------------------- torch
TORCH_CSV="$RESULTS/torch_peers.csv"
rm -f "$TORCH_CSV"
if have torch torchvision; then
  phase torch_compiled 150 "$PY" -m benchmarks.torch_peers --compile on \
    --models "${TORCH_FIRST[@]}" "${TORCH_COMMON[@]}" --csv "$TORCH_CSV"
  phase torch_eager 90 "$PY" -m benchmarks.torch_peers --compile off \
    --models "${TORCH_EAGER[@]}" "${TORCH_COMMON[@]}" --csv "$TORCH_CSV"
  if ((${#TORCH_LATER[@]})); then
    phase torch_compiled_rest 150 "$PY" -m benchmarks.torch_peers --compile on \
      --models "${TORCH_LATER[@]}" "${TORCH_COMMON[@]}" --csv "$TORCH_CSV"
  fi
else
  echo "=== SKIPPED torch phases: torch/torchvision not importable"
fi

# ----------------------------------------------------------------------- flags
VARIANT_CSV=""
if [[ -n "$VARIANT_FLAGS" ]]; then
  if probe_xla_flags "$VARIANT_FLAGS"; then
    VARIANT_DIR="$SCRATCH/jax_flags"
    XLA_FLAGS="$(join_flags "${XLA_FLAGS:-}" "$VARIANT_FLAGS")" phase flags 120 "$PY" launch.py --mode benchmark \
      --config "$JAX_CONFIG" --workdir "$VARIANT_DIR" \
      --config.benchmark.continue_on_error=True "${JAX_EXTRA[@]}" \
      "--config.benchmark.models=$VARIANT_MODELS" "--config.benchmark.framework=jax[xla-flags]"
    echo "=== flags phase XLA_FLAGS: $VARIANT_FLAGS"
    VARIANT_CSV="$VARIANT_DIR/benchmark.csv"
    cp "$VARIANT_CSV" "$RESULTS/jax_flags_benchmark.csv" 2>/dev/null
  else
    echo "=== SKIPPED flags phase: this XLA rejects '$VARIANT_FLAGS'"
  fi
fi

# ----------------------------------------------------------------------- table
echo "=== total $(elapsed)s; results in $RESULTS"
echo
"$PY" -m benchmarks.plot_results "$JAX_DIR/benchmark.csv" "$TORCH_CSV" ${VARIANT_CSV:+"$VARIANT_CSV"} \
  --out_dir "$RESULTS"
status=$?
rm -rf "$SCRATCH"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null  # Let tee finish the log before the script ends.
exit $status
