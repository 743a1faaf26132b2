#!/usr/bin/env bash
# Run Flask-SQLAlchemy's own test suite twice, plain and with ormcache's
# cache_all attached to every Session, and list the tests whose outcome
# differs (there should be none).  Flask-SQLAlchemy is an existing
# application-level library: its tests build models, sessions, binds and
# queries the way applications do.
#
#   scripts/flask-sqlalchemy-suite-under-cache-all.sh [PYTHON]   (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
# the runs happen in a temporary directory: make a relative path absolute
case "$PY" in /*) ;; */*) PY="$(pwd)/$PY" ;; esac
HOOK_DIR=$(pwd)/scripts
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip install -q flask flask-sqlalchemy
VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("flask-sqlalchemy"))')
"$PY" -m pip download -q --no-binary :all: --no-deps "flask-sqlalchemy==$VERSION" -d "$WORK"
tar -xzf "$WORK"/flask_sqlalchemy-*.tar.gz -C "$WORK"
cd "$WORK"/flask_sqlalchemy-"$VERSION"
run() {
    "$PY" -m pytest tests -q -p no:cacheprovider -p ormcache_sa_hook -rfE 2>&1 \
      | grep -E "^(FAILED|ERROR)" | sed 's/ - .*//' | sort
}
PYTHONPATH="$HOOK_DIR" run > "$WORK/plain.txt" || true
ORMCACHE_HOOK=1 PYTHONPATH="$HOOK_DIR" run > "$WORK/cached.txt" || true
echo "plain: $(wc -l < "$WORK/plain.txt") failed or errored; with cache_all: $(wc -l < "$WORK/cached.txt")"
echo "outcomes that differ:"
diff "$WORK/plain.txt" "$WORK/cached.txt" && echo "  none"
