#!/usr/bin/env bash
# Every GPU-only check of megatron_dapo in one call (<= 9 min on one H200); see benchmarks/gpu/run_all.py.
#
#   bash benchmarks/gpu/run_all.sh --out DIR            # on the GPU machine (e.g. --out $OUT)
#   bash benchmarks/gpu/run_all.sh --dry-run --out DIR  # same logic, tiny sizes, CPU (CI)
#
# Python: $PYTHON, else the repo's .venv, else python3. When megatron-core is not importable and wheels
# are in .whl/ (carried to the GPU machine), they are installed into /tmp/megatron_dapo_site first.
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
  if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/megatron_dapo_site "$ROOT"/.whl/*.whl || { echo "run_all.sh: installing .whl/ failed"; exit 2; }
    export PYTHONPATH=/tmp/megatron_dapo_site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "run_all.sh: megatron-core is not importable by $PY and no wheels in .whl/ (pip download megatron-core==0.16.1)"
    exit 2
  fi
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/benchmarks/gpu/run_all.py" "$@"
