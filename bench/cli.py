"""``python -m bench``: run the scenarios, print the table, write the files.

Examples (from the repository root)::

    python -m bench                        # everything, full sizes (~10 min)
    python -m bench --quick --no-chart     # tiny sizes, seconds (the smoke test)
    python -m bench --only 'hit.*'         # scenarios by glob or substring
    python -m bench --only hit,cold --backends memory,redis
    python -m bench --update-docs          # also refresh docs/benchmarks.md

Exit status: 0 when every scenario ran (MISS rows included), 1 when a
scenario failed (an ERROR row), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import backends as bk
from .profile_hit import format_summary
from .report import draw_chart, machine_info, table, update_docs, write_json
from .results import ERROR, Row
from .scenarios import REPO, SCENARIOS, Config, Context, Scenario

DEFAULT_JSON = REPO / "bench" / "results" / "latest.json"
DEFAULT_CHART = REPO / "docs" / "benchmarks.png"
DEFAULT_DOCS = REPO / "docs" / "benchmarks.md"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def select_scenarios(patterns: str | None) -> list[Scenario]:
    if not patterns:
        return list(SCENARIOS)
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = []
    for s in SCENARIOS:
        for p in wanted:
            if any(ch in p for ch in "*?[") and fnmatch.fnmatch(s.name, p) or p in s.name:
                chosen.append(s)
                break
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="ormcache benchmarks: uncached vs memory, Redis and memcached, side by side.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (smoke test)")
    parser.add_argument("--only", metavar="PATTERN", help="comma-separated globs or substrings of scenario names")
    parser.add_argument("--backends", default=",".join(bk.BACKENDS), help="comma-separated subset of memory,redis,memcached,redis_l1")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH", help=f"results file (default {DEFAULT_JSON.relative_to(REPO)})")
    parser.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    parser.add_argument("--chart", type=Path, default=DEFAULT_CHART, metavar="PATH", help=f"chart file (default {DEFAULT_CHART.relative_to(REPO)})")
    parser.add_argument("--update-docs", action="store_true", help=f"rewrite the generated blocks of {DEFAULT_DOCS.relative_to(REPO)}")
    parser.add_argument("--invalidate-entries", type=int, metavar="N", help="entries for the big side of invalidate.model (default 1,000,000)")
    parser.add_argument("--batches", type=int, help="rounds per timed scenario (default 11; quick 3)")
    parser.add_argument("--batch-time", type=float, help="seconds per batch per side (default 0.15)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="PATH",
        help="run nothing: print the table of a results file, redraw its chart, and with --update-docs refresh the page",
    )
    args = parser.parse_args(argv)
    unknown = set(args.backends.split(",")) - set(bk.BACKENDS)
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    if args.update_docs and args.quick and not args.from_json:
        parser.error("--update-docs needs a full run, not --quick")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for s in SCENARIOS:
            print(f"{s.name:<22} {s.about}")
        return 0
    if args.from_json:
        return render_saved(args)
    scenarios = select_scenarios(args.only)
    if not scenarios:
        print(f"no scenario matches {args.only!r}; see --list", file=sys.stderr)
        return 2

    cfg = Config.quick_config() if args.quick else Config.full()
    if args.invalidate_entries:
        cfg.invalidate_big = args.invalidate_entries
    if args.batches:
        cfg.plan.batches = args.batches
    if args.batch_time:
        cfg.plan.batch_time = args.batch_time

    selected = [b.strip() for b in args.backends.split(",") if b.strip()]
    available = {}
    for name in bk.BACKENDS:
        if name in selected:
            available[name] = bk.probe(name)
        else:
            available[name] = (False, f"{name} not selected (--backends)")
        ok, where = available[name]
        log(f"backend {name}: {where if ok else 'SKIP: ' + where}")
    servers = bk.server_versions({k: v[0] for k, v in available.items()})

    started = datetime.now(UTC)
    t0 = time.perf_counter()
    command = " ".join(["python -m bench", shlex.join(sys.argv[1:] if argv is None else argv)]).strip()
    meta: dict[str, Any] = {
        "command": command,
        "mode": "quick" if args.quick else "full",
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(servers),
        "config": {
            k: v for k, v in vars(cfg).items() if not k.endswith("plan")
        }
        | {"plan": vars(cfg.plan), "overhead_plan": vars(cfg.overhead_plan)},
        "scenarios_run": [s.name for s in scenarios],
    }

    rows: list[Row] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="ormcache-bench-") as tmp:
        ctx = Context(cfg, Path(tmp), available, log)
        try:
            for scenario in scenarios:
                log(f"{scenario.name}: {scenario.about}")
                start = time.perf_counter()
                try:
                    got = scenario.run(ctx)
                except Exception as err:  # noqa: BLE001 - report it, go on
                    traceback.print_exc()
                    failed = True
                    got = [Row(scenario.name, "-", scenario.about, status=ERROR, note=f"{type(err).__name__}: {err}"[:300])]
                for row in got:
                    row.judge()
                    if row.status == ERROR:
                        failed = True
                rows.extend(got)
                log(f"{scenario.name}: done in {time.perf_counter() - start:.1f} s")
        finally:
            if "templates" in ctx.__dict__:
                t = ctx.templates
                t.cache.close()
                t.engine_plain.dispose()
                t.engine_cached.dispose()
    meta["duration_s"] = time.perf_counter() - t0
    try:
        meta["machine"]["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass

    print()
    print(table(rows))
    if ctx.profile:
        print()
        print("\n".join(format_summary(ctx.profile)))

    write_json(args.json, meta, rows, ctx.profile)
    log(f"results written to {args.json}")
    outputs(args, meta, rows, ctx.profile)
    return 1 if failed else 0


def outputs(args: argparse.Namespace, meta: dict[str, Any], rows: list[Row], profile: dict[str, Any] | None) -> None:
    if not args.no_chart:
        why_not = draw_chart(args.chart, rows, meta)
        log(f"chart: {why_not}" if why_not else f"chart written to {args.chart}")
    if args.update_docs:
        if meta.get("mode") == "quick":
            log("warning: updating the docs page with --quick numbers")
        if args.only or len(meta.get("scenarios_run", [])) < len(SCENARIOS):
            log("warning: not every scenario ran: the page's table holds only those that did")
        if DEFAULT_DOCS.exists():
            done = update_docs(DEFAULT_DOCS, meta, rows, profile)
            log(f"{DEFAULT_DOCS}: updated blocks {', '.join(done) or '(none found)'}")
        else:
            log(f"{DEFAULT_DOCS} does not exist: nothing to update")


def render_saved(args: argparse.Namespace) -> int:
    data = json.loads(args.from_json.read_text())
    fields = set(Row.__dataclass_fields__)
    rows = [Row(**{k: v for k, v in r.items() if k in fields}) for r in data["scenarios"]]
    meta, profile = data["meta"], data.get("profile")
    print(table(rows))
    if profile:
        print()
        print("\n".join(format_summary(profile)))
    outputs(args, meta, rows, profile)
    return 0
