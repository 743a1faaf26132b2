#!/usr/bin/env bash
# Run SQLAlchemy's own ORM tests with ormcache's cache_all attached to every
# Session, next to a plain run, and print both summaries.  Differences that
# are expected: tests that count get_bind() or _autoflush() calls (ormcache's
# listener makes one more of each) and tests that expect an unbuffered
# result to fail after Session.close() (cached and captured results are
# buffered).  Any other failure is a bug.
#
#   scripts/sqlalchemy-suite-under-cache-all.sh [PYTHON]   (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
# the runs happen in a temporary directory: make a relative path absolute
case "$PY" in /*) ;; */*) PY="$(pwd)/$PY" ;; esac
HOOK_DIR=$(pwd)/scripts
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
VERSION=$("$PY" -c 'import sqlalchemy; print(sqlalchemy.__version__)')
"$PY" -m pip download -q --no-binary :all: --no-deps "sqlalchemy==$VERSION" -d "$WORK"
tar -xzf "$WORK"/sqlalchemy-*.tar.gz -C "$WORK"
cd "$WORK"/sqlalchemy-"$VERSION"
FILES="test/orm/test_lazy_relations.py test/orm/test_query.py test/orm/test_unitofworkv2.py
 test/orm/test_eager_relations.py test/orm/test_session.py test/orm/test_cascade.py
 test/orm/test_relationships.py test/orm/test_selectin_relations.py test/orm/test_core_compilation.py
 test/orm/test_expire.py test/orm/test_naturalpks.py test/orm/test_versioning.py"
echo "== plain"
PYTHONPATH="$HOOK_DIR" "$PY" -m pytest $FILES -p ormcache_sa_hook -q -p no:cacheprovider 2>&1 | tail -1 || true
echo "== with ormcache cache_all"
ORMCACHE_HOOK=1 PYTHONPATH="$HOOK_DIR" "$PY" -m pytest $FILES -p ormcache_sa_hook -q -p no:cacheprovider -rf 2>&1 \
  | grep -E "^FAILED|passed|failed|ormcache stats" | sed 's/ - .*//' || true
