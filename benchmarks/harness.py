"""Timing, repetition and reporting shared by every benchmark group.

A group is a function ``run(ctx) -> None`` that records measurements with ``ctx.measure``;
each measurement is repeated (median of at least 3 runs, with min and max) and may name a
reference measured in the same run, so the report shows the ratio.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.json"
REPORT = ROOT / "docs" / "benchmarks.md"


@dataclass
class Measurement:
    """One benchmark's runs (seconds, or another unit) and what it is compared with."""

    group: str
    name: str
    unit: str
    runs: list[float]
    reference: str | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)


@dataclass
class Context:
    """What a group gets: the size mode, a place for files, and the recorder."""

    quick: bool
    workdir: Path
    measurements: list[Measurement] = field(default_factory=list)
    repeats: int = 3

    @property
    def sizes(self) -> tuple[int, ...]:
        """The workload's sizes N: 10,000 and 100,000 (10,000 alone with ``--quick``)."""
        return (10_000,) if self.quick else (10_000, 100_000)

    def log(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def measure(
        self,
        group: str,
        name: str,
        fn: Callable[[int], float],
        *,
        unit: str = "s",
        reference: str | None = None,
        note: str = "",
        repeats: int | None = None,
    ) -> Measurement:
        """Run ``fn(run_index)`` (which returns one figure) several times and record it."""
        runs: list[float] = []
        for i in range(repeats or self.repeats):
            value = fn(i)
            runs.append(value)
            self.log(f"  {group} / {name}: run {i + 1}: {value:.6g} {unit}")
        m = Measurement(group, name, unit, runs, reference, note)
        self.measurements.append(m)
        return m

    def record(self, m: Measurement) -> None:
        """Record a measurement made by other means (e.g. percentiles)."""
        self.measurements.append(m)
        self.log(f"  {m.group} / {m.name}: {m.runs}")


def timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn()`` took."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def save(ctx: Context, groups: list[str]) -> None:
    """Merge this run's measurements into results.json (replacing the groups run) and
    rewrite docs/benchmarks.md."""
    data: dict[str, Any] = {"runs": {}}
    if RESULTS.exists():
        data = json.loads(RESULTS.read_text())
    for g in groups:
        data["runs"][g] = {
            "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "quick": ctx.quick,
            "machine": f"{platform.machine()}, {platform.python_implementation()} "
            f"{platform.python_version()}, {platform.system()}",
            "measurements": [asdict(m) for m in ctx.measurements if m.group == g],
        }
    RESULTS.write_text(json.dumps(data, indent=2, default=str))
    REPORT.write_text(render(data))


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        if value < 1e-3:
            return f"{value * 1e6:.1f} µs"
        if value < 1:
            return f"{value * 1e3:.2f} ms"
        return f"{value:.3f} s"
    return f"{value:,.1f} {unit}"


def render(data: dict[str, Any]) -> str:
    """The markdown report."""
    out = [
        "# Benchmarks",
        "",
        "Measured by `python -m benchmarks run` (see `benchmarks/`). Every figure is the median",
        "of at least 3 runs (min and max beside it); a ratio compares with a reference system",
        "measured in the same run on the same machine (ratio = tidesync / reference: lower is",
        "better for times). Regenerate with `python -m benchmarks run [--quick] [--only GROUP]`.",
        "",
    ]
    notes_file = ROOT / "benchmarks" / "notes.md"
    # references may live in another group (e.g. PouchDB, the floor)
    everywhere = {m["name"]: m for run in data["runs"].values() for m in run["measurements"]}
    for group, run in data["runs"].items():
        out += [
            f"## {group}",
            "",
            f"Run {run['when']} on {run['machine']}{' (quick sizes)' if run['quick'] else ''}.",
            "",
            "| benchmark | median | min | max | reference | ratio |",
            "|---|---|---|---|---|---|",
        ]
        by_name = {**everywhere, **{m["name"]: m for m in run["measurements"]}}
        for m in run["measurements"]:
            runs = m["runs"]
            med = statistics.median(runs)
            ref = m.get("reference")
            ratio = ""
            if ref and ref in by_name:
                ref_med = statistics.median(by_name[ref]["runs"])
                ratio = f"{med / ref_med:.2f}x" if ref_med else ""
            note = f" ({m['note']})" if m.get("note") else ""
            out.append(
                f"| {m['name']}{note} | {_fmt(med, m['unit'])} | {_fmt(min(runs), m['unit'])} | "
                f"{_fmt(max(runs), m['unit'])} | {ref or ''} | {ratio} |"
            )
        out.append("")
    if notes_file.exists():
        out += [notes_file.read_text().rstrip(), ""]
    return "\n".join(out) + "\n"
