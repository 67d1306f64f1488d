"""Fan-out: one write seen by 100 connected devices (100 users, in a few client processes);
the time until the last one was notified, and the server's peak memory."""

from __future__ import annotations

import shutil
import subprocess
import time

from .common import Bench, Device, peak_mib, read_line, start_server, stop_workers, worker_process
from .harness import Context, Measurement

GROUP = "fan-out"
DEVICES = 100
PROCESSES = 4
ROUNDS = 5  # the first is a warm-up


def run(ctx: Context) -> None:
    """Record the fan-out benchmark."""
    root = ctx.workdir / "fanout"
    shutil.rmtree(root, ignore_errors=True)
    server = start_server(root, "server")
    writer = Device(root, "writer", server.url)
    workers: list[subprocess.Popen[str]] = []
    try:
        db = writer.open()
        writer.wait_upload(60)
        per = DEVICES // PROCESSES
        for w in range(PROCESSES):
            workers.append(worker_process("fanout", server.url, str(root / f"w{w}"), str(per)))
        for p in workers:
            read_line(p, "ready", 300)
        ctx.log(f"  {DEVICES} devices connected in {PROCESSES} processes")
        took: list[float] = []
        for r in range(ROUNDS):
            for p in workers:
                assert p.stdin is not None
                p.stdin.write("round\n")
                p.stdin.flush()
            start = time.perf_counter()
            with db.write():
                db.add(Bench(id=r, owner="fan", title=f"round {r}", qty=r, price=0.5, done=False))
            last = max(float(read_line(p, "done", 120).split()[1]) for p in workers)
            ctx.log(f"  round {r}: {(last - start) * 1e3:.1f} ms")
            if r:
                took.append(last - start)
        ctx.record(
            Measurement(
                GROUP,
                f"tidesync fan-out to {DEVICES} devices",
                "s",
                took,
                note="write to the last device notified",
            )
        )
        ctx.record(Measurement(GROUP, "server peak RSS, fan-out", "MiB", [peak_mib(server)]))
    finally:
        stop_workers(workers)
        writer.close()
        server.kill()
