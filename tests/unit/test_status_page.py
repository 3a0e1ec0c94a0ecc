"""The status page at /: rendered from a StatusView, and served by the web resource."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import attrs
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from mailrelay import __version__
from mailrelay.alerts.rules import ActiveAlert
from mailrelay.health import Health
from mailrelay.metrics import Metrics
from mailrelay.monitor import Monitor, ProviderHealth, QueueDepth, QueueSample, Reading
from mailrelay.outbound.activity import Activity, FailedRecipient
from mailrelay.outbound.results import FailureClass, Kind, ProviderStatus, RecipientResult
from mailrelay.queue import QueuedMessage
from mailrelay.web import Operations, build_site
from mailrelay.web.status import StatusView, nice_ticks, render_status_page

NOW = 1_700_000_000.0
HOSTILE = "<script>alert(1)</script>"


def provider(name: str, state: str = "closed", **overrides: object) -> ProviderHealth:
    fields: dict[str, object] = {
        "name": name,
        "kind": "smtp",
        "state": state,
        "open_connections": 0,
        "next_probe_at": None,
        "last_success_at": None,
        "last_error_at": None,
        "last_error_class": None,
        "last_error": None,
        "in_default_chain": True,
    }
    fields.update(overrides)
    return ProviderHealth(**fields)  # type: ignore[arg-type]


def reading(**overrides: object) -> Reading:
    fields: dict[str, object] = {
        "at": NOW,
        "started_at": NOW - 3725,
        "depth": QueueDepth(ready=3, deferred=2, active=1, held=4, failed=7),
        "oldest_received_at": NOW - 125,
        "free_bytes": 50 * 2**30,
        "providers": (
            provider("primary", open_connections=2, last_success_at=NOW - 12),
            provider(
                "backup",
                "open",
                next_probe_at=NOW + 20,
                last_error_at=NOW - 5,
                last_error_class="connect",
                last_error="connection refused",
            ),
            provider("spare", "half-open", kind="maildir", in_default_chain=False),
        ),
        "accepting": True,
    }
    fields.update(overrides)
    return Reading(**fields)  # type: ignore[arg-type]


def history(count: int, **latest: int) -> tuple[QueueSample, ...]:
    """``count`` samples 10 s apart ending at NOW; the last one has the ``latest`` values."""
    samples = [
        QueueSample(NOW - 10 * (count - 1 - i), ready=i % 5, deferred=1, active=0, held=0)
        for i in range(count)
    ]
    if samples:
        samples[-1] = attrs.evolve(samples[-1], **latest)
    return tuple(samples)


def view(**overrides: object) -> StatusView:
    fields: dict[str, object] = {
        "reading": reading(),
        "health": Health("degraded", ("provider backup is down (open)",)),
        "alerts": (ActiveAlert("backlog", NOW - 60, "120 message(s) waiting", 120, 100),),
        "history": history(30, ready=5, deferred=2, active=1, held=4),
        "failures": (
            FailedRecipient(NOW - 30, "Q1", "bob@example.com", "backup", False, "connect", "x"),
            FailedRecipient(NOW - 90, "Q2", "eve@example.com", "primary", True, "rcpt", "550 no"),
        ),
        "oldest": (
            QueuedMessage("QOLD", NOW - 125, "deferred", NOW + 300),
            QueuedMessage("QNEW", NOW - 3, "ready", None),
        ),
        "hostname": "relay.example.com",
        "refresh_seconds": 10,
    }
    fields.update(overrides)
    return StatusView(**fields)  # type: ignore[arg-type]


def page(**overrides: object) -> str:
    return render_status_page(view(**overrides)).decode("utf-8")


def element(text: str, tag: str, **attributes: str) -> str:
    """The first ``<tag ...>...</tag>`` whose start tag carries ``attributes`` (no nesting of
    the same tag inside, which holds for the rows and groups looked at here)."""
    wanted = "".join(
        rf'(?=[^>]*\s{k.replace("_", "-")}="{re.escape(v)}")' for k, v in attributes.items()
    )
    match = re.search(rf"<{tag}\b{wanted}[^>]*>.*?</{tag}>", text, re.S)
    assert match is not None, f"no <{tag} {attributes}> in the page"
    return match.group(0)


class _TextOf(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def text_of(fragment: str) -> str:
    parser = _TextOf()
    parser.feed(fragment)
    return " ".join(" ".join(parser.parts).split())


# -- the rendered page -----------------------------------------------------------------------


def test_page_is_a_utf8_html5_document_that_refreshes_itself() -> None:
    body = render_status_page(view(refresh_seconds=15))
    text = body.decode("utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert '<meta http-equiv="refresh" content="15">' in text
    assert '<meta charset="utf-8">' in text


def test_header_names_host_version_uptime_health_and_reasons() -> None:
    text = page()
    header = element(text, "header")
    assert "relay.example.com" in header
    assert __version__ in header
    assert "up 62m" in header  # 3725 s
    badge = element(text, "span", id="health")
    assert 'data-status="degraded"' in badge and "status-degraded" in badge
    assert "provider backup is down (open)" in element(text, "ul", id="reasons")
    assert "2023-11-14 22:13:20 UTC" in header  # the reading's time, UTC


def test_queue_counts_and_oldest_age_are_shown() -> None:
    text = page()
    for name, value in (("ready", 3), ("deferred", 2), ("active", 1), ("held", 4), ("failed", 7)):
        stat = element(text, "div", id=f"count-{name}")
        assert f'data-value="{value}"' in stat
        assert text_of(stat) == f"{value} {name}"
    assert text_of(element(text, "div", id="oldest-age")) == "2m oldest age"


def test_providers_table_has_one_row_per_provider_with_its_breaker_state() -> None:
    text = page()
    table = element(text, "table", id="providers")
    assert len(re.findall(r"<tr data-provider=", table)) == 3
    primary = element(table, "tr", data_provider="primary")
    assert 'data-state="closed"' in primary and "state-closed" in primary
    assert "12s ago" in text_of(primary) and ">2<" in primary  # last success, connections
    backup = element(table, "tr", data_provider="backup")
    assert "state-open" in backup
    assert "in 20s" in text_of(backup)  # next probe
    assert "connect connection refused" in text_of(backup)
    spare = element(table, "tr", data_provider="spare")
    assert "state-half-open" in spare and "maildir" in spare and "<td>no</td>" in spare


def test_chart_series_carry_the_latest_sample() -> None:
    text = page()
    chart = element(text, "svg", id="queue-chart")
    for name, latest in (("ready", 5), ("deferred", 2), ("active", 1), ("held", 4)):
        group = element(chart, "g", data_series=name)
        assert f'data-latest="{latest}"' in group
        assert f"<title>{name}: {latest} now</title>" in group
        assert "<path d=" in group
    assert "collecting data" not in chart
    assert "min ago" in chart  # 290 s of samples: ticks in minutes
    assert re.search(r">\s*0\s*</text>", chart)  # the y scale starts at 0


def test_chart_with_no_or_one_sample_says_it_is_collecting_data() -> None:
    for samples in ((), history(1, ready=9)):
        chart = element(page(history=samples), "svg", id="queue-chart")
        assert "collecting data…" in chart
        assert "<path" not in chart
    one = element(page(history=history(1, ready=9)), "svg", id="queue-chart")
    assert 'data-latest="9"' in element(one, "g", data_series="ready")


def test_chart_with_all_zero_history_has_a_scale_and_no_nan() -> None:
    zeros = tuple(QueueSample(NOW - 10 * i, 0, 0, 0, 0) for i in range(5, -1, -1))
    chart = element(page(history=zeros), "svg", id="queue-chart")
    assert "nan" not in chart.lower() and "inf" not in chart.lower()
    assert "no mail queued in this period" in chart
    assert 'data-latest="0"' in element(chart, "g", data_series="ready")


def test_chart_with_large_values_uses_round_ticks_and_keeps_the_plot_inside() -> None:
    samples = history(60, ready=100_000, deferred=0)
    chart = element(page(history=samples), "svg", id="queue-chart")
    assert 'data-latest="100000"' in element(chart, "g", data_series="ready")
    assert "100\u202f000" in chart  # the top tick
    for y in re.findall(r"[ ML][\d.]+,(-?[\d.]+)", chart):
        assert 0 <= float(y) <= 300


def test_chart_of_an_hour_at_a_fine_interval_is_downsampled() -> None:
    samples = tuple(QueueSample(NOW - 0.2 * i, 1, 0, 0, 0) for i in range(18000, -1, -1))
    text = page(history=samples)
    assert len(text) < 200_000
    assert 'data-latest="1"' in element(text, "g", data_series="ready")


def test_nice_ticks_are_round_and_cover_the_maximum() -> None:
    assert nice_ticks(0) == [0, 1, 2, 3, 4]
    assert nice_ticks(7) == [0, 2, 4, 6, 8]
    assert nice_ticks(100_000) == [0, 25_000, 50_000, 75_000, 100_000]
    assert nice_ticks(123) == [0, 50, 100, 150]


def test_hostile_reply_recipient_and_hostname_are_rendered_as_text() -> None:
    hostile = FailedRecipient(NOW - 1, "Q<b>", f"{HOSTILE}@x.example", "p", True, "rcpt", HOSTILE)
    text = page(
        failures=(hostile,),
        hostname=f'"><{HOSTILE}',
        reading=reading(providers=(provider('a"b<i>', last_error=HOSTILE, last_error_class="x"),)),
    )
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>" not in text and "<i>" not in text
    assert 'data-provider="a&quot;b&lt;i&gt;"' in text


def test_long_replies_are_clipped_with_the_full_text_in_a_title() -> None:
    reply = "451 " + "x" * 300 + ' "<end>'
    text = page(failures=(FailedRecipient(NOW, "Q", "r@x", "p", False, None, reply),))
    row = element(element(text, "table", id="failures"), "tr", data_queue_id="Q")
    assert (
        f'title="{reply.replace(chr(34), "&quot;").replace("<", "&lt;").replace(">", "&gt;")}"'
        in row
    )
    assert "x" * 196 + "…" in row and "x" * 300 not in text_of(row)


def test_page_loads_nothing_from_elsewhere_and_runs_no_script() -> None:
    text = page().lower()
    assert "<script" not in text
    assert "http://" not in text and "https://" not in text
    assert "src=" not in text and "url(" not in text and "@import" not in text


def test_failures_table_lists_time_id_recipient_provider_outcome_class_and_reply() -> None:
    table = element(page(), "table", id="failures")
    q1 = text_of(element(table, "tr", data_queue_id="Q1"))
    assert q1.startswith("30s ago")
    assert "bob@example.com backup temporary connect x" in q1
    q2 = text_of(element(table, "tr", data_queue_id="Q2"))
    assert "eve@example.com primary permanent rcpt 550 no" in q2


def test_oldest_table_lists_id_age_state_and_next_attempt() -> None:
    table = element(page(), "table", id="oldest")
    old = text_of(element(table, "tr", data_queue_id="QOLD"))
    assert old.startswith("QOLD 2m ") and "deferred in 5m" in old
    new = text_of(element(table, "tr", data_queue_id="QNEW"))
    assert new.startswith("QNEW 3s") and new.endswith("ready –")


def test_empty_tables_and_no_alerts_say_so() -> None:
    text = page(failures=(), oldest=(), alerts=(), reading=reading(providers=()))
    assert "No recent failures." in element(text, "table", id="failures")
    assert "The queue is empty." in element(text, "table", id="oldest")
    assert "No provider configured" in element(text, "table", id="providers")
    assert "No alert firing." in element(text, "ul", id="alerts")


def test_active_alerts_are_listed() -> None:
    alerts = element(page(), "ul", id="alerts")
    assert 'data-alert="backlog"' in alerts and "120 message(s) waiting" in alerts


# -- through the web resource, from a real Monitor -------------------------------------------


class FakeQueue:
    def __init__(self) -> None:
        self.messages = [QueuedMessage("QA", 900.0, "deferred", 1300.0)]

    def depth(self) -> dict[str, int]:
        return {"ready": 5, "deferred": 1, "active": 2, "held": 0}

    def oldest(self, count: int) -> list[QueuedMessage]:
        return self.messages[:count]


@attrs.frozen
class FakeProvider:
    name: str
    state: str

    def status(self) -> ProviderStatus:
        probe = 1030.0 if self.state == "open" else None
        return ProviderStatus(self.state, 1 if self.state == "closed" else 0, probe)  # type: ignore[arg-type]


@attrs.frozen
class FakeRouter:
    providers: tuple[FakeProvider, ...]
    chain: tuple[FakeProvider, ...]


class FakeAlerts:
    def active(self) -> list[ActiveAlert]:
        return []


LOCAL = IPv4Address("TCP", "127.0.0.1", 40000)


def site_with_monitor() -> tuple[object, Clock]:
    clock = Clock()
    clock.advance(1000)
    up, down = FakeProvider("up", "closed"), FakeProvider("down", "open")
    activity = Activity(clock)
    activity.record(
        "down",
        "QA",
        [RecipientResult("a@x", Kind.TEMPORARY, f"421 {HOSTILE}", failure=FailureClass.CONNECT)],
    )
    monitor = Monitor(
        clock,
        FakeQueue(),
        FakeRouter((up, down), (up, down)),
        activity,
        provider_kinds={"up": "smtp", "down": "smtp"},
        free_bytes=lambda: 10 * 2**30,
        count_failed=lambda: defer.succeed(0),
        accepting=lambda: True,
        interval=1.0,
    )
    monitor.start()
    clock.advance(1)
    clock.advance(1)
    ops = Operations(monitor=monitor, alerts=FakeAlerts(), min_free_space=0, hostname="h.test")
    return build_site(ops, Metrics()), clock


def get(site: object, client: object = LOCAL) -> DummyRequest:
    request = DummyRequest([b""])
    request.client = client
    resource = site.getResourceFor(request)  # type: ignore[attr-defined]
    body = resource.render(request)
    if isinstance(body, bytes):
        request.write(body)
    return request


def test_resource_serves_the_page_from_live_monitor_data_with_a_strict_csp() -> None:
    site, _ = site_with_monitor()
    request = get(site)
    assert request.responseCode in (None, 200)
    headers = request.responseHeaders
    assert headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    assert headers.getRawHeaders(b"content-security-policy") == [
        b"default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none';"
        b" base-uri 'none'; form-action 'none'"
    ]
    text = b"".join(request.written).decode()
    assert 'data-state="closed"' in element(text, "tr", data_provider="up")
    assert 'data-state="open"' in element(text, "tr", data_provider="down")
    assert 'data-value="5"' in element(text, "div", id="count-ready")
    chart = element(text, "svg", id="queue-chart")
    assert 'data-latest="2"' in element(chart, "g", data_series="active")
    assert "<path d=" in chart  # three samples from the monitor's loop
    assert "<script" not in text and "&lt;script&gt;" in text
    assert "QA" in element(text, "table", id="oldest")
    assert '<meta http-equiv="refresh" content="5">' in text


def test_resource_refuses_a_client_that_is_not_on_loopback() -> None:
    site, _ = site_with_monitor()
    request = get(site, IPv4Address("TCP", "10.0.0.1", 40000))
    assert request.responseCode == 403
    assert b"<html" not in b"".join(request.written)
