#!/usr/bin/env bash
# The test suite: the main suite in .venv (pytest, 2 workers); the vLLM tests in
# .venv-vllm when that venv exists (make setup-vllm), else they skip with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python -m pytest -n 2 -q -p no:cacheprovider "$@"
