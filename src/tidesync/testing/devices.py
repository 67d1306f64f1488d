"""Run several client devices as real processes, write at random, and check convergence.

A *device* is a process running this module (``python -m tidesync.testing.devices``): one
app, one user, one synced database file, making random writes on every data type (scalars,
counters, lists, sets, dicts, links, erase and re-create) on a small pool of shared objects,
so devices conflict all the time. It takes commands from a *control file* that the harness
rewrites (``run``, ``pause``, ``upload``, ``download``, ``exit``) and appends to a JSON-lines
*device log*:

- ``{"t": "cs", "origin": o, "v": n, "data": hex}``: each local changeset, as committed;
- ``{"t": "acked", "origin": o, "v": n}``: ``wait_for_upload`` returned, covering every
  changeset up to ``n``;
- ``{"t": "phase", "name": ...}``: the device finished a final phase (``uploaded``,
  ``downloaded``); the download phase also writes a snapshot of the data (JSON).

A device killed with ``kill -9`` and started again continues with the same file and user;
at start it logs any committed changeset its previous life did not get to log. A changeset
the device re-stamped (its clock was ahead: docs/merge.md, "Clocks") is logged again with
its new data once acknowledged (the last record of a version counts).

``--clock-skew-ms N`` (``DeviceProcess(clock_skew_ms=N)``) runs the device with its clock
``N`` ms fast (negative: slow), through :func:`skew_clock`: what a phone with a wrong clock
does, for the convergence soak.

The harness side is :class:`DeviceProcess` (start, kill, command, read the log) and
:func:`check_convergence`, which compares the devices' snapshots with the server's data and
checks every acknowledged write against the merge rules, using the server's history.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tidesync as ts

from ..core.changeset import Instruction, Op
from ..core.merge import wrap_int64
from ..core.packing import unpack_instructions
from ..errors import TidesyncError

APP_ID = "convergence"
DOC_IDS = [f"d{i}" for i in range(6)]
TAG_IDS = [f"g{i}" for i in range(3)]
TALLY_IDS = [f"t{i}" for i in range(2)]
WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
PHASE_TIMEOUT = 120.0

#: Increments near the bounds of a counter (docs/merge.md: its sum wraps around int64).
COUNTER_EXTREMES = (2**62, 2**63 - 1, -(2**63), -(2**62))
#: Floats SQLite would change (NaN, -0.0) and the infinities.
SPECIAL_FLOATS = (math.nan, -math.nan, -0.0, math.inf, -math.inf)


def float_bits(value: Any) -> Any:
    """A float as its IEEE 754 bits (hex), so snapshots compare NaN and -0.0 exactly."""
    return struct.pack(">d", value).hex() if isinstance(value, float) else value


class Tag(ts.Model):
    """A small object that docs link to (and that devices erase and re-create)."""

    id: str = ts.primary_key()
    name: str = ""


class Doc(ts.Model):
    """The shared object devices fight over: every field type."""

    id: str = ts.primary_key()
    title: str = ""
    n: int = 0
    score: float = 0.0
    flag: bool = False
    tags: list[str]
    labels: set[str]
    attrs: dict[str, int]
    owner: Tag | None = None
    members: list[Tag]


class Tally(ts.Model):
    """Counters, created once by the setup device and only incremented after."""

    id: str = ts.primary_key()
    hits: ts.Counter


class Bulk(ts.Model):
    """Objects written :data:`BULK_SIZE` at a time: one transaction larger than the server's
    frame (the convergence run lowers it), so it travels in parts and is applied whole."""

    id: str = ts.primary_key()
    who: str = ""
    n: int = 0
    text: str = ""


#: How many objects one big transaction writes (every one of them, created or updated).
BULK_SIZE = 600
BULK_IDS = [f"b{i}" for i in range(BULK_SIZE)]


def _models() -> dict[str, Any]:
    return {"Tag": Tag, "Doc": Doc, "Tally": Tally, "Bulk": Bulk}


def skew_clock(skew_ms: int) -> None:
    """Make this process's tidesync clock run ``skew_ms`` ms fast (negative: slow).

    A testing hook: it replaces :func:`tidesync.store.engine.now_ms`, the one wall-clock
    input of every HLC a device issues and of the clock offset it measures at WELCOME.
    Call it before opening any database; the library itself never does."""
    from ..store import engine

    real = engine.now_ms
    if getattr(real, "skewed_from", None) is not None:
        real = real.skewed_from  # type: ignore[attr-defined]

    def skewed() -> int:
        return real() + skew_ms

    skewed.skewed_from = real  # type: ignore[attr-defined]
    engine.now_ms = skewed


# -- the device process ----------------------------------------------------------------------


class _Device:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.root = Path(opts.dir)
        self.log_path = self.root / "device.log"
        self.control = self.root / "control"
        self.models = _models()
        self.logged = 0
        self.lives = 0
        self.origin = ""
        self.logged_data: dict[int, str] = {}  # version -> data (hex) as last logged
        self.final = 0  # versions up to this one are logged as the server has them
        if self.log_path.exists():
            for rec in read_log(self.log_path):
                if rec["t"] == "cs":
                    self.logged = max(self.logged, int(rec["v"]))
                    self.logged_data[int(rec["v"])] = rec["data"]
                elif rec["t"] == "start":
                    self.lives += 1
        self.rng = random.Random(opts.seed * 1000 + self.lives)
        self.errors: list[str] = []

    def log(self, **rec: Any) -> None:
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
            fh.flush()

    def command(self) -> str:
        try:
            return self.control.read_text(encoding="utf-8").strip() or "run"
        except FileNotFoundError:
            return "run"

    def log_new_changesets(self, db: Any) -> int:
        with db._lock:
            rows = db._engine.read_changelog(self.logged, 1 << 40)
        for version, data in rows:
            self.log(t="cs", origin=self.origin, v=version, data=bytes(data).hex())
            self.logged_data[version] = bytes(data).hex()
            self.logged = version
        return self.logged

    def relog_restamped(self, db: Any, upto: int) -> None:
        """Log again the changesets up to ``upto`` whose data changed since they were
        logged (re-stamped before their upload: see the module docstring)."""
        with db._lock:
            rows = db._engine.read_changelog(self.final, 1 << 40)
        for version, data in rows:
            if version > upto:
                break
            hexed = bytes(data).hex()
            if self.logged_data.get(version) != hexed:
                self.log(t="cs", origin=self.origin, v=version, data=hexed)
                self.logged_data[version] = hexed
        self.final = max(self.final, upto)  # acknowledged: never re-stamped again

    async def main(self) -> None:
        timeouts = ts.SyncTimeoutOptions(
            connect_timeout=5,
            reconnect_initial_delay=0.1,
            reconnect_max_delay=1.0,
            ping_keep_alive_period=2,
            pong_keep_alive_timeout=4,
            connection_linger_time=1,
        )
        app = ts.App(
            ts.AppConfiguration(
                APP_ID, base_url=self.opts.url, base_path=self.root / "app", sync_timeouts=timeouts
            )
        )
        try:
            user = app.current_user
            deadline = time.monotonic() + PHASE_TIMEOUT
            while user is None:
                try:
                    user = await app.log_in(ts.Credentials.anonymous())
                except TidesyncError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
            models = list(self.models.values())

            def everything(db: Any) -> None:
                with db.subscriptions.update() as subs:
                    for model in models:
                        subs.add(db.all(model), name=model.__name__)

            config = ts.Configuration.flexible_sync(
                user,
                models,
                path=self.root / "data.tidesync",
                sync_error_handler=lambda s, e: self.errors.append(repr(e)),
                initial_subscriptions=everything if self.opts.subscribe else None,
            )
            db = ts.Database(config)
            try:
                self.origin = str(db._engine.origin)
                self.log(t="start", origin=self.origin, pid=os.getpid(), life=self.lives)
                self.log_new_changesets(db)
                if self.opts.setup:
                    await self.setup(db)
                else:
                    await self.loop(db)
            finally:
                db.close()
        finally:
            app.close()

    async def setup(self, db: Any) -> None:
        with db.write():
            for tid in TALLY_IDS:
                db.add(self.models["Tally"](id=tid))
        self.log_new_changesets(db)
        v = self.logged
        await db.sync_session.wait_for_upload(ts.TimeoutCancellationToken(PHASE_TIMEOUT))
        self.relog_restamped(db, v)
        self.log(t="acked", origin=self.origin, v=v)
        self.log(t="phase", name="setup")

    async def ack(self, db: Any, limit: float) -> bool:
        v = self.logged
        try:
            await db.sync_session.wait_for_upload(ts.TimeoutCancellationToken(limit))
        except TidesyncError:
            return False
        self.relog_restamped(db, v)
        self.log(t="acked", origin=self.origin, v=v)
        return True

    async def loop(self, db: Any) -> None:
        session = db.sync_session
        paused = False
        done: set[str] = set()
        end = time.monotonic() + 24 * 3600
        while time.monotonic() < end:
            cmd = self.command()
            if cmd == "exit":
                return
            if cmd == "pause" and not paused:
                session.pause()
                paused = True
            elif cmd != "pause" and paused:
                session.resume()
                paused = False
            if cmd in ("run", "pause"):
                if self.rng.random() < self.opts.bulk_rate:
                    self.bulk_write(db)
                else:
                    self.random_write(db)
                self.log_new_changesets(db)
                if not paused and self.rng.random() < 0.15:
                    await self.ack(db, 3.0)
                await asyncio.sleep(self.rng.uniform(0.0, 0.04))
            elif cmd == "upload" and "uploaded" not in done:
                self.log_new_changesets(db)
                for _ in range(20):
                    if await self.ack(db, 10.0):
                        break
                else:
                    raise TidesyncError("the final upload did not finish")
                done.add("uploaded")
                self.log(t="phase", name="uploaded", errors=self.errors)
            elif cmd == "download" and "downloaded" not in done:
                await session.wait_for_download(ts.TimeoutCancellationToken(PHASE_TIMEOUT))
                snap = snapshot(db, self.models)
                tmp = self.root / "snapshot.json.tmp"
                tmp.write_text(json.dumps(snap, sort_keys=True), encoding="utf-8")
                os.replace(tmp, self.root / "snapshot.json")
                done.add("downloaded")
                self.log(
                    t="phase",
                    name="downloaded",
                    errors=self.errors,
                    state=str(session.state.value),
                )
            else:
                await asyncio.sleep(0.05)

    def bulk_write(self, db: Any) -> None:
        """One big transaction: every :class:`Bulk` object created or rewritten (about
        400 KB of changeset)."""
        bulk = self.models["Bulk"]
        n = self.rng.randrange(1 << 30)
        text = self.rng.choice(WORDS) * 100
        with db.write():
            for i, pk in enumerate(BULK_IDS):
                obj = db.find(bulk, pk)
                if obj is None:
                    db.add(bulk(id=pk, who=self.origin, n=n + i, text=text))
                else:
                    obj.who, obj.n, obj.text = self.origin, n + i, text
        self.log(t="bulk", size=BULK_SIZE)

    def random_write(self, db: Any) -> None:
        rng = self.rng
        Doc, Tag, Tally = self.models["Doc"], self.models["Tag"], self.models["Tally"]
        with db.write():
            for _ in range(rng.randint(1, 3)):
                kind = rng.random()
                if kind < 0.12:
                    tally = db.find(Tally, rng.choice(TALLY_IDS))
                    if tally is not None:
                        amount = rng.randint(1, 5)
                        if rng.random() < 0.1:  # counter extremes: the sums wrap at 64 bits
                            amount = rng.choice(COUNTER_EXTREMES)
                        tally.hits.increment(amount)
                    continue
                if kind < 0.2:
                    tid = rng.choice(TAG_IDS)
                    tag = db.find(Tag, tid)
                    if tag is None:
                        db.add(Tag(id=tid, name=rng.choice(WORDS)))
                    elif rng.random() < 0.3:
                        db.delete(tag)
                    else:
                        tag.name = rng.choice(WORDS)
                    continue
                did = rng.choice(DOC_IDS)
                doc = db.find(Doc, did)
                if doc is None:
                    db.add(
                        Doc(
                            id=did,
                            title=rng.choice(WORDS),
                            n=rng.randint(0, 99),
                            tags=rng.sample(WORDS, 2),
                            labels=set(rng.sample(WORDS, 2)),
                            attrs={rng.choice(WORDS): rng.randint(0, 9)},
                        )
                    )
                    continue
                self.edit_doc(db, doc, Tag)

    def edit_doc(self, db: Any, doc: Any, tag_model: Any) -> None:
        rng = self.rng
        action = rng.randrange(14)
        if action == 0:
            if rng.random() < 0.5:
                db.delete(doc)
            else:
                doc.title = rng.choice(WORDS)
        elif action == 1:
            doc.title = f"{rng.choice(WORDS)}-{rng.randint(0, 999)}"
        elif action == 2:
            doc.n = rng.randint(-1000, 1000)
        elif action == 3:
            doc.score = round(rng.uniform(-10, 10), 3)
            if rng.random() < 0.1:  # floats a store might change: kept bit for bit
                doc.score = rng.choice(SPECIAL_FLOATS)
        elif action == 4:
            doc.flag = not doc.flag
        elif action == 5:
            doc.tags.append(rng.choice(WORDS))
        elif action == 6:
            doc.tags.insert(rng.randint(0, len(doc.tags)), rng.choice(WORDS))
        elif action == 7:
            if len(doc.tags):
                doc.tags.pop(rng.randrange(len(doc.tags)))
        elif action == 8:
            doc.labels.add(rng.choice(WORDS))
        elif action == 9:
            doc.labels.discard(rng.choice(WORDS))
        elif action == 10:
            doc.attrs[rng.choice(WORDS)] = rng.randint(0, 99)
        elif action == 11:
            doc.attrs.pop(rng.choice(WORDS), None)
        elif action == 12:
            tag = db.find(tag_model, rng.choice(TAG_IDS))
            doc.owner = tag if rng.random() < 0.8 else None
        else:
            tag = db.find(tag_model, rng.choice(TAG_IDS))
            if tag is not None:
                doc.members.append(tag)


def snapshot(db: Any, models: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A device's data in the normalized form :func:`normalize_server` also produces."""
    out: dict[str, dict[str, Any]] = {"Doc": {}, "Tag": {}, "Tally": {}}
    for tag in db.all(models["Tag"]):
        out["Tag"][tag.id] = {"name": tag.name}
    for tally in db.all(models["Tally"]):
        out["Tally"][tally.id] = {"hits": int(tally.hits.value)}
    bulk = {b.id: {"who": b.who, "n": b.n, "text": b.text} for b in db.all(models["Bulk"])}
    if bulk:  # only where the run wrote any (as normalize_server)
        out["Bulk"] = bulk
    for doc in db.all(models["Doc"]):
        out["Doc"][doc.id] = {
            "title": doc.title,
            "n": doc.n,
            "score": float_bits(doc.score),
            "flag": doc.flag,
            "tags": list(doc.tags),
            "labels": sorted(doc.labels),
            "attrs": dict(doc.attrs),
            "owner": doc.owner.id if doc.owner is not None else None,
            "members": [m.id for m in doc.members],
        }
    return out


