"""The HTTP side: /health (ok, degraded, failing), /health/live, /health/ready, /metrics;
loopback clients only, GET and HEAD only."""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from mailrelay.alerts.rules import BacklogRule
from mailrelay.outbound.results import FailureClass, Kind, ProviderError, RecipientResult
from mailrelay.web import build_site
from tests.unit.ops_fakes import OpsRig, ops_rig

LOCAL = IPv4Address("TCP", "127.0.0.1", 40000)


def make_site(rig: OpsRig | None = None, min_free_space: int = 0) -> tuple[Site, OpsRig]:
    rig = rig or ops_rig()
    site = build_site(rig.operations(min_free_space=min_free_space), rig.metrics)
    return site, rig


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


def health(site: Site, path: bytes = b"/health") -> tuple[int, dict[str, object]]:
    request = render(site, path)
    return request.responseCode or 200, json.loads(body_of(request))


def test_health_reports_status_uptime_queue_and_providers() -> None:
    site, rig = make_site()
    rig.queue.add(2)
    rig.queue.add(1, state="deferred", received_at=rig.clock.seconds() - 30)
    rig.clock.advance(42)
    rig.activity.record(
        "primary", "Q1", [RecipientResult("a@example.com", Kind.DELIVERED, "250 2.0.0 Ok")]
    )
    code, body = health(site)
    assert code == 200
    assert body["status"] == "ok" and body["reasons"] == []
    assert body["uptime_seconds"] == 42
    assert body["queue"] == {
        "ready": 2,
        "deferred": 1,
        "active": 0,
        "held": 0,
        "failed": 0,
        "queued": 3,
        "oldest_age_seconds": 72.0,
    }
    providers = body["providers"]
    assert isinstance(providers, list)
    assert [p["name"] for p in providers] == ["primary", "backup"]
    assert providers[0]["breaker"] == "closed"
    assert providers[0]["last_success_at"] == "2027-01-15T08:00:42Z"
    assert providers[0]["last_error_class"] is None
    assert body["disk"] == {"free_bytes": 10 * 2**30, "min_free_space": 0}


def test_one_provider_down_is_degraded_with_its_last_error() -> None:
    site, rig = make_site()
    rig.router.chain[0].state = "open"
    rig.activity.record(
        "primary",
        "Q1",
        [
            RecipientResult(
                "a@example.com",
                Kind.TEMPORARY,
                "connection refused",
                failure=FailureClass.CONNECT,
            )
        ],
    )
    code, body = health(site)
    assert code == 200
    assert body["status"] == "degraded"
    assert body["reasons"] == ["provider primary is down (open)"]
    providers = body["providers"]
    assert isinstance(providers, list)
    assert providers[0]["last_error_class"] == "connect"
    assert providers[0]["last_error"] == "connection refused"


def test_every_provider_of_the_default_chain_down_is_failing_503_and_back() -> None:
    site, rig = make_site(ops_rig(providers=("primary", "backup"), others=("special",)))
    primary, backup = rig.router.chain
    primary.state, backup.state = "open", "half-open"
    code, body = health(site)
    assert code == 503
    assert body["status"] == "failing"
    assert body["reasons"] == [
        "every provider of the default chain is down: primary (open), backup (half-open)"
    ]
    # Mail is still accepted into the spool: ready stays 200, only health says failing.
    assert render(site, b"/health/ready").responseCode in (None, 200)
    backup.state = "closed"
    code, body = health(site)
    assert (code, body["status"]) == (200, "degraded")
    primary.state = "closed"
    assert health(site)[1]["status"] == "ok"


def test_a_provider_outside_the_default_chain_does_not_make_it_fail() -> None:
    site, rig = make_site(ops_rig(providers=("primary",), others=("special",)))
    rig.router.others[0].state = "open"
    code, body = health(site)
    assert (code, body["status"]) == (200, "degraded")


def test_disk_below_min_free_space_is_failing_and_not_ready() -> None:
    site, rig = make_site(min_free_space=100 * 2**20)
    rig.free[0] = 50 * 2**20
    code, body = health(site)
    assert code == 503 and body["status"] == "failing"
    reasons = body["reasons"]
    assert isinstance(reasons, list) and "new mail is refused" in reasons[0]
    ready = render(site, b"/health/ready")
    assert ready.responseCode == 503
    assert json.loads(body_of(ready)) == {"status": "not ready"}
    rig.free[0] = 200 * 2**20
    assert health(site)[0] == 200
    assert render(site, b"/health/ready").responseCode in (None, 200)


