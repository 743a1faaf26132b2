"""The benchmark harness runs end to end (``python -m bench --quick``).

No timing is asserted: only that every scenario ran and reported numbers.
Backends whose server is down are reported as SKIP by the harness itself.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

EXPECTED = {
    "hit.one_row",
    "hit.session_get",
    "hit.100_rows",
    "cold.first_query",
    "overhead.no_options",
    "overhead.process",
    "overhead.instructions",
    "shards.resolve",
    "size.row_2kb",
    "size.large_result",
    "workload.80_20",
    "invalidate.model",
}


def test_bench_quick_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-chart", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())
    rows = data["scenarios"]
    assert EXPECTED <= {r["scenario"] for r in rows}
    for row in rows:
        assert row["status"] in ("PASS", "MISS", "INFO", "SKIP"), row
        if row["status"] == "SKIP":
            continue
        assert isinstance(row["value"], (int, float)) and math.isfinite(row["value"]), row
        if row["unit"] == "x":
            assert isinstance(row["ratio"], (int, float)) and row["ratio"] > 0, row
    # the in-process memory backend never needs a server: its rows always ran
    memory = {r["scenario"] for r in rows if r["backend"] == "memory" and r["status"] != "SKIP"}
    assert {"hit.one_row", "hit.session_get", "hit.100_rows", "cold.first_query", "invalidate.model"} <= memory
    assert data["meta"]["mode"] == "quick"
    assert data["profile"]["phases"], "the hit path profile is missing"


def test_bench_floor_runs(redis_url: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.floor", "--calls", "20", "--rounds", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "ORMCACHE_BENCH_REDIS_URL": redis_url},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = {line.split("  ")[0]: line for line in proc.stdout.splitlines()}
    assert {
        "uncached one-row select()",
        "listener answering at once",
        "_generate_cache_key() alone",
        "Redis.mget (6 keys, 2 KB)",
        "the same MGET on a pool connection",
        "the same MGET by ormcache's reader",
    } <= set(lines)

