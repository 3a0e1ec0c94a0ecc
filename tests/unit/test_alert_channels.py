"""The webhook and mail alert channels, without sockets: a fake IAgent and task.Clock for the
webhook, fake providers for the mail."""

from __future__ import annotations

import email
import email.header
import email.policy
import json
from typing import Any

import pytest
from twisted.internet import defer, error, task
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailrelay import __version__
from mailrelay.alerts.mail import (
    MAX_IN_FLIGHT,
    PROVIDER_WAIT,
    AlertMailError,
    MailChannel,
    build_message,
)
from mailrelay.alerts.rules import Channel, Notice
from mailrelay.alerts.webhook import (
    MAX_RESPONSE_BODY,
    WebhookChannel,
    WebhookError,
    WebhookOverloaded,
    origin,
)
from mailrelay.outbound.results import IProvider, Kind, OutboundMessage
from tests.unit.fakes import FakeProvider, LogCapture, answer_all, failure_of, result_of

TOKEN = "T0000/B0000/XXXXsecretXXXX"
URL = f"https://hooks.example.com/services/{TOKEN}?key=hush"


def notice(
    kind: Any = "firing",
    summary: str = "5 message(s) waiting for delivery (threshold 3)",
    name: str = "backlog",
) -> Notice:
    return Notice(
        name=name,
        kind=kind,
        summary=summary,
        value=5,
        threshold=3,
        since=1_700_000_000.0,
        at=1_700_000_060.0,
        host="relay.example.com",
    )


# -- a fake HTTP client --------------------------------------------------------------------


class _Consumer:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class BodyTransport:
    """What a response body's protocol sees as its transport (a push producer)."""

    def __init__(self) -> None:
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


@implementer(IResponse)
class FakeResponse:
    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(
        self, code: int, headers: dict[bytes, list[bytes]] | None = None, body: bytes = b""
    ) -> None:
        self.code = code
        self.phrase = b"whatever the server says " + URL.encode()
        self.headers = Headers(headers or {})
        self.length: int | object = UNKNOWN_LENGTH
        self.body = body
        self.protocol: Any = None
        self.transport = BodyTransport()
        self.finish = True  # deliver the whole body and end it at once

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        if self.finish:
            if self.body:
                protocol.dataReceived(self.body)
            protocol.connectionLost(Failure(ResponseDone()))

    def setPreviousResponse(self, response: IResponse) -> None:
        pass


class Request:
    def __init__(self, method: bytes, uri: bytes, headers: Headers, body: bytes) -> None:
        self.method = method
        self.uri = uri
        self.headers = headers
        self.body = body
        self.cancelled = False
        self.deferred: defer.Deferred[IResponse] = defer.Deferred(self._cancel)

    def _cancel(self, d: defer.Deferred[IResponse]) -> None:
        self.cancelled = True
        # What Twisted's HTTP client does when a request is cancelled mid-way.
        d.errback(Failure(error.ConnectionAborted()))

    def respond(self, code: int, **kwargs: Any) -> FakeResponse:
        response = FakeResponse(code, **kwargs)
        self.deferred.callback(response)
        return response


@implementer(IAgent)
class FakeAgent:
    """Records each request; answers from ``script`` (a response code, an exception, or
    None for "leave it pending"), else leaves it pending for the test."""

    def __init__(self, script: list[int | Exception | None] | None = None) -> None:
        self.requests: list[Request] = []
        self.script = list(script or [])

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> defer.Deferred[IResponse]:
        assert headers is not None and bodyProducer is not None
        consumer = _Consumer()
        bodyProducer.startProducing(consumer)
        assert bodyProducer.length == len(consumer.data)
        request = Request(method, uri, headers, consumer.data)
        self.requests.append(request)
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, Exception):
                return defer.fail(step)
            if step is not None:
                request.respond(step)
        return request.deferred


def webhook(
    agent: FakeAgent, clock: task.Clock, retries: int = 3, timeout: float = 10.0, **kw: Any
) -> WebhookChannel:
    return WebhookChannel(clock, URL, timeout=timeout, retries=retries, agent=agent, **kw)


def request_times(
    clock: task.Clock, agent: FakeAgent, until: float, step: float = 0.25
) -> list[float]:
    """Advance the clock in small steps up to ``until``; the time of each new request."""
    times: list[float] = []
    seen = len(agent.requests)
    while clock.seconds() < until:
        clock.advance(step)
        while len(agent.requests) > seen:
            times.append(clock.seconds())
            seen += 1
    return times


