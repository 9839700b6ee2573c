#!/usr/bin/env bash
# The GPU check, rehearsed on a CPU with the GPU machine's software, before a GPU is spent.
#
#   bash benchmarks/gpu_preflight.sh   # 4.5-9 min on 2 cores (measured), +3.5 min the first install
#
# A GPU call is short and scarce, and the GPU machine differs from a development
# machine in more than its GPU: Python 3.12, a newer JAX, PyTorch 2.11, and no
# TensorFlow, grain, clu or ml_collections (grain, clu and ml_collections travel as the
# wheels in .whl/). This script builds that software on the CPU
# (benchmarks/gpu_machine_requirements.txt, in $PREFLIGHT_VENV, default .venv-gpu-machine),
# fetches the wheels into .whl/ if they are missing, and runs benchmarks/gpu_check.sh at
# tiny sizes with them, so that an import, an API change or a missing package fails
# here, not in the GPU call. What it cannot find: anything CUDA does differently.
# Paths (PREFLIGHT_VENV, OUT) are relative to the repository root. The venv takes ~6 GB:
# PyTorch from PyPI is its CUDA build (it runs on a CPU too).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PREFLIGHT_VENV:-.venv-gpu-machine}"
PYTHON312="${PYTHON312:-python3.12}"
# The venv counts as built only once its install finished for today's requirements (a
# stamp with their checksum): an interrupted install or an edited list builds it again.
WANTED="$(sha256sum benchmarks/gpu_machine_requirements.txt | cut -d' ' -f1)"
if [[ "$(cat "$VENV/.requirements_sha256" 2>/dev/null)" != "$WANTED" ]]; then
  if ! "$PYTHON312" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    echo "error: the GPU machine runs Python 3.12; '$PYTHON312' is not a working Python 3.12" \
         "(set PYTHON312 to one)" >&2
    exit 2
  fi
  echo "=== building $VENV with $("$PYTHON312" --version) from benchmarks/gpu_machine_requirements.txt"
  rm -rf "$VENV"
  "$PYTHON312" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -r benchmarks/gpu_machine_requirements.txt
  echo "$WANTED" > "$VENV/.requirements_sha256"
fi
WHEELS=(grain==0.2.18 array_record==0.8.6 google-crc32c==1.9.0 clu==0.0.12 ml_collections==1.1.0
        portpicker==1.6.0)
# pip skips a wheel it already has, so this only fetches what is missing (or was cut short).
echo "=== the carried wheels in .whl/"
"$VENV/bin/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
# One CPU device (a developer's XLA_FLAGS may simulate eight).
env -u XLA_FLAGS GPU_CHECK_TINY=1 PYTHON="$VENV/bin/python" OUT="${OUT:-runs/gpu_preflight}" \
  PROBE_BUDGET_S="${PROBE_BUDGET_S:-900}" USER_PATH_LIMIT_S="${USER_PATH_LIMIT_S:-900}" \
  bash benchmarks/gpu_check.sh
