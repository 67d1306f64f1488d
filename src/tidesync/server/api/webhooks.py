"""Webhook delivery: each ``[[apps.X.webhooks]]`` entry gets the change feed's events, in
order, at least once, POSTed as signed JSON batches (docs/backend.md, "Webhooks").

One :class:`HookWorker` task per hook, so a slow or dead receiver delays only its own hook
(never sync: the workers only read the log). A hook's state (cursor, the batch being
delivered and its delivery id, failures, paused) is a storage record, written before the
first attempt of a batch and after its success, so a restart, or another process taking
over, resumes with the same batch and the same delivery id. On storage shared by several
processes (PostgreSQL) a lease (:meth:`~..storage.base.ServerStorage.take_lease`) lets one
process deliver a hook at a time; when it dies its lease expires and another takes over.

Each POST carries::

    Content-Type: application/json
    Tidesync-Delivery: <id>              the same on every retry of the batch
    Tidesync-Timestamp: <unix seconds>   when this attempt was signed
    Tidesync-Signature: sha256=<hex>     HMAC-SHA256(secret, "<timestamp>." + body)

and the body ``{"hook": n, "delivery": id, "events": [...], "next": cursor}``. Any 2xx
answer acknowledges the batch; anything else (an error, a timeout, another status) is a
failure, retried after ``retry_initial`` seconds doubling up to ``retry_max``. After
``max_failures`` consecutive failures the hook is paused (logged, counted in the metrics,
shown by ``GET .../webhooks``) until ``POST .../webhooks/{n}/resume``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from ..hub import SyncHub
from ..settings import WebhookSettings
from .access import ApiError, Caller
from .changes import Waker
from .feed import FeedReader, build_filter

log = logging.getLogger("tidesync.server.webhooks")

SIGNATURE_HEADER = "Tidesync-Signature"
TIMESTAMP_HEADER = "Tidesync-Timestamp"
DELIVERY_HEADER = "Tidesync-Delivery"
#: Longest a worker sleeps between looks at its lease, its state and the log (seconds).
IDLE_CHECK = 5.0


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``Tidesync-Signature`` value of ``body`` signed at ``timestamp``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def hook_key(hook: WebhookSettings) -> str:
    """The storage record (and lease) name of a hook: its URL, models and query (so a hook
    edited into another one starts afresh, while reordering the hooks changes nothing)."""
    ident = json.dumps([hook.url, sorted(hook.models), hook.query]).encode()
    return "webhook:" + hashlib.sha256(ident).hexdigest()[:24]


@dataclass
class HookState:
    """A hook's durable state (its storage record, as JSON)."""

    cursor: int = 0
    #: The batch being delivered: changes in ``(cursor, pending_to]``, under ``delivery``.
    pending_to: int | None = None
    delivery: str | None = None
    failures: int = 0  # consecutive failed attempts
    paused: bool = False
    last_error: str | None = None
    delivered: int = 0  # batches delivered in all

    @classmethod
    def parse(cls, text: str) -> HookState:
        """The state from its record."""
        raw = json.loads(text)
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def dump(self) -> str:
        """The record's text."""
        return json.dumps(asdict(self), separators=(",", ":"))


class _Failure(Exception):
    """One delivery attempt failed (the message says how)."""


