"""Upstream faults, shared/reliability.md cases 21-31, against real processes on loopback.

Every case goes through a Router over real SMTPProviders: a faulty primary and, where the
case says "next provider", a healthy backup (an smtp-sink without faults, which captures what
it takes). The faults come from Postfix's smtp-sink (-Q/-q/-r/-f/-w), the scripted aiosmtpd
upstream (greetings, replies, hangs, TLS, AUTH) and our fault proxy (resets, stalls,
STARTTLS stripping and injection).

Not tested here (being built elsewhere): the on_temporary = "defer" policy, the circuit
breaker, batching and rate limits. Every provider uses the defaults for those.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from prometheus_client import generate_latest
from twisted.internet import reactor
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from mailrelay.config import ProviderConfig
from mailrelay.metrics import Metrics
from mailrelay.outbound.pool import SMTPProvider
from mailrelay.outbound.results import IProvider, Kind, OutboundMessage, Progress, RecipientResult
from mailrelay.outbound.router import RoutedResult, Router
from tests.support.certs import ServerKind, session_pki
from tests.support.faultproxy import FaultProxy
from tests.support.loopback_reactor import LoopbackReactor
from tests.support.net import free_port
from tests.support.smtpsink import SmtpSink
from tests.support.upstream import UpstreamProcess

pytestmark = pytest.mark.integration

PASSWORD_ENV = "MAILRELAY_FAULTS_TEST_PASSWORD"
USER = "relay"
# Distinctive, so that finding it anywhere can only mean a leak.
SECRET = "Zebra-7f3c-Correct-Horse-91d2"
REMOTE_NAME = "smtp.example.test"  # not loopback: no "AUTH in clear to loopback" exemption

# Stage timeouts for cases that are not about timeouts: generous for loopback, short enough
# that a wrong wait shows up as a failure, not a stuck suite.
NORMAL = 3.0
# The stage a hang case is about gets this; a test asserts it ended well before NORMAL.
SHORT = 0.5


def provider_config(name: str, port: int, **options: Any) -> ProviderConfig:
    values: dict[str, Any] = {
        "name": name,
        "kind": "smtp",
        "host": "127.0.0.1",
        "port": port,
        "tls": "none",
        "helo": "relay.test",
        "connect_timeout": NORMAL,
        "greeting_timeout": NORMAL,
        "command_timeout": NORMAL,
        "data_timeout": NORMAL,
        "final_timeout": NORMAL,
    }
    values.update(options)
    return ProviderConfig(**values)


@implementer(IProvider)
class Recording:
    """An SMTPProvider that keeps every result it gave (the router keeps only the last
    provider's result for a recipient)."""

    def __init__(self, provider: SMTPProvider) -> None:
        self.provider = provider
        self.results: list[RecipientResult] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.provider, name)

    @property
    def name(self) -> str:
        return self.provider.name

    @property
    def on_temporary(self) -> str:
        return self.provider.on_temporary

    @property
    def on_permanent(self) -> str:
        return self.provider.on_permanent

    def deliver(self, message: OutboundMessage, progress: Progress | None = None) -> Any:
        def record(results: list[RecipientResult]) -> list[RecipientResult]:
            self.results.extend(results)
            return results

        return self.provider.deliver(message, progress).addCallback(record)

    def close(self) -> Any:
        return self.provider.close()

    def result_for(self, recipient: str) -> RecipientResult:
        (result,) = [r for r in self.results if r.recipient == recipient]
        return result


