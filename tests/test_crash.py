"""Committed writes survive ``kill -9`` of the writing process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import tidesync as ts

from .conftest import MODELS, Person


def test_committed_writes_survive_kill_9(db_path: Path) -> None:
    root = str(Path(__file__).parent.parent)
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {root!r})
        import tidesync as ts
        from tests.conftest import MODELS, Person
        db = ts.Database(ts.Configuration.local(MODELS, path={str(db_path)!r}))
        for i in range(50):
            with db.write():
                db.add(Person(id=str(i), name="n"))
            print(i, flush=True)
        db._engine.begin()  # an open, uncommitted transaction at the time of the kill
        db._engine.conn.execute('DELETE FROM "t_Person"')
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acked = []
    for line in proc.stdout:
        line = line.strip()
        if line == "ready":
            break
        acked.append(line)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(acked) == 50
    with ts.Database(ts.Configuration.local(MODELS, path=db_path)) as db:
        assert {p.id for p in db.all(Person)} == set(acked)
        assert db._engine.pending_bytes(0)[0] == 50
