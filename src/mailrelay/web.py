"""Health and metrics over HTTP, for loopback clients only, GET and HEAD only.

Metrics are rendered with ``prometheus_client.generate_latest`` in the reactor thread: the
library's own ``twisted`` resource runs WSGI in the shared thread pool and imports the global
reactor (pitfall 31). Rendering a registry of this size takes well under a millisecond.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.interfaces import IReactorTime
from twisted.web import resource, server
from twisted.web.iweb import IRequest

from mailrelay import __version__
from mailrelay.metrics import Metrics
from mailrelay.netaddr import is_local_peer


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
    def __init__(
        self, clock: IReactorTime, started_at: float, queue_depth: Callable[[], dict[str, int]]
    ) -> None:
        super().__init__()
        self._clock = clock
        self._started_at = started_at
        self._queue_depth = queue_depth

    def render_GET(self, request: IRequest) -> bytes:
        depth = self._queue_depth()
        body = {
            "status": "ok",
            "version": __version__,
            "uptime_seconds": round(self._clock.seconds() - self._started_at, 3),
            "queue": {**depth, "total": sum(depth.values())},
        }
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode() + b"\n"


class MetricsResource(_LocalGetResource):
    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        output: bytes = generate_latest(self._metrics.registry)
        return output


class IndexResource(_LocalGetResource):
    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return (
            f"mailrelay {__version__}\n/health  JSON health\n/metrics Prometheus metrics\n".encode()
        )


class NotFoundResource(_LocalGetResource):
    def render_GET(self, request: IRequest) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Not Found\n"


class _Root(resource.Resource):
    def __init__(self, index: resource.Resource) -> None:
        super().__init__()
        self._index = index

    def getChild(self, path: bytes, request: IRequest) -> resource.Resource:
        # Unknown paths go through the same loopback and method checks as known ones.
        return self._index if path == b"" else NotFoundResource()


def build_site(
    clock: IReactorTime,
    started_at: float,
    queue_depth: Callable[[], dict[str, int]],
    metrics: Metrics,
) -> server.Site:
    root = _Root(IndexResource())
    root.putChild(b"health", HealthResource(clock, started_at, queue_depth))
    root.putChild(b"metrics", MetricsResource(metrics))
    site = server.Site(root)
    site.displayTracebacks = False
    return site
