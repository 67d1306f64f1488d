"""Scale: idle connected sessions on one server process (one user and one WebSocket each,
opened by protocol-level clients in several processes): time to connect them all and the
server's memory per session."""

from __future__ import annotations

import shutil
import subprocess
import time

from .common import proc_status, read_line, server_pid, start_server, stop_workers, worker_process
from .harness import Context, Measurement

GROUP = "scale"
PER_PROCESS = 1250


def _once(ctx: Context, sessions: int, run: int) -> tuple[float, float, float, float]:
    """(seconds to connect all, RSS growth KiB per session, peak KiB per session, peak MiB)."""
    root = ctx.workdir / f"scale-{sessions}-{run}"
    shutil.rmtree(root, ignore_errors=True)
    server = start_server(root, "server")
    pid = server_pid(server)
    procs: list[subprocess.Popen[str]] = []
    try:
        left = sessions
        while left:
            k = min(PER_PROCESS, left)
            left -= k
            procs.append(worker_process("scale", server.url, str(k)))
        for p in procs:
            read_line(p, "ready", 300)
        time.sleep(0.5)
        base_rss = proc_status(pid, "VmRSS")
        start = time.perf_counter()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        end = max(float(read_line(p, "connected", 300).split()[1]) for p in procs)
        took = end - start
        time.sleep(1.0)
        rss = proc_status(pid, "VmRSS")
        peak = proc_status(pid, "VmHWM")
        per = (rss - base_rss) / sessions / 1024
        per_peak = peak / sessions / 1024
        ctx.log(
            f"  {sessions} sessions: {took:.2f} s, RSS {base_rss / 2**20:.1f} -> "
            f"{rss / 2**20:.1f} MiB ({per:.1f} KiB/session), peak {peak / 2**20:.1f} MiB"
        )
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError("the server died")
        return took, per, per_peak, peak / 2**20
    finally:
        stop_workers(procs)
        server.kill()


def run(ctx: Context) -> None:
    """Record the scale benchmark at 1,000 and 5,000 sessions."""
    for sessions in (1000, 5000):
        results = [_once(ctx, sessions, r) for r in range(ctx.repeats)]
        took, per, per_peak, peak = (list(x) for x in zip(*results, strict=True))
        ctx.record(
            Measurement(
                GROUP,
                f"connect {sessions:,} idle sessions",
                "s",
                took,
                note="one user and WebSocket each",
            )
        )
        ctx.record(Measurement(GROUP, f"server RSS growth per session, {sessions:,}", "KiB", per))
        ctx.record(
            Measurement(
                GROUP,
                f"server peak RSS / sessions, {sessions:,}",
                "KiB",
                per_peak,
                note="whole process peak divided by sessions",
            )
        )
        ctx.record(Measurement(GROUP, f"server peak RSS, {sessions:,} sessions", "MiB", peak))
