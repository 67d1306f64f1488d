"""``tidesync demo``: a sync server and two devices (separate processes) editing one data set.

The main process starts ``tidesync serve`` on a temporary folder and two device processes;
each device runs a short script of edits (including concurrent edits of the same field, a
shared counter, and a stretch offline) and reports what it holds after every change. The
main process shows both devices side by side, live, until the script ends (or Ctrl-C), then
checks that both hold the same data and cleans up.
"""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import tidesync as ts


class Chore(ts.Model):
    """The demo's data: a shared chore list."""

    id: str = ts.primary_key()
    title: str
    done: bool = False
    assignee: str | None = None
    votes: ts.Counter
    notes: list[str]


# (delay in seconds, device, action, arguments): the script both devices follow.
SCRIPT: list[tuple[float, str, str, tuple[Any, ...]]] = [
    (0.5, "A", "add", ("milk", "Buy milk")),
    (0.3, "A", "add", ("bins", "Take out the bins")),
    (0.3, "B", "add", ("plants", "Water the plants")),
    (0.8, "B", "done", ("milk",)),
    (0.5, "A", "vote", ("plants", 2)),
    (0.0, "B", "vote", ("plants", 3)),
    (0.8, "A", "note", ("bins", "blue bin this week")),
    (0.0, "B", "note", ("bins", "and the glass")),
    (0.8, "B", "offline", ()),
    (0.3, "B", "assign", ("bins", "Bea")),
    (0.3, "A", "assign", ("bins", "Al")),
    (0.3, "B", "add", ("keys", "Copy the keys (written offline)")),
    (1.5, "B", "online", ()),
    (1.5, "A", "delete", ("milk",)),
    (1.5, "*", "end", ()),
]


def _state(db: ts.Database) -> list[dict[str, Any]]:
    return [
        {
            "id": c.id,
            "title": c.title,
            "done": c.done,
            "assignee": c.assignee,
            "votes": c.votes.value,
            "notes": list(c.notes),
        }
        for c in db.query(Chore, "TRUEPREDICATE SORT(id ASC)")
    ]


def _emit(**data: Any) -> None:
    print(json.dumps(data, default=str), flush=True)


async def _device(name: str, url: str, base: str, start_at: float) -> None:
    app = ts.App(ts.AppConfiguration("demo", base_url=url, base_path=base))
    user = await app.log_in(ts.Credentials.anonymous())
    db = await ts.Database.open(ts.Configuration.flexible_sync(user, [Chore]))
    session = db.sync_session
    changed = threading.Event()
    db.all(Chore).add_listener(lambda change: changed.set())
    session.add_connection_state_listener(lambda change: changed.set())

    def report(event: str = "") -> None:
        _emit(
            device=name,
            items=_state(db),
            connection=session.connection_state.value,
            state=session.state.value,
            event=event,
        )

    report("opened")
    clock = start_at
    for delay, who, action, args in SCRIPT:
        clock += delay
        while time.time() < clock:
            if changed.wait(max(0.0, min(0.05, clock - time.time()))):
                changed.clear()
                report()
        if who not in (name, "*"):
            continue
        event = _act(db, action, args)
        if event:
            report(event)
    await session.wait_for_upload(ts.TimeoutCancellationToken(20))
    await session.wait_for_download(ts.TimeoutCancellationToken(20))
    await asyncio.sleep(0.5)
    await session.wait_for_download(ts.TimeoutCancellationToken(20))
    report("finished")
    db.close()
    app.close()


