#!/usr/bin/env bash
# Create .venv exactly as requirements/main.lock says (harness-merge editable, lmms-eval
# 0.7.3, lm-eval 0.4.13, the test tools; torch 2.13.0+cpu), then prove it with a real
# one-document `lmms_eval --model merged` run on a tiny built-in model.
# Idempotent: a second run re-syncs the venv to the lock (seconds) and re-checks it.
#   VENV=path (default .venv)  PYTHON=python3.11 (default python3)
#   HM_NO_UV=1: plain pip on the same lock instead of uv   HM_SKIP_SMOKE=1: no smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
LOCK=requirements/main.lock
start=$(date +%s)
source scripts/_uv.sh
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
quiet_pip() { grep -v "is ignored: it is neither a file nor a directory" || true; }
if "$VENV/bin/python" scripts/check_lock.py "$LOCK" >/dev/null 2>&1; then
  echo "[setup] $VENV already matches $LOCK"
elif [ -n "$UV" ]; then
  echo "[setup] syncing $VENV to $LOCK with uv $UV_VERSION"
  # sync: install exactly the lock, remove what it does not list.
  # --compile-bytecode: these machines set PYTHONDONTWRITEBYTECODE=1, so without .pyc files
  # every harness subprocess would compile lmms-eval, transformers, ... from source again.
  "$UV" pip sync --python "$VENV/bin/python" "${FIND_LINKS[@]}" --build-constraint requirements/build.txt --compile-bytecode "$LOCK"
else
  echo "[setup] installing $LOCK with pip (no uv)"
  "$VENV/bin/python" -m pip install -q --no-deps -r "$LOCK" 2>&1 | quiet_pip
fi
# The project itself, editable (re-done every time: seconds, and it picks up new entry points).
if [ -n "$UV" ]; then
  "$UV" pip install --python "$VENV/bin/python" --no-deps --build-constraint requirements/build.txt -q -e .
else
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | quiet_pip
fi
"$VENV/bin/python" scripts/check_lock.py "$LOCK" \
  || { echo "[setup] ERROR: $VENV does not match $LOCK (see above)" >&2; exit 1; }
echo "[setup] $("$VENV/bin/python" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)')"
# The smoke run is repeated whenever the lock or the venv changed since it last passed.
stamp="$VENV/.hm-smoke-ok"
want="$(sha256sum "$LOCK" | cut -d' ' -f1) $("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])')"
if [ "${HM_SKIP_SMOKE:-0}" = 1 ]; then
  echo "[setup] smoke test skipped (HM_SKIP_SMOKE=1)"
elif [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] smoke test passed before on this lock ($stamp)"
else
  echo "[setup] smoke test: one document through lmms_eval --model merged"
  "$VENV/bin/python" scripts/smoke.py || { echo "[setup] ERROR: the smoke evaluation failed (see above)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
echo "[setup] ok in $(( $(date +%s) - start )) s"
