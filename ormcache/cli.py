"""The ``ormcache`` command.

::

    ormcache invalidate myapp.models:Template --settings ormcache.toml
    ormcache invalidate --table templates --settings ormcache.toml
    ormcache invalidate --region shared --settings ormcache.toml
    ormcache invalidate --all --settings ormcache.toml
    ormcache check --settings ormcache.toml
    ormcache stats --settings ormcache.toml
    ormcache warm myapp.warmup:QUERIES --database-url URL --settings ormcache.toml
    ormcache demo

The settings file may also be named by ``$ORMCACHE_SETTINGS``.

Exit codes: 0 done; 1 a cache backend failed (nothing can be assumed
invalidated), or for ``warm`` a statement failed; 2 bad arguments or
settings (for ``invalidate`` and ``warm``, a region in-process memory:
another process cannot reach it).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import types
import uuid
from collections.abc import Sequence
from functools import partial
from typing import Any

from . import invalidation
from .exc import BackendError, ConfigurationError, OrmCacheError

__all__ = ["main"]

EXIT_OK, EXIT_BACKEND, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ormcache", description="Query caching for the SQLAlchemy ORM."
    )
    parser.add_argument("--version", action="version", version=f"ormcache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    inv = sub.add_parser(
        "invalidate",
        help="drop cached results, in every process sharing the cache",
        description="Drop cached results. Use it after writes that bypass "
        "SQLAlchemy (other programs, manual SQL).",
    )
    inv.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help="a mapped class as module:Class (or module.Class)",
    )
    inv.add_argument("--table", action="append", default=[], help="a table name (repeatable)")
    inv.add_argument("--region", action="append", default=[], help="a whole region (repeatable)")
    inv.add_argument("--all", action="store_true", help="everything ormcache cached")
    _settings_argument(inv)

    check = sub.add_parser("check", help="validate settings and reach every backend")
    _settings_argument(check)

    warm = sub.add_parser(
        "warm",
        help="preload hot queries into the cache",
        description="Run a list of cached queries so that the first users "
        "find them in the cache. TARGET is module:attribute naming a list of "
        "statements carrying FromCache (or a callable returning one, given "
        "the session).",
    )
    warm.add_argument("target", metavar="TARGET", help="module:attribute")
    warm.add_argument("--database-url", required=True, help="the SQLAlchemy URL to query")
    _settings_argument(warm)

    stats = sub.add_parser(
        "stats",
        help="hits, misses and invalidations of the processes that publish them",
        description="Sum the statistics that applications publish with "
        "OrmCache.publish_stats().",
    )
    stats.add_argument("--region", help="the region they publish in (default: the first shared one)")
    stats.add_argument("--json", action="store_true", help="print JSON")
    _settings_argument(stats)

    sub.add_parser("demo", help="the sharded template-store demo", add_help=False)
    return parser


def _settings_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--settings",
        default=os.environ.get("ORMCACHE_SETTINGS"),
        metavar="FILE",
        help="a TOML file with an [ormcache] table (default: $ORMCACHE_SETTINGS)",
    )


def _load(path: str | None) -> Any:
    from .core import OrmCache

    if not path:
        raise ConfigurationError("no settings: pass --settings FILE or set ORMCACHE_SETTINGS")
    return OrmCache.from_settings(path)


def _import_model(spec: str, what: str = "model", form: str = "module:Class") -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        if spec and _is_module(spec):
            raise ConfigurationError(f"{what} {spec!r} is a module: write {form}")
        raise ConfigurationError(f"{what} {spec!r}: write it as {form}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        # the application's modules, from its root, as `python -m` finds
        # them (a console script's path holds only its own directory)
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigurationError(f"{what} {spec!r}: cannot import {module_name!r}: {err}") from err
    except Exception as err:  # the module itself failed while it was imported
        raise ConfigurationError(
            f"{what} {spec!r}: importing {module_name!r} raised {type(err).__name__}: {err}"
        ) from err
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            if not sep and _is_module(spec):
                raise ConfigurationError(f"{what} {spec!r} is a module: write {form}") from None
            raise ConfigurationError(
                f"{what} {spec!r}: {module_name!r} has no attribute {attr!r}"
            ) from None
    if isinstance(target, types.ModuleType):
        raise ConfigurationError(f"{what} {spec!r} is a module: write {form}")
    return target


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _invalidate(args: argparse.Namespace) -> int:
    if not (args.models or args.table or args.region or args.all):
        raise ConfigurationError("nothing to invalidate: name a MODEL, --table, --region or --all")
    from .core import _mapper_of

    # every target is checked before anything is written
    models = [(spec, _import_model(spec)) for spec in args.models]
    for spec, model in models:
        if not (isinstance(model, type) and _mapper_of(model) is not None):
            raise ConfigurationError(f"model {spec!r}: {model!r} is not a mapped class")
    for table in args.table:
        if not table.strip():
            raise ConfigurationError(f"--table {table!r}: give a table name")
        if invalidation.named_table(table.strip()) is None:
            raise ConfigurationError(
                f"--table {table!r}: not a table name ('t', 'schema.t', or quoted as SQL quotes names)"
            )
    cache = _load(args.settings)
    try:
        for region in args.region:
            cache._store(region)  # unknown names are usage errors
        local = _in_process(cache)
        named = [r for r in args.region if r in local]
        if named:
            raise ConfigurationError(_unreachable(named))
        if local and (models or args.table or args.all) and not _reached(cache):
            raise ConfigurationError(_unreachable(local))
    except BaseException:
        cache.close()
        raise
    if local and (models or args.table or args.all):
        # the shared regions are invalidated; say what is not
        print(f"ormcache: {_unreachable(local)}", file=sys.stderr)
    steps: list[tuple[str, Any]] = [(f"model {spec}", partial(cache.invalidate, m)) for spec, m in models]
    steps += [(f"table {t}", partial(cache.invalidate_table, t)) for t in args.table]
    steps += [(f"region {r}", partial(cache.invalidate_region, r)) for r in args.region]
    if args.all:
        steps.append(("everything", cache.invalidate_all))
    status = EXIT_OK
    try:
        # a backend that fails does not stop the other invalidations
        for what, step in steps:
            try:
                step()
            except BackendError as err:
                print(f"ormcache: {what}: {err}", file=sys.stderr)
                status = EXIT_BACKEND
            else:
                print(f"invalidated {what}")
    finally:
        cache.close()
    return status


def _in_process(cache: Any) -> list[str]:
    """The regions whose entries live in each process's memory (dogpile's
    memory backends): a command in another process cannot reach them."""
    return [
        name
        for name, region in cache.regions.items()
        if type(region.backend).__module__ == "dogpile.cache.backends.memory"
    ]


def _reached(cache: Any) -> bool:
    """Whether any region holds entries other processes read."""
    return any(store.shared for store in cache._stores.values())


def _unreachable(
    names: Sequence[str],
    advice: str = "invalidate from the application (cache.invalidate...), or restart it",
) -> str:
    listed = ", ".join(repr(n) for n in names)
    return (
        f"region{'s' if len(names) > 1 else ''} {listed}: in-process (memory backend), "
        "each process keeps its own entries, which a command in another process "
        f"cannot reach; {advice}"
    )


def _check(args: argparse.Namespace) -> int:
    cache = _load(args.settings)
    status = EXIT_OK
    try:
        for name, region in cache.regions.items():
            if type(region.backend).__module__ == "dogpile.cache.backends.null":
                print(f"region {name}: ok (NullBackend: stores nothing, by design)")
                continue
            key = f"{cache.settings.namespace}:check:{uuid.uuid4().hex}"
            try:
                region.set(key, "ok")
                value = region.get(key)
                region.delete(key)
                if value != "ok":
                    raise RuntimeError("value read back differs from the one written")
            except Exception as err:
                print(f"region {name}: FAILED ({type(err).__name__}: {err})")
                status = EXIT_BACKEND
            else:
                print(f"region {name}: ok ({region.backend.__class__.__name__})")
    finally:
        cache.close()
    return status


def _warm(args: argparse.Namespace) -> int:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.orm import Session

    from .demo import Progress

    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from .options import FromCache

    target = _import_model(args.target, "warm target", "module:QUERIES")
    try:
        engine = create_engine(args.database_url)
    except (ArgumentError, NoSuchModuleError, ImportError) as err:
        # a malformed URL, an unknown dialect, a driver not installed
        raise ConfigurationError(f"--database-url {args.database_url!r}: {err}") from err
    cache = _load(args.settings)
    failed = 0
    try:
        with Session(engine) as session:
            cache.attach(session)
            try:
                statements = list(target(session) if callable(target) else target)
            except TypeError as err:
                raise ConfigurationError(
                    f"warm target {args.target!r}: not a list of statements, nor a "
                    f"callable(session) returning one ({err})"
                ) from err
            except Exception as err:  # the application's callable failed
                raise ConfigurationError(
                    f"warm target {args.target!r} raised {type(err).__name__}: {err}"
                ) from err
            regions = [
                {o.region for o in getattr(stmt, "_with_options", ()) if isinstance(o, FromCache)}
                for stmt in statements
            ]
            local = sorted(set(_in_process(cache)).intersection(set().union(*regions)))
            if local:
                raise ConfigurationError(
                    f"warm target {args.target!r}: "
                    + _unreachable(local, "warm them from the application")
                )
            uncached = sum(1 for r in regions if not r)
            if uncached:
                print(
                    f"ormcache: {uncached} of {len(statements)} statements carry no FromCache "
                    "option: they run, and store nothing",
                    file=sys.stderr,
                )
            progress = Progress("warm", len(statements), sys.stderr)
            for done, stmt in enumerate(statements, 1):
                try:
                    session.execute(stmt).all()
                except SQLAlchemyError as err:
                    failed += 1
                    print(f"ormcache: statement {done} failed: {err}", file=sys.stderr)
                    session.rollback()
                progress(done)
        stats = cache.stats()["regions"]
        filled = sum(r["fills"] for r in stats.values())
        hits = sum(r["hits"] for r in stats.values())
        errors = {name: r["errors"] for name, r in stats.items() if r["errors"]}
        already = f", {hits} cached already" if hits else ""
        print(
            f"warmed {len(statements) - failed} of {len(statements)} statements; "
            f"{filled} results stored{already}"
        )
        for name, count in sorted(errors.items()):
            print(
                f"ormcache: region {name}: the backend failed {count} time(s); "
                "those results were not stored",
                file=sys.stderr,
            )
    finally:
        cache.close()
        engine.dispose()
    return EXIT_BACKEND if failed or errors else EXIT_OK


def _stats(args: argparse.Namespace) -> int:
    import json

    from .stats import collect

    cache = _load(args.settings)
    try:
        name = args.region or next(
            (n for n, s in cache._stores.items() if s.shared), None
        )
        if name is None:
            raise ConfigurationError("no shared region: statistics are per process here")
        if not cache._store(name).shared:
            raise ConfigurationError(
                f"region {name!r} is in-process: each process keeps its own statistics "
                "(cache.stats() in the application); name a region on a shared backend"
            )
        try:
            total = collect(cache, cache._store(name))
        except RuntimeError as err:
            print(f"ormcache: region {name}: {err}", file=sys.stderr)
            return EXIT_BACKEND
    finally:
        cache.close()
    if args.json:
        print(json.dumps(total, indent=2, sort_keys=True))
        return EXIT_OK
    print(f"processes publishing: {len(total['processes'])}")
    header = f"{'':24} {'hits':>9} {'misses':>9} {'hit rate':>9} {'fills':>8} {'bypassed':>9} {'errors':>7} {'invalid.':>9}"
    for part in ("regions", "models"):
        if not total[part]:
            continue
        print(f"\n{part}\n{header}")
        for name, e in sorted(total[part].items()):
            rate = "-" if e["hit_rate"] is None else f"{e['hit_rate']:.1%}"
            print(
                f"{name[:24]:24} {e['hits']:>9} {e['misses']:>9} {rate:>9} {e['fills']:>8} "
                f"{e['bypassed']:>9} {e['errors']:>7} {e['invalidations']:>9}"
            )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        demo = importlib.import_module("ormcache.demo")
        return int(demo.main(argv[1:]))
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "invalidate":
            return _invalidate(args)
        if args.command == "stats":
            return _stats(args)
        if args.command == "warm":
            return _warm(args)
        return _check(args)
    except BackendError as err:
        print(f"ormcache: {err}", file=sys.stderr)
        return EXIT_BACKEND
    except OrmCacheError as err:
        print(f"ormcache: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
