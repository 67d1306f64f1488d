"""The web console in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
driven by Selenium) against one real server: sign in, watch a device's session appear and
end when it pauses, query / edit / delete an object and see it on the device, hostile
strings shown as text. The screenshots in docs/ are made here."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tidesync.server.settings import load_config
from tidesync.testing import TestServer

from .api_helpers import ADMIN_KEY, Device, Task, write_config
from .flex_helpers import eventually

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
    "chromium-driver; .ci/run installs them)",
)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

#: Screenshots go to docs/ with TIDESYNC_CONSOLE_SCREENSHOTS=1 (else to a temporary folder,
#: so a test run leaves the checkout as it was).
DOCS = Path(__file__).parent.parent / "docs"
HOSTILE = ["<script>window.pwned = 1</script>", '"><img src=x onerror="window.pwned=2">']
#: How long a browser condition may take (seconds).
WAIT = 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServer]:
    root = tmp_path_factory.mktemp("console-browser")
    config = load_config(write_config(root))
    with TestServer(root / "server", config=config) as srv:
        yield srv


@pytest.fixture(scope="module")
def driver(server: TestServer) -> Iterator[WebDriver]:
    """One headless Chromium for the module, signed in through the form."""
    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,900",
    ):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        browser.set_page_load_timeout(WAIT)
        browser.get(f"{server.url}/admin/sessions")
        assert browser.current_url.endswith("/admin/signin")  # not signed in yet
        browser.find_element(By.ID, "key").send_keys("not the key")
        browser.find_element(By.ID, "signin").click()
        error = until(browser, lambda b: b.find_elements(By.ID, "error"))
        assert "not an admin key" in error[0].text
        browser.find_element(By.ID, "key").send_keys(ADMIN_KEY)
        browser.find_element(By.ID, "signin").click()
        until(browser, lambda b: b.current_url.endswith("/admin/"))
        assert ADMIN_KEY not in browser.current_url
        cookie = browser.get_cookie("tidesync_console")
        assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert browser.execute_script("return document.cookie") == ""  # no script sees it
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the screenshots go."""
    if os.environ.get("TIDESYNC_CONSOLE_SCREENSHOTS") == "1":
        return DOCS
    return tmp_path_factory.mktemp("screenshots")


def until(browser: WebDriver, check: Any) -> Any:
    """``check(browser)`` once it is truthy (fails after :data:`WAIT` seconds)."""
    return WebDriverWait(browser, WAIT, poll_frequency=0.1).until(check)


def _rows(browser: WebDriver) -> list[list[str]]:
    """The sessions table's cells, read in one go (the stream replaces the rows)."""
    rows: list[list[str]] = browser.execute_script(
        """return Array.from(document.querySelectorAll('#session-rows tr')).map(
               r => Array.from(r.cells).map(c => c.innerText.trim()));"""
    )
    return rows


def _session_row(browser: WebDriver, user_id: str) -> tuple[str, str] | None:
    """(file ident, state) of the user's first device session row."""
    for cells in _rows(browser):
        if len(cells) > 3 and cells[1] == user_id and cells[2]:
            return cells[2], cells[3]
    return None


def _upload_acked(browser: WebDriver, file_ident: str) -> int:
    for cells in _rows(browser):
        if len(cells) > 7 and cells[2] == file_ident:
            return int(cells[7])
    return -1


def _state_of(browser: WebDriver, file_ident: str) -> str | None:
    for cells in _rows(browser):
        if len(cells) > 3 and cells[2] == file_ident:
            return cells[3]
    return None


async def test_a_device_session_appears_live_and_changes_state_when_paused(
    server: TestServer, driver: WebDriver, tmp_path: Path, shots: Path
) -> None:
    driver.get(f"{server.url}/admin/sessions?app=todo")
    until(driver, lambda b: "on" in b.find_element(By.ID, "live").get_attribute("class"))
    device = Device(tmp_path, "phone", server.url)
    try:
        await device.open("summary != 'hidden'")
        # no reload: the row comes over the event stream
        file_ident, state = until(driver, lambda b: _session_row(b, device.user_id))
        assert state == "active"
        row_text = driver.find_element(By.ID, "session-rows").text
        assert "Task: summary != 'hidden'" in row_text
        assert device.db is not None
        with device.db.write():
            device.db.add(Task(id="s-1", owner_id=device.user_id, summary="uploaded"))
        await device.settle()
        # the upload's progress shows up live too: the acknowledged client version moves
        until(driver, lambda b: _upload_acked(b, file_ident) > 0)
        driver.save_screenshot(str(shots / "console-sessions.png"))
        device.db.sync_session.pause()
        ended = until(driver, lambda b: (s := _state_of(b, file_ident)) != "active" and s)
        assert ended.startswith(("disconnected", "unbound")), ended
    finally:
        device.shutdown()


