"""Alert notifications reaching real peers on loopback.

- The webhook channel, with the real Agent, POSTs to a real twisted.web receiver in the same
  reactor: the JSON of a firing and a resolved notice; and against a receiver that answers 503
  twice, it retries and gets through on the third POST.
- The whole relay (buildService, in-process) whose only provider is an aiosmtpd upstream that
  answers 451 to every ordinary recipient: five messages sit deferred in the queue, the backlog
  alert fires, and its mail to the admin reaches that same upstream directly while the five
  are still waiting.

Waiting is done on Deferreds or by polling with a deadline while the reactor runs; never by
sleeping for an event.
"""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

import pytest
from OpenSSL import SSL
from twisted.internet import defer, reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort, IOpenSSLContextFactory, IReactorSSL
from twisted.internet.protocol import ServerFactory
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from mailrelay import __version__
from mailrelay.alerts.rules import Notice
from mailrelay.alerts.webhook import WebhookChannel, WebhookError
from mailrelay.config import parse
from mailrelay.service import buildService
from tests.support.certs import ServerCert, session_pki
from tests.support.net import free_port, port_accepts
from tests.support.polling import poll
from tests.support.upstream import UpstreamProcess

pytestmark = pytest.mark.integration

TOKEN = "hook-token-0123456789"
HANG = 0  # a receiver's "answer": none at all


def notice(kind: Any, at: float) -> Notice:
    return Notice(
        name="backlog",
        kind=kind,
        summary="120 message(s) waiting for delivery (threshold 100)",
        value=120 if kind == "firing" else 10,
        threshold=100,
        since=1_700_000_000.0,
        at=at,
        host="relay.test",
    )


class _Hook(Resource):
    """Records each POST; answers with the next of ``codes`` (200 once they run out; HANG:
    never)."""

    isLeaf = True

    def __init__(self, codes: list[int]) -> None:
        super().__init__()
        self.codes = list(codes)
        self.posts: list[tuple[bytes, dict[bytes, Sequence[bytes]], bytes]] = []

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        headers = dict(request.requestHeaders.getAllRawHeaders())
        self.posts.append((request.uri, headers, request.content.read()))
        code = self.codes.pop(0) if self.codes else 200
        if code == HANG:
            return NOT_DONE_YET
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain")
        return b"ok\n" if code == 200 else b"busy\n"


@implementer(IOpenSSLContextFactory)
class _ServerContext:
    """A TLS server context from PEM files (Twisted's CertificateOptions would want
    pyOpenSSL certificate objects, which pyOpenSSL now deprecates)."""

    def __init__(self, cert: ServerCert) -> None:
        self._context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self._context.use_certificate_chain_file(str(cert.chain))
        self._context.use_privatekey_file(str(cert.key))

    def getContext(self) -> SSL.Context:
        return self._context


class WebhookReceiver:
    """A twisted.web server on 127.0.0.1, port chosen by the kernel; HTTPS with ``tls``."""

    def __init__(self, codes: list[int], tls: ServerCert | None = None) -> None:
        self.hook = _Hook(codes)
        root = Resource()
        services = Resource()
        root.putChild(b"services", services)
        services.putChild(TOKEN.encode(), self.hook)
        # WrappingFactory keeps track of the open connections, so the test can wait for the
        # client's (non-persistent) connections to be closed before the reactor is checked.
        self.factory = WrappingFactory(Site(root))
        # (WrappingFactory is a ServerFactory; Twisted's annotation of it is narrower.)
        factory = cast(ServerFactory, self.factory)
        self._port: IListeningPort
        if tls is None:
            self._port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        else:
            self._port = cast(IReactorSSL, reactor).listenSSL(
                0, factory, _ServerContext(tls), interface="127.0.0.1"
            )
        port = cast(IPv4Address, self._port.getHost()).port
        scheme = "http" if tls is None else "https"
        self.url = f"{scheme}://127.0.0.1:{port}/services/{TOKEN}?channel=ops"

    async def close(self) -> None:
        await defer.maybeDeferred(self._port.stopListening)
        await poll(lambda: not self.factory.protocols, 5, "webhook connections to close")


