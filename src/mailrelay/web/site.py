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

import io
import json
from typing import Any, Protocol

import attrs
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.web import resource, server
from twisted.web.iweb import IRequest

from mailrelay.alerts.rules import ActiveAlert
from mailrelay.health import Health, assess, document, refusing_for_disk
from mailrelay.metrics import Metrics
from mailrelay.monitor import Monitor, Reading
from mailrelay.netaddr import is_local_peer, is_loopback_host
from mailrelay.web.status import StatusView, render_status_page

# How many oldest messages and recent failures the status page lists.
STATUS_ROWS = 20


class ActiveAlerts(Protocol):
    def active(self) -> list[ActiveAlert]: ...


@attrs.frozen
class Operations:
    """Everything the HTTP side reads, in one value."""

    monitor: Monitor
    alerts: ActiveAlerts  # the AlertManager
    min_free_space: int
    hostname: str

    def health(self) -> tuple[Reading, Health, list[ActiveAlert]]:
        reading = self.monitor.reading()
        active = self.alerts.active()
        return reading, assess(reading, self.min_free_space, active), active


def _json(request: IRequest, body: dict[str, Any]) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode() + b"\n"


def _host_is_loopback(request: IRequest) -> bool:
    """The Host header names this machine (127.0.0.1, [::1], localhost), or there is none.

    A page on a hostile site whose name is re-pointed at 127.0.0.1 (DNS rebinding) makes the
    browser send its own name here: that request is refused, so no other site can read the
    status page or /health through a browser on this host. A request without Host (HTTP/1.0,
    HAProxy's health check) comes from a program, not from such a page."""
    raw = request.getHeader(b"host")
    if raw is None:
        return True
    host = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    return is_loopback_host(name)


def _plain(request: IRequest, code: int, text: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return text


class _LocalGetResource(resource.Resource):
    """403 for a non-loopback client or a Host header that is not this machine, 405 (from
    Resource.render) for anything but GET/HEAD, 404 for a path below a leaf."""

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        # On every answer, errors included: nothing here is for caches or content sniffing.
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"server", b"mailrelay")
        if not is_local_peer(request.getClientAddress()):
            return _plain(request, 403, b"Forbidden: local clients only\n")
        if not _host_is_loopback(request):
            return _plain(request, 403, b"Forbidden: Host must be this machine\n")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _plain(request, 405, b"Method Not Allowed\n")
        if getattr(request, "postpath", None):
            return _plain(request, 404, b"Not Found\n")  # /health/live/x, //health
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
        monitor = self._ops.monitor
        # Not ready while mail is turned away at the door (starting, stopping, disk full); a
        # provider outage does not count: accepted mail waits safely in the spool.
        ready = monitor.accepting_now() and not refusing_for_disk(
            monitor.free_bytes_now(), self._ops.min_free_space
        )
        request.setResponseCode(200 if ready else 503)
        return _json(request, {"status": "ready" if ready else "not ready"})


class MetricsResource(_LocalGetResource):
    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        output: bytes = self._metrics.exposition()
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
        # Nothing from elsewhere may load or run, and the page may not be framed: it is
        # inline HTML, CSS and SVG.
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none';"
            b" base-uri 'none'; form-action 'none'",
        )
        request.setHeader(b"x-frame-options", b"DENY")
        return render_status_page(view)


class NotFoundResource(_LocalGetResource):
    def render_GET(self, request: IRequest) -> bytes:
        return _plain(request, 404, b"Not Found\n")


class _NoBody(io.BytesIO):
    """A request body's store that keeps nothing: no resource here reads a body, and a
    large POST from any web page (a "simple" cross-origin request) must not fill memory or
    a temporary file before it is answered 405."""

    def write(self, data: Any) -> int:
        return len(data)


class _BodylessRequest(server.Request):
    def gotLength(self, length: int | None) -> None:
        self.content = _NoBody()


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
    site = server.Site(root, requestFactory=_BodylessRequest)
    site.displayTracebacks = False
    return site
