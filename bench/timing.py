"""Interleaved timing: every side of a comparison, slice after slice.

:func:`measure` takes named zero-argument callables (``"uncached"``,
``"memory"``, ``"redis"``, ...); :func:`measure_runners` takes "runners"
instead, callables that make ``n`` calls and return the seconds they took
(for sides that live in another process).

1. Warm-up: each side runs at least ``warmup_calls`` calls (for example one
   whole cycle of ids, so that every one is cached) and for at least
   ``plan.warmup_time`` seconds; this also estimates its time per call.
2. Each side gets a number of calls per batch such that its batch lasts
   about ``plan.batch_time`` seconds (or a fixed number, ``reps``).
3. ``plan.batches`` rounds; in each round every side runs one batch, cut
   into ``plan.slices`` slices that alternate between the sides (the order
   rotates from slice to slice).  A burst of noise from another process
   therefore lands on every side of the round alike, instead of on
   whichever side happened to be running.
4. Each round gives one sample per side: the time of its batch divided by
   its calls (``time.perf_counter``).  A side's figure is the median of its
   samples; a ratio between two sides is the median of the per-round
   ratios.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

perf_counter = time.perf_counter

Runner = Callable[[int], float]


@dataclass
class Samples:
    """Seconds per call, one sample per round, for one side."""

    name: str
    reps: int
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "min_s": min(self.samples),
            "max_s": max(self.samples),
            "calls_per_batch": self.reps,
            "batches": len(self.samples),
            "samples_s": self.samples,
        }


@dataclass
class Plan:
    """How long to measure."""

    batches: int = 11
    batch_time: float = 0.15
    warmup_time: float = 0.2
    slices: int = 10
    min_reps: int = 3
    max_reps: int = 100_000


def paired_ratio(measured: Samples, baseline: Samples) -> float:
    """Median over rounds of measured / baseline."""
    ratios = [m / b for m, b in zip(measured.samples, baseline.samples) if b > 0]
    return statistics.median(ratios)


def ratio_spread(measured: Samples, baseline: Samples) -> tuple[float, float]:
    ratios = [m / b for m, b in zip(measured.samples, baseline.samples) if b > 0]
    return min(ratios), max(ratios)


def local_runner(fn: Callable[[], object]) -> Runner:
    def run(n: int) -> float:
        start = perf_counter()
        for _ in range(n):
            fn()
        return perf_counter() - start

    return run


def measure(
    sides: Mapping[str, Callable[[], object]],
    plan: Plan,
    *,
    warmup_calls: int = 0,
    reps: Mapping[str, int] | int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Samples]:
    """Time every side; see the module docstring.  With ``reps`` (the
    calls per batch: one number for every side, or per side) the warm-up
    is exactly ``warmup_calls`` calls, for sides that draw from a finite
    pool of fresh ids."""
    return measure_runners(
        {name: local_runner(fn) for name, fn in sides.items()},
        plan,
        warmup_calls=warmup_calls,
        reps=reps,
        progress=progress,
    )


def measure_runners(
    runners: Mapping[str, Runner],
    plan: Plan,
    *,
    warmup_calls: int = 0,
    reps: Mapping[str, int] | int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Samples]:
    names = list(runners)
    per_call: dict[str, float] = {}
    for name in names:
        run = runners[name]
        start = perf_counter()
        spent = 0.0
        calls = 0
        while calls < max(warmup_calls, 1) or (
            reps is None and perf_counter() - start < plan.warmup_time
        ):
            spent += run(1)
            calls += 1
        per_call[name] = spent / calls
    counts: dict[str, int] = {}
    for name in names:
        if isinstance(reps, int):
            n = reps
        elif reps is not None and name in reps:
            n = reps[name]
        else:
            n = int(plan.batch_time / max(per_call[name], 1e-9))
            n = max(plan.min_reps, min(plan.max_reps, n))
        counts[name] = n
    slices = max(1, plan.slices)
    # calls of each side in each slice: spread n calls over the slices
    chunks = {
        name: [n // slices + (1 if i < n % slices else 0) for i in range(slices)]
        for name, n in counts.items()
    }
    result = {name: Samples(name, counts[name]) for name in names}
    for round_no in range(plan.batches):
        gc.collect()
        spent_in_round = dict.fromkeys(names, 0.0)
        for slice_no in range(slices):
            shift = (round_no + slice_no) % len(names)
            order = names[shift:] + names[:shift]
            if (round_no + slice_no) % 2:
                order.reverse()
            for name in order:
                n = chunks[name][slice_no]
                if n:
                    spent_in_round[name] += runners[name](n)
        for name in names:
            result[name].samples.append(spent_in_round[name] / counts[name])
        if progress is not None:
            progress(f"round {round_no + 1}/{plan.batches}")
    return result


def time_once(fn: Callable[[], object]) -> float:
    start = perf_counter()
    fn()
    return perf_counter() - start