class WebhookDelivery(TestCase):
    timeout = 30

    async def receiver(self, codes: list[int], tls: ServerCert | None = None) -> WebhookReceiver:
        receiver = WebhookReceiver(codes, tls)
        self.addCleanup(receiver.close)
        return receiver

    async def test_receiver_gets_the_json_of_a_firing_and_a_resolved_notice(self) -> None:
        receiver = await self.receiver([])
        channel = WebhookChannel(reactor, receiver.url, timeout=5.0, retries=0)
        firing, resolved = notice("firing", 1_700_000_000.0), notice("resolved", 1_700_000_600.0)
        await channel.send(firing)
        await channel.send(resolved)
        posts = receiver.hook.posts
        assert [json.loads(body) for _, _, body in posts] == [
            firing.as_json(),
            resolved.as_json(),
        ]
        assert [json.loads(body)["status"] for _, _, body in posts] == ["firing", "resolved"]
        uri, headers, _ = posts[0]
        assert uri == f"/services/{TOKEN}?channel=ops".encode()
        assert headers[b"Content-Type"] == [b"application/json"]
        assert headers[b"User-Agent"] == [f"mailrelay/{__version__}".encode()]
        assert channel.in_flight == 0

    async def test_503_twice_then_200_takes_three_posts(self) -> None:
        receiver = await self.receiver([503, 503])
        channel = WebhookChannel(reactor, receiver.url, timeout=5.0, retries=3, backoff=0.2)
        started = time.monotonic()
        await channel.send(notice("firing", 1_700_000_000.0))
        elapsed = time.monotonic() - started
        assert len(receiver.hook.posts) == 3
        assert len({body for _, _, body in receiver.hook.posts}) == 1  # the same JSON each time
        # Backoff 0.2 s, then 0.4 s: the retries waited, and not much longer.
        assert 0.6 <= elapsed < 5.0, elapsed

    async def test_gives_up_on_404_without_naming_the_token(self) -> None:
        receiver = await self.receiver([404])
        channel = WebhookChannel(reactor, receiver.url, timeout=5.0, retries=3, backoff=0.2)
        with pytest.raises(Exception) as exc:
            await channel.send(notice("firing", 1_700_000_000.0))
        assert "HTTP 404" in str(exc.value)
        assert TOKEN not in str(exc.value)
        assert len(receiver.hook.posts) == 1

    async def test_a_receiver_that_never_answers_is_timed_out_and_dropped(self) -> None:
        receiver = await self.receiver([HANG, HANG])
        channel = WebhookChannel(reactor, receiver.url, timeout=0.3, retries=1, backoff=0.1)
        with pytest.raises(WebhookError) as exc:
            await channel.send(notice("firing", 1_700_000_000.0))
        assert "gave up after 2 attempt(s): no answer within 0.3s" in str(exc.value)
        assert len(receiver.hook.posts) == 2
        # Each timed-out request's connection was dropped by the client.
        await poll(lambda: not receiver.factory.protocols, 5, "the connections to be dropped")

    async def test_connection_refused_is_retried_then_reported(self) -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}/services/{TOKEN}"
        channel = WebhookChannel(reactor, url, timeout=5.0, retries=2, backoff=0.1)
        with pytest.raises(Exception) as exc:
            await channel.send(notice("firing", 1_700_000_000.0))
        message = str(exc.value)
        assert "3 attempt(s)" in message and "ConnectionRefused" in message, message
        assert TOKEN not in message

    async def test_https_certificate_is_verified(self) -> None:
        """The default Agent checks the receiver's certificate: one from a CA the system does
        not trust (our test CA) is refused, and the JSON is never sent to it."""
        receiver = await self.receiver([], tls=session_pki().server("valid"))
        channel = WebhookChannel(reactor, receiver.url, timeout=5.0, retries=1, backoff=0.1)
        with pytest.raises(WebhookError) as exc:
            await channel.send(notice("firing", 1_700_000_000.0))
        message = str(exc.value)
        assert "certificate verify failed" in message, message
        assert message.startswith(f"webhook {receiver.url.split('/services')[0]}: gave up")
        assert TOKEN not in message
        assert receiver.hook.posts == []