def test_not_accepting_is_failing_and_not_ready_but_live() -> None:
    site, rig = make_site()
    rig.accepting[0] = False
    assert health(site)[0] == 503
    assert render(site, b"/health/ready").responseCode == 503
    live = render(site, b"/health/live")
    assert live.responseCode in (None, 200)
    assert json.loads(body_of(live)) == {"status": "alive"}


def test_a_firing_alert_makes_health_degraded() -> None:
    rig = ops_rig()
    manager = rig.alert_manager([BacklogRule(2, 0.8)], [])
    site = build_site(rig.operations(alerts=manager), rig.metrics)
    rig.queue.add(3)
    rig.monitor.sample()
    code, body = health(site)
    assert (code, body["status"]) == (200, "degraded")
    assert body["reasons"] == ["3 message(s) waiting for delivery (threshold 2)"]
    alerts = body["alerts"]
    assert isinstance(alerts, list) and alerts[0]["alert"] == "backlog"


def test_health_with_a_trailing_slash_is_the_same() -> None:
    site, _ = make_site()
    assert health(site, b"/health/")[1]["status"] == "ok"


def test_metrics_are_prometheus_text_and_move_with_counters() -> None:
    site, rig = make_site()
    rig.metrics.messages_received.inc(3)
    text = body_of(render(site, b"/metrics")).decode()
    assert "mailrelay_messages_received_total 3.0" in text
    assert 'mailrelay_info{version="' in text


def test_queue_gauges_read_the_state_at_scrape_time() -> None:
    rig = ops_rig()
    rig.queue.add(5, received_at=rig.clock.seconds() - 120)
    rig.failed[0] = 4
    rig.monitor.sample()  # counts failed/
    value = rig.metrics.registry.get_sample_value
    assert value("mailrelay_queue_depth", {"state": "ready"}) == 5
    assert value("mailrelay_queue_depth", {"state": "failed"}) == 4
    assert value("mailrelay_queue_oldest_age_seconds") == 120
    assert value("mailrelay_spool_free_bytes") == 10 * 2**30
    rig.queue.add(2)
    rig.free[0] = None
    assert value("mailrelay_queue_depth", {"state": "ready"}) == 7
    assert value("mailrelay_spool_free_bytes") == -1
    rig.queue.drain()
    assert value("mailrelay_queue_oldest_age_seconds") == 0


@pytest.mark.parametrize(
    "path", [b"/health", b"/health/live", b"/health/ready", b"/metrics", b"/", b"/missing"]
)
@pytest.mark.parametrize(
    "client",
    [
        IPv4Address("TCP", "10.0.0.5", 1),
        IPv6Address("TCP", "2001:db8::1", 1),
        IPv6Address("TCP", "::ffff:192.0.2.1", 1),
    ],
)
def test_non_loopback_clients_get_403(path: bytes, client: object) -> None:
    site, _ = make_site()
    request = render(site, path, client=client)
    assert request.responseCode == 403


@pytest.mark.parametrize("path", [b"/health", b"/health/ready", b"/"])
@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH"])
def test_other_methods_get_405(path: bytes, method: bytes) -> None:
    site, _ = make_site()
    request = render(site, path, method=method)
    assert request.responseCode == 405
    assert request.responseHeaders.getRawHeaders(b"allow") == [b"GET, HEAD"]


def test_ipv6_loopback_is_local() -> None:
    site, _ = make_site()
    request = render(site, b"/health", client=IPv6Address("TCP", "::1", 1))
    assert json.loads(body_of(request))["status"] == "ok"


@pytest.mark.parametrize("path", [b"/missing", b"/health/missing"])
def test_unknown_path_is_404_for_local_clients(path: bytes) -> None:
    site, _ = make_site()
    assert render(site, path).responseCode == 404


