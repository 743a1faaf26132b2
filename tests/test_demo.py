"""``ormcache demo`` (ormcache.demo.main): quick runs against the embedded
setup, Redis and memcached; exit statuses.  No timing is asserted."""

from __future__ import annotations

import io
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from ormcache import demo

REPORT = (
    r"^hit rate: \d+\.\d% \([\d,]+ of [\d,]+ cache lookups\)",
    r"^queries avoided: \d+\.\d+% \(",
    r"^p50 latency +\d+\.\d\d ms +\d+\.\d\d ms$",
    r"^p99 latency +\d+\.\d\d ms +\d+\.\d\d ms$",
    r"^speed-up: \d+\.\dx ",
    r"^writes: 10 ",
    r"^workload: [\d,]+ reads .* and 10 writes$",
)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = demo.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def check_report(out: str) -> None:
    for pattern in REPORT:
        assert re.search(pattern, out, re.MULTILINE), f"no line matching {pattern!r} in:\n{out}"
    fresh = re.search(r"^fresh after writes: (\d+)/(\d+)$", out, re.MULTILINE)
    assert fresh and fresh[1] == fresh[2] and int(fresh[1]) >= 10


def test_quick_embedded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "--quick", "--data-dir", str(tmp_path))
    assert status == 0, err
    check_report(out)
    assert "embedded" in out and "11 shards, 1,100 templates" in out
    assert "building the store" in err and "cached" in err  # progress, on stderr
    assert "\r" not in err  # not a terminal: plain lines
    assert max(p.name for p in tmp_path.glob("s*.db")) == "s010.db"

    status, out, err = run(
        capsys, "--quick", "--data-dir", str(tmp_path), "--requests", "300", "--writes", "3"
    )
    assert status == 0, err
    assert "reused" in out and "building" not in err
    assert re.search(r"^fresh after writes: (\d+)/\1$", out, re.MULTILINE)


@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")
def test_quick_redis(tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
    status, out, err = run(capsys, "--quick", "--data-dir", str(tmp_path), "--redis", redis_url)
    assert status == 0, err
    check_report(out)
    assert f"Redis at {redis_url}" in out


def test_quick_memcached_through_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], memcached_url: str
) -> None:
    settings = tmp_path / "demo.toml"
    settings.write_text(
        "[ormcache]\n"
        'namespace = "demo-mc"\n'
        "[ormcache.regions.templates]\n"
        'backend = "memcached"\n'
        f'arguments = {{ url = ["{memcached_url}"] }}\n'
        "[ormcache.regions.analytics]\n"
        'backend = "memcached"\n'
        f'arguments = {{ url = ["{memcached_url}"] }}\n'
    )
    status, out, err = run(
        capsys, "--quick", "--data-dir", str(tmp_path / "d"), "--settings", str(settings)
    )
    assert status == 0, err
    check_report(out)
    assert "dogpile.cache.pylibmc" in out


def test_stale_reads_fail_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes the cache cannot see (sqlite3 behind SQLAlchemy's back) make
    reads after them stale: exit status 1."""
    from examples.template_store import queries, workload

    def unseen_write(self: Any, template_id: int, headline: str) -> int:
        with self.Session() as session:
            template = self.resolve(session, template_id)
            shard, version = queries.shard_of(template), template.version + 7
        with sqlite3.connect(tmp_path / f"{shard}.db") as conn:
            conn.execute(
                "UPDATE templates SET version = ?, body = json_set(body, '$.version', ?) WHERE id = ?",
                (version, version, template_id),
            )
        return version

    monkeypatch.setattr(workload.App, "write", unseen_write)
    status, out, err = run(
        capsys, "--quick", "--data-dir", str(tmp_path), "--requests", "400", "--writes", "4"
    )
    assert status == 1
    fresh = re.search(r"^fresh after writes: (\d+)/(\d+)$", out, re.MULTILINE)
    assert fresh and int(fresh[1]) < int(fresh[2])
    assert "stale read: resolve" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--requests", "0"], "must be at least 1"),
        (["--requests", "ten"], "not a whole number"),
        (["--redis", "redis://x", "--settings", "f.toml"], "not allowed with"),
        (["--redis", "localhost:6379"], "wants a redis:// URL"),
        (["--settings", "missing.toml"], "cannot read settings file 'missing.toml'"),
        (["--requests", "5", "--writes", "3"], "too few for 3 writes"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, _, err = run(capsys, "--data-dir", str(tmp_path), *argv)
    assert status == 2
    assert message in err
    assert err.startswith("usage: ormcache demo") or "ormcache demo: error: " in err
    assert not list(tmp_path.iterdir())  # nothing built


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("redis-port", "--redis: region 'templates', setting 'arguments'"),
        ("misspelt-argument", "does not take the argument(s) 'hots'"),
        ("data-dir", "cannot create it"),
    ],
)
def test_what_building_the_cache_finds_exits_2(
    how: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "d"
    argv = ["--quick", "--data-dir", str(data_dir)]
    if how == "redis-port":
        argv += ["--redis", "redis://127.0.0.1:notaport/0"]
    elif how == "misspelt-argument":
        settings = tmp_path / "s.toml"
        settings.write_text(
            '[ormcache.regions.templates]\nbackend = "redis"\n'
            'arguments = {url = "redis://127.0.0.1:1/0", hots = "x"}\n'
            '[ormcache.regions.analytics]\nbackend = "memory"\n'
        )
        argv += ["--settings", str(settings)]
    else:
        (tmp_path / "file").write_text("")
        argv[2] = str(tmp_path / "file" / "d")  # under a file: cannot be made
    status, _, err = run(capsys, *argv)
    assert status == 2
    assert message in err and "Traceback" not in err
    assert not data_dir.exists()


def test_settings_without_the_regions_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = tmp_path / "s.toml"
    settings.write_text('[ormcache.regions.templates]\nbackend = "memory"\n')
    status, _, err = run(capsys, "--settings", str(settings), "--data-dir", str(tmp_path / "d"))
    assert status == 2
    assert "declares no region 'analytics'" in err


@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")
def test_unreachable_redis_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(
        capsys, "--quick", "--data-dir", str(tmp_path), "--redis", "redis://127.0.0.1:1/0"
    )
    assert status == 2
    assert "region 'templates' (dogpile.cache.redis) does not answer" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "--help")
    assert status == 0 and out.startswith("usage: ormcache demo")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_and_lines_elsewhere() -> None:
    tty = _Terminal()
    bar = demo.Progress("cached", 4, tty)
    for n in range(1, 5):
        bar(n)
    text = tty.getvalue()
    assert text.startswith("\rcached    [") and text.endswith(" s\n")
    assert "[########################] 100% 4/4" in text and text.count("\n") == 1

    plain = io.StringIO()
    lines = demo.Progress("build", 3, plain)
    for n in range(1, 4):
        lines(n)
    assert "\r" not in plain.getvalue()
    assert plain.getvalue().splitlines()[-1].startswith("build                 3/3 (100%, ")


def test_foreign_databases_are_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "s000.db").write_bytes(b"someone else's data")
    status, _, err = run(capsys, "--quick", "--data-dir", str(tmp_path))
    assert status == 2
    assert "no store.json: not a store built here" in err
    assert (tmp_path / "s000.db").read_bytes() == b"someone else's data"
