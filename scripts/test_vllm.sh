#!/usr/bin/env bash
# The vLLM backend tests (tests/backends/test_vllm.py) and the parity tests against
# lmms-eval's own classes (tests/backends/test_lmms_parity.py, need torchvision) in .venv-vllm, built by
# scripts/setup_vllm.sh when missing. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-vllm/bin/python ] || ! .venv-vllm/bin/python -c "import vllm" >/dev/null 2>&1; then
  echo "[test_vllm] .venv-vllm missing or without vllm: building it with scripts/setup_vllm.sh" >&2
  bash scripts/setup_vllm.sh
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec .venv-vllm/bin/python -m pytest tests/backends/test_vllm.py tests/backends/test_lmms_parity.py -q -p no:cacheprovider "$@"