class FaultTestCase(TestCase):
    def setUp(self) -> None:
        self.pki = session_pki()
        self.metrics = Metrics()
        os.environ[PASSWORD_ENV] = SECRET
        self.addCleanup(os.environ.pop, PASSWORD_ENV, None)
        self.serial = 0

    # -- upstreams ------------------------------------------------------------------------------

    def aiosmtpd(self, tls: ServerKind | None = None, **options: Any) -> UpstreamProcess:
        if tls is not None:
            cert = self.pki.server(tls)
            options.update(tls_cert=cert.chain, tls_key=cert.key)
        upstream = UpstreamProcess(**options).start()
        self.addCleanup(upstream.__exit__, None, None, None)
        return upstream

    def sink(self, **options: Any) -> SmtpSink:
        sink = SmtpSink(**options).start()
        self.addCleanup(sink.cleanup)
        return sink

    def proxy(self, port: int, **options: Any) -> FaultProxy:
        proxy = FaultProxy(port, **options).start()
        self.addCleanup(proxy.stop)
        return proxy

    # -- the relay side -------------------------------------------------------------------------

    def provider(self, name: str, port: int, via: Any = reactor, **options: Any) -> Recording:
        provider = Recording(
            SMTPProvider(provider_config(name, port, **options), via, self.metrics)
        )
        # Registered after the upstreams: cleanups run last-in first-out, so providers close
        # (QUIT) while their upstreams still answer.
        self.addCleanup(provider.close)
        return provider

    def tls_provider(
        self, name: str, port: int, tls: str = "starttls", **options: Any
    ) -> Recording:
        options.setdefault("ca_file", str(self.pki.ca_file))
        options.setdefault("username", USER)
        options.setdefault("password_env", PASSWORD_ENV)
        return self.provider(name, port, tls=tls, **options)

    def message(self, *recipients: str) -> OutboundMessage:
        self.serial += 1
        subject = f"{self.id().rsplit('.', 1)[-1]} {self.serial}"
        return OutboundMessage(
            queue_id=f"Q{self.serial}",
            sender="app@example.com",
            recipients=recipients or ("user@example.com",),
            body=f"Subject: {subject}\r\n\r\nfault test\r\n".encode(),
        )

    async def route(
        self, chain: Sequence[Recording], message: OutboundMessage
    ) -> dict[str, RoutedResult]:
        routed = await Router(chain).deliver(message)
        assert [r.result.recipient for r in routed] == list(message.recipients)
        return {r.result.recipient: r for r in routed}

    def assert_failed_over(
        self,
        routed: dict[str, RoutedResult],
        primary: Recording,
        backup: SmtpSink,
        message: OutboundMessage,
        *,
        uncertain: bool | None = False,
    ) -> None:
        """Every recipient: temporary at the primary (never permanent, "never a bounce"),
        then delivered by the backup, which holds exactly this message."""
        for recipient in message.recipients:
            first = primary.result_for(recipient)
            assert first.kind is Kind.TEMPORARY, first
            if uncertain is not None:
                assert first.uncertain is uncertain, first
            assert routed[recipient].provider == "backup", routed[recipient]
            assert routed[recipient].result.kind is Kind.DELIVERED, routed[recipient]
        [captured] = backup.messages()
        assert captured.rcpt_tos == message.recipients
        assert captured.body == message.body.replace(b"\r\n", b"\n")

    async def fail_over(
        self, primary: Recording, *recipients: str, uncertain: bool | None = False
    ) -> dict[str, RoutedResult]:
        """Route one message over primary -> backup and check that it failed over."""
        backup_sink = self.sink()
        backup = self.provider("backup", backup_sink.port)
        message = self.message(*recipients)
        routed = await self.route([primary, backup], message)
        self.assert_failed_over(routed, primary, backup_sink, message, uncertain=uncertain)
        return routed

    async def timed_fail_over(self, primary: Recording, *, uncertain: bool | None = False) -> float:
        started = time.monotonic()
        await self.fail_over(primary, uncertain=uncertain)
        elapsed = time.monotonic() - started
        # Ended by the SHORT stage timeout under test, not by another stage's NORMAL one.
        assert SHORT * 0.9 <= elapsed < NORMAL, elapsed
        return elapsed


@contextlib.contextmanager
def unaccepting_listener() -> Iterator[int]:
    """A port whose accept queue is full: a new connection attempt hangs in SYN_SENT (Linux
    drops the SYN) until the client's connect timeout, which is what a black-holed upstream
    looks like."""
    server = socket.create_server(("127.0.0.1", 0), backlog=0)
    port: int = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        with pytest.raises(TimeoutError):  # the precondition, checked
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def _everything_text(events: list[LogEvent]) -> str:
    parts = []
    for event in events:
        parts.append(formatEvent(event))
        parts.append(repr({k: v for k, v in event.items() if k != "log_logger"}))
        failure = event.get("log_failure")
        if failure is not None:
            parts.append(failure.getTraceback())
    return "\n".join(parts)


# -- 21 -----------------------------------------------------------------------------------------