def assert_no_secret(text: str) -> None:
    assert TOKEN not in text
    assert "hush" not in text
    assert "/services/" not in text


# -- webhook -------------------------------------------------------------------------------


def test_webhook_is_a_channel() -> None:
    channel: Channel = webhook(FakeAgent(), task.Clock())
    assert channel.name == "webhook"
    verifyObject(IAgent, FakeAgent())


def test_webhook_posts_the_notice_json_with_headers() -> None:
    agent, clock = FakeAgent([200]), task.Clock()
    d = webhook(agent, clock).send(notice())
    assert result_of(d) is None
    (req,) = agent.requests
    assert req.method == b"POST"
    assert req.uri == URL.encode()
    assert req.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert req.headers.getRawHeaders(b"user-agent") == [f"mailrelay/{__version__}".encode()]
    assert json.loads(req.body) == notice().as_json()
    assert json.loads(req.body)["status"] == "firing"


def test_webhook_any_2xx_is_success() -> None:
    agent, clock = FakeAgent([204]), task.Clock()
    assert result_of(webhook(agent, clock).send(notice("resolved"))) is None
    assert json.loads(agent.requests[0].body)["status"] == "resolved"


def test_webhook_retries_5xx_with_exponential_backoff_then_gives_up() -> None:
    agent, clock = FakeAgent([500, 502, 503, 500]), task.Clock()
    channel = webhook(agent, clock, retries=3)
    with LogCapture() as logs:
        d = channel.send(notice())
        times = request_times(clock, agent, until=20)
    # First attempt at 0; retries 1 s, 2 s and 4 s after each failure.
    assert times == [1.0, 3.0, 7.0]
    assert len(agent.requests) == 4
    f = failure_of(d)
    assert f.check(WebhookError)
    message = f.getErrorMessage()
    assert "HTTP 500" in message and "4 attempt" in message
    assert "https://hooks.example.com:443" in message
    assert_no_secret(message)
    # The server's own reason phrase (which quotes the URL here) is never repeated.
    assert "whatever" not in message
    warns = [e for e in logs.events if e.get("event") == "webhook_failed"]
    assert [e["attempt"] for e in warns] == [1, 2, 3, 4]
    assert [e["error"] for e in warns] == [
        "HTTP 500 Internal Server Error",
        "HTTP 502 Bad Gateway",
        "HTTP 503 Service Unavailable",
        "HTTP 500 Internal Server Error",
    ]
    for text in logs.texts():
        assert_no_secret(text)
    assert channel.in_flight == 0
    assert clock.getDelayedCalls() == []


def test_webhook_backoff_base_is_configurable_and_capped() -> None:
    agent, clock = FakeAgent([500] * 10), task.Clock()
    d = webhook(agent, clock, retries=9, backoff=10.0).send(notice())
    times = request_times(clock, agent, until=500, step=1.0)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert gaps == [10, 20, 40, 60, 60, 60, 60, 60, 60]
    assert failure_of(d).check(WebhookError)


def test_webhook_succeeds_after_a_retry() -> None:
    agent, clock = FakeAgent([503, 200]), task.Clock()
    d = webhook(agent, clock).send(notice())
    assert not d.called
    clock.advance(1.0)
    assert result_of(d) is None
    assert len(agent.requests) == 2
    assert agent.requests[0].body == agent.requests[1].body


def test_webhook_retries_408_and_429() -> None:
    agent, clock = FakeAgent([408, 429, 200]), task.Clock()
    d = webhook(agent, clock).send(notice())
    clock.advance(1.0)
    clock.advance(2.0)
    assert result_of(d) is None
    assert len(agent.requests) == 3


def test_webhook_honours_retry_after_up_to_a_cap() -> None:
    agent, clock = FakeAgent(), task.Clock()
    d = webhook(agent, clock, timeout=1000.0).send(notice())
    agent.requests[0].respond(429, headers={b"Retry-After": [b"10"]})
    assert request_times(clock, agent, until=30) == [10.0]  # not the 1 s backoff
    agent.requests[1].respond(503, headers={b"Retry-After": [b"86400"]})  # at t=30
    assert request_times(clock, agent, until=200) == [90.0]  # capped at 60 s
    agent.requests[2].respond(503, headers={b"Retry-After": [b"Wed, 21 Oct 2037 07:28:00 GMT"]})
    assert request_times(clock, agent, until=300) == [204.0]  # a date: the backoff (4 s)
    agent.requests[3].respond(200)
    assert result_of(d) is None


