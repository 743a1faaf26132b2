"""Output: the console table, the JSON file, the chart, the docs page."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from .results import (
    ERROR,
    INFO,
    MISS,
    PASS,
    SKIP,
    Row,
    fmt_quantity,
    target_text,
    value_text,
)

HEADERS = ("scenario", "backend", "baseline", "measured", "ratio", "target", "result")


def _cells(row: Row) -> tuple[str, ...]:
    return (
        row.scenario,
        row.backend,
        fmt_quantity(row, "baseline"),
        fmt_quantity(row, "measured"),
        value_text(row),
        target_text(row),
        row.status,
    )


def table(rows: list[Row]) -> str:
    cells = [HEADERS] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    lines = []
    for n, c in enumerate(cells):
        lines.append("  ".join(text.ljust(w) for text, w in zip(c, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"  {line}" for line in note_lines(rows)]
    if notes:
        lines.append("")
        lines.append("notes:")
        lines.extend(notes)
    counts = {s: sum(r.status == s for r in rows) for s in (PASS, MISS, INFO, SKIP, ERROR)}
    lines.append("")
    lines.append("  ".join(f"{k}: {v}" for k, v in counts.items()))
    return "\n".join(lines)


def note_lines(rows: list[Row]) -> list[str]:
    """One line per distinct (scenario, note), naming the backends."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r.note:
            grouped.setdefault((r.scenario, r.note), []).append(f"{r.backend} {r.status}")
    return [f"{scenario} [{', '.join(who)}]: {note}" for (scenario, note), who in grouped.items()]


def markdown_table(rows: list[Row]) -> str:
    head = "| " + " | ".join(HEADERS) + " |"
    sep = "|" + "|".join("---" for _ in HEADERS) + "|"
    body = []
    for r in rows:
        c = list(_cells(r))
        c[0] = f"`{c[0]}`"
        c[-1] = f"**{c[-1]}**" if r.status in (MISS, ERROR) else c[-1]
        body.append("| " + " | ".join(x.replace("|", "\\|") for x in c) + " |")
    return "\n".join([head, sep, *body])