class ConnectFailures(FaultTestCase):
    """21. Connection refused or connect timeout [next provider; if none, defer]."""

    async def test_refused_fails_over_to_the_next_provider(self) -> None:
        await self.fail_over(self.provider("primary", free_port()))

    async def test_refused_with_no_next_provider_is_temporary(self) -> None:
        primary = self.provider("primary", free_port())
        message = self.message()
        routed = await self.route([primary], message)
        result = routed[message.recipients[0]]
        assert (result.provider, result.result.kind) == ("primary", Kind.TEMPORARY)

    async def test_closed_before_the_greeting(self) -> None:
        sink = self.sink(disconnect=["CONNECT"])  # smtp-sink -q CONNECT: EOF, no greeting
        await self.fail_over(self.provider("primary", sink.port))

    async def test_connect_timeout_fails_over_within_the_connect_timeout(self) -> None:
        with unaccepting_listener() as port:
            await self.timed_fail_over(self.provider("primary", port, connect_timeout=SHORT))


# -- 22 -----------------------------------------------------------------------------------------


class RefusingGreeting(FaultTestCase):
    """22. 421 or 5xx greeting [next provider; never a bounce]."""

    async def test_421_greeting(self) -> None:
        upstream = self.aiosmtpd(greeting="421 4.3.2 not now")
        await self.fail_over(self.provider("primary", upstream.port))
        assert upstream.connection_count() == 1

    async def test_554_greeting(self) -> None:
        upstream = self.aiosmtpd(greeting="554 5.3.2 no service here")
        await self.fail_over(self.provider("primary", upstream.port))
        assert upstream.message_count() == 0

    async def test_smtp_sink_421_on_connect(self) -> None:
        await self.fail_over(self.provider("primary", self.sink(disconnect_421=["CONNECT"]).port))


# -- 23 -----------------------------------------------------------------------------------------


class TransientReplies(FaultTestCase):
    """23. 4xx on MAIL, RCPT or DATA; 421 mid-session [those recipients go to the next
    provider by default; never lost]."""

    async def sink_fails_over(self, **faults: list[str]) -> SmtpSink:
        sink = self.sink(**faults)
        await self.fail_over(self.provider("primary", sink.port), "a@example.com", "b@example.com")
        return sink

    async def test_4xx_to_mail(self) -> None:
        await self.sink_fails_over(soft_reject=["MAIL"])

    async def test_4xx_to_rcpt(self) -> None:
        await self.sink_fails_over(soft_reject=["RCPT"])

    async def test_4xx_to_data(self) -> None:
        await self.sink_fails_over(soft_reject=["DATA"])

    async def test_4xx_to_the_final_dot(self) -> None:
        sink = await self.sink_fails_over(soft_reject=["."])
        assert sink.message_count() == 1  # it got the body, and said 4xx to it

    async def test_421_and_disconnect_after_mail(self) -> None:
        await self.sink_fails_over(disconnect_421=["MAIL"])

    async def test_421_and_disconnect_after_rcpt(self) -> None:
        await self.sink_fails_over(disconnect_421=["RCPT"])

    async def test_421_and_disconnect_after_data(self) -> None:
        await self.sink_fails_over(disconnect_421=["DATA"])

    async def test_421_reply_to_mail_then_close(self) -> None:
        upstream = self.aiosmtpd(replies={"MAIL": "421 4.3.2 shutting down"})
        await self.fail_over(self.provider("primary", upstream.port))

    async def test_452_to_the_data_command(self) -> None:
        upstream = self.aiosmtpd(replies={"DATA": "452 4.3.1 insufficient storage"})
        await self.fail_over(self.provider("primary", upstream.port))
        assert upstream.message_count() == 0

    async def test_4xx_to_one_rcpt_moves_only_that_recipient(self) -> None:
        upstream = self.aiosmtpd(rcpt_4xx_prefix="busy")
        primary = self.provider("primary", upstream.port)
        backup_sink = self.sink()
        backup = self.provider("backup", backup_sink.port)
        message = self.message("ok@example.com", "busy@example.com")
        routed = await self.route([primary, backup], message)
        assert routed["ok@example.com"].provider == "primary"
        assert routed["ok@example.com"].result.kind is Kind.DELIVERED
        assert primary.result_for("busy@example.com").kind is Kind.TEMPORARY
        assert routed["busy@example.com"].provider == "backup"
        assert routed["busy@example.com"].result.kind is Kind.DELIVERED
        [stored] = upstream.messages()
        assert stored["rcpt_tos"] == ["ok@example.com"]
        [captured] = backup_sink.messages()
        assert captured.rcpt_tos == ("busy@example.com",)


# -- 24 -----------------------------------------------------------------------------------------