async def test_query_edit_and_delete_an_object_and_the_device_sees_it(
    server: TestServer, driver: WebDriver, tmp_path: Path, shots: Path
) -> None:
    device = Device(tmp_path, "tablet", server.url)
    try:
        db = await device.open()
        with db.write():
            db.add(Task(id="b-1", owner_id=device.user_id, summary="from the tablet"))
        await device.settle()
        driver.get(f"{server.url}/admin/data/todo/Task")
        box = driver.find_element(By.ID, "query")
        box.send_keys("summary ==")
        driver.find_element(By.ID, "run").click()
        error = until(driver, lambda b: b.find_element(By.ID, "query-error"))
        assert "summary ==" in error.text  # the parser's message, under the field
        box = driver.find_element(By.ID, "query")
        box.clear()
        box.send_keys("summary == 'from the tablet'")
        driver.find_element(By.ID, "run").click()
        until(driver, lambda b: b.find_elements(By.LINK_TEXT, "b-1"))
        assert len(driver.find_elements(By.CSS_SELECTOR, "#objects tbody tr")) == 1
        driver.find_element(By.LINK_TEXT, "b-1").click()
        until(driver, lambda b: b.find_element(By.ID, "pk").text == "b-1")
        value = driver.find_element(By.CSS_SELECTOR, "#field-summary textarea")
        value.clear()
        value.send_keys("edited in the console")
        driver.find_element(By.CSS_SELECTOR, "#field-summary button").click()
        until(driver, lambda b: b.find_elements(By.ID, "edited"))
        await eventually(lambda: device.tasks()["b-1"]["summary"] == "edited in the console")
        driver.save_screenshot(str(shots / "console-object.png"))
        driver.find_element(By.ID, "delete").click()
        until(driver, lambda b: b.find_elements(By.ID, "confirm-delete"))
        assert "b-1" in device.tasks()  # asking is not deleting
        driver.find_element(By.ID, "confirm-delete").click()
        until(driver, lambda b: b.current_url.endswith("/admin/data/todo/Task"))
        await eventually(lambda: "b-1" not in device.tasks())
    finally:
        device.shutdown()


def test_hostile_strings_are_shown_as_text(server: TestServer, driver: WebDriver) -> None:
    body = {"id": "hostile", "owner_id": HOSTILE[1], "summary": HOSTILE[0], "n": 0, "shared": False}
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    made = httpx.post(f"{server.url}/api/v1/apps/todo/data/Task", json=body, headers=headers)
    assert made.status_code == 200, made.text
    driver.get(f"{server.url}/admin/data/todo/Task?query=id+%3D%3D+%27hostile%27")
    cells = until(driver, lambda b: b.find_elements(By.CSS_SELECTOR, "#objects tbody td"))
    assert [c.text for c in cells[1:3]] == [HOSTILE[1], HOSTILE[0]]
    driver.get(f"{server.url}/admin/data/todo/Task/object?pk=hostile")
    summary = driver.find_element(By.CSS_SELECTOR, "#field-summary textarea")
    assert summary.get_attribute("value") == HOSTILE[0]
    owner = driver.find_element(By.CSS_SELECTOR, "#field-owner_id textarea")
    assert owner.get_attribute("value") == HOSTILE[1]
    assert driver.find_elements(By.CSS_SELECTOR, "main img") == []
    assert driver.execute_script("return window.pwned === undefined") is True


def test_a_post_without_the_csrf_token_is_refused_in_the_browser(
    server: TestServer, driver: WebDriver
) -> None:
    driver.get(f"{server.url}/admin/")
    status = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch('/admin/signout', {method: 'POST', credentials: 'same-origin',
              headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: ''})
          .then(r => done(r.status), e => done(String(e)));
        """
    )
    assert status == 403
    driver.get(f"{server.url}/admin/")
    assert driver.current_url.endswith("/admin/")  # still signed in


async def test_find_disable_enable_and_delete_a_user(
    server: TestServer, driver: WebDriver, tmp_path: Path
) -> None:
    device = Device(tmp_path, "laptop", server.url)
    try:
        await device.open()
        driver.get(f"{server.url}/admin/users?app=todo")
        driver.find_element(By.LINK_TEXT, device.user_id).click()  # connected now
        until(driver, lambda b: b.find_element(By.ID, "found-user").text == device.user_id)
        assert driver.find_element(By.ID, "status").text == "active"
        driver.find_element(By.ID, "disable").click()
        until(driver, lambda b: b.find_element(By.ID, "status").text == "disabled")

        def connections() -> str:
            driver.refresh()
            return str(driver.find_element(By.ID, "user-connections").text)

        await eventually(lambda: connections() == "0")  # the device's connection ended
        driver.find_element(By.ID, "enable").click()
        until(driver, lambda b: b.find_element(By.ID, "status").text == "active")
        driver.find_element(By.ID, "delete-user").click()
        until(driver, lambda b: b.find_elements(By.ID, "confirm-delete-user"))[0].click()
        until(driver, lambda b: "deleted" in b.find_element(By.ID, "done").text)
        driver.get(f"{server.url}/admin/users?app=todo&user={device.user_id}")
        assert driver.find_elements(By.ID, "not-found")
    finally:
        device.shutdown()
