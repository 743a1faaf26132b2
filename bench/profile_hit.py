"""Where a cache hit spends its time: cProfile over one-row hits.

Part of ``python -m bench`` (scenario ``profile.hit``, memory backend), or
on its own, for any backend, printing the full pstats listing too::

    python -m bench.profile_hit [--backend redis] [--calls 5000] [--sort tottime]

cProfile adds a fixed cost to every Python call, so small functions look
bigger than they are; the summary gives the unprofiled time per hit next to
the profiled one.  Shares are of the profiled total.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import pstats
import sys
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select


def _code_key(func: Any) -> tuple[str, int, str] | None:
    code = getattr(func, "__code__", None)
    if code is None:
        return None
    return (code.co_filename, code.co_firstlineno, code.co_name)


#: (label, functions whose cumulative times add up, indent); a function is
#: "module:qualname" and is skipped when it does not exist (the hit path
#: changes: the phases that exist in this version are the ones shown)
PHASES: list[tuple[str, list[str], int]] = [
    ("sessionmaker() -> new Session", ["sqlalchemy.orm.session:sessionmaker.__call__"], 0),
    (
        "select().where().options(FromCache())",
        [
            "sqlalchemy.sql._selectable_constructors:select",
            "sqlalchemy.sql.selectable:Select.where",
            "sqlalchemy.sql.selectable:Select.options",
            "ormcache.options:FromCache.__init__",
        ],
        0,
    ),
    ("Session.scalars() (whole execution)", ["sqlalchemy.orm.session:Session.scalars"], 0),
    ("ormcache do_orm_execute listener", ["ormcache.core:OrmCache._do_orm_execute"], 1),
    ("generate_cache_key (SQLAlchemy)", ["ormcache._compat:generate_cache_key"], 2),
    ("ShapeCache.shape", ["ormcache.keys:ShapeCache.shape"], 2),
    ("parameter_values + query_key (key digest)", ["ormcache.keys:parameter_values", "ormcache.keys:query_key"], 2),
    ("Store.get_many (backend read)", ["ormcache._store:Store.get_many"], 2),
    ("OrmCache._valid", ["ormcache.core:OrmCache._valid"], 2),
    ("fast path: _loading.Plan.build", ["ormcache._loading:Plan.build"], 2),
    ("invoke_statement (replay through the ORM)", ["sqlalchemy.orm.session:ORMExecuteState.invoke_statement"], 2),
    ("_replay._do_execute (replay cursor)", ["ormcache._replay:_do_execute"], 3),
    ("orm.loading.instances (rows -> objects)", ["sqlalchemy.orm.loading:instances"], 3),
    ("ScalarResult.one()", ["sqlalchemy.engine.result:ScalarResult.one"], 0),
    ("Session.close()", ["sqlalchemy.orm.session:Session.close"], 0),
]


def _resolve(dotted: str) -> Any:
    import importlib

    module_name, _, qualname = dotted.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj


def _area_prefixes() -> list[tuple[str, str]]:
    """(directory, area) pairs, most specific first, from where the
    packages really are."""
    import os

    import dogpile
    import sqlalchemy

    import bench
    import ormcache

    def home(module: Any) -> str:
        return os.path.dirname(os.path.abspath(module.__file__)) + os.sep

    sa = home(sqlalchemy)
    pairs = [
        (home(ormcache), "ormcache"),
        (home(bench), "benchmark loop"),
        (home(dogpile), "dogpile.cache"),
        (sa + "orm" + os.sep, "SQLAlchemy ORM"),
        (sa + "engine" + os.sep, "SQLAlchemy engine"),
        (sa + "sql" + os.sep, "SQLAlchemy SQL (statements, cache keys)"),
        (sa + "event" + os.sep, "SQLAlchemy events"),
        (sa + "util" + os.sep, "SQLAlchemy util"),
        (sa + "pool" + os.sep, "SQLAlchemy pool"),
        (sa, "SQLAlchemy other"),
    ]
    try:
        import redis

        pairs.append((home(redis), "redis-py"))
    except ImportError:
        pass
    return sorted(pairs, key=lambda p: len(p[0]), reverse=True)


def _area(filename: str, prefixes: list[tuple[str, str]]) -> str:
    if filename == "~":
        return "builtins / C functions"
    if "sqlalchemy generated" in filename:
        return "SQLAlchemy SQL (statements, cache keys)"
    for prefix, name in prefixes:
        if filename.startswith(prefix):
            return name
    return "other Python (stdlib)"


def _short(key: tuple[str, int, str]) -> str:
    filename, line, name = key
    f = filename.replace("\\", "/")
    for marker in ("site-packages/", "/work/main/"):
        if marker in f:
            f = f.split(marker, 1)[1]
    if filename == "~":
        return name
    return f"{f}:{line}({name})"


def summarize(stats: pstats.Stats, calls: int, top: int = 15) -> dict[str, Any]:
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for (_cc, _nc, tt, _ct, _callers) in raw.values())
    functions = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)
    top_rows = [
        {
            "function": _short(key),
            "tottime_share": tt / total,
            "tottime_us_per_hit": tt / calls * 1e6,
            "calls_per_hit": nc / calls,
        }
        for key, (_cc, nc, tt, _ct, _callers) in functions[:top]
    ]
    areas: dict[str, float] = {}
    prefixes = _area_prefixes()
    for key, (_cc, _nc, tt, _ct, _callers) in raw.items():
        area = _area(key[0], prefixes)
        areas[area] = areas.get(area, 0.0) + tt
    area_rows = [
        {"area": area, "share": t / total, "us_per_hit": t / calls * 1e6}
        for area, t in sorted(areas.items(), key=lambda kv: kv[1], reverse=True)
    ]
    phase_rows = []
    for label, names, indent in PHASES:
        cum = 0.0
        found = False
        for name in names:
            key = _code_key(_resolve(name))
            if key in raw:
                cum += raw[key][3]
                found = True
        if found:
            phase_rows.append(
                {"phase": label, "indent": indent, "share": cum / total, "us_per_hit": cum / calls * 1e6}
            )
    import os

    import ormcache

    home = os.path.dirname(os.path.abspath(ormcache.__file__)) + os.sep
    own = sorted(
        ((key, v) for key, v in raw.items() if key[0].startswith(home)),
        key=lambda kv: kv[1][3],
        reverse=True,
    )
    ormcache_rows = [
        {"function": _short(key), "cumtime_share": ct / total, "calls_per_hit": nc / calls}
        for key, (_cc, nc, _tt, ct, _callers) in own[:10]
    ]
    return {
        "profiled_total_us_per_hit": total / calls * 1e6,
        "ormcache_cumulative": ormcache_rows,
        "top_functions": top_rows,
        "areas": area_rows,
        "phases": phase_rows,
    }


def profile_one_row_hit(Session: Any, ids: list[int], region: str, calls: int) -> dict[str, Any]:
    """Profile ``calls`` one-row ``select()`` hits from ``region``, a new
    session each, cycling over ``ids`` (all cached first)."""
    from ormcache import FromCache

    from .data import Template

    def hit(tid: int) -> Any:
        with Session() as session:
            return session.scalars(select(Template).where(Template.id == tid).options(FromCache(region))).one()

    for tid in ids:
        hit(tid)
    it = itertools.cycle(ids)
    for _ in range(min(calls, 500)):
        hit(next(it))
    start = time.perf_counter()
    for _ in range(calls):
        hit(next(it))
    plain = (time.perf_counter() - start) / calls
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        hit(next(it))
    profiler.disable()
    stats = pstats.Stats(profiler)
    summary = summarize(stats, calls)
    summary.update({"backend": region, "calls": calls, "unprofiled_us_per_hit": plain * 1e6})
    summary["_stats"] = stats
    return summary


def format_summary(summary: dict[str, Any], top: int = 12) -> list[str]:
    lines = [
        f"profile: {summary['calls']:,} one-row {summary['backend']} hits; "
        f"{summary['unprofiled_us_per_hit']:.0f} us per hit unprofiled, "
        f"{summary['profiled_total_us_per_hit']:.0f} us under cProfile",
        "  phases (cumulative, share of profiled time):",
    ]
    for p in summary["phases"]:
        pad = "  " * p["indent"]
        lines.append(f"    {pad}{p['phase']:<{48 - len(pad)}} {p['share'] * 100:5.1f}%")
    lines.append("  by package (own time):")
    for a in summary["areas"]:
        if a["share"] >= 0.01:
            lines.append(f"    {a['area']:<48} {a['share'] * 100:5.1f}%")
    lines.append("  ormcache functions (cumulative):")
    for f in summary.get("ormcache_cumulative", [])[:8]:
        lines.append(f"    {f['cumtime_share'] * 100:5.1f}%  {f['calls_per_hit']:5.1f}/hit  {f['function']}")
    lines.append("  top functions (own time):")
    for f in summary["top_functions"][:top]:
        lines.append(f"    {f['tottime_share'] * 100:5.1f}%  {f['calls_per_hit']:5.1f}/hit  {f['function']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    import tempfile
    from pathlib import Path

    from sqlalchemy.orm import sessionmaker

    from . import backends as bk
    from .data import create_templates, sqlite_engine

    parser = argparse.ArgumentParser(prog="python -m bench.profile_hit")
    parser.add_argument("--backend", default="memory", choices=bk.BACKENDS)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--templates", type=int, default=10_000)
    parser.add_argument("--sort", default="tottime", help="pstats sort key for the full listing")
    parser.add_argument("--limit", type=int, default=40, help="lines of the full listing")
    args = parser.parse_args(argv)
    ok, reason = bk.probe(args.backend)
    if not ok:
        print(reason, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ormcache-profile-") as tmp:
        path = Path(tmp) / "templates.db"
        create_templates(path, args.templates)
        engine = sqlite_engine(path)
        Session = sessionmaker(engine)
        cache = bk.make_cache([args.backend], tag="p")
        cache.attach(Session)
        summary = profile_one_row_hit(Session, list(range(1, 101)), args.backend, args.calls)
        for line in format_summary(summary, top=20):
            print(line)
        print()
        stats: Callable[..., Any] | pstats.Stats = summary["_stats"]
        assert isinstance(stats, pstats.Stats)
        stats.sort_stats(args.sort).print_stats(args.limit)
        cache.close()
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