class HookWorker:
    """Delivers one hook's batches (a task of its own; see the module docstring)."""

    def __init__(
        self, hub: SyncHub, app_id: str, index: int, hook: WebhookSettings, holder: str
    ) -> None:
        self.hub = hub
        self.app_id = app_id
        self.index = index
        self.hook = hook
        self.key = hook_key(hook)
        self.holder = holder
        #: The lease's length: a POST (at most ``timeout``) never outlasts it.
        self.lease_ttl = max(2.0, 3 * hook.timeout)
        self.state = HookState()
        #: True while this process holds the hook's lease.
        self.active = False
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._waker: Waker | None = None
        self._lease_at = 0.0
        self._counted = False  # counted in the paused gauge
        #: The body of the batch being delivered, by delivery id (retries send it again).
        self._body: tuple[str, bytes] | None = None

    def start(self) -> None:
        """Start the worker's task."""
        self._waker = Waker(self.hub, self.app_id)
        self._task = asyncio.create_task(self._run(), name=f"webhook-{self.app_id}-{self.index}")

    async def aclose(self) -> None:
        """Stop the task (an attempt under way is abandoned: it is retried, under the same
        delivery id, by whoever delivers the hook next) and give up the lease."""
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._waker is not None:
            self._waker.close()
        if self.active:
            self.active = False
            self._count_paused()
            try:
                await self.hub.storage.drop_lease(self.app_id, self.key, self.holder)
            except Exception as exc:  # the lease then expires by itself
                log.warning("webhook %s of app %s: dropping the lease failed: %s", *self._me, exc)

    @property
    def _me(self) -> tuple[int, str]:
        return (self.index, self.app_id)

    async def resume(self) -> HookState:
        """Unpause the hook (its failures are forgotten); returns the new state. Works from
        any process: the state is the storage record."""
        storage = self.hub.storage
        text = await storage.get_record(self.app_id, self.key)
        state = HookState.parse(text) if text else HookState()
        state.paused, state.failures = False, 0
        await storage.put_record(self.app_id, self.key, state.dump())
        if self.active:
            self.state = state
            self._count_paused()
        self._wake.set()
        log.info("webhook %s of app %s resumed at cursor %s", self.index, self.app_id, state.cursor)
        return state

    async def status(self) -> dict[str, Any]:
        """The hook's status for ``GET .../webhooks`` (read from storage)."""
        text = await self.hub.storage.get_record(self.app_id, self.key)
        state = HookState.parse(text) if text else None
        return {
            "index": self.index,
            "url": self.hook.url,
            "models": list(self.hook.models),
            "query": self.hook.query,
            "state": "new" if state is None else ("paused" if state.paused else "active"),
            "cursor": None if state is None else str(state.cursor),
            "pending_delivery": None if state is None else state.delivery,
            "failures": 0 if state is None else state.failures,
            "last_error": None if state is None else state.last_error,
            "delivered": 0 if state is None else state.delivered,
            "delivering_here": self.active,
        }

    # -- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.hook.timeout)) as client:
            while not self._stop.is_set():
                try:
                    await self._step(client)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a storage hiccup: look again in a moment
                    log.exception("webhook %s of app %s: delivery loop failed", *self._me)
                    await self._sleep(min(IDLE_CHECK, self.lease_ttl / 3))

    async def _renew(self) -> bool:
        """Hold the lease (renewed at most every third of its length); True if held."""
        now = time.monotonic()
        if self.active and now - self._lease_at < self.lease_ttl / 3:
            return True
        got = await self.hub.storage.take_lease(self.app_id, self.key, self.holder, self.lease_ttl)
        if got:
            self._lease_at = now
            if not self.active:  # (again) ours: another process may have moved it on
                self.active = True
                await self._load()
                log.info(
                    "webhook %s of app %s: delivering from cursor %s",
                    *self._me,
                    self.state.cursor,
                )
        elif self.active:
            self.active = False
            self._count_paused()
            log.warning("webhook %s of app %s: another process took it over", *self._me)
        return got

    async def _load(self) -> None:
        text = await self.hub.storage.get_record(self.app_id, self.key)
        if text is not None:
            self.state = HookState.parse(text)
        else:
            start = 0
            if self.hook.start == "now":
                start = await self.hub.storage.latest_version(self.app_id)
            self.state = HookState(cursor=start)
            await self._save()
        self._count_paused()

    def _count_paused(self) -> None:
        """Keep the ``tidesync_webhooks_paused`` gauge true to this worker's state."""
        paused = self.active and self.state.paused
        if paused != self._counted:
            self._counted = paused
            self.hub.metrics.webhooks_paused += 1 if paused else -1

    async def _save(self) -> None:
        await self.hub.storage.put_record(self.app_id, self.key, self.state.dump())

    async def _sleep(self, seconds: float, on_commit: bool = False) -> None:
        """Sleep, waking early on a resume or the stop (and a commit of the app when
        ``on_commit``)."""
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self._stop.wait())]
        if on_commit and self._waker is not None:
            waits.append(asyncio.ensure_future(self._waker.event.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        self._wake.clear()

    async def _step(self, client: httpx.AsyncClient) -> None:
        idle = min(IDLE_CHECK, self.lease_ttl / 3)
        if not await self._renew():
            await self._sleep(idle)
            return
        state = self.state
        if state.paused:
            await self._sleep(idle)
            if not self._stop.is_set():
                await self._load_paused()
            return
        assert self._waker is not None
        self._waker.clear()
        try:
            flt = await self._filter()
        except ApiError as exc:
            if exc.code != "unknown_model":
                await self._fail_for_good(exc)  # e.g. a query that does not fit the models
                return
            # development mode: no device declared the hook's models yet
            log.debug("webhook %s of app %s: %s; waiting", *self._me, exc.message)
            await self._sleep(idle, on_commit=True)
            return
        reader = FeedReader(self.hub.storage, self.app_id, flt)
        try:
            if state.pending_to is None:
                page = await reader.page(state.cursor, self.hook.batch_size)
                if not page.changes:
                    if page.cursor != state.cursor:
                        state.cursor = page.cursor
                        await self._save()
                    if not page.more:
                        await self._sleep(idle, on_commit=True)
                    return
                state.pending_to, state.delivery = page.cursor, uuid.uuid4().hex
                await self._save()  # before the first attempt: a retry is the same batch
            elif self._body is not None and self._body[0] == state.delivery:
                await self._deliver(client, self._body[1])  # a retry: the very same body
                return
            else:  # after a restart or a takeover: the same changes, the same id
                page = await reader.page(state.cursor, 1 << 30, until=state.pending_to)
        except ApiError as exc:
            await self._fail_for_good(exc)
            return
        if page.changes:
            await self._deliver(client, self._encode(page.events))
        else:  # the batch's objects no longer match (filters see current values)
            await self._delivered()

    def _encode(self, events: list[dict[str, Any]]) -> bytes:
        state = self.state
        assert state.delivery is not None
        body = json.dumps(
            {
                "hook": self.index,
                "delivery": state.delivery,
                "events": events,
                "next": str(state.pending_to),
            },
            separators=(",", ":"),
        ).encode()
        self._body = (state.delivery, body)
        return body

    async def _deliver(self, client: httpx.AsyncClient, body: bytes) -> None:
        try:
            await self._post(client, body)
        except _Failure as exc:
            await self._failed(str(exc))
            return
        await self._delivered()
        self.hub.metrics.webhook_deliveries_total += 1

    async def _delivered(self) -> None:
        state = self.state
        assert state.pending_to is not None
        state.cursor, state.pending_to, state.delivery = state.pending_to, None, None
        state.failures, state.last_error = 0, None
        state.delivered += 1
        self._body = None
        await self._save()

    async def _load_paused(self) -> None:
        """A paused hook: see whether it was resumed (maybe by another process)."""
        text = await self.hub.storage.get_record(self.app_id, self.key)
        if text is not None:
            self.state = HookState.parse(text)
            self._count_paused()

    async def _filter(self) -> Any:
        caller = Caller(self.app_id, None)  # a hook sees every object (no rules)
        return await build_filter(self.hub, caller, self.hook.models, self.hook.query)

    async def _post(self, client: httpx.AsyncClient, body: bytes) -> None:
        assert self.state.delivery is not None
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            DELIVERY_HEADER: self.state.delivery,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self.hook.secret, timestamp, body),
            "User-Agent": "tidesync-webhooks",
        }
        try:
            async with asyncio.timeout(self.hook.timeout):
                answer = await client.post(self.hook.url, content=body, headers=headers)
        except TimeoutError:
            raise _Failure(f"no answer within {self.hook.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise _Failure(f"{type(exc).__name__}: {exc}") from None
        if not 200 <= answer.status_code < 300:
            raise _Failure(f"the receiver answered {answer.status_code}")

    async def _failed(self, error: str) -> None:
        state = self.state
        state.failures += 1
        state.last_error = error
        self.hub.metrics.webhook_failures_total += 1
        if state.failures >= self.hook.max_failures:
            state.paused = True
            self.hub.metrics.webhook_pauses_total += 1
            self._count_paused()
            log.error(
                "webhook %s of app %s (%s) paused after %d consecutive failures (last: %s); "
                "resume it with POST /api/v1/apps/%s/webhooks/%s/resume",
                self.index,
                self.app_id,
                self.hook.url,
                state.failures,
                error,
                self.app_id,
                self.index,
            )
        else:
            log.warning(
                "webhook %s of app %s: delivery %s failed (%d in a row): %s",
                *self._me,
                state.delivery,
                state.failures,
                error,
            )
        await self._save()
        if not state.paused:
            delay = min(self.hook.retry_max, self.hook.retry_initial * 2 ** (state.failures - 1))
            deadline = time.monotonic() + delay
            while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
                await self._sleep(min(left, self.lease_ttl / 3))
                if not await self._renew():
                    return

    async def _fail_for_good(self, exc: ApiError) -> None:
        """The feed cannot be read from the cursor (trimmed history; the app was wiped):
        pause with the reason. Resuming then skips to the oldest cursor kept."""
        state = self.state
        state.paused = True
        state.last_error = exc.message
        oldest = exc.extra.get("oldest")
        if oldest is not None:
            state.cursor, state.pending_to, state.delivery = int(oldest), None, None
            state.last_error += " (changes before it are lost to this hook)"
        elif exc.code == "bad_cursor":
            state.cursor, state.pending_to, state.delivery = 0, None, None
        self.hub.metrics.webhook_pauses_total += 1
        self._count_paused()
        log.error("webhook %s of app %s paused: %s", *self._me, state.last_error)
        await self._save()


class WebhookManager:
    """Every hook of every declared app of one server process (started and stopped by
    the server's lifespan)."""

    def __init__(self, hub: SyncHub) -> None:
        self.hub = hub
        self.holder = uuid.uuid4().hex
        self.workers: dict[str, list[HookWorker]] = {}
        for app_id, settings in hub.config.auth.apps.items():
            self.workers[app_id] = [
                HookWorker(hub, app_id, i, hook, self.holder)
                for i, hook in enumerate(settings.webhooks)
            ]

    def start(self) -> None:
        """Start every worker."""
        for workers in self.workers.values():
            for worker in workers:
                worker.start()

    def of(self, app_id: str) -> list[HookWorker]:
        """The app's hooks, in configuration order."""
        return self.workers.get(app_id, [])

    async def aclose(self) -> None:
        """Stop every worker; returns when none runs."""
        everyone = [w for workers in self.workers.values() for w in workers]
        await asyncio.gather(*(w.aclose() for w in everyone), return_exceptions=True)
