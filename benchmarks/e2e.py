"""End to end with bigger transactions: A writes N objects in 100 transactions while B is
connected; time until B holds them all (the sync issue's benchmark; the sync group measures
the same path with N/100 transactions)."""

from __future__ import annotations

from .harness import Context, Measurement
from .sync import _end_to_end

GROUP = "end to end, 100 transactions"


def run(ctx: Context) -> None:
    """Record A-to-B time for N objects written in 100 transactions."""
    n = 10_000 if ctx.quick else 100_000
    took: list[float] = []
    mem: list[float] = []
    for r in range(ctx.repeats):
        t, m = _end_to_end(ctx, n, r, per_tx=n // 100)
        ctx.log(f"  end to end (100 transactions) {t:.3f} s, server peak {m:.1f} MiB")
        took.append(t)
        mem.append(m)
    ctx.record(
        Measurement(GROUP, f"tidesync end to end {n:,}", "s", took, None, "100 transactions")
    )
    ctx.record(Measurement(GROUP, "server peak RSS, end to end (100 transactions)", "MiB", mem))
