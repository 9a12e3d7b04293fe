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
  # pip compiles what it installs from wheels, but not an editable install's own source. Compile
  # it once here: where PYTHONDONTWRITEBYTECODE is set (as on CI machines), every server, worker
  # and CLI process a test or the demo starts would otherwise compile all of taskrun again, about
  # 0.4 s of CPU each. A source file edited later is simply compiled again in memory.
  "$PY" -m compileall -q -j0 "$("$PY" -c 'import os, taskrun; print(os.path.dirname(taskrun.__file__))')" \
    >/dev/null
}

# ensure_postgres_binaries: the PostgreSQL tests start their own server with initdb/pg_ctl
# (tests/postgres.py). On CI, as root, install Debian's server package when they are missing;
# elsewhere say what the tests will do without them.
ensure_postgres_binaries() {
  if [ -n "${TASKRUN_TEST_POSTGRES_URL:-}" ] || [ -n "${PG_BIN:-}" ] ||
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
    return 0
  fi
  if [ "${CI:-}" = "true" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing the PostgreSQL server for its tests (apt-get install postgresql)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "note: no PostgreSQL server binaries (initdb): the PostgreSQL tests will be skipped" \
      "(apt-get install postgresql, or set TASKRUN_TEST_POSTGRES_URL)" >&2
  fi
}
