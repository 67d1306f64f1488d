"""The public API: every exported name exists, is documented, and errors share one root."""

from __future__ import annotations

import inspect

import tidesync as ts


def test_every_export_exists_and_has_a_docstring() -> None:
    missing = [n for n in ts.__all__ if not hasattr(ts, n)]
    assert not missing
    undocumented = [
        n
        for n in ts.__all__
        if (inspect.isclass(getattr(ts, n)) or inspect.isfunction(getattr(ts, n)))
        and not inspect.getdoc(getattr(ts, n))
    ]
    assert not undocumented


def test_every_exported_error_derives_from_the_root() -> None:
    errors = [getattr(ts, n) for n in ts.__all__ if n.endswith("Error")]
    assert errors
    for err in errors:
        assert issubclass(err, ts.TidesyncError), err
