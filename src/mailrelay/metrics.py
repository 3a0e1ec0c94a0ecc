"""Prometheus metrics, declared once on an injected registry (tests get their own)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from mailrelay import __version__


class WatchedState(Protocol):
    def depth_now(self) -> Any: ...  # a monitor.QueueDepth (not imported: no cycle)

    def oldest_age_now(self) -> float | None: ...

    def free_bytes_now(self) -> int | None: ...


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        Info("mailrelay", "mailrelay build information", registry=r).info({"version": __version__})
        self.connections = Counter(
            "mailrelay_smtp_connections_total",
            "Inbound SMTP connections, by result: accepted, refused_nonlocal, refused_limit,"
            " refused_peer_limit, refused_rate, refused_proxy_header, refused_shutdown.",
            ["result"],
            registry=r,
        )
        self.messages_received = Counter(
            "mailrelay_messages_received_total",
            "Messages accepted into the spool (answered 250).",
            registry=r,
        )
        self.recipients_received = Counter(
            "mailrelay_recipients_received_total",
            "Recipients of messages accepted into the spool.",
            registry=r,
        )
        self.messages_rejected = Counter(
            "mailrelay_messages_rejected_total",
            "Transactions refused at MAIL, DATA or the final dot, by reason.",
            ["reason"],
            registry=r,
        )
        self.recipients_rejected = Counter(
            "mailrelay_recipients_rejected_total",
            "RCPT commands refused by an inbound limit, by reason (too_many: smtp.max_recipients).",
            ["reason"],
            registry=r,
        )
        self.sessions_closed = Counter(
            "mailrelay_smtp_sessions_closed_total",
            "Inbound SMTP sessions closed by the server with a 421, by reason: idle_timeout,"
            " session_timeout, too_many_errors, shutdown.",
            ["reason"],
            registry=r,
        )
        self.smtp_open_connections = Gauge(
            "mailrelay_smtp_open_connections",
            "Inbound SMTP sessions open now.",
            registry=r,
        )
        self.inbound_limit = Gauge(
            "mailrelay_inbound_limit",
            "Configured inbound limits, by name (0: off): the smtp.* and limits.* keys.",
            ["limit"],
            registry=r,
        )
        self.ratelimit_keys = Gauge(
            "mailrelay_ratelimit_tracked_keys",
            "Keys an inbound rate limiter holds now, by limiter: connection, client, sender.",
            ["limiter"],
            registry=r,
        )
        self.ratelimit_evictions = Counter(
            "mailrelay_ratelimit_evictions_total",
            "Keys forgotten by a full inbound rate limiter (limits.max_tracked_keys), by limiter.",
            ["limiter"],
            registry=r,
        )
        self.acceptance_seconds = Histogram(
            "mailrelay_acceptance_seconds",
            "Time from the final dot to the 250 (includes fsync).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.recipients_delivered = Counter(
            "mailrelay_recipients_delivered_total",
            "Recipients accepted by an upstream provider.",
            ["provider"],
            registry=r,
        )
        self.recipients_deferred = Counter(
            "mailrelay_recipients_deferred_total",
            "Recipient attempts that failed temporarily and will be retried.",
            registry=r,
        )
        self.recipients_failed = Counter(
            "mailrelay_recipients_failed_total",
            "Recipients that failed permanently.",
            registry=r,
        )
        self.messages_delivered = Counter(
            "mailrelay_messages_delivered_total",
            "Messages whose every recipient reached a final outcome with none failed.",
            registry=r,
        )
        self.messages_failed = Counter(
            "mailrelay_messages_failed_total",
            "Messages moved to the dead-letter area with at least one failed recipient.",
            registry=r,
        )
        self.messages_deferred = Counter(
            "mailrelay_messages_deferred_total",
            "Delivery attempts that ended with recipients left to retry later.",
            registry=r,
        )
        self.messages_expired = Counter(
            "mailrelay_messages_expired_total",
            "Messages given up on after spool.max_lifetime with recipients undelivered.",
            registry=r,
        )
        self.recipients_bounced = Counter(
            "mailrelay_recipients_bounced_total",
            "Permanently failed recipients reported to the sender in a DSN.",
            registry=r,
        )
        self.messages_bounced = Counter(
            "mailrelay_messages_bounced_total",
            "Messages with a permanently failed recipient for which a DSN was sent to the sender.",
            registry=r,
        )
        self.possible_duplicates = Counter(
            "mailrelay_possible_duplicates_total",
            "Recipients retried after the connection was lost past the final dot.",
            registry=r,
        )
        self.corrupt_files = Counter(
            "mailrelay_spool_corrupt_total",
            "Spool files that failed their checksum and were moved to corrupt/.",
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "mailrelay_delivery_seconds",
            "Time from acceptance to the last recipient's final outcome.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_connections = Counter(
            "mailrelay_upstream_connections_total",
            "Connections opened to upstream providers, by provider and result.",
            ["provider", "result"],
            registry=r,
        )
        self.upstream_open_connections = Gauge(
            "mailrelay_upstream_open_connections",
            "Connections to upstream providers open now, by provider.",
            ["provider"],
            registry=r,
        )
        self.upstream_breaker_state = Gauge(
            "mailrelay_upstream_breaker_state",
            "Circuit breaker per provider: 0 closed, 1 half-open (probing), 2 open.",
            ["provider"],
            registry=r,
        )
        self.upstream_throttled = Counter(
            "mailrelay_upstream_throttled_total",
            "Throttling replies from upstream providers (e.g. 454, 421), after which the"
            " provider's sending rate was halved.",
            ["provider"],
            registry=r,
        )
        self.upstream_transaction_seconds = Histogram(
            "mailrelay_upstream_transaction_seconds",
            "Time from handing a message to a ready connection to the upstream's last reply.",
            ["provider"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_last_success = Gauge(
            "mailrelay_upstream_last_success_timestamp_seconds",
            "When a provider last accepted a recipient (Unix time; 0: not since start).",
            ["provider"],
            registry=r,
        )
        self.alert_active = Gauge(
            "mailrelay_alert_active",
            "1 while an alert fires, by alert: backlog, oldest_age, disk_low,"
            " provider_down:<provider>.",
            ["alert"],
            registry=r,
        )
        self.alert_notifications = Counter(
            "mailrelay_alert_notifications_total",
            "Alert notifications (firing, repeat, resolved) by channel (log, webhook, mail)"
            " and result (sent, failed: given up after the channel's retries).",
            ["channel", "result"],
            registry=r,
        )
        self._queue_depth = Gauge(
            "mailrelay_queue_depth",
            "Messages in the spool by state: ready, deferred, active (an attempt running),"
            " held, failed (dead letters in failed/).",
            ["state"],
            registry=r,
        )
        self._oldest_age = Gauge(
            "mailrelay_queue_oldest_age_seconds",
            "Age of the oldest message waiting for delivery (0 when none is).",
            registry=r,
        )
        self._free_bytes = Gauge(
            "mailrelay_spool_free_bytes",
            "Free bytes on the spool's filesystem, for mailrelay's user (-1: cannot tell).",
            registry=r,
        )
        self.start_time = Gauge(
            "mailrelay_start_time_seconds",
            "When this mailrelay process started (Unix time).",
            registry=r,
        )
        self.acceptor_restarts = Counter(
            "mailrelay_acceptor_restarts_total",
            "Acceptor processes (smtp.processes > 1) that exited unasked and were restarted.",
            registry=r,
        )
        # What /metrics renders: this registry, or a view of it (see expose).
        self._exposed: Any = r

    def expose(self, view: Any) -> None:
        """Render ``view`` (anything with the registry's collect()) instead of the registry:
        with acceptor processes, a MergedRegistry adds their samples (acceptors.samples)."""
        self._exposed = view

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (generate_latest)."""
        return generate_latest(self._exposed)

    def watch(self, state: WatchedState) -> None:
        """Read the queue's state at scrape time instead of updating gauges on every change."""
        for name in ("ready", "deferred", "active", "held", "failed"):
            self._queue_depth.labels(name).set_function(
                lambda name=name: getattr(state.depth_now(), name)  # type: ignore[misc]
            )
        self._oldest_age.set_function(lambda: state.oldest_age_now() or 0.0)
        self._free_bytes.set_function(
            lambda: -1 if (free := state.free_bytes_now()) is None else free
        )

    def watch_provider(self, name: str, last_success: Callable[[], float | None]) -> None:
        self.upstream_last_success.labels(name).set_function(lambda: last_success() or 0.0)