class PermanentRecipient(FaultTestCase):
    """24. 5xx on one RCPT [that recipient fails permanently; the others are delivered]."""

    async def test_5xx_to_one_rcpt_fails_only_that_recipient(self) -> None:
        upstream = self.aiosmtpd(replies={"RCPT:bad": "550 5.1.1 no such user"})
        primary = self.provider("primary", upstream.port)
        backup_sink = self.sink()
        backup = self.provider("backup", backup_sink.port)
        message = self.message("ok1@example.com", "bad@example.com", "ok2@example.com")
        routed = await self.route([primary, backup], message)
        assert {r: (v.provider, v.result.kind) for r, v in routed.items()} == {
            "ok1@example.com": ("primary", Kind.DELIVERED),
            "bad@example.com": ("primary", Kind.PERMANENT),
            "ok2@example.com": ("primary", Kind.DELIVERED),
        }
        assert routed["bad@example.com"].result.reply.startswith("550 5.1.1")
        [stored] = upstream.messages()
        assert stored["rcpt_tos"] == ["ok1@example.com", "ok2@example.com"]
        assert backup_sink.message_count() == 0  # a permanent failure is not tried elsewhere

    async def test_5xx_to_every_rcpt_fails_them_all_without_data(self) -> None:
        sink = self.sink(hard_reject=["RCPT"])
        primary = self.provider("primary", sink.port)
        backup_sink = self.sink()
        message = self.message("a@example.com", "b@example.com")
        routed = await self.route([primary, self.provider("backup", backup_sink.port)], message)
        assert {(v.provider, v.result.kind) for v in routed.values()} == {
            ("primary", Kind.PERMANENT)
        }
        assert sink.message_count() == 0
        assert backup_sink.message_count() == 0


# -- 25 -----------------------------------------------------------------------------------------


class PermanentAfterData(FaultTestCase):
    """25. 5xx after DATA, all recipients rejected [permanent; never silently dropped]."""

    async def assert_permanent_for_all(self, port: int) -> dict[str, RoutedResult]:
        primary = self.provider("primary", port)
        backup_sink = self.sink()
        message = self.message("a@example.com", "b@example.com")
        routed = await self.route([primary, self.provider("backup", backup_sink.port)], message)
        for result in routed.values():
            assert (result.provider, result.result.kind) == ("primary", Kind.PERMANENT), result
            assert result.result.reply[:1] == "5"
        assert backup_sink.message_count() == 0
        return routed

    async def test_554_after_the_final_dot(self) -> None:
        upstream = self.aiosmtpd(replies={"DOT": "554 5.6.0 content rejected"})
        routed = await self.assert_permanent_for_all(upstream.port)
        assert all(r.result.reply == "554 5.6.0 content rejected" for r in routed.values())
        assert upstream.message_count() == 0

    async def test_smtp_sink_5xx_after_the_final_dot(self) -> None:
        await self.assert_permanent_for_all(self.sink(hard_reject=["."]).port)

    async def test_smtp_sink_5xx_to_the_data_command(self) -> None:
        await self.assert_permanent_for_all(self.sink(hard_reject=["DATA"]).port)


# -- 26 -----------------------------------------------------------------------------------------


class LostMidTransaction(FaultTestCase):
    """26. Reset or EOF mid-transaction [treated as 451; after the final dot, a possible
    duplicate (uncertain)]."""

    async def test_eof_after_the_data_command_is_temporary_and_certain(self) -> None:
        sink = self.sink(disconnect=["DATA"])
        await self.fail_over(self.provider("primary", sink.port), uncertain=False)
        assert sink.message_count() == 0

    async def test_eof_after_the_final_dot_is_uncertain(self) -> None:
        sink = self.sink(disconnect=["."])
        await self.fail_over(self.provider("primary", sink.port), uncertain=True)
        assert sink.message_count() == 1  # the upstream has it too: a possible duplicate

    async def test_421_after_the_final_dot_is_temporary_and_certain(self) -> None:
        # A reply, even a 421, says the upstream did not take it: no duplicate.
        sink = self.sink(disconnect_421=["."])
        await self.fail_over(self.provider("primary", sink.port), uncertain=False)

    async def test_reset_before_the_final_dot_is_temporary_and_certain(self) -> None:
        upstream = self.aiosmtpd()
        proxy = self.proxy(upstream.port, mode="reset", at="client:RCPT")
        await self.fail_over(self.provider("primary", proxy.port), uncertain=False)
        assert proxy.records()[0].triggered
        assert upstream.message_count() == 0

    async def test_reset_after_the_final_dot_is_uncertain(self) -> None:
        upstream = self.aiosmtpd()
        proxy = self.proxy(upstream.port, mode="reset", at="final-dot")
        await self.fail_over(self.provider("primary", proxy.port), uncertain=True)
        upstream.wait_for_messages(1)  # the upstream took it: the duplicate is real


