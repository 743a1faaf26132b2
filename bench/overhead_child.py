"""Child process of the ``overhead.process`` scenario.

``--mode plain`` never imports ormcache; ``--mode attached`` builds an
OrmCache (memory region), attaches it to the session factory and runs one
cached query, so that every hook ormcache installs is in place.  Both then
serve the same query *without* cache options: the parent writes a number
``n`` on stdin, the child makes ``n`` calls (a new session each) and
answers with the seconds they took; ``quit`` ends it.  The parent alternates
slices between the two children (see :func:`bench.timing.measure_runners`),
so both see the same machine conditions while only one runs at a time.

With ``--calls N`` the child makes one round of warm-up calls and ``N``
calls, then exits: ``overhead.instructions`` runs it under callgrind.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from bench.data import Template, sqlite_engine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead_child")
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--mode", choices=("plain", "attached"), required=True)
    parser.add_argument("--ids", type=int, default=100)
    parser.add_argument(
        "--calls",
        type=int,
        default=None,
        help="make this many calls after one round of warm-up, then exit (for callgrind)",
    )
    args = parser.parse_args(argv)

    engine = sqlite_engine(args.db)
    Session = sessionmaker(engine)
    if args.mode == "attached":
        from ormcache import FromCache, OrmCache

        cache = OrmCache.from_settings({"regions": {"memory": {"backend": "memory"}}})
        cache.attach(Session)
        with Session() as session:
            session.scalars(select(Template).where(Template.id == 1).options(FromCache("memory"))).one()
    elif "ormcache" in sys.modules:
        print("error: ormcache was imported in plain mode", flush=True)
        return 1

    ids = itertools.cycle(range(1, args.ids + 1))

    def query() -> object:
        with Session() as session:
            return session.scalars(select(Template).where(Template.id == next(ids))).one()

    if args.calls is not None:
        for _ in range(args.ids):
            query()
        for _ in range(args.calls):
            query()
        engine.dispose()
        return 0

    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit" or not command:
            break
        n = int(command)
        start = time.perf_counter()
        for _ in range(n):
            query()
        print(repr(time.perf_counter() - start), flush=True)
    engine.dispose()
    return 0


class ChildRunner:
    """A running child, called like a :data:`bench.timing.Runner`."""

    def __init__(self, db: Path, mode: str, ids: int, cwd: Path) -> None:
        cmd = [sys.executable, "-m", "bench.overhead_child", "--db", str(db), "--mode", mode, "--ids", str(ids)]
        self.mode = mode
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
        )
        self._expect("ready")

    def _expect(self, what: str) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line or (what == "ready" and line != "ready"):
            err = self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else ""
            raise RuntimeError(f"overhead child ({self.mode}) said {line!r}: {err[-2000:]}")
        return line

    def __call__(self, n: int) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return float(self._expect("time"))

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ChildRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    raise SystemExit(main())