def test_webhook_client_error_gives_up_at_once() -> None:
    agent, clock = FakeAgent([400]), task.Clock()
    with LogCapture() as logs:
        d = webhook(agent, clock).send(notice())
    f = failure_of(d)
    assert f.check(WebhookError)
    assert "HTTP 400 Bad Request" in f.getErrorMessage()
    assert_no_secret(f.getErrorMessage())
    assert len(agent.requests) == 1
    assert clock.getDelayedCalls() == []  # no retry scheduled, no timeout left behind
    assert any(e.get("event") == "webhook_refused" for e in logs.events)


@pytest.mark.parametrize("code", [301, 401, 403, 404, 410])
def test_webhook_redirects_and_other_4xx_are_not_retried(code: int) -> None:
    agent, clock = FakeAgent([code]), task.Clock()
    d = webhook(agent, clock).send(notice())
    assert f"HTTP {code}" in failure_of(d).getErrorMessage()
    clock.advance(100)
    assert len(agent.requests) == 1


def test_webhook_timeout_cancels_the_request_and_retries() -> None:
    agent, clock = FakeAgent([None, 200]), task.Clock()
    with LogCapture() as logs:
        d = webhook(agent, clock, timeout=5.0).send(notice())
        clock.advance(4.9)
        assert not agent.requests[0].cancelled
        clock.advance(0.1)
        assert agent.requests[0].cancelled
        assert len(agent.requests) == 1
        clock.advance(1.0)  # the first backoff
    assert len(agent.requests) == 2
    assert result_of(d) is None
    (warn,) = [e for e in logs.events if e.get("event") == "webhook_failed"]
    assert warn["error"] == "no answer within 5s"


def test_webhook_timeout_covers_reading_the_body() -> None:
    """A server that sends its status line, then dribbles the body forever, is timed out too,
    and its connection dropped."""
    agent, clock = FakeAgent(), task.Clock()
    d = webhook(agent, clock, timeout=5.0, retries=0).send(notice())
    clock.advance(1.0)
    response = FakeResponse(200)
    response.finish = False
    agent.requests[0].deferred.callback(response)
    response.protocol.dataReceived(b"{")
    assert not d.called
    clock.advance(4.0)
    assert response.transport.stopped
    assert "no answer within 5s" in failure_of(d).getErrorMessage()


def test_webhook_gives_up_after_connection_errors_without_leaking_the_url() -> None:
    refused = error.ConnectionRefusedError("Connection refused")
    # An error whose text quotes the URL (some libraries' do): it is scrubbed.
    quoting = RuntimeError(f"cannot reach {URL}")
    agent, clock = FakeAgent([refused, quoting, refused]), task.Clock()
    with LogCapture() as logs:
        d = webhook(agent, clock, retries=2).send(notice())
        clock.advance(1.0)
        clock.advance(2.0)
    f = failure_of(d)
    assert "ConnectionRefusedError" in f.getErrorMessage()
    assert "3 attempt" in f.getErrorMessage()
    errors = [e["error"] for e in logs.events if e.get("event") == "webhook_failed"]
    assert len(errors) == 3
    assert "RuntimeError: cannot reach https://hooks.example.com:443" in errors[1]
    for text in [f.getErrorMessage(), *logs.texts()]:
        assert_no_secret(text)


def test_webhook_with_no_retries_tries_once() -> None:
    agent, clock = FakeAgent([500, 200]), task.Clock()
    d = webhook(agent, clock, retries=0).send(notice())
    assert "1 attempt" in failure_of(d).getErrorMessage()
    clock.advance(100)
    assert len(agent.requests) == 1


def test_webhook_reads_at_most_the_body_cap() -> None:
    agent, clock = FakeAgent(), task.Clock()
    d = webhook(agent, clock).send(notice())
    response = FakeResponse(200)
    response.finish = False
    agent.requests[0].deferred.callback(response)
    chunk = b"x" * 16384
    sent = 0
    while not response.transport.stopped and sent < 10 * MAX_RESPONSE_BODY:
        response.protocol.dataReceived(chunk)
        sent += len(chunk)
    # It stopped the transfer at the cap (not at the end of the body, which never comes) and
    # kept no more than the cap.
    assert sent == MAX_RESPONSE_BODY
    assert response.transport.stopped
    assert sum(len(c) for c in response.protocol._chunks) <= MAX_RESPONSE_BODY
    assert result_of(d) is None
    response.protocol.dataReceived(chunk)  # late data after the stop is ignored
    response.protocol.connectionLost(Failure(error.ConnectionLost()))