# -- machine ------------------------------------------------------------


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_info(servers: dict[str, str]) -> dict[str, Any]:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = subprocess.run(
            ["nproc"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        nproc = str(os.cpu_count())
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "nproc": nproc,
        "cpu_model": cpu or platform.processor() or "unknown",
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "packages": {
            name: _version(name)
            for name in ("ormcache", "SQLAlchemy", "dogpile.cache", "redis", "hiredis", "pylibmc", "matplotlib")
        },
        "servers": servers,
        "loadavg_at_start": load,
    }


def machine_lines(meta: dict[str, Any]) -> list[str]:
    m = meta["machine"]
    pk = m["packages"]
    servers = ", ".join(f"{k} {v}" for k, v in m["servers"].items()) or "none"
    load = m.get("loadavg_at_start")
    end = m.get("loadavg_at_end")
    return [
        f"- machine: {m['nproc']} CPUs (nproc), {m['cpu_model']}; {m['platform']}",
        f"- Python {m['python']}, SQLAlchemy {pk.get('SQLAlchemy')}, dogpile.cache {pk.get('dogpile.cache')}, "
        f"redis-py {pk.get('redis')} (hiredis {pk.get('hiredis')}), pylibmc {pk.get('pylibmc')}, "
        f"ormcache {pk.get('ormcache')}",
        f"- servers: {servers}"
        + (f"; 1-minute load average {load[0]:.2f} at start" if load else "")
        + (f", {end[0]:.2f} at end" if end else ""),
        f"- command: `{meta['command']}` ({meta['mode']} sizes, {meta['duration_s']:.0f} s, {meta['started']})",
    ]


# -- JSON ------------------------------------------------------------------


def write_json(path: Path, meta: dict[str, Any], rows: list[Row], profile: dict[str, Any] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": meta,
        "scenarios": [r.as_dict() for r in rows],
        "profile": None if profile is None else {k: v for k, v in profile.items() if not k.startswith("_")},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


# -- chart -------------------------------------------------------------------

_COLORS = {PASS: "#2e7d32", MISS: "#c62828", INFO: "#9e9e9e", ERROR: "#000000", SKIP: "#ffffff"}


def draw_chart(path: Path, rows: list[Row], meta: dict[str, Any]) -> str | None:
    """Draw the time ratios; returns None, or why no chart was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return "matplotlib is not installed: no chart (pip install matplotlib, or the 'bench' extra)"
    timed = [r for r in rows if r.unit == "x" and r.value is not None and r.value > 0]
    if not timed:
        return "nothing to draw"
    labels = [f"{r.scenario} [{r.backend}]" for r in timed]
    values = [float(r.value or 0.0) for r in timed]
    height = max(3.0, 0.32 * len(timed) + 1.2)
    fig, ax = plt.subplots(figsize=(9, height))
    ys = list(range(len(timed)))[::-1]
    ax.barh(ys, values, color=[_COLORS.get(r.status, "#9e9e9e") for r in timed], height=0.65)
    for y, r, value in zip(ys, timed, values):
        if r.target is not None:
            ax.plot([r.target, r.target], [y - 0.42, y + 0.42], color="black", linewidth=2)
        ax.text(
            value * 1.06, y, value_text(r).split(" (")[0], va="center", fontsize=7,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.8},
        )
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xscale("log")
    ax.axvline(1.0, color="#555555", linewidth=0.8, linestyle=":")
    targets = [float(r.target) for r in timed if r.target]
    lo = min(values + targets)
    hi = max(values + targets)
    ax.set_xlim(10 ** math.floor(math.log10(lo) - 0.05), 10 ** math.ceil(math.log10(hi) + 0.15))
    ax.set_xlabel("ratio (log scale): cached / uncached time, stored / raw bytes, 1M / 1k entries; lower is better")
    m = meta["machine"]
    ax.set_title(
        f"ormcache benchmarks ({meta['mode']}): {m['nproc']} CPUs, Python {m['python']}, "
        f"SQLAlchemy {m['packages'].get('SQLAlchemy')}",
        fontsize=9,
    )
    ax.legend(
        handles=[
            Patch(color=_COLORS[PASS], label="PASS"),
            Patch(color=_COLORS[MISS], label="MISS"),
            Patch(color=_COLORS[INFO], label="no target"),
            Patch(facecolor="white", edgecolor="black", label="| target"),
        ],
        fontsize=7,
        loc="lower right",
    )
    ax.grid(axis="x", which="both", alpha=0.2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -- docs/benchmarks.md ------------------------------------------------------

_BLOCK = re.compile(r"(<!-- bench:(\w+) -->\n)(.*?)(<!-- /bench:\2 -->)", re.DOTALL)


def profile_markdown(profile: dict[str, Any] | None) -> str:
    if not profile:
        return "_not profiled in this run (`--only profile.hit`)_"
    lines = [
        f"{profile['calls']:,} one-row `select()` hits from the `{profile['backend']}` region, a new "
        f"session each: {profile['unprofiled_us_per_hit']:.0f} us per hit unprofiled, "
        f"{profile['profiled_total_us_per_hit']:.0f} us under cProfile.",
        "",
        "| phase (cumulative) | share | us/hit (profiled) |",
        "|---|---|---|",
    ]
    for p in profile["phases"]:
        pad = "&nbsp;&nbsp;&nbsp;&nbsp;" * p["indent"]
        lines.append(f"| {pad}{p['phase']} | {p['share'] * 100:.1f}% | {p['us_per_hit']:.0f} |")
    lines += ["", "| package (own time) | share |", "|---|---|"]
    for a in profile["areas"]:
        if a["share"] >= 0.005:
            lines.append(f"| {a['area']} | {a['share'] * 100:.1f}% |")
    lines += ["", "| ormcache function (cumulative) | share | calls/hit |", "|---|---|---|"]
    for f in profile.get("ormcache_cumulative", [])[:8]:
        lines.append(f"| `{f['function']}` | {f['cumtime_share'] * 100:.1f}% | {f['calls_per_hit']:.1f} |")
    lines += ["", "| function (own time) | share | calls/hit |", "|---|---|---|"]
    for f in profile["top_functions"][:15]:
        lines.append(f"| `{f['function']}` | {f['tottime_share'] * 100:.1f}% | {f['calls_per_hit']:.1f} |")
    return "\n".join(lines)


def update_docs(path: Path, meta: dict[str, Any], rows: list[Row], profile: dict[str, Any] | None) -> list[str]:
    """Replace the generated blocks of ``path``; returns the blocks updated.
    A block is ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->``; the
    prose around them is left alone."""
    blocks = {
        "machine": "\n".join(machine_lines(meta)),
        "results": markdown_table(rows)
        + "\n\n"
        + "\n".join(f"- {line}" for line in note_lines(rows)),
        "profile": profile_markdown(profile),
    }
    text = path.read_text()
    done = []

    def sub(m: re.Match[str]) -> str:
        name = m.group(2)
        if name not in blocks:
            return m.group(0)
        if name == "profile" and not profile:
            return m.group(0)
        done.append(name)
        return f"{m.group(1)}{blocks[name]}\n{m.group(4)}"

    path.write_text(_BLOCK.sub(sub, text))
    return done
