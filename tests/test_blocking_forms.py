"""The blocking forms (``..._blocking``) of every public coroutine, against a real server
process: from plain threads, refused (not deadlocked) where an event loop runs, with the
errors of the async forms; and a coroutine called without ``await`` is loud."""

from __future__ import annotations

import ast
import asyncio
import gc
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tidesync as ts
from tidesync.client.app import ApiKey
from tidesync.client.calls import Call
from tidesync.testing import FaultProxy, ServerProcess

from .flex_helpers import FAST, T


class Note(ts.Model):
    id: str = ts.primary_key()
    text: str = ""


class Chore(ts.Model):
    """The docs' ``Task`` (without the link to ``Person`` of tests/conftest.py)."""

    id: ts.ObjectId = ts.primary_key(default_factory=ts.ObjectId)
    summary: str = ""


class Env:
    """One server process for the module: app ``todo`` (development mode) for sync and
    API keys, app ``mail`` (declared) for the email/password flows; ``tokens()`` reads the
    confirmation and reset tokens its delivery command wrote."""

    def __init__(self, root: Path, server: ServerProcess, mail: Path) -> None:
        self.root = root
        self.server = server
        self.mail = mail
        self.made: list[ts.App] = []

    def app(self, name: str, app_id: str = "todo", url: str | None = None) -> ts.App:
        config = ts.AppConfiguration(
            app_id,
            base_url=url or self.server.url,
            base_path=self.root / "apps" / name,
            sync_timeouts=FAST,
        )
        app = ts.App(config)
        self.made.append(app)
        return app

    def tokens(self, email: str, kind: str) -> list[str]:
        lines = self.mail.read_text().split("\n") if self.mail.exists() else []
        return [p[2] for p in (line.split() for line in lines) if p[:2] == [kind, email]]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("blocking")
    mail = root / "mail.txt"
    script = root / "deliver.sh"
    script.write_text(f'#!/bin/sh\necho "$1 $2 $TIDESYNC_TOKEN" >> {mail}\n')
    script.chmod(0o700)
    config = root / "tidesync.toml"
    config.write_text(
        "[server]\ndevelopment_mode = true\n"
        f'[delivery]\ncommand = ["{script}", "{{kind}}", "{{email}}"]\n'
        '[apps.mail]\nauth = ["email_password", "api_key"]\n'
    )
    server = ServerProcess(root / "data", extra_args=["--config", str(config)]).start()
    made = Env(root, server, mail)
    try:
        yield made
    finally:
        for app in made.made:
            app.close()
        server.kill()


def subscribe_all(db: Any) -> None:
    with db.subscriptions.update() as subs:
        subs.add(db.all(Note), name="all", update=True)