def _act(db: ts.Database, action: str, args: tuple[Any, ...]) -> str:
    session = db.sync_session
    if action == "offline":
        session.pause()
        return "went offline (session paused)"
    if action == "online":
        session.resume()
        return "back online (session resumed)"
    if action == "end":
        return ""
    with db.write():
        if action == "add":
            db.add(Chore(id=args[0], title=args[1]))
            return f"added {args[0]!r}"
        chore = db.find(Chore, args[0])
        if chore is None:
            return f"{args[0]!r} is not here yet"
        if action == "done":
            chore.done = True
            return f"marked {args[0]!r} done"
        if action == "vote":
            chore.votes.increment(args[1])
            return f"+{args[1]} votes on {args[0]!r}"
        if action == "note":
            chore.notes.append(args[1])
            return f"noted {args[1]!r} on {args[0]!r}"
        if action == "assign":
            chore.assignee = args[1]
            return f"assigned {args[0]!r} to {args[1]}"
        if action == "delete":
            db.delete(chore)
            return f"deleted {args[0]!r}"
    return ""


def _render(devices: dict[str, dict[str, Any]], log: list[str], url: str) -> Any:
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    tables = Table.grid(expand=True, padding=(0, 2))
    tables.add_column()
    tables.add_column()
    cells = []
    for name in ("A", "B"):
        info = devices.get(name, {})
        t = Table(expand=True, show_lines=False)
        for col in ("chore", "done", "who", "votes", "notes"):
            t.add_column(col)
        for item in info.get("items", []):
            t.add_row(
                item["title"],
                "✔" if item["done"] else "",
                item["assignee"] or "",
                str(item["votes"]),
                "; ".join(item["notes"]),
            )
        conn = info.get("connection", "starting")
        colour = {"connected": "green", "connecting": "yellow"}.get(conn, "red")
        title = f"device {name} — [{colour}]{conn}[/{colour}]"
        cells.append(Panel(t, title=title))
    tables.add_row(*cells)
    events = "\n".join(log[-10:])
    return Group(
        Panel(f"server: {url}", title="tidesync demo"),
        tables,
        Panel(events or "…", title="what happens"),
    )


def run_demo(duration_limit: float = 60.0) -> int:
    """Run the demo in this terminal; returns 0 when both devices end with the same data."""
    from rich.console import Console
    from rich.live import Live

    from .testing import ServerProcess

    console = Console()
    with tempfile.TemporaryDirectory(prefix="tidesync-demo-") as tmp:
        server = ServerProcess(Path(tmp) / "server").start()
        procs: list[subprocess.Popen[str]] = []
        lines: queue.Queue[dict[str, Any]] = queue.Queue()
        start_at = time.time() + 2.0
        try:
            for name in ("A", "B"):
                p = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tidesync.demo",
                        "device",
                        name,
                        server.url,
                        str(Path(tmp) / name),
                        str(start_at),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
                procs.append(p)
                threading.Thread(target=_pump, args=(p, lines), daemon=True).start()
            devices: dict[str, dict[str, Any]] = {}
            log: list[str] = []
            finished: set[str] = set()
            deadline = time.time() + duration_limit
            with Live(
                _render(devices, log, server.url), console=console, refresh_per_second=8
            ) as live:
                while len(finished) < 2 and time.time() < deadline:
                    if all(p.poll() is not None for p in procs) and lines.empty():
                        break
                    try:
                        msg = lines.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    name = msg["device"]
                    devices[name] = msg
                    if msg.get("event"):
                        log.append(f"{time.strftime('%H:%M:%S')}  device {name}: {msg['event']}")
                    if msg.get("event") == "finished":
                        finished.add(name)
                    live.update(_render(devices, log, server.url))
            same = devices.get("A", {}).get("items") == devices.get("B", {}).get("items")
            if len(finished) == 2 and same:
                console.print("[green]Both devices hold the same data.[/green]")
                return 0
            console.print("[red]The devices did not finish with the same data.[/red]")
            return 1
        except KeyboardInterrupt:
            console.print("stopped")
            return 130
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
            server.stop()


def _pump(proc: subprocess.Popen[str], out: queue.Queue[dict[str, Any]]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            out.put(json.loads(line))
        except ValueError:
            continue


def main(argv: list[str]) -> int:
    """``python -m tidesync.demo [device NAME URL BASE START]``."""
    if argv and argv[0] == "device":
        name, url, base, start = argv[1:5]
        asyncio.run(_device(name, url, base, float(start)))
        return 0
    return run_demo()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
