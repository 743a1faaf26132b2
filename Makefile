# Developer and CI entry points.  `make test` is all a fresh clone needs:
# it builds .venv, starts the servers the tests talk to, and runs pytest.
#
#   make venv        .venv with the project installed editable, with [dev]
#   make services    redis, memcached, postgresql and mariadb answering on loopback
#   make test        pytest $(PYTEST_ARGS), after the services (one that cannot
#                    be started fails the run only when CI is set)
#   make test-oldest some tests again on the lowest dependency versions allowed
#   make demo        ormcache demo $(DEMO_ARGS)
#   make bench       python -m bench $(BENCH_ARGS)
#   make typecheck   mypy (configured in pyproject.toml)
#   make clean       remove .venv and caches

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVICES ?=
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=

# Debian packages pylibmc (the memcached driver) compiles against.
PYLIBMC_BUILD_DEPS := libmemcached-dev zlib1g-dev

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv services test-services test test-oldest demo bench typecheck clean

venv: $(STAMP)

# Re-install only when pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ ! -d /usr/include/libmemcached ] || [ ! -f /usr/include/zlib.h ]; then \
	    if [ "$$(id -u)" -eq 0 ]; then \
	        echo "installing $(PYLIBMC_BUILD_DEPS) (needed to build pylibmc)"; \
	        export DEBIAN_FRONTEND=noninteractive; \
	        apt-get update -qq && \
	        apt-get install -y -qq --no-install-recommends $(PYLIBMC_BUILD_DEPS); \
	    else \
	        echo "pylibmc needs headers; install them with:" \
	             "sudo apt-get install $(PYLIBMC_BUILD_DEPS)" >&2; \
	    fi; \
	fi
	$(BIN)/python -m pip install -e '.[dev]'
	@touch $@

services:
	bash scripts/services.sh $(SERVICES)

# For the tests, a server that cannot be started stops the run only in CI;
# elsewhere its tests are skipped, each naming the server (tests/servers.py).
test-services:
	@bash scripts/services.sh $(SERVICES) || { \
	    case "$$(echo "$${CI:-}" | tr A-Z a-z)" in \
	        true|1) exit 1 ;; \
	        *) echo "services: not all answer; their tests will be skipped (CI is not set)" >&2 ;; \
	    esac; }

test: venv test-services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The lowest versions pyproject.toml allows, in a venv of their own, under
# the tests that touch them most (SQLAlchemy's execution and dogpile's and
# redis-py's Redis; the whole suite passed there too, at 2026-11-27).
OLDEST_VENV ?= .venv-oldest
OLDEST := SQLAlchemy==2.0.51 dogpile.cache==1.4.1 'redis==5.0.*' 'aiosqlite==0.20.*'
OLDEST_TESTS ?= tests/test_core.py tests/test_settings.py tests/test_backend_memory.py \
	tests/test_backend_redis.py tests/test_degradation.py tests/test_async.py \
	tests/test_sqlite_snapshot.py tests/test_cli.py tests/test_fast_path.py
# rotating credentials (StreamingCredentialProvider) exist from redis-py 6
OLDEST_DESELECT := --deselect tests/test_backend_redis.py::test_rotating_credentials_read_through_the_client

test-oldest: venv test-services
	@test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q -e '.[dev]' $(OLDEST)
	$(OLDEST_VENV)/bin/python -m pytest -q $(OLDEST_TESTS) $(OLDEST_DESELECT)

demo: venv
	$(BIN)/ormcache demo $(DEMO_ARGS)

# the benchmark's servers (one that does not answer is reported as SKIP)
bench: venv
	@bash scripts/services.sh redis memcached || \
	    echo "services: not all answer; their benchmark rows will say SKIP" >&2
	$(BIN)/python -m bench $(BENCH_ARGS)

typecheck: venv
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) $(OLDEST_VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
