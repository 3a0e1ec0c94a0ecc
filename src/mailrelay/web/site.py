"""Health, metrics and the status page over HTTP, for loopback clients only, GET and HEAD only.

    /               the status page (HTML, self-contained, refreshes itself)
    /health         ok / degraded / failing, with the reading behind it (JSON; 503 if failing)
    /health/live    the process answers (always 200 while it does)
    /health/ready   mail is being accepted (200), or not: starting, stopping, disk full (503)
    /metrics        Prometheus text format

Metrics are rendered with ``prometheus_client.generate_latest`` in the reactor thread: the
library's own ``twisted`` resource runs WSGI in the shared thread pool and imports the global
reactor (pitfall 31). Rendering a registry of this size takes well under a millisecond.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web import resource, server
from twisted.web.iweb import IRequest

from mailrelay.alerts.rules import ActiveAlert
from mailrelay.health import Health, assess, document, refusing_for_disk
from mailrelay.metrics import Metrics
from mailrelay.monitor import Monitor, Reading
from mailrelay.netaddr import is_local_peer
from mailrelay.web.status import StatusView, render_status_page

# How many oldest messages and recent failures the status page lists.
STATUS_ROWS = 20


@attrs.frozen
class Operations:
    """Everything the HTTP side reads, in one value."""

    monitor: Monitor
    alerts: Any  # an AlertManager (has .active())
    min_free_space: int
    hostname: str

    def health(self) -> tuple[Reading, Health, list[ActiveAlert]]:
        reading = self.monitor.reading()
        active = self.alerts.active()
        return reading, assess(reading, self.min_free_space, active), active


def _json(request: IRequest, body: dict[str, Any]) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode() + b"\n"


class _LocalGetResource(resource.Resource):
    """403 for a non-loopback client, 405 (from Resource.render) for anything but GET/HEAD."""

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        if not is_local_peer(request.getClientAddress()):
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Forbidden: local clients only\n"
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Method Not Allowed\n"
        result: bytes = super().render(request)
        return result


class HealthResource(_LocalGetResource):
    def __init__(self, ops: Operations) -> None:
        super().__init__()
        self._ops = ops

    def render_GET(self, request: IRequest) -> bytes:
        reading, health, active = self._ops.health()
        request.setResponseCode(health.http_code)
        return _json(request, document(reading, health, active, self._ops.min_free_space))


class LiveResource(_LocalGetResource):
    def render_GET(self, request: IRequest) -> bytes:
        return _json(request, {"status": "alive"})


class ReadyResource(_LocalGetResource):
    def __init__(self, ops: Operations) -> None:
        super().__init__()
        self._ops = ops

    def render_GET(self, request: IRequest) -> bytes:
        reading = self._ops.monitor.reading()
        # Not ready while mail is turned away at the door (starting, stopping, disk full); a
        # provider outage does not count: accepted mail waits safely in the spool.
        ready = reading.accepting and not refusing_for_disk(reading, self._ops.min_free_space)
        request.setResponseCode(200 if ready else 503)
        return _json(request, {"status": "ready" if ready else "not ready"})


class MetricsResource(_LocalGetResource):
    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        output: bytes = generate_latest(self._metrics.registry)
        return output


class StatusPageResource(_LocalGetResource):
    def __init__(self, ops: Operations) -> None:
        super().__init__()
        self._ops = ops

    def render_GET(self, request: IRequest) -> bytes:
        reading, health, active = self._ops.health()
        monitor = self._ops.monitor
        view = StatusView(
            reading=reading,
            health=health,
            alerts=tuple(active),
            history=tuple(monitor.history()),
            failures=tuple(monitor.recent_failures()[:STATUS_ROWS]),
            oldest=tuple(monitor.oldest(STATUS_ROWS)),
            hostname=self._ops.hostname,
            refresh_seconds=max(5, int(monitor.interval)),
        )
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        # Nothing from elsewhere may load or run: the page is inline HTML, CSS and SVG.
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; style-src 'unsafe-inline'; img-src data:",
        )
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"x-frame-options", b"DENY")
        return render_status_page(view)


class NotFoundResource(_LocalGetResource):
    def render_GET(self, request: IRequest) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Not Found\n"


class _Node(resource.Resource):
    """A path segment with children; unknown children go through the same loopback and
    method checks as known ones (a 404 from _LocalGetResource)."""

    def __init__(self, index: resource.Resource) -> None:
        super().__init__()
        self._index = index

    def getChild(self, path: bytes, request: IRequest) -> resource.Resource:
        return self._index if path == b"" else NotFoundResource()

    def render(self, request: IRequest) -> bytes:
        result: bytes = self._index.render(request)  # "/health" as "/health/"
        return result


def build_site(ops: Operations, metrics: Metrics) -> server.Site:
    root = _Node(StatusPageResource(ops))
    health = _Node(HealthResource(ops))
    health.putChild(b"live", LiveResource())
    health.putChild(b"ready", ReadyResource(ops))
    root.putChild(b"health", health)
    root.putChild(b"metrics", MetricsResource(metrics))
    site = server.Site(root)
    site.displayTracebacks = False
    return site