def submit(port: int, recipient: str, n: int) -> None:
    """Send one message with smtplib (blocking: run it in a thread)."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.com", recipient, f"blocked {n}"
    msg.set_content("This one waits in the queue.\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        refused = smtp.send_message(msg)
    assert refused == {}


def get_health(port: int) -> dict[str, Any]:
    """/health as JSON, whatever its status code (503 when failing)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        body = e.read()
    document: dict[str, Any] = json.loads(body)
    return document


class AdminMailWhileQueueBlocked(TestCase):
    timeout = 60

    async def test_admin_mail_reaches_the_upstream_while_the_queue_is_blocked(self) -> None:
        # Every recipient starting with "blocked" gets 451 from the upstream; the admin's is
        # taken. So the five messages are deferred, and the same upstream takes the alert.
        upstream = UpstreamProcess(rcpt_4xx_prefix="blocked")
        upstream.__enter__()
        self.addCleanup(upstream.cleanup)
        tmp = Path(tempfile.mkdtemp(prefix="mailrelay-alerts-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        smtp_port, http_port = free_port(), free_port()
        config = parse(
            {
                "smtp": {
                    "listen": [f"tcp:{smtp_port}:interface=127.0.0.1"],
                    "hostname": "relay.test",
                },
                "http": {"listen": f"tcp:{http_port}:interface=127.0.0.1"},
                "spool": {
                    "path": str(tmp / "spool"),
                    "retry_initial": 300.0,
                    "min_free_space": 0,
                },
                "providers": [
                    {
                        "name": "upstream",
                        "kind": "smtp",
                        "host": "127.0.0.1",
                        "port": upstream.port,
                        "tls": "none",
                    }
                ],
                "routing": {"default": ["upstream"]},
                "alerts": {
                    "backlog": 3,
                    "check_interval": 0.2,
                    "oldest_age": 0,
                    "disk_free": 0,
                    "mail_to": "admin@example.com",
                },
            }
        )
        top = buildService(reactor, config)
        top.startService()
        self.addCleanup(top.stopService)
        await poll(
            lambda: port_accepts("127.0.0.1", http_port, timeout=0.2),
            10,
            f"the relay's HTTP listener on port {http_port}",
        )

        for n in range(5):
            await threads.deferToThread(submit, smtp_port, f"blocked{n}@example.com", n)

        def admin_mails() -> list[dict[str, Any]]:
            return [m for m in upstream.messages() if m["rcpt_tos"] == ["admin@example.com"]]

        await poll(admin_mails, 20, "the admin's alert mail at the upstream")
        # Each message's first attempt may still be finishing: wait until all five are
        # deferred (their retry is 300 s away, so they stay that way).
        health: dict[str, Any] = {}

        async def all_deferred() -> bool:
            health.update(await threads.deferToThread(get_health, http_port))
            return bool(health["queue"]["deferred"] == 5)

        deadline = time.monotonic() + 10
        while not await all_deferred():
            assert time.monotonic() < deadline, f"not all five deferred: {health['queue']}"
            await task.deferLater(reactor, 0.05)

        (mail,) = admin_mails()
        assert mail["mail_from"] == "mailrelay@relay.test"
        alert = message_from_bytes(mail["body"], policy=policy.default)
        subject = str(alert["Subject"])
        # "[mailrelay relay.test] FIRING backlog: 4 message(s) waiting ... (threshold 3)": 4
        # or 5, depending on whether a reading came between the 4th and the 5th message.
        assert re.fullmatch(
            r"\[mailrelay relay\.test\] FIRING backlog: [45] message\(s\) waiting for delivery"
            r" \(threshold 3\)",
            subject,
        ), subject
        assert alert["X-Mailrelay-Alert"] == "backlog"
        assert alert["Auto-Submitted"] == "auto-generated"
        assert "not through mailrelay's queue" in alert.get_content()
        # The queue is still blocked: all five wait for their retry, nothing else is queued
        # (the alert mail never went through the spool), and the upstream stored no other mail.
        assert health["queue"]["queued"] == 5, health["queue"]
        assert upstream.message_count() == 1