# -- 27 -----------------------------------------------------------------------------------------


class Hangs(FaultTestCase):
    """27. Upstream that hangs at greeting, during DATA, or after the final dot [per-stage
    timeouts, then abort and fail over]."""

    async def test_hang_at_greeting(self) -> None:
        upstream = self.aiosmtpd(hang_at="greeting")
        await self.timed_fail_over(self.provider("primary", upstream.port, greeting_timeout=SHORT))

    async def test_silent_greeting_through_the_proxy(self) -> None:
        proxy = self.proxy(self.sink().port, mode="stall", at="connect")
        await self.timed_fail_over(self.provider("primary", proxy.port, greeting_timeout=SHORT))

    async def test_no_reply_to_the_data_command(self) -> None:
        # Pipelined (aiosmtpd advertises PIPELINING): MAIL and RCPT are answered, DATA never.
        upstream = self.aiosmtpd(hang_at="data-command")
        await self.timed_fail_over(self.provider("primary", upstream.port, data_timeout=SHORT))
        assert upstream.message_count() == 0

    async def test_no_reply_to_the_data_command_without_pipelining(self) -> None:
        # smtp-sink -w: waits before answering DATA. -p: no PIPELINING (pipelined, smtp-sink
        # would hold back the MAIL and RCPT replies as well).
        sink = self.sink(data_delay=10, extra_args=["-p"])
        await self.timed_fail_over(self.provider("primary", sink.port, data_timeout=SHORT))
        assert sink.message_count() == 0

    async def test_hang_during_data(self) -> None:
        upstream = self.aiosmtpd(hang_at="data")
        primary = self.provider(
            "primary", upstream.port, data_timeout=SHORT / 2, final_timeout=SHORT / 2
        )
        # The body was written, so whether it arrived is unknown to the relay: not asserted.
        await self.timed_fail_over(primary, uncertain=None)
        assert upstream.message_count() == 0

    async def test_stall_after_354_through_the_proxy(self) -> None:
        upstream = self.aiosmtpd()
        proxy = self.proxy(upstream.port, mode="stall", at="server:354")
        primary = self.provider(
            "primary", proxy.port, data_timeout=SHORT / 2, final_timeout=SHORT / 2
        )
        await self.timed_fail_over(primary, uncertain=None)
        assert upstream.message_count() == 0

    async def test_hang_after_the_final_dot(self) -> None:
        upstream = self.aiosmtpd(hang_at="final")
        primary = self.provider(
            "primary", upstream.port, data_timeout=SHORT / 2, final_timeout=SHORT / 2
        )
        await self.timed_fail_over(primary, uncertain=True)
        assert upstream.message_count() == 1  # stored, never acknowledged: the duplicate

    async def test_stall_after_the_final_dot_through_the_proxy(self) -> None:
        upstream = self.aiosmtpd()
        proxy = self.proxy(upstream.port, mode="stall", at="final-dot")
        primary = self.provider(
            "primary", proxy.port, data_timeout=SHORT / 2, final_timeout=SHORT / 2
        )
        await self.timed_fail_over(primary, uncertain=True)
        upstream.wait_for_messages(1)


# -- 28 -----------------------------------------------------------------------------------------


