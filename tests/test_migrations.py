"""migrations/: alembic over every shard of the template store, or over one
database; one transaction per shard; the cache keyed by the revision."""

from __future__ import annotations

import argparse
import io
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import create_engine, insert, select, text

from examples.template_store.models import SCHEMA_REVISION, Base, Template
from examples.template_store.seed import NOW, build_store
from examples.template_store.shards import (
    create_engines,
    make_sessionmaker,
    schema_revision,
    shard_ids,
)
from ormcache import FromCache, OrmCache
from ormcache.testing import QueryCounter

REPO = Path(__file__).resolve().parent.parent
INITIAL, HEAD = "0001_initial", "0002_template_locale"


@pytest.fixture(autouse=True)
def _no_data_dir_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORMCACHE_DATA_DIR", raising=False)


def alembic(*x: str, url: str | None = None) -> tuple[Config, io.StringIO]:
    """A Config on the repository's alembic.ini, as ``alembic -x ...`` would
    build it, printing into a buffer."""
    out = io.StringIO()
    config = Config(
        REPO / "alembic.ini",
        stdout=out,
        cmd_opts=argparse.Namespace(x=list(x), quiet=False),
    )
    config.attributes["configure_logger"] = False
    if url is not None:
        config.set_main_option("sqlalchemy.url", url)
    return config, out


