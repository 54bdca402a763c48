#!/usr/bin/env bash
# The vLLM backend tests (tests/backends/test_vllm*.py: the backend, issue 16's settings, the
# package) and the parity tests against lmms-eval's own classes (tests/backends/test_lmms_parity.py
# and test_internvl_parity.py, need torchvision) and lm-eval's own vllm class
# (tests/backends/test_lm_eval_vllm_parity.py) in
# .venv-vllm, which scripts/setup_vllm.sh first builds or re-syncs to
# requirements/vllm.lock (seconds when it already matches). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec .venv-vllm/bin/python -m pytest tests/backends/test_vllm.py tests/backends/test_vllm_settings.py tests/backends/test_vllm_package.py tests/backends/test_lmms_parity.py tests/backends/test_lm_eval_vllm_parity.py tests/backends/test_internvl_parity.py -q -p no:cacheprovider "$@"