def normalize_server(objects: dict[str, dict[Any, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The server's rendered objects in :func:`snapshot`'s form (links to erased -> dropped)."""
    tags = objects.get("Tag", {})
    out: dict[str, dict[str, Any]] = {"Doc": {}, "Tag": {}, "Tally": {}}
    for pk, vals in tags.items():
        out["Tag"][pk] = {"name": vals.get("name", "")}
    for pk, vals in objects.get("Tally", {}).items():
        out["Tally"][pk] = {"hits": int(vals.get("hits") or 0)}
    if objects.get("Bulk"):
        out["Bulk"] = {
            pk: {"who": v.get("who", ""), "n": v.get("n", 0), "text": v.get("text", "")}
            for pk, v in objects["Bulk"].items()
        }
    for pk, vals in objects.get("Doc", {}).items():
        owner = vals.get("owner")
        out["Doc"][pk] = {
            "title": vals.get("title", ""),
            "n": vals.get("n", 0),
            "score": float_bits(vals.get("score", 0.0)),
            "flag": vals.get("flag", False),
            "tags": list(vals.get("tags") or []),
            "labels": sorted(vals.get("labels") or []),
            "attrs": dict(vals.get("attrs") or {}),
            "owner": owner if owner in tags else None,
            "members": [m for m in (vals.get("members") or []) if m in tags],
        }
    return out


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a device log (a torn last line, from ``kill -9``, is skipped)."""
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# -- the harness side ------------------------------------------------------------------------


class DeviceProcess:
    """One device process: start, ``kill -9``, restart, command, read its log."""

    def __init__(
        self,
        root: Path,
        name: str,
        url: str,
        seed: int,
        *,
        setup: bool = False,
        subscribe: bool = False,
        clock_skew_ms: int = 0,
        bulk_rate: float = 0.0,
    ) -> None:
        self.root = Path(root) / name
        #: The chance that a write is a big transaction (:meth:`_Device.bulk_write`).
        self.bulk_rate = bulk_rate
        #: How many ms fast (negative: slow) the device's clock runs (see :func:`skew_clock`).
        self.clock_skew_ms = clock_skew_ms
        #: The device subscribes to every object of every model (flexible sync) instead of
        #: keeping a file without a subscription set (whole-app mode).
        self.subscribe = subscribe
        self.root.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.url = url
        self.seed = seed
        self.setup = setup
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    @property
    def log_path(self) -> Path:
        """The device's JSON-lines log."""
        return self.root / "device.log"

    def start(self) -> None:
        """Start (or restart) the device process."""
        if self.alive():
            raise RuntimeError(f"device {self.name} is already running")
        cmd = [sys.executable, "-m", "tidesync.testing.devices", "--url", self.url]
        cmd += ["--dir", str(self.root), "--seed", str(self.seed)]
        if self.setup:
            cmd.append("--setup")
        if self.subscribe:
            cmd.append("--subscribe")
        if self.clock_skew_ms:
            cmd += ["--clock-skew-ms", str(self.clock_skew_ms)]
        if self.bulk_rate:
            cmd += ["--bulk-rate", str(self.bulk_rate)]
        out = open(self.root / "output.txt", "ab")
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()
        self.starts += 1

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """``kill -9`` the device."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
            self.kills += 1

    def command(self, cmd: str) -> None:
        """Tell the device what to do next (atomic file replace)."""
        tmp = self.root / "control.tmp"
        tmp.write_text(cmd, encoding="utf-8")
        os.replace(tmp, self.root / "control")

    def records(self) -> list[dict[str, Any]]:
        """The device log so far."""
        return read_log(self.log_path)

    def wait_phase(self, name: str, limit: float = PHASE_TIMEOUT) -> dict[str, Any]:
        """Wait until the device logs phase ``name``; raise with its output if it dies."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            for rec in reversed(self.records()):
                if rec["t"] == "phase" and rec["name"] == name:
                    return dict(rec)
            if not self.alive():
                raise RuntimeError(f"device {self.name} exited:\n{self.output()}")
            time.sleep(0.1)
        raise TimeoutError(f"device {self.name}: no phase {name!r} in {limit} s\n{self.output()}")

    def output(self) -> str:
        """The tail of the device's stdout/stderr."""
        path = self.root / "output.txt"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def snapshot(self) -> dict[str, Any]:
        """The snapshot written by the download phase."""
        data: dict[str, Any] = json.loads((self.root / "snapshot.json").read_text("utf-8"))
        return data

    def stop(self, limit: float = 30.0) -> None:
        """Ask the device to exit; kill it if it does not within ``limit`` seconds."""
        if self.proc is None:
            return
        self.command("exit")
        try:
            self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class ConvergenceReport:
    """What :func:`check_convergence` checked and found."""

    changesets_acked: int = 0
    writes_checked: int = 0
    writes_lost: list[str] = field(default_factory=list)
    devices_diverged: list[str] = field(default_factory=list)
    counter_errors: list[str] = field(default_factory=list)
    increments_acked: int = 0

    @property
    def ok(self) -> bool:
        """No lost write, no diverged device, every counter exact."""
        return not (self.writes_lost or self.devices_diverged or self.counter_errors)


def _later_overrides(ins: Instruction, later: Iterable[Instruction]) -> bool:
    """True if a later instruction on the same object may legitimately hide ``ins``."""
    for j in later:
        if j.op in (Op.CREATE, Op.ERASE):
            return True
        if j.field != ins.field:
            continue
        if j.op == Op.SET:
            return True
        if ins.op in (Op.SET_ADD, Op.SET_REMOVE) and j.op in (Op.SET_ADD, Op.SET_REMOVE):
            if j.value == ins.value:
                return True
        if ins.op in (Op.DICT_SET, Op.DICT_ERASE) and j.op in (Op.DICT_SET, Op.DICT_ERASE):
            if j.key == ins.key:
                return True
        if ins.op == Op.LIST_INSERT and j.op in (Op.LIST_ERASE, Op.LIST_SET):
            if j.key == ins.hlc:
                return True
    return False


def _exact(value: Any) -> Any:
    """``value`` with every float as its bits and sets sorted: equal exactly when the
    values are the same bit for bit (NaN is not equal to itself; set order is hash
    order, per process)."""
    if isinstance(value, float):
        return ("float", float_bits(value))
    if isinstance(value, set | frozenset):
        return ("set", sorted((_exact(v) for v in value), key=repr))
    if isinstance(value, dict):
        return ("dict", sorted((k, _exact(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_exact(v) for v in value)
    return value


def _reflected(ins: Instruction, final: dict[str, Any] | None) -> bool:
    """True if the final state shows ``ins`` (for the ops checked by value)."""
    if ins.op == Op.CREATE:
        return final is not None
    if ins.op == Op.ERASE:
        return final is None
    if final is None:
        return False
    assert ins.field is not None
    current = final.get(ins.field)
    if ins.op == Op.SET:
        if isinstance(current, list | set | tuple) and isinstance(ins.value, list | set | tuple):
            return sorted(map(repr, current)) == sorted(map(repr, ins.value))
        return bool(float_bits(current) == float_bits(ins.value))
    if ins.op == Op.SET_ADD:
        return ins.value in (current or [])
    if ins.op == Op.SET_REMOVE:
        return ins.value not in (current or [])
    if ins.op == Op.DICT_SET:
        return bool((current or {}).get(ins.key) == ins.value)
    if ins.op == Op.DICT_ERASE:
        return ins.key not in (current or {})
    if ins.op in (Op.LIST_INSERT, Op.LIST_SET):
        return ins.value in (current or [])
    return True  # LIST_ERASE: the element has no value to look for


def check_convergence(
    device_logs: dict[str, list[dict[str, Any]]],
    snapshots: dict[str, dict[str, Any]],
    server_log: list[tuple[str, int, bytes]],
    server_objects: dict[str, dict[Any, dict[str, Any]]],
) -> ConvergenceReport:
    """Check the end state of a run.

    ``server_log`` is ``(origin, client_version, packed instructions)`` for every entry of the
    server's history; ``server_objects`` the server's rendered objects by model. Every
    acknowledged changeset must be in the server's history, instruction for instruction;
    every acknowledged instruction must show in the server's data unless a later
    instruction (by HLC) on the same object and field, or an erase, legitimately hides it;
    each counter must equal the sum of every acknowledged increment; and every device's
    snapshot must equal the server's data.
    """
    report = ConvergenceReport()
    history: dict[tuple[str, int], bytes] = {(o, v): d for o, v, d in server_log}
    by_object: dict[tuple[str, Any], list[Instruction]] = defaultdict(list)
    for origin, _, data in server_log:
        for ins in unpack_instructions(data, origin):
            by_object[(ins.model, ins.pk)].append(ins)
    erased_objects = {
        k for k, history in by_object.items() if any(j.op == Op.ERASE for j in history)
    }
    sorted_history: dict[tuple[str, Any], tuple[list[Instruction], list[Any]]] = {}

    def ordered(key: tuple[str, Any]) -> tuple[list[Instruction], list[Any]]:
        """The object's history sorted by HLC, and the HLCs (sorted once, on first use)."""
        found = sorted_history.get(key)
        if found is None:
            history = sorted(by_object[key], key=lambda j: j.hlc)
            found = sorted_history[key] = (history, [j.hlc for j in history])
        return found

    acked: dict[tuple[str, int], bytes] = {}
    for records in device_logs.values():
        written = {
            (r["origin"], int(r["v"])): bytes.fromhex(r["data"]) for r in records if r["t"] == "cs"
        }
        top: dict[str, int] = {}
        for r in records:
            if r["t"] == "acked":
                top[r["origin"]] = max(top.get(r["origin"], 0), int(r["v"]))
        for (origin, v), data in written.items():
            if v <= top.get(origin, 0):
                acked[(origin, v)] = data
    report.changesets_acked = len(acked)
    sums: dict[Any, int] = defaultdict(int)
    for (origin, v), data in sorted(acked.items()):
        stored = history.get((origin, v))
        mine = unpack_instructions(data, origin)
        # compare instructions, not bytes: set values pack in hash order, per process
        if stored is None or _exact(unpack_instructions(stored, origin)) != _exact(mine):
            report.writes_lost.append(f"changeset {origin}#{v} is not in the server history")
            continue
        for ins in mine:
            report.writes_checked += 1
            if ins.op == Op.ADD:
                sums[ins.pk] += int(ins.value)
                report.increments_acked += 1
                continue
            final = server_objects.get(ins.model, {}).get(ins.pk)
            key = (ins.model, ins.pk)
            history_of, stamps = ordered(key)
            erased = final is None and key in erased_objects
            if ins.op not in (Op.CREATE, Op.ERASE) and erased:
                continue  # an erase hides every update, concurrent or later
            # the instructions later than ins, nearest first (so the search stops early)
            later = itertools.islice(history_of, bisect.bisect_right(stamps, ins.hlc), None)
            if not _reflected(ins, final) and not _later_overrides(ins, later):
                report.writes_lost.append(
                    f"{origin}#{v}: {ins.op.name} {ins.model}/{ins.pk}.{ins.field}="
                    f"{ins.value!r} (key {ins.key!r}) is neither shown nor overwritten"
                )
    all_adds: dict[Any, int] = defaultdict(int)
    for (model, pk), instructions in by_object.items():
        if model == "Tally":
            all_adds[pk] = sum(int(i.value) for i in instructions if i.op == Op.ADD)
    for pk, vals in server_objects.get("Tally", {}).items():
        hits = int(vals.get("hits") or 0)
        # counters wrap around at 64 bits (docs/merge.md): compare the wrapped sums
        acked_sum, history_sum = wrap_int64(sums.get(pk, 0)), wrap_int64(all_adds.get(pk, 0))
        if hits != acked_sum or hits != history_sum:
            report.counter_errors.append(
                f"Tally {pk}: server {hits}, acknowledged increments {sums.get(pk, 0)}, "
                f"increments in history {all_adds.get(pk, 0)}"
            )
    expected = normalize_server(server_objects)
    for name, snap in sorted(snapshots.items()):
        if snap != expected:
            diff = [
                f"{m}/{pk}: device {snap.get(m, {}).get(pk)!r} server {expected[m].get(pk)!r}"
                for m in expected
                for pk in sorted(set(expected[m]) | set(snap.get(m, {})), key=repr)
                if snap.get(m, {}).get(pk) != expected[m].get(pk)
            ]
            report.devices_diverged.append(f"{name}: " + "; ".join(diff[:5]))
    return report


def main(argv: list[str] | None = None) -> None:
    """Run one device (see the module docstring)."""
    parser = argparse.ArgumentParser(description="a tidesync test device")
    parser.add_argument("--url", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--setup", action="store_true")
    parser.add_argument("--subscribe", action="store_true", help="subscribe to everything")
    parser.add_argument("--clock-skew-ms", type=int, default=0, help="run the clock fast by N ms")
    parser.add_argument(
        "--bulk-rate", type=float, default=0.0, help="chance that a write is a big transaction"
    )
    opts = parser.parse_args(argv)
    if opts.clock_skew_ms:
        skew_clock(opts.clock_skew_ms)
    asyncio.run(_Device(opts).main())


if __name__ == "__main__":
    main()