def test_webhook_limits_notifications_in_flight() -> None:
    agent, clock = FakeAgent(), task.Clock()
    channel = webhook(agent, clock, max_in_flight=2)
    first = channel.send(notice())
    second = channel.send(notice("repeat"))
    third = channel.send(notice("resolved"))
    f = failure_of(third)
    assert f.check(WebhookOverloaded)
    assert "2 notifications already pending" in f.getErrorMessage()
    assert "backlog (resolved) dropped" in f.getErrorMessage()
    assert_no_secret(f.getErrorMessage())
    assert len(agent.requests) == 2  # the dropped one was never sent
    agent.requests[0].respond(200)
    assert result_of(first) is None
    assert channel.in_flight == 1
    fourth = channel.send(notice("resolved"))
    assert len(agent.requests) == 3
    agent.requests[1].respond(200)
    agent.requests[2].respond(200)
    assert result_of(second) is None and result_of(fourth) is None
    assert channel.in_flight == 0


def test_webhook_retrying_notifications_count_as_in_flight() -> None:
    agent, clock = FakeAgent([500, 500]), task.Clock()
    channel = webhook(agent, clock, max_in_flight=2)
    a, b = channel.send(notice()), channel.send(notice())
    assert channel.in_flight == 2 and not a.called and not b.called  # both waiting to retry
    assert failure_of(channel.send(notice())).check(WebhookOverloaded)
    agent.script = [200, 200]
    clock.advance(1.0)
    assert result_of(a) is None and result_of(b) is None


@pytest.mark.parametrize(
    "url", [f"ftp://h/{TOKEN}", f"https:///{TOKEN}", f"https://h.example/{TOKEN}/é"]
)
def test_webhook_rejects_a_bad_url_without_quoting_it(url: str) -> None:
    with pytest.raises(ValueError) as exc:
        WebhookChannel(task.Clock(), url, 1.0, 1, agent=FakeAgent())
    assert TOKEN not in str(exc.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (URL, "https://hooks.example.com:443"),
        ("http://user:pw@127.0.0.1:8080/x?token=1", "http://127.0.0.1:8080"),
        ("http://[::1]/hook", "http://[::1]:80"),
        ("HTTPS://Example.COM:8443/a/b", "https://example.com:8443"),
    ],
)
def test_origin_keeps_only_scheme_host_and_port(url: str, expected: str) -> None:
    assert origin(url) == expected


# -- mail ----------------------------------------------------------------------------------


@implementer(IProvider)
class Provider(FakeProvider):
    """A FakeProvider with a breaker state."""

    def __init__(self, name: str, kind: Kind = Kind.DELIVERED, state: Any = "closed") -> None:
        super().__init__(name, answer_all(kind))
        self.state = state


class Ids:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"ALERT{self.n:04d}"


def mail_channel(*providers: Provider, clock: task.Clock | None = None) -> MailChannel:
    if clock is None:
        clock = task.Clock()
        clock.advance(1_700_000_061.0)
    return MailChannel(
        clock,
        lambda: providers,
        mail_from="mailrelay@relay.example.com",
        mail_to="admin@example.com",
        hostname="relay.example.com",
        new_id=Ids(),
    )


def parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def assert_wire_safe(raw: bytes) -> None:
    """CRLF lines only, each at most 998 octets, all 7-bit, ending with CRLF."""
    assert raw.endswith(b"\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert raw.isascii()


def test_mail_channel_is_a_channel() -> None:
    channel: Channel = mail_channel()
    assert channel.name == "mail"
    verifyObject(IProvider, Provider("p"))


def test_alert_mail_has_the_headers_and_the_facts() -> None:
    raw = build_message(
        notice(),
        "mailrelay@relay.example.com",
        "admin@example.com",
        "relay.example.com",
        message_id="ALERT0001",
        now=1_700_000_061.0,
    )
    assert_wire_safe(raw)
    head, _, body = raw.partition(b"\r\n\r\n")
    names = [line.split(b":", 1)[0] for line in head.split(b"\r\n")]
    assert names == [
        b"From",
        b"To",
        b"Subject",
        b"Date",
        b"Message-ID",
        b"Auto-Submitted",
        b"X-Mailrelay-Alert",
        b"MIME-Version",
        b"Content-Type",
        b"Content-Transfer-Encoding",
    ]
    msg = parse(raw)
    assert msg["From"] == "mailrelay@relay.example.com"
    assert msg["To"] == "admin@example.com"
    assert msg["Subject"] == (
        "[mailrelay relay.example.com] FIRING backlog: 5 message(s) waiting for delivery"
        " (threshold 3)"
    )
    assert msg["Date"] == "Tue, 14 Nov 2023 22:14:21 +0000"
    assert msg["Message-ID"] == "<ALERT0001@relay.example.com>"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["X-Mailrelay-Alert"] == "backlog"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    text = msg.get_content()
    assert "Status:    FIRING" in text
    assert "Summary:   5 message(s) waiting for delivery (threshold 3)" in text
    assert "Value:     5 (threshold 3)" in text
    assert "Since:     2023-11-14 22:13:20 UTC" in text
    assert "At:        2023-11-14 22:14:20 UTC" in text
    assert "Host:      relay.example.com" in text
    assert "not through mailrelay's queue" in text


def test_alert_mail_resists_header_injection_from_the_summary() -> None:
    evil = "provider p is down (last error: 550 x\r\nBcc: victim@example.net\r\n\r\nhi)"
    raw = build_message(
        notice(summary=evil, name="provider_down:p\r\nX-Evil: 1"),
        "mailrelay@relay.example.com",
        "admin@example.com",
        "relay.example.com",
        message_id="ALERT0001",
        now=0.0,
    )
    assert_wire_safe(raw)
    msg = parse(raw)
    assert msg["Bcc"] is None and msg["X-Evil"] is None
    lines = raw.split(b"\r\n")
    assert not any(line.startswith((b"Bcc", b"X-Evil")) for line in lines)
    assert "550 x Bcc: victim@example.net" in msg["Subject"]
    # The body keeps the text, on its Summary line.
    assert "550 x Bcc: victim@example.net hi)" in msg.get_content()


def test_alert_mail_encodes_a_non_ascii_subject_and_body() -> None:
    summary = "Provider «süd» is down: 451 Überlastet — " + "x" * 1500
    raw = build_message(
        notice(summary=summary),
        "mailrelay@relay.example.com",
        "admin@example.com",
        "relay.example.com",
        message_id="ALERT0001",
        now=0.0,
    )
    assert_wire_safe(raw)  # 7-bit, so body_8bit stays False
    assert b"=?utf-8?" in raw.partition(b"\r\n\r\n")[0]
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"
    assert str(msg["Subject"]).startswith(
        "[mailrelay relay.example.com] FIRING backlog: Provider «süd» is down: 451 Überlastet — x"
    )
    assert len(str(msg["Subject"])) <= 200
    assert summary in msg.get_content()


def test_alert_mail_long_ascii_lines_are_wrapped() -> None:
    raw = build_message(
        notice(summary="y" * 1800),
        "a@example.com",
        "b@example.com",
        "relay.example.com",
        message_id="Q",
        now=0.0,
    )
    assert_wire_safe(raw)
    assert "y" * 1800 in parse(raw).get_content()


def test_mail_goes_to_the_first_closed_provider_skipping_an_open_breaker() -> None:
    down = Provider("down", state="open")
    up = Provider("up")
    spare = Provider("spare")
    with LogCapture() as logs:
        d = mail_channel(down, up, spare).send(notice())
    assert result_of(d) is None
    assert down.delivered == [] and spare.delivered == []
    (message,) = up.delivered
    assert isinstance(message, OutboundMessage)
    assert message.queue_id == "ALERT0001"
    assert message.sender == "mailrelay@relay.example.com"
    assert message.recipients == ("admin@example.com",)
    assert message.body_8bit is False
    assert parse(message.body)["Message-ID"] == "<ALERT0001@relay.example.com>"
    assert parse(message.body)["Date"] == "Tue, 14 Nov 2023 22:14:21 +0000"
    (mailed,) = [e for e in logs.events if e.get("event") == "alert_mailed"]
    assert (mailed["provider"], mailed["queue_id"]) == ("up", "ALERT0001")


def test_mail_fails_over_on_temporary_and_permanent_results() -> None:
    busy = Provider("busy", Kind.TEMPORARY)
    strict = Provider("strict", Kind.PERMANENT)
    last = Provider("last")
    assert result_of(mail_channel(busy, strict, last).send(notice())) is None
    assert [len(p.delivered) for p in (busy, strict, last)] == [1, 1, 1]
    # The same message each time (one Message-ID), not a new one per provider.
    assert busy.delivered[0] == strict.delivered[0] == last.delivered[0]


def test_mail_fails_naming_every_provider_reason() -> None:
    busy = Provider("busy", Kind.TEMPORARY)
    strict = Provider("strict", Kind.PERMANENT)
    down = Provider("down", Kind.TEMPORARY, state="open")
    down.answer = answer_all(Kind.TEMPORARY, "provider down unavailable: circuit breaker open")
    with LogCapture() as logs:
        d = mail_channel(down, busy, strict).send(notice())
    f = failure_of(d)
    assert f.check(AlertMailError)
    assert f.getErrorMessage() == (
        "no provider took the alert mail: busy: 451 4.3.0 try later;"
        " strict: 550 5.1.1 no such user;"
        " down: provider down unavailable: circuit breaker open"
    )
    failed = [e["provider"] for e in logs.events if e.get("event") == "alert_mail_failed"]
    assert failed == ["busy", "strict", "down"]


def test_mail_with_no_closed_breaker_still_tries_each_provider_in_order() -> None:
    first = Provider("first", Kind.TEMPORARY, state="open")
    probing = Provider("probing", state="half-open")
    assert result_of(mail_channel(first, probing).send(notice())) is None
    assert len(first.delivered) == 1 and len(probing.delivered) == 1


def test_mail_waits_for_a_slow_provider_before_the_next() -> None:
    slow = Provider("slow", Kind.TEMPORARY)
    slow.hold = True
    other = Provider("other")
    d = mail_channel(slow, other).send(notice())
    assert not d.called and other.delivered == []
    slow.release()
    assert result_of(d) is None
    assert len(other.delivered) == 1


def test_mail_moves_on_from_a_provider_that_never_answers() -> None:
    clock = task.Clock()
    hung = Provider("hung")
    hung.hold = True  # its delivery never ends
    other = Provider("other")
    d = mail_channel(hung, other, clock=clock).send(notice())
    clock.advance(PROVIDER_WAIT - 1)
    assert not d.called and other.delivered == []
    clock.advance(1)
    assert result_of(d) is None
    assert len(other.delivered) == 1
    assert clock.getDelayedCalls() == []


def test_mail_sends_at_most_max_in_flight_at_once() -> None:
    hung = Provider("hung")
    hung.hold = True
    channel = mail_channel(hung)
    pending = [channel.send(notice()) for _ in range(MAX_IN_FLIGHT)]
    f = failure_of(channel.send(notice()))
    assert f.check(AlertMailError) and "dropped" in f.getErrorMessage()
    assert len(hung.delivered) == MAX_IN_FLIGHT
    hung.hold = False
    hung.release()
    assert all(result_of(d) is None for d in pending)
    assert result_of(channel.send(notice())) is None


def test_mail_reads_the_chain_at_each_send() -> None:
    chain: list[Provider] = [Provider("a", Kind.TEMPORARY)]
    channel = MailChannel(
        task.Clock(),
        lambda: chain,
        mail_from="m@example.com",
        mail_to="admin@example.com",
        hostname="h.example.com",
        new_id=Ids(),
    )
    assert failure_of(channel.send(notice())).check(AlertMailError)
    chain.append(Provider("b"))
    assert result_of(channel.send(notice())) is None
    assert len(chain[1].delivered) == 1
    assert chain[1].delivered[0].queue_id == "ALERT0002"


def test_mail_with_an_empty_chain_fails() -> None:
    f = failure_of(mail_channel().send(notice()))
    assert f.check(AlertMailError)
    assert "no provider" in f.getErrorMessage()


def test_mail_survives_a_provider_that_breaks_its_contract() -> None:
    broken = Provider("broken")
    broken.deliver = lambda message, progress=None: defer.fail(RuntimeError("boom"))  # type: ignore[method-assign]
    good = Provider("good")
    assert result_of(mail_channel(broken, good).send(notice())) is None
    assert len(good.delivered) == 1