def empty_shards(directory: Path, count: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{name}.db" for name in shard_ids(count)]
    for path in paths:
        sqlite3.connect(path).close()
    return paths


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def version(path: Path) -> str | None:
    with sqlite3.connect(path) as conn:
        try:
            rows = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        except sqlite3.OperationalError:
            return None
    return rows[0][0] if rows else None


def test_head_is_what_the_models_describe() -> None:
    script = ScriptDirectory.from_config(alembic()[0])
    assert script.get_current_head() == SCHEMA_REVISION == HEAD
    assert [r.revision for r in script.walk_revisions()] == [HEAD, INITIAL]


def test_upgrade_every_shard_with_progress(tmp_path: Path) -> None:
    paths = empty_shards(tmp_path, 5)
    config, out = alembic(f"data_dir={tmp_path}")
    command.upgrade(config, "head")
    lines = out.getvalue().splitlines()
    assert lines[0] == "5 shards"
    for n, line in enumerate(lines[1:]):
        assert line.startswith(f"[{n + 1}/5] s00{n}: (empty) -> {HEAD} (")
    assert len(lines) == 6
    assert {version(p) for p in paths} == {HEAD}

    engines = create_engines(tmp_path)
    try:
        assert schema_revision(engines) == HEAD
        with engines["s003"].connect() as conn:  # the migrations build the models' schema
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        for engine in engines.values():
            engine.dispose()

    config, out = alembic(f"data_dir={tmp_path}")
    command.upgrade(config, "head")  # nothing left to do
    assert f"[5/5] s004: {HEAD} (" in out.getvalue()


def test_the_seeded_store_matches_the_migrations(tmp_path: Path) -> None:
    build_store(tmp_path, shards=2, templates=20, scans_per_template=1)
    engine = create_engine(f"sqlite:///{tmp_path / 's001.db'}")
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()
    config, out = alembic(f"data_dir={tmp_path}")
    command.upgrade(config, "head")
    assert f"[2/2] s001: {HEAD} (" in out.getvalue()


def test_upgrade_path_keeps_rows_and_downgrades(tmp_path: Path) -> None:
    paths = empty_shards(tmp_path, 2)
    command.upgrade(alembic(f"data_dir={tmp_path}")[0], INITIAL)
    assert {version(p) for p in paths} == {INITIAL}
    with sqlite3.connect(paths[1]) as conn:
        conn.execute("INSERT INTO stores VALUES (1, 'a', 'b', 'pro', '2024-01-01 00:00:00')")
        conn.execute(
            "INSERT INTO templates VALUES (7, 1, 'card', 'menu', 'draft', 3, '{}', '2024-01-01 00:00:00')"
        )
    config, out = alembic(f"data_dir={tmp_path}")
    command.upgrade(config, "head")
    assert f"s001: {INITIAL} -> {HEAD}" in out.getvalue()
    with sqlite3.connect(paths[1]) as conn:
        assert conn.execute("SELECT id, version, locale FROM templates").fetchall() == [
            (7, 3, "en")
        ]
    command.downgrade(alembic(f"data_dir={tmp_path}")[0], "-1")
    with sqlite3.connect(paths[1]) as conn:
        assert conn.execute("SELECT * FROM templates").fetchall() == [
            (7, 1, "card", "menu", "draft", 3, "{}", "2024-01-01 00:00:00")
        ]
    assert {version(p) for p in paths} == {INITIAL}


def test_one_database_by_url(tmp_path: Path) -> None:
    path = tmp_path / "single.db"
    config, out = alembic(f"url=sqlite:///{path}")
    command.upgrade(config, "head")
    assert f"[1/1] sqlite:///{path}: (empty) -> {HEAD}" in out.getvalue()
    assert version(path) == HEAD

    other = tmp_path / "other.db"
    config, out = alembic(url=f"sqlite:///{other}")  # sqlalchemy.url, as in alembic.ini
    command.upgrade(config, INITIAL)
    assert version(other) == INITIAL


def test_data_dir_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = empty_shards(tmp_path, 3)
    monkeypatch.setenv("ORMCACHE_DATA_DIR", str(tmp_path))
    config, out = alembic()
    command.upgrade(config, "head")
    assert {version(p) for p in paths} == {HEAD}
    assert "[3/3] s002" in out.getvalue()


def test_nothing_to_migrate(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="nothing to migrate"):
        command.upgrade(alembic()[0], "head")
    with pytest.raises(CommandError, match="no shard databases"):
        command.upgrade(alembic(f"data_dir={tmp_path}")[0], "head")
    with pytest.raises(CommandError, match="does not exist"):
        command.upgrade(alembic(f"data_dir={tmp_path / 'nope'}")[0], "head")


def test_a_failing_shard_stops_the_run_and_is_rolled_back(tmp_path: Path) -> None:
    paths = empty_shards(tmp_path, 5)
    with sqlite3.connect(paths[2]) as conn:  # s002 already has a table named assets
        conn.execute("CREATE TABLE assets (legacy TEXT)")
    config, out = alembic(f"data_dir={tmp_path}")
    with pytest.raises(CommandError) as failure:
        command.upgrade(config, "head")
    message = str(failure.value)
    assert message.startswith("migrating shard s002 failed and was rolled back (still unversioned)")
    assert "table assets already exists" in message
    assert "Migrated: s000, s001 (2). Not attempted: s003, s004 (2)." in message
    assert out.getvalue().splitlines()[-1] == "[3/5] s002: FAILED, rolled back"

    assert [version(p) for p in paths] == [HEAD, HEAD, None, None, None]
    # 0001 had created stores and templates in s002 before failing: all undone
    assert tables(paths[2]) == {"assets"}
    assert tables(paths[3]) == tables(paths[4]) == set()


def test_a_shard_failing_at_the_second_revision_stays_at_the_first(tmp_path: Path) -> None:
    paths = empty_shards(tmp_path, 3)
    command.upgrade(alembic(f"data_dir={tmp_path}")[0], INITIAL)
    with sqlite3.connect(paths[1]) as conn:
        conn.execute("INSERT INTO stores VALUES (1, 'a', 'b', 'pro', '2024-01-01 00:00:00')")
        conn.execute("ALTER TABLE templates ADD COLUMN locale VARCHAR(5)")  # a local hotfix
    with pytest.raises(
        CommandError, match=r"shard s001 failed .* \(still at 0001_initial\).*duplicate column"
    ):
        command.upgrade(alembic(f"data_dir={tmp_path}")[0], "head")
    assert [version(p) for p in paths] == [HEAD, INITIAL, INITIAL]
    with sqlite3.connect(paths[1]) as conn:
        assert conn.execute("SELECT id FROM stores").fetchall() == [(1,)]


def test_cache_never_serves_entries_of_the_old_schema(tmp_path: Path) -> None:
    """Entries cached under revision 0001 are not served once the shards are
    at 0002 and the application keys the cache by the new revision, even
    though the migration ran in another process (a deploy step) that no
    cache invalidation reached."""
    empty_shards(tmp_path, 3)
    command.upgrade(alembic(f"data_dir={tmp_path}")[0], INITIAL)
    engines = create_engines(tmp_path)
    for n, engine in enumerate(engines.values()):
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO stores VALUES (:n, 's', 'c', 'pro', '2024-01-01')"), {"n": n}
            )
            conn.execute(
                text(
                    "INSERT INTO templates VALUES (:id, :n, 't', 'menu', 'draft', 1, '{}', '2024-01-01')"
                ),
                [{"id": n * 10 + i, "n": n} for i in range(3)],
            )
    Session = make_sessionmaker(engines)
    cache = OrmCache.from_settings(
        {"namespace": "mg" + uuid.uuid4().hex[:8], "regions": {"templates": {"backend": "memory"}}}
    )
    cache.attach(Session)
    counters = [QueryCounter(e).__enter__() for e in engines.values()]

    def queries() -> int:
        n = sum(c.selects for c in counters)
        for c in counters:
            c.reset()
        return n

    # columns that exist under both revisions
    stmt = select(Template.id, Template.name).order_by(Template.id).options(FromCache("templates"))

    def read() -> list[tuple[int, str]]:
        with Session() as session:
            return sorted((r[0], r[1]) for r in session.execute(stmt))

    try:
        cache.use_schema_version(schema_revision(engines))
        assert cache.schema_version == INITIAL
        queries()
        rows = read()
        assert len(rows) == 9 and queries() == 3
        assert read() == rows and queries() == 0

        subprocess.run(
            [
                sys.executable,
                "-m",
                "alembic",
                "-c",
                str(REPO / "alembic.ini"),
                "-x",
                f"data_dir={tmp_path}",
                "upgrade",
                "head",
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        # a cache still keyed by 0001 would serve the old entries...
        assert read() == rows and queries() == 0
        # ...keyed by the revision the shards are at now, it does not
        cache.use_schema_version(schema_revision(engines))
        assert cache.schema_version == HEAD
        queries()
        assert read() == rows and queries() == 3
        assert read() == rows and queries() == 0
        with Session() as session:  # and the new column is there
            assert {
                t.locale for t in session.scalars(select(Template).options(FromCache("templates")))
            } == {"en"}
    finally:
        for c in counters:
            c.__exit__()
        cache.close()
        for engine in engines.values():
            engine.dispose()


def test_head_schema_takes_orm_inserts(tmp_path: Path) -> None:
    """The head schema accepts what the seed writes (NOW is a naive
    datetime) through the ORM's Core insert."""
    path = tmp_path / "one.db"
    command.upgrade(alembic(f"url=sqlite:///{path}")[0], "head")
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO stores VALUES (1, 's', 'c', 'pro', '2024-01-01')"))
        conn.execute(
            insert(Template),
            {
                "id": 1,
                "store_id": 1,
                "name": "n",
                "kind": "menu",
                "status": "draft",
                "version": 1,
                "body": {"version": 1},
                "updated_at": NOW,
            },
        )
        assert conn.execute(select(Template.locale)).scalar_one() == "en"
    engine.dispose()


def test_migrations_run_with_the_application_settings_invalidate(tmp_path: Path) -> None:
    """A downgrade and an upgrade leave the revision where it was, so a
    cache keyed by the revision alone would serve rows cached before them.
    Run with the application's settings (``$ORMCACHE_SETTINGS``), the
    migration process invalidates what it writes in the shared regions."""
    data = tmp_path / "data"
    empty_shards(data, 2)
    command.upgrade(alembic(f"data_dir={data}")[0], HEAD)
    engines = create_engines(data)
    for n, engine in enumerate(engines.values()):
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO stores VALUES (:n, 's', 'c', 'pro', '2024-01-01')"), {"n": n})
            conn.execute(
                text("INSERT INTO templates VALUES (:id, :n, 't', 'menu', 'draft', 1, '{}', '2024-01-01', 'fr')"),
                {"id": n * 10, "n": n},
            )
    namespace = "mg" + uuid.uuid4().hex[:8]
    settings = tmp_path / "ormcache.toml"
    settings.write_text(
        "[ormcache]\n"
        f'namespace = "{namespace}"\n'
        "[ormcache.regions.templates]\n"
        'backend = "dbm"\n'
        f'arguments = {{ filename = "{tmp_path / "cache.dbm"}" }}\n'
    )
    cache = OrmCache.from_settings(settings)
    Session = make_sessionmaker(engines)
    cache.attach(Session)
    stmt = select(Template.id, Template.locale).order_by(Template.id).options(FromCache("templates"))

    def read() -> list[tuple[int, str]]:
        with Session() as session:
            return [(r[0], r[1]) for r in session.execute(stmt)]

    try:
        cache.use_schema_version(schema_revision(engines))
        assert read() == read() == [(0, "fr"), (10, "fr")]
        for target in (INITIAL, "head"):
            done = subprocess.run(
                [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"),
                 "-x", f"data_dir={data}", "downgrade" if target == INITIAL else "upgrade", target],
                cwd=REPO,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(REPO), "ORMCACHE_SETTINGS": str(settings)},
            )
            assert done.returncode == 0, done.stderr
            assert "ormcache: what the migrations wrote is invalidated" in done.stdout
        cache.use_schema_version(schema_revision(engines))
        assert cache.schema_version == HEAD  # the same revision as before
        assert read() == [(0, "en"), (10, "en")]  # the upgrade's default, not the cached rows
    finally:
        cache.close()
        for engine in engines.values():
            engine.dispose()


def _settings_of_a_redis_that_is_down(tmp_path: Path) -> Path:
    """An application's settings file whose one region is a Redis that
    refuses connections."""
    from servers import closed_port

    settings = tmp_path / "ormcache.toml"
    settings.write_text(
        "[ormcache]\n"
        "[ormcache.regions.templates]\n"
        'backend = "redis"\n'
        f'arguments = {{ url = "redis://127.0.0.1:{closed_port()}/0" }}\n'
    )
    return settings


def test_migrations_say_so_when_their_invalidations_were_lost(tmp_path: Path) -> None:
    """With the application's shared backend down, the migrations still
    commit, but the run fails with the command that repairs the cache."""
    data = tmp_path / "data"
    empty_shards(data, 2)
    settings = _settings_of_a_redis_that_is_down(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"),
         "-x", f"data_dir={data}", "-x", f"ormcache_settings={settings}", "upgrade", "head"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode != 0
    assert "the migrations are committed" in done.stderr
    assert f"ormcache invalidate --all --settings {settings}" in done.stderr
    assert {version(p) for p in data.glob("*.db")} == {HEAD}


def test_a_run_that_changes_nothing_says_so(tmp_path: Path) -> None:
    """``alembic current`` (or an upgrade already at head) with the
    application's settings writes nothing: it does not claim to have
    invalidated anything, even with the backend down."""
    data = tmp_path / "data"
    empty_shards(data, 2)
    settings = _settings_of_a_redis_that_is_down(tmp_path)
    alembic = [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), "-x", f"data_dir={data}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    upgrade = subprocess.run([*alembic, "upgrade", "head"], cwd=REPO, capture_output=True, text=True, env=env)
    assert upgrade.returncode == 0, upgrade.stderr
    done = subprocess.run(
        [*alembic, "-x", f"ormcache_settings={settings}", "current"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "no shard changed revision; nothing to invalidate" in done.stdout
    assert "is invalidated" not in done.stdout


def test_bad_application_settings_are_one_line(tmp_path: Path) -> None:
    """A settings file that cannot be read is alembic's one ``FAILED:``
    line naming where the path came from, not a traceback."""
    data = tmp_path / "data"
    empty_shards(data, 1)
    alembic = [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), "-x", f"data_dir={data}"]
    missing = tmp_path / "missing.toml"
    for how, extra, env_settings in (
        ("-x ormcache_settings", ["-x", f"ormcache_settings={missing}"], {}),
        ("$ORMCACHE_SETTINGS", [], {"ORMCACHE_SETTINGS": str(missing)}),
    ):
        env = {**os.environ, "PYTHONPATH": str(REPO), **env_settings}
        done = subprocess.run(
            [*alembic, *extra, "current"], cwd=REPO, capture_output=True, text=True, env=env
        )
        said = done.stdout + done.stderr
        assert done.returncode != 0
        assert f"{how} '{missing}': cannot read settings file" in said
        assert "Traceback" not in said


def test_the_demo_refuses_a_store_all_at_an_older_revision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every shard downgraded (template-store.md's ``alembic downgrade
    -1``): the demo, whose models describe the head, says so and exits 2
    instead of failing on a missing column (found by review)."""
    from ormcache import demo

    assert demo.main(["--quick", "--requests", "200", "--writes", "5", "--data-dir", str(tmp_path)]) == 0
    command.downgrade(alembic(f"data_dir={tmp_path}")[0], "-1")
    capsys.readouterr()
    assert demo.main(["--quick", "--requests", "200", "--writes", "5", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"at schema revision {INITIAL}" in err and f"alembic -x data_dir={tmp_path} upgrade head" in err