def in_thread(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on a new plain thread (no event loop) and return its result or raise."""
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the blocking call did not return in 120 s"
    if errors:
        raise errors[0]
    return out[0]


def same_error(
    blocking: Callable[[], Any], asynchronous: Callable[[], Any], kind: type[BaseException]
) -> str:
    """Both forms raise ``kind`` with the same message; returns it."""
    with pytest.raises(kind) as plain:
        blocking()
    with pytest.raises(kind) as awaited:
        asyncio.run(asynchronous())
    assert type(plain.value) is type(awaited.value)
    assert str(plain.value) == str(awaited.value)
    return str(plain.value)


# --- from a thread without an event loop ------------------------------------------------


def test_sync_flow_in_blocking_forms_from_a_plain_thread(env: Env) -> None:
    def flow() -> list[str]:
        done: list[str] = []
        writer_app = env.app("writer")
        user = writer_app.log_in_blocking(ts.Credentials.anonymous())
        assert user.is_logged_in and writer_app.current_user is user
        progress: list[float] = []
        config = ts.Configuration.flexible_sync(user, [Note], initial_subscriptions=subscribe_all)
        db = ts.Database.open_blocking(
            config,
            on_progress=lambda p: progress.append(p.progress_estimate),
            cancellation_token=T(60),
        )
        assert progress and progress[-1] == 1.0 and progress == sorted(progress)
        done.append("open")
        with db.write():
            db.add(Note(id="n1", text="from a plain thread"))
        db.sync_session.wait_for_upload_blocking(T(60))
        db.sync_session.wait_for_download_blocking(cancellation_token=T(60))
        db.subscriptions.wait_for_synchronization_blocking(T(60))
        done.append("waits")
        # a second device downloads it: the upload really happened
        reader_app = env.app("reader")
        reader = reader_app.log_in_blocking(ts.Credentials.anonymous())
        reader_db = ts.Database.open_blocking(
            ts.Configuration.flexible_sync(reader, [Note], initial_subscriptions=subscribe_all),
            cancellation_token=T(60),
        )
        assert [n.text for n in reader_db.all(Note)] == ["from a plain thread"]
        reader_db.close()
        db.close()
        # tokens
        token = user.refresh_access_token_blocking()
        assert token == user.access_token
        assert user.valid_access_token_blocking() == token
        assert user.valid_access_token_blocking(margin=10**9) == user.access_token
        done.append("tokens")
        # the user's API keys
        key = user.api_keys.create_blocking("script")
        assert key.key and not key.disabled
        assert [k.name for k in user.api_keys.list_blocking()] == ["script"]
        assert user.api_keys.get_blocking(key.id) == ApiKey(key.id, "script", False)
        user.api_keys.disable_blocking(key.id)
        assert user.api_keys.get_blocking(key.id).disabled  # type: ignore[union-attr]
        user.api_keys.enable_blocking(key.id)
        via_key = writer_app.log_in_blocking(ts.Credentials.api_key(key.key))
        assert via_key.id == user.id
        user.api_keys.delete_blocking(key.id)
        assert user.api_keys.list_blocking() == []
        done.append("api keys")
        # out: log out, remove, delete
        other = writer_app.log_in_blocking(ts.Credentials.anonymous())
        other.log_out_blocking()
        assert not other.is_logged_in and other not in writer_app.all_users
        third = writer_app.log_in_blocking(ts.Credentials.anonymous())
        writer_app.remove_user_blocking(third)
        assert third not in writer_app.all_users
        reader.delete_blocking()
        assert not reader.is_logged_in
        with pytest.raises(ts.AuthError):
            reader_app.log_in_blocking(ts.Credentials.api_key("no such key"))
        done.append("out")
        return done

    assert in_thread(flow) == ["open", "waits", "tokens", "api keys", "out"]


def test_email_password_flows_in_blocking_forms(env: Env) -> None:
    app = env.app("mailer", app_id="mail")
    auth = app.email_password_auth
    auth.register_user_blocking("ann@example.com", "first password")
    with pytest.raises(ts.AuthError, match="not confirmed"):
        app.log_in_blocking(ts.Credentials.email_password("ann@example.com", "first password"))
    auth.resend_confirmation_email_blocking("ann@example.com")
    confirms = env.tokens("ann@example.com", "confirm")
    assert len(confirms) == 2
    auth.confirm_user_blocking(confirms[-1])
    user = app.log_in_blocking(ts.Credentials.email_password("ann@example.com", "first password"))
    auth.send_reset_password_email_blocking("ann@example.com")
    resets = env.tokens("ann@example.com", "reset")
    assert len(resets) == 1
    auth.reset_password_blocking(resets[0], "second password")
    with pytest.raises(ts.AuthError, match="revoked"):
        user.refresh_access_token_blocking()
    again = app.log_in_blocking(ts.Credentials.email_password("ann@example.com", "second password"))
    assert again.id == user.id


# --- the same errors as the async forms ----------------------------------------------


def test_blocking_forms_raise_the_errors_of_the_async_forms(env: Env) -> None:
    app = env.app("errors")
    auth = env.app("errors-mail", app_id="mail").email_password_auth
    bad = ts.Credentials.api_key("not a key")
    same_error(lambda: app.log_in_blocking(bad), lambda: app.log_in(bad), ts.AuthError)
    message = same_error(
        lambda: auth.confirm_user_blocking("forged"),
        lambda: auth.confirm_user("forged"),
        ts.AuthError,
    )
    assert "invalid or expired" in message
    same_error(
        lambda: auth.register_user_blocking("not an address", "long enough"),
        lambda: auth.register_user("not an address", "long enough"),
        ts.AuthError,
    )
    user = app.log_in_blocking(ts.Credentials.anonymous())
    same_error(
        lambda: user.api_keys.delete_blocking("no-such-key"),
        lambda: user.api_keys.delete("no-such-key"),
        ts.AuthError,
    )
    with pytest.raises(TypeError):  # a Python error before any call, as in the async form
        app.log_in_blocking()  # type: ignore[call-arg]

    db = ts.Database(ts.Configuration.flexible_sync(user, [Note], initial_subscriptions=None))
    try:
        session = db.sync_session
        session.pause()
        message = same_error(
            session.wait_for_upload_blocking, session.wait_for_upload, ts.SessionInactiveError
        )
        session.resume()
        cancelled = ts.CancellationToken()
        cancelled.cancel()
        assert "cancelled" in same_error(
            lambda: session.wait_for_download_blocking(cancelled),
            lambda: session.wait_for_download(cancelled),
            ts.OperationCancelledError,
        )
        subscribe_all(db)
        assert "cancelled" in same_error(
            lambda: db.subscriptions.wait_for_synchronization_blocking(cancelled),
            lambda: db.subscriptions.wait_for_synchronization(cancelled),
            ts.OperationCancelledError,
        )
    finally:
        db.close()
    with pytest.raises(ts.DatabaseClosedError):
        session.wait_for_upload_blocking()


def test_timeouts_of_blocking_waits_offline(env: Env) -> None:
    """Behind a cut proxy, the waits and the open end by their token with the async
    forms' errors; the open closes the database (it opens again)."""
    with FaultProxy("127.0.0.1", env.server.port) as proxy:
        app = env.app("offline", url=proxy.url)
        user = app.log_in_blocking(ts.Credentials.anonymous())
        config = ts.Configuration.flexible_sync(user, [Note], initial_subscriptions=subscribe_all)
        db = ts.Database.open_blocking(config, cancellation_token=T(60))
        proxy.cut()
        with db.write():
            db.add(Note(id="offline", text="waits"))
        session = db.sync_session
        message = same_error(
            lambda: session.wait_for_upload_blocking(T(0.5)),
            lambda: session.wait_for_upload(T(0.5)),
            ts.OperationCancelledError,
        )
        assert message == "wait_for_upload timed out after 0.5 s"
        db.close()
        progress: list[float] = []
        with pytest.raises(ts.OperationCancelledError, match="timed out after 1"):
            ts.Database.open_blocking(config, progress.append, T(1))
        # cancelled from another thread while it blocks
        token = ts.CancellationToken()
        threading.Timer(0.5, token.cancel).start()
        with pytest.raises(ts.OperationCancelledError, match="was cancelled"):
            ts.Database.open_blocking(config, cancellation_token=token)
        proxy.restore()
        db = ts.Database.open_blocking(config, cancellation_token=T(60))  # closed before
        db.sync_session.wait_for_upload_blocking(T(60))
        db.close()


# --- where an event loop runs --------------------------------------------------------


def blocking_calls(user: ts.User, db: ts.Database) -> dict[str, Callable[[], Any]]:
    """Every blocking form, with arguments."""
    app = user.app
    auth = app.email_password_auth
    keys = user.api_keys
    session = db.sync_session
    return {
        "App.log_in_blocking": lambda: app.log_in_blocking(ts.Credentials.anonymous()),
        "App.remove_user_blocking": lambda: app.remove_user_blocking(user),
        "User.log_out_blocking": user.log_out_blocking,
        "User.delete_blocking": user.delete_blocking,
        "User.refresh_access_token_blocking": user.refresh_access_token_blocking,
        "User.valid_access_token_blocking": user.valid_access_token_blocking,
        "EmailPasswordAuth.register_user_blocking": lambda: auth.register_user_blocking(
            "a@example.com", "long enough"
        ),
        "EmailPasswordAuth.confirm_user_blocking": lambda: auth.confirm_user_blocking("t"),
        "EmailPasswordAuth.resend_confirmation_email_blocking": (
            lambda: auth.resend_confirmation_email_blocking("a@example.com")
        ),
        "EmailPasswordAuth.send_reset_password_email_blocking": (
            lambda: auth.send_reset_password_email_blocking("a@example.com")
        ),
        "EmailPasswordAuth.reset_password_blocking": lambda: auth.reset_password_blocking(
            "t", "long enough"
        ),
        "ApiKeyClient.create_blocking": lambda: keys.create_blocking("k"),
        "ApiKeyClient.list_blocking": keys.list_blocking,
        "ApiKeyClient.get_blocking": lambda: keys.get_blocking("k"),
        "ApiKeyClient.disable_blocking": lambda: keys.disable_blocking("k"),
        "ApiKeyClient.enable_blocking": lambda: keys.enable_blocking("k"),
        "ApiKeyClient.delete_blocking": lambda: keys.delete_blocking("k"),
        "Database.open_blocking": lambda: ts.Database.open_blocking(db.config),
        "Session.wait_for_upload_blocking": session.wait_for_upload_blocking,
        "Session.wait_for_download_blocking": session.wait_for_download_blocking,
        "SubscriptionSet.wait_for_synchronization_blocking": (
            db.subscriptions.wait_for_synchronization_blocking
        ),
    }


async def test_every_blocking_form_is_refused_in_a_running_loop(env: Env) -> None:
    app = env.app("in-loop")
    user = await app.log_in(ts.Credentials.anonymous())
    db = await ts.Database.open(
        ts.Configuration.flexible_sync(user, [Note], initial_subscriptions=subscribe_all),
        cancellation_token=T(60),
    )
    try:
        calls = blocking_calls(user, db)
        for name, call in calls.items():
            with pytest.raises(ts.BlockingCallError) as refused:
                call()
            text = str(refused.value)
            assert text.startswith(f"{name}() would block the event loop"), text
            assert f"'await {name.removesuffix('_blocking')}(...)'" in text
            assert isinstance(refused.value, RuntimeError)
        # nothing happened: the user is still logged in, nothing was opened twice
        assert user.is_logged_in and app.all_users == [user]
        # the way out: the blocking form on a worker thread, awaited
        with db.write():
            db.add(Note(id="loop", text="to_thread"))
        await asyncio.to_thread(db.sync_session.wait_for_upload_blocking, T(60))
        keys = await asyncio.to_thread(user.api_keys.list_blocking)
        assert keys == []
    finally:
        db.close()


def test_blocking_forms_in_a_sync_callback_are_refused_not_deadlocked(env: Env) -> None:
    app = env.app("callback")
    user = app.log_in_blocking(ts.Credentials.anonymous())
    db = ts.Database.open_blocking(
        ts.Configuration.flexible_sync(user, [Note], initial_subscriptions=subscribe_all),
        cancellation_token=T(60),
    )
    try:
        session = db.sync_session
        seen: list[BaseException] = []
        called = threading.Event()

        def on_progress(progress: ts.SyncProgress) -> None:  # on the sync thread
            try:
                session.wait_for_upload_blocking(T(5))
            except BaseException as exc:
                seen.append(exc)
            called.set()

        token = session.add_progress_listener(
            on_progress, ts.ProgressDirection.UPLOAD, ts.ProgressMode.REPORT_INDEFINITELY
        )
        assert called.wait(30)
        token.cancel()
        assert len(seen) >= 1 and isinstance(seen[0], ts.BlockingCallError)
        assert "in a tidesync callback" in str(seen[0])
        session.wait_for_download_blocking(T(60))  # the sync thread is not stuck
    finally:
        db.close()


def test_a_thread_with_an_idle_loop_can_block(env: Env) -> None:
    """A loop set for the thread but not running does not count: nothing would block it."""

    def flow() -> str:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            app = env.app("idle-loop")
            return app.log_in_blocking(ts.Credentials.anonymous()).id
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    assert in_thread(flow)


# --- the forgotten await is loud -----------------------------------------------------


def unreachable_app(tmp_path: Path) -> ts.App:
    return ts.App(ts.AppConfiguration("todo", base_url="http://127.0.0.1:9", base_path=tmp_path))


def test_a_call_never_awaited_warns_at_its_line(tmp_path: Path) -> None:
    app = unreachable_app(tmp_path)
    with pytest.warns(ts.NotAwaitedWarning) as caught:
        app.log_in(ts.Credentials.anonymous())  # the mistake
        line = _line() - 1
        gc.collect()
    assert len(caught) == 1
    warning = caught[0]
    assert str(warning.message) == (
        "App.log_in() was not awaited, so it did nothing: write 'await App.log_in(...)' in "
        "async code, or call 'App.log_in_blocking(...)' from plain code "
        "(docs/sync-session.md, 'Blocking code')"
    )
    assert isinstance(warning.message, RuntimeWarning)
    assert (warning.filename, warning.lineno) == (__file__, line)
    assert app.all_users == []  # nothing ran


def _line() -> int:
    return sys._getframe(1).f_lineno


def test_using_a_call_as_its_result_raises_at_once(tmp_path: Path) -> None:
    app = unreachable_app(tmp_path)
    call = app.log_in(ts.Credentials.anonymous())
    with pytest.raises(TypeError, match=r"App.log_in\(\) was not awaited.*reading \.id"):
        call.id  # noqa: B018
    with pytest.raises(TypeError, match=r"was not awaited.*log_in_blocking"):
        if call:
            pass
    call.close()  # closed: dropped without a warning
    with pytest.raises(RuntimeError, match="closed before it was awaited"):
        asyncio.run(call)
    del call
    gc.collect()


def test_a_call_dropped_inside_a_coroutine_warns(tmp_path: Path) -> None:
    app = unreachable_app(tmp_path)

    async def forgets() -> None:
        app.email_password_auth.register_user("a@example.com", "long enough")

    with pytest.warns(ts.NotAwaitedWarning, match=r"EmailPasswordAuth.register_user\(\)"):
        asyncio.run(forgets())
        gc.collect()


async def test_calls_work_everywhere_a_coroutine_does(env: Env) -> None:
    app = env.app("anywhere")
    anon = ts.Credentials.anonymous()
    first = await asyncio.wait_for(app.log_in(anon), 60)
    second, third = await asyncio.gather(app.log_in(anon), app.log_in(anon))
    task = asyncio.create_task(app.log_in(anon))
    fourth = await task
    assert len({first.id, second.id, third.id, fourth.id}) == 4
    call = app.log_in(anon)
    assert asyncio.iscoroutine(call)
    call.close()
    assert "App.log_in" in repr(task)
    # from a plain thread: asyncio.run takes a call too
    fifth = await asyncio.to_thread(asyncio.run, app.log_in(anon))
    assert fifth.id not in {first.id, second.id}


async def test_cancelling_a_task_of_a_call(tmp_path: Path) -> None:
    """The task's cancel reaches the HTTP request inside (a server that never answers)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    app = ts.App(
        ts.AppConfiguration("todo", base_url=f"http://127.0.0.1:{port}", base_path=tmp_path)
    )
    try:
        task = asyncio.create_task(app.log_in(ts.Credentials.anonymous()))
        await asyncio.sleep(0.3)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        silent.close()
        app.close()


def test_ctrl_c_interrupts_a_blocking_call(tmp_path: Path) -> None:
    """In a script's main thread, Ctrl+C (SIGINT) ends a blocking call with
    KeyboardInterrupt, cleanly: no warning, no task left behind."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    script = textwrap.dedent(
        f"""
        import sys
        import tidesync as ts
        app = ts.App(ts.AppConfiguration(
            "todo", base_url="http://127.0.0.1:{port}", base_path={str(tmp_path)!r}))
        print("calling", flush=True)
        try:
            app.log_in_blocking(ts.Credentials.anonymous())
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(3)
        """
    )
    src = str(Path(ts.__file__).parent.parent)
    proc = subprocess.Popen(
        [sys.executable, "-W", "error", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=src),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "calling\n"
        time.sleep(1.0)  # inside the HTTP request, which the server never answers
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        silent.close()
    assert (proc.returncode, out, err) == (3, "interrupted\n", "")


def test_a_call_steps_like_a_coroutine() -> None:
    """send/throw/close as an event loop's task uses them (pure code)."""

    async def body() -> str:
        try:
            await asyncio.sleep(0)  # one bare yield
        except ValueError as exc:
            return f"caught {exc}"
        return "not thrown"

    for args in ((ValueError("x"),), (ValueError, ValueError("x")), (ValueError, "x")):
        call: Call[str] = Call(body, "body", (__file__, 1))
        assert call.send(None) is None
        with pytest.raises(StopIteration) as stop:
            call.throw(*args)  # type: ignore[arg-type]
        assert stop.value.value == "caught x"
    call = Call(body, "body", (__file__, 1))
    call.send(None)
    call.close()  # a started coroutine is closed, no warning
    with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
        call.send(None)


def test_async_iterators_made_in_plain_code_name_the_callback_forms(
    env: Env, tmp_path: Path
) -> None:
    app = env.app("streams")
    user = app.log_in_blocking(ts.Credentials.anonymous())
    db = ts.Database.open_blocking(
        ts.Configuration.flexible_sync(user, [Note], initial_subscriptions=subscribe_all),
        cancellation_token=T(60),
    )
    local = ts.Database(ts.Configuration.local([Note], path=tmp_path / "local.tidesync"))
    try:
        with local.write():
            note = local.add(Note(id="n"))
        session = db.sync_session
        makers: list[Callable[[], Any]] = [
            lambda: session.get_progress_stream(
                ts.ProgressDirection.UPLOAD, ts.ProgressMode.REPORT_INDEFINITELY
            ),
            lambda: session.connection_state_changes,
            lambda: local.all(Note).changes(),
            note.changes,
        ]
        for make in makers:
            with pytest.raises(ts.NoEventLoopError, match="use their callback forms") as err:
                make()
            assert isinstance(err.value, RuntimeError)  # what asyncio raised before
        session.wait_for_upload_blocking(T(60))  # nothing was left registered half-way
    finally:
        local.close()
        db.close()


# --- the examples of docs/sync-session.md, both forms ---------------------------------

DOC = Path(__file__).parent.parent / "docs" / "sync-session.md"
EXAMPLE = re.compile(r"^(Async|Blocking)(?:[^\n]|\n(?!\n))*\n\n```python\n(.*?)```", re.M | re.S)


def doc_examples(kind: str) -> list[str]:
    found = [code for label, code in EXAMPLE.findall(DOC.read_text()) if label == kind]
    assert len(found) == 4, f"docs/sync-session.md has {len(found)} {kind} examples"
    return found


def test_the_blocking_examples_of_the_docs_run(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    app = env.app("doc-blocking")
    ns: dict[str, Any] = {"ts": ts, "Task": Chore, "app": app}
    try:
        for code in doc_examples("Blocking"):
            exec(compile(code, str(DOC), "exec"), ns)
    finally:
        if "db" in ns:
            ns["db"].close()


async def test_the_async_examples_of_the_docs_run(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the example's App keeps its users in ./tidesync/todo
    ns: dict[str, Any] = {"Task": Chore}
    examples = doc_examples("Async")
    endless = [c for c in examples if "connection_state_changes" in c]
    assert len(endless) == 1  # it waits for changes forever: run apart, stopped by a pause
    try:
        for code in examples:
            code = code.replace("http://127.0.0.1:8765", env.server.url)
            if code in endless:  # stop it at the first change, which a pause makes
                code = code.replace("print(change.previous, change.current)", "break")
            compiled = compile(code, str(DOC), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            result = eval(compiled, ns)
            if result is None:
                continue
            if code.startswith("async for change"):
                reader = asyncio.ensure_future(result)
                await asyncio.sleep(0.2)
                ns["session"].pause()
                await asyncio.wait_for(reader, 30)
                ns["session"].resume()
            else:
                await result
    finally:
        if "db" in ns:
            ns["db"].close()
        if "app" in ns:
            ns["app"].close()


def test_every_public_coroutine_has_both_forms() -> None:
    """The naming rule holds for every public class of the client: no bare coroutine
    method (it would return a silent coroutine), and each one has ``<name>_blocking``."""
    from tidesync.client.app import ApiKeyClient, EmailPasswordAuth

    found = []
    classes = (ts.App, ts.User, EmailPasswordAuth, ApiKeyClient, ts.Session)
    for cls in (*classes, ts.SubscriptionSet, ts.Database):
        for name in dir(cls):
            member = inspect.getattr_static(cls, name)
            fn = member.__func__ if isinstance(member, classmethod) else member
            if name.startswith("_") or name.endswith("_blocking") or not callable(fn):
                continue
            where = f"{cls.__name__}.{name}"
            assert not inspect.iscoroutinefunction(fn), f"{where}: declare it with @awaitable"
            inner = getattr(fn, "__wrapped__", None)
            if inner is not None and inspect.iscoroutinefunction(inner):
                found.append(where)
                blocking = getattr(cls, name + "_blocking")
                assert inspect.signature(blocking) == inspect.signature(getattr(cls, name))
                assert blocking.__doc__ and "blocking form" in blocking.__doc__
    assert len(found) == 21, found
