# Shared by the scripts: find the repo, make sure .venv exists and holds the project.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

pick_python() {
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "TaskRun needs Python 3.11 or newer on PATH" >&2
  return 1
}

# ensure_venv [EXTRAS]: create .venv if missing, then (re)install the project editable (strict
# mode, so mypy and editors resolve `taskrun.*`). Quiet unless something fails.
ensure_venv() {
  local extras="${1:-}"
  if [ ! -x "$PY" ]; then
    echo "==> creating .venv"
    "$(pick_python)" -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
  fi
  # the distribution was called `taskrun` before it became `taskrun-agents`: drop an old install
  if "$PY" -m pip show --quiet taskrun >/dev/null 2>&1; then
    "$PY" -m pip uninstall --quiet --yes taskrun >/dev/null
  fi
  local spec="."
  [ -n "$extras" ] && spec=".[$extras]"
  echo "==> installing taskrun-agents${extras:+[$extras]} into .venv"
  local log
  log="$(mktemp)"
  if ! "$PY" -m pip install --quiet --disable-pip-version-check -e "$spec" \
    --config-settings editable_mode=strict >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "installing taskrun failed (pip output above)" >&2
    return 1
  fi
  rm -f "$log"
}
