"""How long an invalidation takes to reach a relaxed L1 over Redis pub/sub.

``python -m bench.propagation [--url redis://127.0.0.1:6379/0] [--count 2000]``

A writer OrmCache moves a version token (what a committed write does); a
reader OrmCache's subscriber (relaxed L1 mode) receives it.  The time from
the writer's call until the reader forgets its local token is sampled
``--count`` times, one write at a time, and its percentiles printed.  This
is how long a relaxed L1 may serve an entry that a write has invalidated.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

from ormcache import OrmCache


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.propagation")
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    region = {
        "backend": "redis",
        "l1": {"max_entries": 10, "mode": "relaxed"},
        "arguments": {"url": args.url},
    }
    settings = {"namespace": "pg" + uuid.uuid4().hex[:8], "regions": {"r": region}}
    reader, writer = OrmCache.from_settings(settings), OrmCache.from_settings(settings)
    subscriber = reader._stores["r"].subscriber
    store = writer._stores["r"]
    deadline = time.monotonic() + 5
    while not subscriber.healthy and time.monotonic() < deadline:
        time.sleep(0.01)
    key = f"{settings['namespace']}:v:probe"
    samples = []
    try:
        for i in range(args.count):
            token = f"{i:016x}"
            # a message makes the reader forget the key's token (it reads
            # it from Redis next time): plant one, and wait for it to go
            with subscriber._lock:
                subscriber.tokens[key] = "planted"
            started = time.perf_counter()
            store.set_many({key: token})
            while key in subscriber.tokens:
                if time.perf_counter() - started > 2:
                    raise SystemExit("a message did not arrive within 2 s")
                time.sleep(0)
            samples.append(time.perf_counter() - started)
    finally:
        reader.close()
        writer.close()
    samples.sort()

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(p / 100 * len(samples)))] * 1e6

    print(
        f"{len(samples)} invalidations over {args.url}: "
        f"p50 {pct(50):.0f} us, p99 {pct(99):.0f} us, max {samples[-1] * 1e6:.0f} us, "
        f"mean {statistics.mean(samples) * 1e6:.0f} us"
    )


if __name__ == "__main__":
    main()
