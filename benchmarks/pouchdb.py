"""Reference: PouchDB 9 clients (leveldb on disk) replicating with an ``express-pouchdb``
server (leveldb on disk), installed from npm into a cache folder at run time."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from .common import percentile, proc_status
from .harness import Context, Measurement

GROUP = "pouchdb"
CACHE = Path(os.environ.get("TIDESYNC_BENCH_CACHE", Path.home() / ".cache" / "tidesync-bench"))
PACKAGES = ["pouchdb@9", "express-pouchdb@4", "express@4"]
SCRIPT = Path(__file__).with_name("pouchdb_bench.js")


def install(ctx: Context) -> Path:
    """npm-install the packages into the cache (once); returns node_modules."""
    folder = CACHE / "node"
    modules = folder / "node_modules"
    if (modules / "pouchdb" / "package.json").exists() and (modules / "express-pouchdb").exists():
        return modules
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "package.json").write_text('{"name": "tidesync-bench-refs", "private": true}\n')
    ctx.log(f"  npm install {' '.join(PACKAGES)} into {folder}")
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", *PACKAGES],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"npm install failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return modules


class PouchServer:
    """An express-pouchdb server child process."""

    def __init__(self, modules: Path, data: Path) -> None:
        data.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, NODE_PATH=str(modules))
        self.proc = subprocess.Popen(
            ["node", str(SCRIPT), "server", str(data)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded: the process prints or exits
        if not line.startswith("port "):
            self.close()
            raise RuntimeError(f"express-pouchdb did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def peak_mib(self) -> float:
        """Peak RSS of the server process."""
        return proc_status(self.proc.pid, "VmHWM") / 2**20

    def client(self, *args: str, timeout: float = 900) -> str:
        """Run one client command; its last output line."""
        done = subprocess.run(
            ["node", str(SCRIPT), args[0], self.url, *args[1:]],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pouchdb {args[0]} failed: {done.stderr[-2000:]}")
        return done.stdout.strip().splitlines()[-1]

    def close(self) -> None:
        """Kill the server."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _push_pull(ctx: Context, modules: Path, n: int) -> None:
    """PouchDB push and pull of ``n`` documents, each run against a fresh server."""
    ctx.log(f"{GROUP}: N = {n:,}")
    push: list[float] = []
    pull: list[float] = []
    mem: list[float] = []
    for r in range(ctx.repeats):
        root = ctx.workdir / f"pouch-{n}-{r}"
        shutil.rmtree(root, ignore_errors=True)
        (root / "client").mkdir(parents=True)
        server = PouchServer(modules, root / "server")
        try:
            push.append(float(server.client("push", str(root / "client"), str(n)).split()[1]))
            pull.append(float(server.client("pull", str(root / "client"), str(n)).split()[1]))
            mem.append(server.peak_mib())
        finally:
            server.close()
        ctx.log(f"  PouchDB push {push[-1]:.3f} s, pull {pull[-1]:.3f} s, server {mem[-1]:.1f} MiB")
    ctx.record(Measurement(GROUP, f"PouchDB push {n:,}", "s", push, note="replicate.to"))
    ctx.record(Measurement(GROUP, f"PouchDB pull {n:,}", "s", pull, note="replicate.from, fresh"))
    ctx.record(Measurement(GROUP, f"express-pouchdb peak RSS, push + pull {n:,}", "MiB", mem))


def run(ctx: Context) -> None:
    """Record PouchDB push, pull and live-sync latency."""
    modules = install(ctx)
    for n in ctx.sizes:
        _push_pull(ctx, modules, n)
    count = 200 if ctx.quick else 1000
    root = ctx.workdir / "pouch-latency"
    shutil.rmtree(root, ignore_errors=True)
    (root / "client").mkdir(parents=True)
    server = PouchServer(modules, root / "server")
    try:
        start = time.monotonic()
        out = server.client("latency", str(root / "client"), str(count), "50", timeout=600)
        ctx.log(f"  PouchDB latency run took {time.monotonic() - start:.1f} s")
        lat = [float(x) / 1e3 for x in out.split()[1].split(",")]
        peak = server.peak_mib()
    finally:
        server.close()
    for p in (50, 95, 99):
        chunks = [lat[i::3] for i in range(3)]
        ctx.record(
            Measurement(
                GROUP,
                f"PouchDB latency p{p}",
                "s",
                [percentile(c, p) for c in chunks],
                note=f"{len(lat)} writes, live sync A to B changes feed",
                extra={"all": percentile(lat, p)},
            )
        )
    ctx.record(Measurement(GROUP, "express-pouchdb peak RSS, latency", "MiB", [peak]))
