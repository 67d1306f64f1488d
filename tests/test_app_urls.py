"""``AppConfiguration`` checks its app id and ``base_url`` when it is made (pure checks)."""

from __future__ import annotations

import pytest

import tidesync as ts
from tidesync.client.urls import check_app_id, check_base_url, host_and_port


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8765",
        "http://127.0.0.1:8765/",
        "https://sync.example.com",
        "http://localhost:1",
        "http://localhost:65535",
        "http://[::1]:8765",
        "http://my_host.local",
        "https://bücher.example",
    ],
)
def test_good_urls_pass(url: str) -> None:
    check_base_url(url)
    assert ts.AppConfiguration("todo", base_url=url).base_url == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1:99999", "the port 99999 is not in 1-65535"),
        ("http://127.0.0.1:0", "the port 0 is not in 1-65535"),
        ("http://127.0.0.1:port", "the port 'port' is not a number"),
        ("http://127.0.0.1:", "the port after ':' is missing"),
        ("ws://127.0.0.1:8765", "must start with http:// or https://"),
        ("127.0.0.1:8765", "must start with http:// or https://"),
        ("HTTP://127.0.0.1", "must start with http:// or https://"),
        ("http://:8765", "it has no host"),
        ("http://", "it has no host"),
        ("http://127.0.0.1:8765/api/v1", "it has the path '/api/v1'"),
        ("http://h/x/", "it has the path '/x/'"),
        ("http://h/?a=1", "it has a query"),
        ("http://h/#top", "it has a fragment"),
        ("http://me:secret@h", "user name or password"),
        ("http://h ost", "white space"),
        (" http://h", "white space"),
        ("http://[zz]:1", "cannot be read as a URL"),
        ("http://a..b", "'a..b' is not a host name or IP address"),
        ("http://-a", "'-a' is not a host name or IP address"),
    ],
)
def test_bad_urls_name_the_url_and_the_problem(url: str, problem: str) -> None:
    with pytest.raises(ts.ConfigurationError) as info:
        ts.AppConfiguration("todo", base_url=url)
    message = str(info.value)
    assert repr(url) in message and problem in message
    assert isinstance(info.value, ValueError)


def test_a_url_that_is_not_a_string() -> None:
    with pytest.raises(ts.ConfigurationError, match="base_url must be a string"):
        check_base_url(8765)


@pytest.mark.parametrize("app_id", ["todo", "my-app_2.prod", "A", "x" * 128])
def test_good_app_ids_pass(app_id: str) -> None:
    check_app_id(app_id)


@pytest.mark.parametrize(
    ("app_id", "problem"),
    [
        ("", "the app id is empty"),
        ("my app", "the character ' '"),
        ("a/b", "the character '/'"),
        ("to?do", "the character '?'"),
        ("café", "the character 'é'"),
        ("-todo", "a first character that is no letter or digit"),
        ("x" * 129, "129 characters long, more than 128"),
    ],
)
def test_bad_app_ids_are_refused(app_id: str, problem: str) -> None:
    with pytest.raises(ts.ConfigurationError) as info:
        ts.AppConfiguration(app_id)
    assert problem in str(info.value)


def test_app_id_not_a_string() -> None:
    with pytest.raises(ts.ConfigurationError, match="must be a string"):
        check_app_id(None)


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("http://127.0.0.1:8765", "127.0.0.1:8765"),
        ("http://example.com/", "example.com:80"),
        ("https://example.com", "example.com:443"),
        ("http://[::1]:9", "[::1]:9"),
    ],
)
def test_host_and_port(url: str, target: str) -> None:
    assert host_and_port(url) == target
