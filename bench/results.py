"""One line of the results table, and how it is judged against its target."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PASS, MISS, INFO, SKIP, ERROR = "PASS", "MISS", "INFO", "SKIP", "ERROR"


@dataclass
class Row:
    """One scenario on one backend.

    ``value`` is what the target is about: a ratio (``unit="x"``, e.g.
    cached / uncached time) or a fraction (``unit="%"``).  ``baseline`` and
    ``measured`` are what the ratio is made of, in ``kind`` units: seconds
    per call (``"time"``), bytes (``"size"``) or counts (``"count"``).
    """

    scenario: str
    backend: str
    title: str
    kind: str = "time"
    baseline: float | None = None
    measured: float | None = None
    value: float | None = None
    unit: str = "x"
    target_op: str | None = None
    target: float | None = None
    status: str = ""
    note: str = ""
    baseline_label: str = "uncached"
    measured_label: str = "cached"
    detail: dict[str, Any] = field(default_factory=dict)

    def judge(self) -> Row:
        if self.status in (SKIP, ERROR):
            return self
        if self.value is None:
            self.status = ERROR
        elif self.target is None or self.target_op is None:
            self.status = INFO
        elif self.target_op == "<=":
            self.status = PASS if self.value <= self.target else MISS
        else:
            self.status = PASS if self.value >= self.target else MISS
        return self

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.value if self.unit == "x" else None
        data["target_text"] = target_text(self)
        data["value_text"] = value_text(self)
        return data


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def fmt_quantity(row: Row, which: str) -> str:
    number = row.baseline if which == "baseline" else row.measured
    label = row.baseline_label if which == "baseline" else row.measured_label
    if number is None:
        return "-"
    if row.kind == "time":
        text = fmt_seconds(number)
    elif row.kind == "size":
        text = f"{number:,.0f} B"
    else:
        text = f"{number:,.0f}"
    default = "uncached" if which == "baseline" else "cached"
    return text if label == default else f"{text} ({label})"


def value_text(row: Row) -> str:
    if row.value is None:
        return "-"
    if row.unit == "%":
        return f"{row.value * 100:.1f}%"
    if row.value < 0.1:
        return f"{row.value:.4f}x ({1 / row.value:.0f}x faster)" if row.value > 0 else "0x"
    return f"{row.value:.2f}x"


def target_text(row: Row) -> str:
    if row.target is None or row.target_op is None:
        return "-"
    if row.unit == "%":
        return f"{row.target_op} {row.target * 100:.0f}%"
    if row.target < 0.1:
        return f"{row.target_op} {row.target:.3f}x ({1 / row.target:.0f}x faster)"
    return f"{row.target_op} {row.target:g}x"
