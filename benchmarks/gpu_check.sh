#!/usr/bin/env bash
# One device call, two checks: the speed probe (issues 11, 20, 21) and the user path (issue 16).
#
#   bash benchmarks/gpu_check.sh                    # one GPU: the probe ~9 min, the user path ~4.5 min
#   GPU_CHECK_PARTS=probe bash benchmarks/gpu_check.sh       # where one command may take 10 min
#   GPU_CHECK_TINY=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh   # CPU check
#
# Environment: GPU_CHECK_PARTS ("probe user_path" by default; either alone),
# PROBE_BUDGET_S (480: rows start while it lasts, the one running may go a minute past),
# PROBE_ARGS (extra arguments, e.g. "--skip jax:msff_msp", or "--only targets" for a
# second call; `python -m benchmarks.gpu_probe --list` prints the rows), USER_PATH_LIMIT_S
# (270), USER_PATH_ARGS (extra arguments of gpu_user_path, e.g. "--keep DIR"), PYTHON (python3).
# On a host without grain/ml_collections/clu, the wheels in .whl/ are installed first
# (see README: carry .whl). Everything lands in $OUT (else runs/gpu_check): gpu_check.log,
# gpu_probe.md/.json, user_path.md/.json; the two tables are printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
RESULTS="${OUT:-runs/gpu_check}"
PARTS="${GPU_CHECK_PARTS:-probe user_path}"
TINY_FLAG=()
[[ "${GPU_CHECK_TINY:-0}" == 1 ]] && TINY_FLAG=(--tiny)
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
START=$(date +%s)
echo "=== gpu_check.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC') parts='$PARTS' results=$RESULTS"

have() { "$PY" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in sys.argv[1:]))" "$@"; }
if ! have grain ml_collections clu && compgen -G ".whl/*.whl" >/dev/null; then
  SITE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_site.XXXXXX")"
  echo "=== installing $(ls .whl/*.whl | wc -l) carried wheels from .whl/ into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
have grain ml_collections clu || echo "=== WARNING: grain/ml_collections/clu missing: parts that need them report it"
have tensorflow || echo "=== no TensorFlow: training logs through the stand-in writer (no TensorBoard files)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
"$PY" -c "
import importlib, platform
print('python', platform.python_version())
for n in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'grain', 'clu', 'torch', 'torchvision'):
    try:
        print(n, getattr(importlib.import_module(n), '__version__', '?'))
    except Exception as e:
        print(n, 'unavailable:', type(e).__name__)
"

status=0
if [[ " $PARTS " == *" probe "* ]]; then
  echo "=== probe (budget ${PROBE_BUDGET_S:-480}s, at $(($(date +%s) - START))s)"
  # The outer limit leaves the probe a minute past its own budget to finish an item.
  # shellcheck disable=SC2086
  timeout --kill-after=10 $((${PROBE_BUDGET_S:-480} + 60)) "$PY" -m benchmarks.gpu_probe \
    --out_dir "$RESULTS" --budget_s "${PROBE_BUDGET_S:-480}" "${TINY_FLAG[@]}" ${PROBE_ARGS:-} || status=1
fi
if [[ " $PARTS " == *" user_path "* ]]; then
  # shellcheck disable=SC2086
  echo "=== user path (limit ${USER_PATH_LIMIT_S:-270}s, at $(($(date +%s) - START))s)"
  timeout --kill-after=10 "${USER_PATH_LIMIT_S:-270}" "$PY" -m benchmarks.gpu_user_path \
    --out_dir "$RESULTS" --benchmark_json "$RESULTS/gpu_probe.json" "${TINY_FLAG[@]}" \
    ${USER_PATH_ARGS:-} || status=1
fi
echo "=== gpu_check.sh done in $(($(date +%s) - START))s, exit $status; results in $RESULTS"
for f in gpu_probe.md user_path.md; do [[ -f "$RESULTS/$f" ]] && cat "$RESULTS/$f"; done
exit $status
