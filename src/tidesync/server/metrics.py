"""The server's counters, and their Prometheus text rendering (``GET /metrics``).

One :class:`ServerMetrics` per hub; the hub and its connections bump plain integer fields
(no locks: everything runs on the server's event loop) and :meth:`ServerMetrics.render`
writes the Prometheus text exposition format 0.0.4. Rates ("uploads per second") are what
Prometheus computes from the counters: ``rate(tidesync_uploads_total[1m])``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

#: The commit latency histogram's bucket bounds (seconds).
COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: The media type of the text format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Histogram:
    """A cumulative histogram with fixed bucket bounds."""

    bounds: tuple[float, ...] = COMMIT_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        """Record one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        """The ``_bucket``, ``_sum`` and ``_count`` sample lines."""
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.total:.6f}")
        out.append(f"{name}_count {self.count}")
        return out


@dataclass
class ServerMetrics:
    """Counters of one server process (all monotonic except where rendered as gauges)."""

    connections_total: int = 0
    sessions_total: int = 0
    upload_messages_total: int = 0
    uploads_total: int = 0  # changesets integrated (new server versions)
    downloads_total: int = 0  # changesets sent to clients
    download_messages_total: int = 0
    bytes_received_total: int = 0
    bytes_sent_total: int = 0
    commits_total: int = 0
    commit_failures_total: int = 0
    remote_wakeups_total: int = 0  # commits of other processes that woke sessions here
    errors_total: dict[int, int] = field(default_factory=dict)
    webhook_deliveries_total: int = 0  # webhook POSTs answered 2xx
    webhook_failures_total: int = 0  # webhook attempts that failed (error, timeout, non-2xx)
    webhook_pauses_total: int = 0  # hooks paused after too many consecutive failures
    webhooks_paused: int = 0  # gauge: hooks this process holds that are paused now
    commit_seconds: Histogram = field(default_factory=Histogram)

    def error(self, code: int) -> None:
        """Count one ERROR sent to a client."""
        self.errors_total[int(code)] = self.errors_total.get(int(code), 0) + 1

    def render(self, *, connections: int, sessions: int, ready: bool) -> str:
        """The Prometheus text exposition of every metric, with the current gauges."""
        out: list[str] = []

        def metric(name: str, kind: str, text: str, samples: list[str]) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        def counter(name: str, text: str, value: int) -> None:
            metric(name, "counter", text, [f"{name} {value}"])

        def gauge(name: str, text: str, value: int) -> None:
            metric(name, "gauge", text, [f"{name} {value}"])

        gauge("tidesync_connections", "Open sync connections.", connections)
        gauge("tidesync_sessions", "Bound sync sessions.", sessions)
        gauge("tidesync_accepting", "1 while the server accepts sync connections.", int(ready))
        counter("tidesync_connections_total", "Sync connections accepted.", self.connections_total)
        counter("tidesync_sessions_total", "Sync sessions bound.", self.sessions_total)
        counter(
            "tidesync_upload_messages_total",
            "UPLOAD messages received.",
            self.upload_messages_total,
        )
        counter("tidesync_uploads_total", "Changesets integrated.", self.uploads_total)
        counter("tidesync_downloads_total", "Changesets sent to clients.", self.downloads_total)
        counter(
            "tidesync_download_messages_total",
            "DOWNLOAD messages sent.",
            self.download_messages_total,
        )
        counter(
            "tidesync_received_bytes_total", "Sync frame bytes received.", self.bytes_received_total
        )
        counter("tidesync_sent_bytes_total", "Sync frame bytes sent.", self.bytes_sent_total)
        counter("tidesync_commits_total", "Group commits to storage.", self.commits_total)
        counter(
            "tidesync_commit_failures_total",
            "Group commits that failed.",
            self.commit_failures_total,
        )
        counter(
            "tidesync_remote_wakeups_total",
            "Wake-ups for commits made by other server processes.",
            self.remote_wakeups_total,
        )
        counter(
            "tidesync_webhook_deliveries_total",
            "Webhook batches delivered (answered 2xx).",
            self.webhook_deliveries_total,
        )
        counter(
            "tidesync_webhook_failures_total",
            "Webhook delivery attempts that failed (network error, timeout, non-2xx).",
            self.webhook_failures_total,
        )
        counter(
            "tidesync_webhook_pauses_total",
            "Webhooks paused after too many consecutive failures.",
            self.webhook_pauses_total,
        )
        gauge(
            "tidesync_webhooks_paused",
            "Webhooks delivered by this process that are paused now.",
            self.webhooks_paused,
        )
        metric(
            "tidesync_errors_total",
            "counter",
            "ERROR messages sent to clients, by protocol error code.",
            [
                f'tidesync_errors_total{{code="{c}"}} {n}'
                for c, n in sorted(self.errors_total.items())
            ],
        )
        metric(
            "tidesync_commit_seconds",
            "histogram",
            "Group commit latency (storage integrate call), seconds.",
            self.commit_seconds.lines("tidesync_commit_seconds"),
        )
        return "\n".join(out) + "\n"


__all__ = ["COMMIT_BUCKETS", "CONTENT_TYPE", "Histogram", "ServerMetrics"]
