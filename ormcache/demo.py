"""``ormcache demo``: the template store of issue 4, uncached and cached.

Builds (once) a store of 101 SQLite shards holding 10,100 QR-card
templates, then answers the same deterministic requests twice: the way the
reference application does (scan the shards until the template turns up,
no cache), and through ormcache.  It prints the hit rate, the database
queries avoided, p50 and p99 latencies and the speed-up, and checks that
every read after a write saw the new version::

    ormcache demo                         # embedded: SQLite + memory regions
    ormcache demo --redis redis://127.0.0.1:6379/0
    ormcache demo --settings demo.toml    # [ormcache] with regions
                                          # "templates" and "analytics"
    ormcache demo --quick                 # 11 shards, a few seconds

The store itself lives in ``examples/template_store`` of the source tree;
see ``docs/template-store.md``.  Exit status: 0 on success, 1 when a read
after a write returned an old version, 2 on bad arguments or settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from .core import OrmCache
from .exc import ConfigurationError
from .settings import Settings, load_settings

__all__ = ["main"]

PROG = "ormcache demo"


@dataclass(frozen=True)
class Size:
    """How big a run is."""

    shards: int
    templates: int
    requests: int
    """Measured requests through the cache."""
    warmup: int
    """Earlier requests whose distinct ones warm the cache first."""
    uncached: int
    """Requests of the measured stream that also run uncached (every k-th)."""
    writes: int


FULL = Size(shards=101, templates=10_100, requests=20_000, warmup=100_000, uncached=600, writes=50)
QUICK = Size(shards=11, templates=1_100, requests=2_000, warmup=10_000, uncached=100, writes=10)


_KINDS = {
    "resolve": "template resolutions",
    "listing": "store listings",
    "scans": "scan dashboards",
    "events": "event dashboards",
}


class UsageError(Exception):
    """Bad arguments, settings or environment: exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Build a 101-shard SQLite template store and resolve templates in it, "
            "first uncached (scanning the shards), then through ormcache; report "
            "the hit rate, queries avoided, latencies and the speed-up."
        ),
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".ormcache-demo"),
        help="where the shards live (default: .ormcache-demo in the current directory); "
        "built if missing",
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the store even if present")
    parser.add_argument(
        "--quick", action="store_true", help="a small run (11 shards, 2,000 requests), for tests"
    )
    backend = parser.add_mutually_exclusive_group()
    backend.add_argument(
        "--settings",
        type=Path,
        metavar="FILE",
        help='a TOML file whose [ormcache] table declares regions "templates" and "analytics"',
    )
    backend.add_argument(
        "--redis", metavar="URL", help="use Redis at URL for both regions (redis://host:port/db)"
    )
    parser.add_argument(
        "--requests", type=_positive, metavar="N", help="measured requests (default 20,000)"
    )
    parser.add_argument("--writes", type=_natural, metavar="N", help="template writes (default 50)")
    parser.add_argument("--seed", type=int, default=42, help="workload and data seed (default 42)")
    return parser


