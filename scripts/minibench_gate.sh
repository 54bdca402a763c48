#!/usr/bin/env bash
# Mini-benchmark regression gate: rerun a minibench grid with the current code
# and compare it doc by doc with the committed baseline (harness-merge regress:
# exact McNemar per cell, Holm over the cells); exit non-zero when a cell
# dropped significantly, a cell is missing/untested or a cell failed.
#
#   bash scripts/minibench_gate.sh             # CI: grid_ci.yaml vs baseline_ci/ (~4-5 min on 2 cores)
#   bash scripts/minibench_gate.sh --full      # every method and task: grid.yaml vs baseline/
#   bash scripts/minibench_gate.sh --refresh   # rerun grid_ci.yaml and STORE it as baseline_ci/
#   bash scripts/minibench_gate.sh --full --refresh   # the same for the full grid
#
# --refresh writes results.{json,md,csv,png} into the baseline folder (the
# per-row lmms-eval files and model cards stay in the temp run); commit them.
#
# Environment:
#   MINIBENCH_ALPHA       significance level of a drop, for all cells together (Holm; default 0.05)
#   MINIBENCH_MIN_EFFECT  a significant drop fails only beyond this many score points (default 0)
#   MINIBENCH_OUT         keep the new run here (default: a temp dir, removed)
#   PYTHON / HARNESS_MERGE  the venv's python / console script (default .venv/bin/...)
#
# Merges are redone with the current code: the merge cache is a fresh temp dir.
# Two runs on one machine are bit-identical (greedy decoding, one thread); on
# other hardware a few answers may change: regress lists them as "changed"
# without failing unless the change is significant.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"   # the grids name their models relative to the repository root
HM="${HARNESS_MERGE:-$ROOT/.venv/bin/harness-merge}"
GRID=benchmarks/minibench/grid_ci.yaml
BASE=benchmarks/minibench/baseline_ci
REFRESH=0
for arg in "$@"; do
  case "$arg" in
    --full) GRID=benchmarks/minibench/grid.yaml; BASE=benchmarks/minibench/baseline ;;
    --refresh) REFRESH=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "minibench_gate.sh: unknown argument $arg (use --full, --refresh)" >&2; exit 2 ;;
  esac
done
ALPHA="${MINIBENCH_ALPHA:-0.05}"
MIN_EFFECT="${MINIBENCH_MIN_EFFECT:-0}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/minibench_gate.XXXXXX")"
OUT="${MINIBENCH_OUT:-$TMP/run}"
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export HARNESS_MERGE_CACHE="$TMP/cache"

start=$(date +%s)
"$HM" leaderboard "$GRID" --out "$OUT" --fresh > "$TMP/leaderboard.log" 2>&1
lb=$?
echo "[minibench_gate] $GRID: exit $lb, $(( $(date +%s) - start ))s -> $OUT"
if [ ! -f "$OUT/results.json" ]; then
  tail -n 60 "$TMP/leaderboard.log"
  echo "[minibench_gate] FAIL: the grid run wrote no results.json" >&2
  exit 1
fi
[ "$lb" -ne 0 ] && tail -n 40 "$TMP/leaderboard.log"
if [ "$REFRESH" -eq 1 ]; then
  if [ "$lb" -ne 0 ]; then echo "[minibench_gate] not storing a baseline with failed cells" >&2; exit 1; fi
  mkdir -p "$BASE"
  cp "$OUT"/results.json "$OUT"/results.md "$OUT"/results.csv "$BASE"/
  [ -f "$OUT/results.png" ] && cp "$OUT/results.png" "$BASE"/
  echo "[minibench_gate] stored $BASE/results.{json,md,csv,png}: commit them"
  exit 0
fi
"$HM" regress --baseline "$BASE/results.json" --results "$OUT/results.json" --alpha "$ALPHA" --min-effect "$MIN_EFFECT"
rg=$?
if [ "$lb" -ne 0 ] || [ "$rg" -ne 0 ]; then
  echo "[minibench_gate] FAIL (leaderboard exit $lb, regress exit $rg)" >&2
  exit 1
fi
echo "[minibench_gate] PASS ($(( $(date +%s) - start ))s)"
