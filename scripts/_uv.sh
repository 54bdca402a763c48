# Sourced by the setup scripts: find or install uv (pinned), and the machine's local
# wheel folder. Sets UV (the uv executable, empty when unavailable) and FIND_LINKS
# (uv arguments for the local wheel folder, which holds the CPU torch build).
UV_VERSION=0.13.9
UV_HOME="${HM_UV_HOME:-$HOME/.cache/harness-merge/uv-$UV_VERSION}"
UV=""
if [ "${HM_NO_UV:-0}" != 1 ]; then
  if [ ! -x "$UV_HOME/bin/uv" ]; then
    echo "[setup] installing uv $UV_VERSION into $UV_HOME"
    # --target keeps uv out of the venvs, so syncing a venv to its lock never removes it.
    python3 -m pip install -q --disable-pip-version-check --target "$UV_HOME" "uv==$UV_VERSION" >/dev/null 2>&1 \
      || echo "[setup] could not install uv $UV_VERSION; falling back to pip on the same lock"
  fi
  if [ -x "$UV_HOME/bin/uv" ] && [ "$("$UV_HOME/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" = "$UV_VERSION" ]; then
    UV="$UV_HOME/bin/uv"
  fi
fi
# The machines of this project keep the torch 2.13.0+cpu wheel in a local folder (pip's
# find-links); uv does not read pip's configuration, so it is passed explicitly.
FIND_LINKS=()
LOCAL_WHEELS="${HM_FIND_LINKS:-/opt/wheels}"
if [ -d "$LOCAL_WHEELS" ]; then FIND_LINKS=(--find-links "$LOCAL_WHEELS"); fi
export UV_NO_PROGRESS=1