def _positive(text: str) -> int:
    value = _natural(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def _natural(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return _run(args, sys.stdout, sys.stderr)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


# -- setup -------------------------------------------------------------------


def _store_package() -> ModuleType:
    """``examples.template_store``, from the source tree this package was
    installed from (editable installs) when it is not importable as is."""
    name = "examples.template_store"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name not in ("examples", name):
            raise
    root = Path(__file__).resolve().parent.parent
    if not (root / "examples" / "template_store" / "__init__.py").is_file():
        raise UsageError(
            "the demo runs the example in examples/template_store of the ormcache "
            "source tree; run it from a checkout (pip install -e .)"
        )
    sys.path.append(str(root))
    return importlib.import_module(name)


def _settings(args: argparse.Namespace) -> tuple[Settings, str]:
    """The cache settings and a line describing them."""
    if args.settings is not None:
        try:
            settings = load_settings(args.settings)
        except ConfigurationError as err:
            raise UsageError(f"{args.settings}: {err}") from None
        except OSError as err:
            raise UsageError(f"cannot read {args.settings}: {err.strerror or err}") from None
        missing = [n for n in ("templates", "analytics") if n not in settings.regions]
        if missing:
            raise UsageError(
                f"{args.settings} declares no region {' or '.join(map(repr, missing))}; "
                'the demo needs regions "templates" and "analytics"'
            )
        if settings.namespace == "ormcache":  # the default: keep clear of applications
            settings = dataclasses.replace(settings, namespace="ormcache-demo")
        described = ", ".join(
            f"{name}: {settings.regions[name].backend}" for name in ("templates", "analytics")
        )
        return settings, f"settings from {args.settings} ({described})"
    if args.redis is not None:
        if not args.redis.startswith(("redis://", "rediss://", "unix://")):
            raise UsageError(f"--redis wants a redis:// URL, not {args.redis!r}")
        region = {
            "backend": "redis",
            "expiration_time": 3600,
            "arguments": {
                "url": args.redis,
                "redis_expiration_time": 3600,  # the demo's keys go away by themselves
                "socket_connect_timeout": 3,
                "socket_timeout": 10,
            },
        }
        settings = load_settings(
            {"namespace": "ormcache-demo", "regions": {"templates": region, "analytics": region}}
        )
        return settings, f"Redis at {args.redis} (regions templates, analytics)"
    settings = load_settings(
        {
            "namespace": "ormcache-demo",
            "regions": {
                "templates": {"backend": "memory"},
                "analytics": {"backend": "memory_pickle"},
            },
        }
    )
    return (
        settings,
        'embedded: in-process regions "templates" (memory), "analytics" (memory_pickle)',
    )


def _probe(cache: OrmCache) -> None:
    """Fail early, naming the region, when a backend does not answer (the
    cache itself would quietly fall back to the databases)."""
    for name in ("templates", "analytics"):
        region = cache.region(name)
        key = f"{cache.settings.namespace}:demo-probe"
        try:
            region.set(key, 1)
            region.get(key)
        except Exception as err:  # noqa: BLE001 - any driver error: it does not answer
            raise UsageError(
                f"region {name!r} ({cache.settings.regions[name].backend}) does not answer: "
                f"{type(err).__name__}: {err}"
            ) from None


# -- progress ----------------------------------------------------------------


class Progress:
    """A progress bar on a terminal (redrawn in place with ``\\r``),
    otherwise a plain line every few seconds and one at the end."""

    width = 24

    def __init__(self, label: str, total: int, stream: TextIO, *, every: float = 2.0) -> None:
        self.label = label
        self.total = max(total, 1)
        self.stream = stream
        self.tty = stream.isatty()
        self.every = 0.1 if self.tty else every
        self.started = self.last = time.monotonic()

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if done < self.total and now - self.last < self.every:
            return
        self.last = now
        fraction = min(done / self.total, 1.0)
        counts = f"{done:,}/{self.total:,}"
        elapsed = f"{now - self.started:.1f} s"
        if self.tty:
            filled = round(self.width * fraction)
            bar = "#" * filled + "-" * (self.width - filled)
            end = f" {elapsed}\n" if done >= self.total else ""
            self.stream.write(f"\r{self.label:<9} [{bar}] {fraction:4.0%} {counts}{end}")
        else:
            self.stream.write(f"{self.label:<9} {counts:>15} ({fraction:4.0%}, {elapsed})\n")
        self.stream.flush()


# -- the run -----------------------------------------------------------------


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    size = QUICK if args.quick else FULL
    requests = args.requests if args.requests is not None else size.requests
    writes = args.writes if args.writes is not None else size.writes
    if requests < 2 * writes:
        raise UsageError(f"--requests {requests} is too few for {writes} writes")
    settings, described = _settings(args)
    _store_package()
    from examples.template_store import models, queries, seed, shards, workload

    data_dir: Path = args.data_dir
    if data_dir.exists() and not data_dir.is_dir():
        raise UsageError(f"--data-dir {data_dir} is not a directory")
    try:
        cache = OrmCache(settings)
    except ConfigurationError as exc:  # what building the regions found (a bad port, ...)
        source = args.settings if args.settings is not None else "--redis"
        raise UsageError(f"{source}: {exc}") from None
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        cache.close()
        raise UsageError(f"--data-dir {data_dir}: cannot create it: {exc.strerror or exc}") from None
    # store listings (17-48 KB pickled) are worth compressing in a shared
    # backend; ormcache's default threshold is higher (256 KiB)
    cache.compress_threshold = 16 * 1024
    engines: dict[str, Any] = {}
    try:
        _probe(cache)
        wanted = seed.StoreLayout(
            shards=size.shards, templates=size.templates, stores=size.shards * 4, seed=args.seed
        )
        layout = seed.load_layout(data_dir)
        if args.rebuild or layout is None or not layout.same_store(wanted):
            why = "rebuilding" if layout is not None else "building"
            err.write(
                f"{why} the store in {data_dir}: {size.shards} shards, {size.templates:,} templates\n"
            )
            try:
                layout = seed.build_store(
                    data_dir,
                    shards=size.shards,
                    templates=size.templates,
                    seed=args.seed,
                    progress=Progress("build", size.shards, err),
                )
            except FileExistsError as exc:
                raise UsageError(str(exc)) from None
            built = f"built in {layout.build_seconds:.1f} s"
        else:
            built = "reused; --rebuild to rebuild"

        engines = shards.create_engines(data_dir, layout.shard_ids)
        try:
            revision = shards.schema_revision(engines)
        except shards.SchemaMismatch as exc:
            raise UsageError(f"{data_dir}: {exc} (or pass --rebuild)") from None
        if revision != models.SCHEMA_REVISION:
            raise UsageError(
                f"{data_dir}: the store is at schema revision {revision}, and the demo's models "
                f"describe {models.SCHEMA_REVISION}: bring it to head with "
                f"`alembic -x data_dir={data_dir} upgrade head` "
                "(or pass --rebuild)"
            )
        cache.use_schema_version(revision)
        cache.invalidate_all()  # a cold start, whatever an earlier run left
        Plain = shards.make_sessionmaker(engines)
        Cached = shards.make_sessionmaker(engines)
        cache.attach(Cached)
        lookups = workload.count_lookups(Cached)

        load = workload.Workload(layout.templates, layout.stores, seed=args.seed)
        measured = load.requests(requests, stream=1, writes=writes)
        earlier = list(dict.fromkeys(load.requests(size.warmup, stream=0)))
        reads = [n for n, r in enumerate(measured) if r.kind != workload.WRITE]
        step = max(1, math.ceil(len(reads) / size.uncached))
        sampled = reads[::step]
        engine_list = list(engines.values())

        out.write(
            f"ormcache demo: {layout.shards} shards, {layout.templates:,} templates, "
            f"{layout.stores} stores in {data_dir} ({built})\n"
            f"cache: {described}; schema {revision}\n"
        )
        out.flush()

        with Plain() as session:
            stores = queries.store_shards(session)
        plain_app = workload.App(Plain, layout.shard_ids, cached=False, stores=stores)
        uncached = workload.run(
            plain_app,
            [measured[n] for n in sampled],
            engine_list,
            progress=Progress("uncached", len(sampled), err),
        )
        cached_app = workload.App(Cached, layout.shard_ids, cached=True, stores=stores)
        warm = workload.run(
            cached_app, earlier, engine_list, progress=Progress("warm-up", len(earlier), err)
        )
        cached = workload.run(
            cached_app,
            measured,
            engine_list,
            lookups=lookups,
            progress=Progress("cached", len(measured), err),
        )
    finally:
        cache.close()
        for engine in engines.values():
            engine.dispose()

    mix = ", ".join(f"{share:.0%} {_KINDS[kind]}" for kind, share in workload.MIX)
    out.write(
        f"workload: {cached.reads:,} reads ({mix}; 80% of lookups on 20% of the "
        f"templates; seed {args.seed}) and {cached.writes} writes\n"
        f"warm-up: the {len(earlier):,} distinct requests among {size.warmup:,} earlier ones "
        f"({warm.read_queries:,} database queries)\n"
        f"uncached: 1 in {step} of the reads, scanning the shards in order until found\n\n"
    )
    _report(out, uncached, cached, sampled)
    if cached.fresh_ok != cached.fresh_checks:
        err.writelines(f"stale read: {line}\n" for line in cached.stale)
        return 1
    return 0


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _report(out: TextIO, uncached: Any, cached: Any, sampled: list[int]) -> None:
    """The table and the summary lines; ``sampled`` are the positions of
    the requests the uncached pass ran."""
    u_per = uncached.read_queries / max(uncached.reads, 1)
    c_per = cached.read_queries / max(cached.reads, 1)
    by_position = dict(zip(cached.positions, cached.latencies))
    paired = [by_position[n] for n in sampled]
    speedup = _mean(uncached.latencies) / _mean(paired)
    hits = cached.lookups - cached.read_queries
    no_db = sum(1 for q in cached.queries if q == 0)

    def ms(values: Sequence[float], q: float) -> str:
        return f"{_percentile(values, q) * 1000:.2f} ms"

    rows = [
        ("reads", f"{uncached.reads:,}", f"{cached.reads:,}"),
        ("db queries", f"{uncached.read_queries:,}", f"{cached.read_queries:,}"),
        ("per read", f"{u_per:.2f}", f"{c_per:.4f}"),
        ("p50 latency", ms(uncached.latencies, 50), ms(cached.latencies, 50)),
        ("p99 latency", ms(uncached.latencies, 99), ms(cached.latencies, 99)),
    ]
    out.write(f"{'':<14}{'uncached':>14}{'cached':>14}\n")
    out.writelines(f"{label:<14}{a:>14}{b:>14}\n" for label, a, b in rows)
    out.write(
        f"\nhit rate: {hits / max(cached.lookups, 1):.1%} ({hits:,} of {cached.lookups:,} "
        f"cache lookups); {no_db / max(cached.reads, 1):.1%} of reads reached no database\n"
        f"queries avoided: {_avoided(u_per, c_per)} ({u_per:.2f} -> {c_per:.4f} per read)\n"
        f"speed-up: {speedup:.1f}x (mean latency of the {len(sampled):,} reads both passes ran)\n"
        f"writes: {cached.writes} (version bumped and body changed through the ORM)\n"
        f"fresh after writes: {cached.fresh_ok}/{cached.fresh_checks}\n"
    )
    out.flush()


def _mean(values: Sequence[float]) -> float:
    return sum(values) / max(len(values), 1)


def _avoided(before: float, after: float) -> str:
    """The share of queries avoided, never rounded up to 100%."""
    if not before:
        return "n/a"
    share = 1 - after / before
    for digits in (1, 2, 3):
        text = f"{share:.{digits}%}"
        if not text.startswith("100") or share == 1:
            return text
    return f"{math.floor(share * 1e5) / 1e3:.3f}%"


if __name__ == "__main__":
    raise SystemExit(main())
