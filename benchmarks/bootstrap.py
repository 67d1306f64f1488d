"""Flexible sync bootstrap: a fresh device subscribes to every object of a model that the
server holds (100,000; 10,000 with ``--quick``) and waits until its subscription set is
COMPLETE. Records the time, the server's peak RSS and the device process's peak RSS during
the bootstrap (VmHWM, reset just before via ``/proc/self/clear_refs``)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from .common import Device, peak_mib, proc_status, rows, start_server, write_objects
from .harness import Context, Measurement

GROUP = "bootstrap"

#: Seconds any phase may take before the run fails.
LIMIT = 900.0


def _reset_peak() -> bool:
    """Reset this process's VmHWM (Linux); False if the kernel refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _run(ctx: Context, n: int, run: int) -> tuple[float, float, float, int]:
    root = ctx.workdir / f"bootstrap-{run}"
    shutil.rmtree(root, ignore_errors=True)
    server = start_server(root, "server")
    a = Device(root, "a", server.url)
    b = Device(root, "b", server.url)
    try:
        db = a.open()
        write_objects(db, rows(n), min(n, 10_000))
        a.wait_upload(LIMIT)
        a.close()
        b.log_in()
        reset = _reset_peak()
        start = time.perf_counter()
        b.open()  # subscribes to all Bench objects and waits until the set is COMPLETE
        elapsed = time.perf_counter() - start
        held = b.count()
        if held != n or b.errors:
            raise RuntimeError(f"bootstrap delivered {held} of {n}; errors {b.errors}")
        device_peak = proc_status(os.getpid(), "VmHWM") / 2**20 if reset else float("nan")
        return elapsed, peak_mib(server), device_peak, held
    finally:
        b.close()
        server.kill()


def run(ctx: Context) -> None:
    """Bootstrap of n objects into a fresh device."""
    n = 10_000 if ctx.quick else 100_000
    times: list[float] = []
    server_mem: list[float] = []
    device_mem: list[float] = []
    for i in range(1 if not ctx.quick else 2):
        elapsed, smem, dmem, _ = _run(ctx, n, i)
        ctx.log(f"  bootstrap {n}: {elapsed:.2f} s, server {smem:.0f} MiB, device {dmem:.0f} MiB")
        times.append(elapsed)
        server_mem.append(smem)
        device_mem.append(dmem)
    note = f"{n:,} objects, fresh device, subscription to all, until COMPLETE"
    ctx.record(Measurement(GROUP, f"bootstrap {n:,} objects", "s", times, note=note))
    ctx.record(Measurement(GROUP, "server peak RSS, bootstrap", "MiB", server_mem))
    ctx.record(
        Measurement(
            GROUP,
            "device process peak RSS, bootstrap",
            "MiB",
            device_mem,
            note="the benchmark process (the device) after resetting its VmHWM",
        )
    )
