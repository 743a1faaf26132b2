"""The ``ormcache`` command line."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from ormcache import FromCache, OrmCache
from ormcache.cli import main
from ormcache.testing import QueryCounter
from ormcache.testing.fixtures import Base, Template, seed


@pytest.fixture
def settings_file(tmp_path: Path, redis_url: str) -> Path:
    path = tmp_path / "ormcache.toml"
    path.write_text(
        f"""
[ormcache]
namespace = "cli{uuid.uuid4().hex[:8]}"

[ormcache.regions.default]
backend = "redis"
expiration_time = 300
arguments = {{ url = "{redis_url}" }}
"""
    )
    return path


def test_invalidate_model_from_another_process(settings_file: Path, tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    seed(engine)
    cache = OrmCache.from_settings(str(settings_file))
    maker = sessionmaker(engine)
    cache.attach(maker)
    stmt = select(Template).where(Template.id == 1).options(FromCache())

    def selects() -> int:
        with QueryCounter(engine) as c, maker() as s:
            s.scalars(stmt).one()
        return c.selects

    try:
        assert (selects(), selects()) == (1, 0)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "ormcache.cli",
                "invalidate",
                "ormcache.testing.fixtures:Template",
                "--settings",
                str(settings_file),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert "invalidated model ormcache.testing.fixtures:Template" in proc.stdout
        assert selects() == 1
        assert main(["invalidate", "--table", "templates", "--settings", str(settings_file)]) == 0
        assert selects() == 1
        assert main(["invalidate", "--region", "default", "--all", "--settings", str(settings_file)]) == 0
        assert selects() == 1
    finally:
        cache.close()
        engine.dispose()


def test_check(settings_file: Path, capsys: Any) -> None:
    assert main(["check", "--settings", str(settings_file)]) == 0
    assert "region default: ok (RedisBackend)" in capsys.readouterr().out


def test_backend_down_exit_code(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "down.toml"
    path.write_text(
        '[ormcache.regions.default]\nbackend = "redis"\narguments = { url = "redis://127.0.0.1:1/0" }\n'
    )
    assert main(["invalidate", "--all", "--settings", str(path)]) == 1
    assert "failed to record an invalidation" in capsys.readouterr().err
    assert main(["check", "--settings", str(path)]) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["invalidate", "--all"], "no settings"),
        (["invalidate", "--settings", "x.toml"], "nothing to invalidate"),
        (["invalidate", "nosuchmodule:Model", "--settings", "x.toml"], "cannot import 'nosuchmodule'"),
        (["invalidate", "ormcache:Nope", "--settings", "x.toml"], "has no attribute 'Nope'"),
        # a module where a class belongs (said to have no attribute, or taken as one)
        (["invalidate", "ormcache.testing.fixtures", "--settings", "x.toml"], "'ormcache.testing.fixtures' is a module: write module:Class"),
        (["invalidate", "json", "--settings", "x.toml"], "model 'json' is a module: write module:Class"),
        (["invalidate", "ormcache:testing", "--settings", "x.toml"], "model 'ormcache:testing' is a module"),
        (["warm", "ormcache.testing", "--settings", "x.toml", "--database-url", "sqlite://"], "warm target 'ormcache.testing' is a module: write module:QUERIES"),
        (["invalidate", "--all", "--settings", "/nonexistent.toml"], "nonexistent.toml"),
    ],
)
def test_usage_errors(argv: list[str], message: str, capsys: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("ORMCACHE_SETTINGS", raising=False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_model_module_that_fails_to_import(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    (tmp_path / "breaks_on_import.py").write_text('raise RuntimeError("no database configured")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["invalidate", "breaks_on_import:Model", "--settings", "x.toml"]) == 2
    err = capsys.readouterr().err
    assert "importing 'breaks_on_import' raised RuntimeError: no database configured" in err
    assert "Traceback" not in err


def test_stats_of_an_in_process_region(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "local.toml"
    path.write_text('[ormcache.regions.local]\nbackend = "memory"\n')
    assert main(["stats", "--region", "local", "--settings", str(path)]) == 2
    assert "region 'local' is in-process" in capsys.readouterr().err


def test_invalidate_and_warm_refuse_in_process_regions(tmp_path: Path, redis_url: str, capsys: Any) -> None:
    """A command cannot reach the memory regions of the application's
    processes: saying "invalidated" or "warmed" would be false."""
    url = f"sqlite:///{tmp_path}/db.sqlite"
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    seed(engine)
    engine.dispose()
    local = tmp_path / "local.toml"
    local.write_text('[ormcache.regions.default]\nbackend = "memory"\n')
    for argv in (
        ["invalidate", "ormcache.testing.fixtures:Template"],
        ["invalidate", "--all"],
        ["invalidate", "--table", "templates"],
        ["invalidate", "--region", "default"],
        ["warm", "warmup_queries:QUERIES", "--database-url", url],
    ):
        assert main([*argv, "--settings", str(local)]) == 2, argv
        captured = capsys.readouterr()
        assert "region 'default': in-process" in captured.err, argv
        assert "invalidated" not in captured.out and "warmed" not in captured.out, argv
    # with a shared region too: that one is invalidated, the other named
    mixed = tmp_path / "mixed.toml"
    mixed.write_text(
        f'[ormcache]\nnamespace = "cli{uuid.uuid4().hex[:8]}"\n'
        '[ormcache.regions.default]\nbackend = "memory"\n'
        f'[ormcache.regions.shared]\nbackend = "redis"\narguments = {{ url = "{redis_url}" }}\n'
    )
    assert main(["invalidate", "--all", "--settings", str(mixed)]) == 0
    captured = capsys.readouterr()
    assert "invalidated everything" in captured.out
    assert "region 'default': in-process" in captured.err
    assert main(["invalidate", "--region", "default", "--settings", str(mixed)]) == 2
    assert main(["invalidate", "--region", "shared", "--settings", str(mixed)]) == 0


def test_warm_with_the_backend_down(tmp_path: Path, capsys: Any) -> None:
    url = f"sqlite:///{tmp_path}/db.sqlite"
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    seed(engine)
    engine.dispose()
    path = tmp_path / "down.toml"
    path.write_text(
        '[ormcache.regions.default]\nbackend = "redis"\narguments = { url = "redis://127.0.0.1:1/0" }\n'
    )
    assert main(["warm", "warmup_queries:QUERIES", "--database-url", url, "--settings", str(path)]) == 1
    captured = capsys.readouterr()
    assert "0 results stored" in captured.out
    assert "region default: the backend failed" in captured.err


def test_stats_published_by_an_application(settings_file: Path, tmp_path: Path, capsys: Any) -> None:
    from ormcache.stats import publish_once

    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    seed(engine)
    cache = OrmCache.from_settings(str(settings_file))
    maker = sessionmaker(engine)
    cache.attach(maker)
    try:
        for _ in range(3):
            with maker() as s:
                s.scalars(select(Template).where(Template.id == 1).options(FromCache())).one()
        assert publish_once(cache, cache._stores["default"])
        assert main(["stats", "--settings", str(settings_file), "--json"]) == 0
        import json

        total = json.loads(capsys.readouterr().out)
        assert len(total["processes"]) == 1
        assert total["regions"]["default"]["hits"] == 2
        assert total["models"]["Template"]["misses"] == 1
        assert main(["stats", "--settings", str(settings_file)]) == 0
        assert "processes publishing: 1" in capsys.readouterr().out
    finally:
        cache.close()
        engine.dispose()


def test_warm(settings_file: Path, tmp_path: Path, capsys: Any) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    seed(engine)
    url = f"sqlite:///{tmp_path}/db.sqlite"
    for target, stored in (("warmup_queries:QUERIES", 3), ("warmup_queries:by_store", 2)):
        assert main(["warm", target, "--database-url", url, "--settings", str(settings_file)]) == 0
        assert f"warmed {stored} of {stored} statements; {stored} results stored\n" in capsys.readouterr().out
    # again: nothing to store, and it says why
    assert main(["warm", "warmup_queries:by_store", "--database-url", url, "--settings", str(settings_file)]) == 0
    assert "warmed 2 of 2 statements; 0 results stored, 2 cached already" in capsys.readouterr().out
    cache = OrmCache.from_settings(str(settings_file))
    maker = sessionmaker(engine)
    cache.attach(maker)
    try:
        from warmup_queries import QUERIES

        with QueryCounter(engine) as c, maker() as s:
            for stmt in QUERIES:
                s.scalars(stmt).one()
        assert c.selects == 0
    finally:
        cache.close()
        engine.dispose()


def test_warm_says_what_is_wrong(settings_file: Path, tmp_path: Path, capsys: Any) -> None:
    """Bad arguments to ``warm`` exit 2 with a message naming the argument,
    not a traceback; statements without ``FromCache`` are reported."""
    url = f"sqlite:///{tmp_path}/db.sqlite"
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    base = ["--settings", str(settings_file)]
    cases = [
        (["warm", "warmup_queries:QUERIES", "--database-url", "notaurl", *base], "--database-url 'notaurl'"),
        (
            ["warm", "warmup_queries:QUERIES", "--database-url", "nosuchdialect://x", *base],
            "--database-url 'nosuchdialect://x'",
        ),
        (["warm", "warmup_queries:NOPE", "--database-url", url, *base], "warm target 'warmup_queries:NOPE'"),
        (
            ["warm", "warmup_queries:NOT_STATEMENTS", "--database-url", url, *base],
            "warm target 'warmup_queries:NOT_STATEMENTS': not a list of statements",
        ),
        (
            ["warm", "warmup_queries:failing", "--database-url", url, *base],
            "warm target 'warmup_queries:failing' raised ValueError: the application's own error",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert main(["warm", "warmup_queries:UNCACHED", "--database-url", url, *base]) == 0
    assert "1 of 1 statements carry no FromCache option" in capsys.readouterr().err


def test_invalidate_checks_every_target_before_writing(settings_file: Path, capsys: Any) -> None:
    """A target that is not a model stops the command before anything is
    invalidated (it used to come after the model before it was done)."""
    before = main(["invalidate", "ormcache.testing.fixtures:Template", "ormcache.testing.fixtures:seed",
                   "--settings", str(settings_file)])
    captured = capsys.readouterr()
    assert before == 2 and "is not a mapped class" in captured.err
    assert "invalidated" not in captured.out
    assert main(["invalidate", "--table", " ", "--settings", str(settings_file)]) == 2
    assert "--table ' ': give a table name" in capsys.readouterr().err
    assert main(["invalidate", "--table", "'templates'", "--settings", str(settings_file)]) == 2
    assert "--table \"'templates'\": not a table name" in capsys.readouterr().err


def test_check_a_null_region(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "null.toml"
    path.write_text('[ormcache.regions.off]\nbackend = "null"\n')
    assert main(["check", "--settings", str(path)]) == 0
    assert "region off: ok (NullBackend: stores nothing, by design)" in capsys.readouterr().out


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_publishes_its_own_statistics(settings_file: Path) -> None:
    """gunicorn --preload: the master publishes, then forks workers; each
    worker publishes under its own process id, counting from zero."""
    import os
    import signal
    import time

    from ormcache.stats import collect, process_id

    cache = OrmCache.from_settings(str(settings_file))
    store = cache._stores["default"]
    try:
        cache._stats.count("default", "Template", "hits", 5)  # before the fork
        cache.publish_stats(interval=0.05)
        parent = process_id()
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)
            ok = False
            try:
                child = process_id()
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and not ok:
                    total = collect(cache, store)
                    ok = child != parent and child in total["processes"] and cache.stats()["regions"] == {}
                    time.sleep(0.05)
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert collect(cache, store)["regions"]["default"]["hits"] == 5  # the parent's, once
    finally:
        cache.close()
    from ormcache import stats

    assert cache not in stats._publishing  # closed: its thread stops, a child does not restart it


def test_processes_that_publish_at_once_are_all_listed(settings_file: Path, monkeypatch: Any) -> None:
    """Workers forked together publish their first statistics at the same
    moment: each one writes itself into the shared index of processes
    until it reads itself back (a slower writer's older copy may still
    drop it: it is back at its next publication, the second one here)."""
    import threading

    from ormcache import stats

    cache = OrmCache.from_settings(str(settings_file))
    store = cache._stores["default"]
    # a thread stands for a process here
    monkeypatch.setattr(stats, "process_id", lambda: threading.current_thread().name)
    workers = 8
    barrier = threading.Barrier(workers)
    published: list[bool] = []

    def worker() -> None:
        barrier.wait()
        published.append(stats.publish_once(cache, store))
        published.append(stats.publish_once(cache, store))  # the next interval's

    try:
        threads = [threading.Thread(target=worker, name=f"w{i}") for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert published == [True] * 2 * workers
        assert stats.collect(cache, store)["processes"] == sorted(t.name for t in threads)
    finally:
        cache.close()


def test_the_console_script_imports_the_applications_modules(settings_file: Path, tmp_path: Path) -> None:
    """``ormcache invalidate myapp.models:Model`` from the application's
    root finds ``myapp`` as ``python -m`` would (a console script's path
    holds only its own directory)."""
    import shutil

    # (installing the package installs the script next to its Python)
    script = shutil.which("ormcache", path=str(Path(sys.executable).parent))
    assert script is not None, f"no ormcache console script next to {sys.executable}"
    app = tmp_path / "app"
    (app / "myapp").mkdir(parents=True)
    (app / "myapp" / "__init__.py").write_text("")
    (app / "myapp" / "models.py").write_text("from ormcache.testing.fixtures import Template\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [script, "invalidate", "myapp.models:Template", "--settings", str(settings_file)],
        cwd=app, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "invalidated model myapp.models:Template" in proc.stdout


def test_publish_stats_again_keeps_one_thread(settings_file: Path) -> None:
    """Called again, publish_stats() changes what the running thread does;
    after close() it is refused."""
    import threading
    import time

    from ormcache import ConfigurationError

    def publishers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "ormcache-stats"}

    from ormcache.stats import collect, process_id

    before = publishers()
    cache = OrmCache.from_settings(str(settings_file))
    store = cache._stores["default"]
    try:
        for interval in (50, 60, 55):
            cache.publish_stats(interval=interval)
        assert len(publishers() - before) == 1
        # the running thread publishes at once when called again, not
        # after the 55 s it was sleeping
        cache._stats.count("default", "Template", "hits", 3)
        cache.publish_stats(interval=0.05)
        deadline = time.monotonic() + 5
        while (collect(cache, store)["regions"].get("default") or {}).get("hits") != 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert process_id() in collect(cache, store)["processes"]
    finally:
        cache.close()
    with pytest.raises(ConfigurationError, match="closed"):
        cache.publish_stats()
    deadline = time.monotonic() + 5
    while publishers() - before:  # closed: its thread ends at once
        assert time.monotonic() < deadline
        time.sleep(0.01)
