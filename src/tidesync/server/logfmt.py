"""Structured logs: one JSON object per line (``tidesync serve --log-format json``).

Each line has ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``msg``, ``pid`` and, when the
record carries one, ``exc`` (the formatted traceback); fields passed with ``extra=`` that are
JSON-able are kept as top-level keys. Log shippers (Loki, Elasticsearch, CloudWatch) ingest
this without parsing rules.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from typing import Any

#: Attributes every LogRecord has; anything else came from ``extra=``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON object on one line."""
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": os.getpid(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                try:
                    json.dumps(value)
                except (TypeError, ValueError):
                    value = repr(value)
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Send the root logger's records to stderr as ``fmt`` ("text" or "json")."""
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r} (use text or json)")
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))


__all__ = ["JsonFormatter", "configure_logging"]
