"""Health and metrics resources: loopback clients only, GET and HEAD only."""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from mailrelay.metrics import Metrics
from mailrelay.web import build_site

LOCAL = IPv4Address("TCP", "127.0.0.1", 40000)


def make_site() -> tuple[Site, Clock, Metrics]:
    clock = Clock()
    clock.advance(1000)
    metrics = Metrics()
    site = build_site(clock, 1000.0, lambda: {"ready": 2, "deferred": 1, "active": 0}, metrics)
    return site, clock, metrics


def render(site: Site, path: bytes, method: bytes = b"GET", client: object = LOCAL) -> DummyRequest:
    request = DummyRequest(path.strip(b"/").split(b"/") if path != b"/" else [b""])
    request.method = method
    request.client = client
    resource = site.getResourceFor(request)
    body = resource.render(request)
    if isinstance(body, bytes):
        request.write(body)
    return request


def body_of(request: DummyRequest) -> bytes:
    return b"".join(request.written)


def test_health_reports_status_uptime_and_queue_depth() -> None:
    site, clock, _ = make_site()
    clock.advance(42)
    request = render(site, b"/health")
    assert request.responseCode in (None, 200)
    health = json.loads(body_of(request))
    assert health["status"] == "ok"
    assert health["uptime_seconds"] == 42
    assert health["queue"] == {"ready": 2, "deferred": 1, "active": 0, "total": 3}
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]


def test_metrics_are_prometheus_text_and_move_with_counters() -> None:
    site, _, metrics = make_site()
    metrics.messages_received.inc(3)
    text = body_of(render(site, b"/metrics")).decode()
    assert "mailrelay_messages_received_total 3.0" in text
    assert 'mailrelay_info{version="' in text


def test_queue_depth_gauge_reads_the_queue_at_scrape_time() -> None:
    metrics = Metrics()
    depth = {"ready": 5, "deferred": 0, "active": 1}
    metrics.watch_queue(lambda: depth)
    assert metrics.registry.get_sample_value("mailrelay_queue_depth", {"state": "ready"}) == 5
    depth["ready"] = 7
    assert metrics.registry.get_sample_value("mailrelay_queue_depth", {"state": "ready"}) == 7


@pytest.mark.parametrize("path", [b"/health", b"/metrics", b"/", b"/missing"])
@pytest.mark.parametrize(
    "client",
    [
        IPv4Address("TCP", "10.0.0.5", 1),
        IPv6Address("TCP", "2001:db8::1", 1),
        IPv6Address("TCP", "::ffff:192.0.2.1", 1),
    ],
)
def test_non_loopback_clients_get_403(path: bytes, client: object) -> None:
    site, _, _ = make_site()
    request = render(site, path, client=client)
    assert request.responseCode == 403


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH"])
def test_other_methods_get_405(method: bytes) -> None:
    site, _, _ = make_site()
    request = render(site, b"/health", method=method)
    assert request.responseCode == 405
    assert request.responseHeaders.getRawHeaders(b"allow") == [b"GET, HEAD"]


def test_ipv6_loopback_is_local() -> None:
    site, _, _ = make_site()
    request = render(site, b"/health", client=IPv6Address("TCP", "::1", 1))
    assert json.loads(body_of(request))["status"] == "ok"


def test_unknown_path_is_404_for_local_clients() -> None:
    site, _, _ = make_site()
    assert render(site, b"/missing").responseCode == 404
