"""Shared pieces of the web console tests: signing in over plain HTTP, form tokens."""

from __future__ import annotations

import re

import httpx

from .api_helpers import ADMIN_KEY

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    """The CSRF token of the first form on a console page."""
    found = _CSRF.search(html)
    assert found is not None, "the page has no form with a CSRF token"
    return found.group(1)


async def sign_in(client: httpx.AsyncClient, key: str = ADMIN_KEY) -> str:
    """Sign ``client`` in with ``key``; answers the session's CSRF token."""
    form = await client.get("/admin/signin")
    assert form.status_code == 200, form.text
    answer = await client.post("/admin/signin", data={"csrf": csrf_of(form.text), "key": key})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/admin/"
    page = await client.get("/admin/")
    assert page.status_code == 200, page.text
    return csrf_of(page.text)