class TLSFailures(FaultTestCase):
    """28. STARTTLS missing or stripped, handshake failure, untrusted or wrong-name
    certificate [temporary failure, next provider; never plaintext, never AUTH in clear]."""

    def assert_nothing_in_clear(self, upstream: UpstreamProcess) -> None:
        assert upstream.message_count() == 0
        assert [a for a in upstream.auth_attempts() if not a[1]] == []

    async def test_verified_starttls_and_one_auth_deliver(self) -> None:
        """The control: the same setup with nothing wrong delivers at the primary."""
        upstream = self.aiosmtpd(tls="valid", auth=(USER, SECRET))
        primary = self.tls_provider("primary", upstream.port)
        message = self.message()
        routed = await self.route([primary], message)
        assert routed[message.recipients[0]].result.kind is Kind.DELIVERED
        [(connection, over_tls, _)] = upstream.auth_attempts()
        assert (connection, over_tls) == (1, True)

    async def test_starttls_not_offered(self) -> None:
        upstream = self.aiosmtpd(auth=(USER, SECRET), auth_in_clear=True)
        await self.fail_over(self.tls_provider("primary", upstream.port))
        self.assert_nothing_in_clear(upstream)
        assert upstream.auth_attempts() == []

    async def test_starttls_stripped_by_a_man_in_the_middle(self) -> None:
        # The upstream would even take AUTH in clear: the bait a downgraded client bites.
        upstream = self.aiosmtpd(tls="valid", auth=(USER, SECRET), auth_in_clear=True)
        proxy = self.proxy(upstream.port, mode="strip_starttls")
        await self.fail_over(self.tls_provider("primary", proxy.port))
        self.assert_nothing_in_clear(upstream)
        sent = proxy.records()[0].client_plaintext.upper()
        assert b"AUTH" not in sent and b"MAIL FROM" not in sent

    async def cert_fails_over(self, kind: ServerKind) -> None:
        upstream = self.aiosmtpd(tls=kind, auth=(USER, SECRET))
        await self.fail_over(self.tls_provider("primary", upstream.port))
        self.assert_nothing_in_clear(upstream)
        assert upstream.auth_attempts() == []
        assert upstream.connection_count() == 1  # no second try without TLS

    async def test_untrusted_certificate(self) -> None:
        await self.cert_fails_over("untrusted")

    async def test_wrong_name_certificate(self) -> None:
        await self.cert_fails_over("wrong_name")

    async def test_expired_certificate(self) -> None:
        await self.cert_fails_over("expired")

    async def test_reset_during_the_handshake(self) -> None:
        upstream = self.aiosmtpd(tls="valid", auth=(USER, SECRET))
        proxy = self.proxy(upstream.port, mode="reset", at="starttls")
        await self.fail_over(self.tls_provider("primary", proxy.port))
        self.assert_nothing_in_clear(upstream)

    async def test_handshake_stalled_after_starttls_ready(self) -> None:
        upstream = self.aiosmtpd(tls="valid", auth=(USER, SECRET))
        proxy = self.proxy(upstream.port, mode="stall", at="starttls")
        primary = self.tls_provider("primary", proxy.port, command_timeout=SHORT)
        await self.timed_fail_over(primary)
        self.assert_nothing_in_clear(upstream)

    async def test_required_client_certificate_missing(self) -> None:
        upstream = self.aiosmtpd(tls="valid", auth=(USER, SECRET), tls_client_ca=self.pki.ca_file)
        await self.fail_over(self.tls_provider("primary", upstream.port))
        self.assert_nothing_in_clear(upstream)

    async def test_client_certificate_for_mutual_tls_delivers(self) -> None:
        upstream = self.aiosmtpd(tls="valid", auth=(USER, SECRET), tls_client_ca=self.pki.ca_file)
        primary = self.tls_provider(
            "primary",
            upstream.port,
            client_cert=str(self.pki.client.cert),
            client_key=str(self.pki.client.key),
        )
        message = self.message()
        routed = await self.route([primary], message)
        assert routed[message.recipients[0]].result.kind is Kind.DELIVERED
        assert upstream.message_count() == 1

    async def test_implicit_tls_to_a_plaintext_server(self) -> None:
        upstream = self.aiosmtpd(auth=(USER, SECRET), auth_in_clear=True)
        await self.fail_over(self.tls_provider("primary", upstream.port, tls="implicit"))
        self.assert_nothing_in_clear(upstream)

    async def test_no_auth_in_clear_to_a_remote_host(self) -> None:
        """tls = "none" (insecure) with a login, to a host that is not loopback: the upstream
        offers AUTH in clear, the relay must not take the bait."""
        upstream = self.aiosmtpd(auth=(USER, SECRET), auth_in_clear=True)
        primary = self.tls_provider(
            "primary",
            upstream.port,
            tls="none",
            insecure=True,
            host=REMOTE_NAME,
            via=LoopbackReactor(reactor),
        )
        await self.fail_over(primary)
        self.assert_nothing_in_clear(upstream)
        assert upstream.auth_attempts() == []


# -- 29 -----------------------------------------------------------------------------------------


