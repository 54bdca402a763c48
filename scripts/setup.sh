#!/usr/bin/env bash
# Create .venv with harness-merge, lmms-eval 0.7.3, lm-eval 0.4.13 and the test tools.
# Idempotent: a second run only re-installs the project (editable).
#   VENV=path  (default .venv)   PYTHON=python3.11 (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip
fi
PIP="$VENV/bin/pip"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  echo "[setup] installing torch 2.13.0 (CPU wheel where the machine has it)"
  "$PIP" install -q torch==2.13.0 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
fi
echo "[setup] installing harness-merge with lmms-eval, lm-eval and test extras"
"$PIP" install -q -c constraints.txt -e ".[lmms,lm_eval,plot,test]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
# lmms-eval pulls PyPI's torchvision, which cannot load beside the CPU torch wheel
# and then breaks transformers' image imports: remove it where it does not import.
if ! "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
  "$PIP" uninstall -q -y torchvision torchaudio >/dev/null 2>&1 || true
fi
"$VENV/bin/python" -c "import harness_merge, lmms_eval, lm_eval, peft" \
  || { echo "[setup] ERROR: the install did not complete (see pip's output above)" >&2; exit 1; }
echo "[setup] ok: $("$VENV/bin/python" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)')"