def test_a_failed_connection_setup_is_the_last_error_and_skips_are_not() -> None:
    site, rig = make_site()
    primary = rig.router.chain[0]
    rig.activity.record(
        "primary",
        "Q1",
        [RecipientResult("a@example.com", Kind.TEMPORARY, "451 later", failure=FailureClass.RCPT)],
    )
    rig.clock.advance(5)
    # The breaker opened from a probe with no message waiting: the pool reports why.
    primary.state = "open"
    primary.last_setup_error = ProviderError(rig.clock.seconds(), "connect", "refused")
    rig.clock.advance(5)
    skipped = "provider primary unavailable: circuit breaker open"
    rig.activity.record(
        "primary",
        "Q2",
        [
            RecipientResult(
                "b@example.com", Kind.TEMPORARY, skipped, failure=FailureClass.UNAVAILABLE
            )
        ],
    )
    providers = health(site)[1]["providers"]
    assert isinstance(providers, list)
    assert (providers[0]["last_error_class"], providers[0]["last_error"]) == ("connect", "refused")
    assert [f.queue_id for f in rig.activity.recent_failures()] == ["Q1"]


def render_with_host(site: Site, path: bytes, host: bytes) -> DummyRequest:
    request = DummyRequest(path.strip(b"/").split(b"/"))
    request.client = LOCAL
    request.requestHeaders.setRawHeaders(b"host", [host])
    resource = site.getResourceFor(request)
    body = resource.render(request)
    if isinstance(body, bytes):
        request.write(body)
    return request


@pytest.mark.parametrize(
    "host", [b"127.0.0.1:8025", b"localhost:8025", b"[::1]:8025", b"127.0.0.1", b"localhost"]
)
def test_a_host_header_naming_this_machine_is_served(host: bytes) -> None:
    site, _ = make_site()
    assert render_with_host(site, b"/health", host).responseCode in (None, 200)


@pytest.mark.parametrize(
    "host", [b"evil.example:8025", b"127.0.0.1.nip.io", b"[2001:db8::1]:8025", b"evil.example"]
)
@pytest.mark.parametrize("path", [b"/", b"/health", b"/metrics"])
def test_a_foreign_host_header_is_refused_against_dns_rebinding(host: bytes, path: bytes) -> None:
    site, _ = make_site()
    request = render_with_host(site, path, host)
    assert request.responseCode == 403
    assert b"Host must be this machine" in body_of(request)


@pytest.mark.parametrize("path", [b"/health/live/x", b"/metrics/x", b"/health/ready/x"])
def test_paths_below_a_leaf_are_404(path: bytes) -> None:
    site, _ = make_site()
    request = render(site, path)
    assert request.responseCode == 404
    assert request.responseHeaders.getRawHeaders(b"cache-control") == [b"no-store"]
    assert request.responseHeaders.getRawHeaders(b"x-content-type-options") == [b"nosniff"]


def test_a_request_body_is_never_stored() -> None:
    site, _ = make_site()
    request = site.requestFactory(DummyChannel(), False)
    request.gotLength(50 * 2**20)
    for _ in range(10):
        request.handleContentChunk(b"x" * 2**20)
    assert request.content.getvalue() == b""


def test_a_queue_that_is_not_delivering_is_failing() -> None:
    rig = ops_rig()
    delivering = [False]
    rig.monitor._delivering = lambda: delivering[0]
    site = build_site(rig.operations(), rig.metrics)
    code, body = health(site)
    assert (code, body["status"], body["delivering"]) == (503, "failing", False)
    reasons = body["reasons"]
    assert isinstance(reasons, list) and reasons[0].startswith("the delivery queue is not running")
    delivering[0] = True
    assert health(site)[:1] == (200,)


def test_a_reading_that_fails_does_not_stop_the_monitor() -> None:
    rig = ops_rig(interval=10)
    readings: list[int] = []
    rig.monitor.subscribe(lambda r: readings.append(r.depth.queued))
    rig.monitor.start()
    real_oldest = rig.queue.oldest
    rig.queue.oldest = lambda count: 1 / 0  # type: ignore[assignment,method-assign]
    rig.clock.advance(10)
    rig.queue.oldest = real_oldest  # type: ignore[method-assign]
    rig.queue.add(2)
    rig.clock.advance(10)
    assert readings == [0, 2]