class StartTLSInjection(FaultTestCase):
    """29. Extra bytes after "220 ready for TLS" [abort]."""

    async def test_bytes_injected_after_220_ready_abort_the_session(self) -> None:
        upstream = self.aiosmtpd(tls="valid", auth=(USER, SECRET))
        proxy = self.proxy(upstream.port, mode="inject_after_starttls")
        await self.fail_over(self.tls_provider("primary", proxy.port))
        [record] = proxy.records()
        assert record.tls_started  # the injection happened...
        # ...and the relay sent nothing after STARTTLS: no handshake, no command.
        assert record.client_bytes.upper().endswith(b"STARTTLS\r\n"), record.client_bytes
        assert upstream.message_count() == 0
        assert upstream.auth_attempts() == []


# -- 30 -----------------------------------------------------------------------------------------


class AuthRejected(FaultTestCase):
    """30. AUTH rejected (535) [next provider; one attempt, not two]."""

    async def test_535_is_one_attempt_then_the_next_provider(self) -> None:
        upstream = self.aiosmtpd(tls="valid", auth=(USER, SECRET), reject_auth=True)
        routed = await self.fail_over(self.tls_provider("primary", upstream.port))
        [(connection, over_tls, _)] = upstream.auth_attempts()  # one attempt, not two
        assert (connection, over_tls) == (1, True)
        assert upstream.connection_count() == 1
        assert SECRET not in repr(routed)

    async def test_wrong_password_is_one_attempt_then_the_next_provider(self) -> None:
        upstream = self.aiosmtpd(tls="valid", auth=(USER, "another-" + SECRET))
        await self.fail_over(self.tls_provider("primary", upstream.port))
        assert len(upstream.auth_attempts()) == 1
        assert upstream.connection_count() == 1


# -- 31 -----------------------------------------------------------------------------------------


class CredentialsNeverLeak(FaultTestCase):
    """31. Credentials never appear in any log line, error, metric or result."""

    async def test_secret_appears_nowhere(self) -> None:
        events: list[LogEvent] = []

        @implementer(ILogObserver)
        def observe(event: LogEvent) -> None:
            events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

        outcomes: list[Any] = []

        async def run(primary: Recording) -> None:
            outcomes.append(await self.fail_over(primary))
            outcomes.extend(primary.results)

        # 535 over TLS.
        rejecting = self.aiosmtpd(tls="valid", auth=(USER, SECRET), reject_auth=True)
        await run(self.tls_provider("p535", rejecting.port))
        # AUTH in clear to loopback (allowed there), rejected, and the connection then reset
        # right after the AUTH line: the base64 token crossed the wire in both.
        clear = self.aiosmtpd(auth=(USER, SECRET), auth_in_clear=True, reject_auth=True)
        await run(self.tls_provider("pclear", clear.port, tls="none"))
        assert [tls for _, tls, _ in clear.auth_attempts()] == [False]  # it did cross in clear
        reset = self.proxy(
            self.aiosmtpd(auth=(USER, SECRET), auth_in_clear=True).port,
            mode="reset",
            at="client:AUTH",
        )
        await run(self.tls_provider("preset", reset.port, tls="none"))
        assert reset.records()[0].triggered
        # TLS failures: injection, untrusted certificate, stripped STARTTLS.
        injected = self.proxy(
            self.aiosmtpd(tls="valid", auth=(USER, SECRET)).port, mode="inject_after_starttls"
        )
        await run(self.tls_provider("pinject", injected.port))
        untrusted = self.aiosmtpd(tls="untrusted", auth=(USER, SECRET))
        await run(self.tls_provider("puntrusted", untrusted.port))
        # And a success, whose logs must be as clean.
        good = self.aiosmtpd(tls="valid", auth=(USER, SECRET))
        ok = self.tls_provider("pgood", good.port)
        outcomes.append(await self.route([ok], self.message()))

        token = base64.b64encode(f"\0{USER}\0{SECRET}".encode()).decode()
        forms = {SECRET, token, base64.b64encode(SECRET.encode()).decode()}
        texts = {
            "log events": _everything_text(events),
            "metrics": generate_latest(self.metrics.registry).decode(),
            "results": repr(outcomes) + "\n".join(str(o) for o in outcomes),
        }
        assert len(events) > 0  # the failures above were logged, so the check means something
        for where, text in texts.items():
            for form in forms:
                assert form not in text, f"the secret ({form!r}) leaked into the {where}"
