#!/usr/bin/env bash
# Mini-benchmark regression gate: rerun benchmarks/minibench/grid.yaml with the
# current code and compare it with the committed baseline; exit non-zero when a
# cell dropped beyond the tolerance, a cell is missing or a cell failed.
#
#   bash scripts/minibench_gate.sh
#
# Environment:
#   MINIBENCH_TOLERANCE  allowed drop per (row, task) cell in score points
#                        (default 0.5: less than one doc of 24 = 4.17 points;
#                        two runs on one machine are bit-identical, so any
#                        changed answer of the greedy decoder is a real change.
#                        On other hardware, 4.2 allows one flipped doc per cell)
#   MINIBENCH_OUT        keep the new run here (default: a temp dir, removed)
#   PYTHON / HARNESS_MERGE  the venv's python / console script (default .venv/bin/...)
#
# Merges are redone with the current code: the merge cache is a fresh temp dir.
# ~2 minutes on 2 CPU cores (one torch thread).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"   # the grid names its models relative to the repository root
HM="${HARNESS_MERGE:-$ROOT/.venv/bin/harness-merge}"
TOL="${MINIBENCH_TOLERANCE:-0.5}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/minibench_gate.XXXXXX")"
OUT="${MINIBENCH_OUT:-$TMP/run}"
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export HARNESS_MERGE_CACHE="$TMP/cache"

start=$(date +%s)
"$HM" leaderboard benchmarks/minibench/grid.yaml --out "$OUT" --fresh > "$TMP/leaderboard.log" 2>&1
lb=$?
echo "[minibench_gate] grid run: exit $lb, $(( $(date +%s) - start ))s -> $OUT"
if [ ! -f "$OUT/results.json" ]; then
  tail -n 60 "$TMP/leaderboard.log"
  echo "[minibench_gate] FAIL: the grid run wrote no results.json" >&2
  exit 1
fi
[ "$lb" -ne 0 ] && tail -n 40 "$TMP/leaderboard.log"
"$HM" regress --baseline benchmarks/minibench/baseline/results.json --results "$OUT/results.json" --tolerance "$TOL"
rg=$?
if [ "$lb" -ne 0 ] || [ "$rg" -ne 0 ]; then
  echo "[minibench_gate] FAIL (leaderboard exit $lb, regress exit $rg)" >&2
  exit 1
fi
echo "[minibench_gate] PASS"
