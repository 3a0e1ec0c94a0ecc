"""Our outbound pool against a real upstream SMTP server process (aiosmtpd) on loopback."""

from __future__ import annotations

import pytest
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailrelay.config import ProviderConfig
from mailrelay.metrics import Metrics
from mailrelay.outbound.payload import ONE_WRITE_LIMIT, PIECE
from mailrelay.outbound.pool import SMTPProvider
from mailrelay.outbound.results import Kind, OutboundMessage
from mailrelay.outbound.router import Router
from tests.support.net import free_port
from tests.support.upstream import UpstreamProcess

pytestmark = pytest.mark.integration


def provider_config(port: int, name: str = "primary", **options: object) -> ProviderConfig:
    return ProviderConfig(
        name=name,
        kind="smtp",
        host="127.0.0.1",
        port=port,
        tls="none",
        helo="relay.test",
        connect_timeout=5,
        **options,  # type: ignore[arg-type]
    )


def outbound(
    queue_id: str, body: bytes, recipients: tuple[str, ...] = ("user@example.com",)
) -> OutboundMessage:
    return OutboundMessage(
        queue_id=queue_id, sender="app@example.com", recipients=recipients, body=body
    )


def tricky_body() -> bytes:
    """Lines starting with '.' on the first line and at 16 KiB chunk boundaries (pitfall 15)."""
    body = b".first\r\n"
    for boundary in (16384, 32768):
        while len(body) < boundary - 80:
            body += b"a" * 70 + b"\r\n"
        body += b"b" * (boundary - len(body) - 2) + b"\r\n"
        assert len(body) == boundary
        body += b".\r\n"  # a lone dot exactly at the boundary: would end DATA if unstuffed
    return b"Subject: dots\r\n\r\n" + body + b"..double\r\nlast line\r\n"


class OutboundAgainstRealUpstream(TestCase):
    def setUp(self) -> None:
        # UpstreamProcess makes (and removes) its own temporary directory; trial's mktemp()
        # would write into the working directory.
        self.upstream = UpstreamProcess(rcpt_4xx_prefix="busy").start()
        self.addCleanup(self.upstream.stop)
        self.providers: list[SMTPProvider] = []

    def make_provider(self, port: int, name: str = "primary", **options: object) -> SMTPProvider:
        provider = SMTPProvider(provider_config(port, name, **options), reactor, Metrics())
        self.providers.append(provider)
        self.addCleanup(provider.close)
        return provider

    async def test_body_arrives_byte_identical_across_chunk_boundaries(self) -> None:
        provider = self.make_provider(self.upstream.port)
        body = tricky_body()
        results = await provider.deliver(outbound("Q1", body))
        assert [r.kind for r in results] == [Kind.DELIVERED]
        (stored,) = self.upstream.messages()
        assert stored["body"] == body
        assert stored["mail_from"] == "app@example.com"

    async def test_a_large_body_goes_in_pieces_and_arrives_byte_identical(self) -> None:
        # Past ONE_WRITE_LIMIT the payload is written a piece at a time; dot lines sit at
        # piece boundaries (PIECE).
        body = bytearray(b"Subject: big\r\n\r\n")
        for boundary in range(PIECE, 3 * ONE_WRITE_LIMIT, PIECE):
            while len(body) < boundary - 80:
                body += b"c" * 78 + b"\r\n"
            body += b"d" * (boundary - len(body) - 2) + b"\r\n"
            body += b".\r\n" if boundary % (2 * PIECE) else b"..x\r\n"
        provider = self.make_provider(self.upstream.port)
        results = await provider.deliver(outbound("Q1", bytes(body)))
        assert [r.kind for r in results] == [Kind.DELIVERED]
        (stored,) = self.upstream.messages()
        assert stored["body"] == bytes(body)

    async def test_messages_reuse_the_pool_connections(self) -> None:
        provider = self.make_provider(self.upstream.port, connections=2)
        from twisted.internet import defer

        results = await defer.gatherResults(
            [
                provider.deliver(outbound(f"Q{i}", f"Subject: {i}\r\n\r\nbody\r\n".encode()))
                for i in range(50)
            ]
        )
        assert all(r[0].kind is Kind.DELIVERED for r in results)
        assert len(self.upstream.messages()) == 50
        assert self.upstream.connection_count() <= 2

    async def test_per_recipient_results_from_the_upstream(self) -> None:
        provider = self.make_provider(self.upstream.port)
        message = outbound(
            "Q1", b"Subject: x\r\n\r\nhi\r\n", ("ok@example.com", "busy@example.com")
        )
        results = {r.recipient: r for r in await provider.deliver(message)}
        assert results["ok@example.com"].kind is Kind.DELIVERED
        assert results["busy@example.com"].kind is Kind.TEMPORARY
        assert results["busy@example.com"].reply.startswith("451")
        (stored,) = self.upstream.messages()
        assert stored["rcpt_tos"] == ["ok@example.com"]

    async def test_refused_primary_fails_over_to_backup(self) -> None:
        dead = self.make_provider(free_port(), name="dead")
        backup = self.make_provider(self.upstream.port, name="backup")
        router = Router([dead, backup])
        routed = await router.deliver(outbound("Q1", b"Subject: failover\r\n\r\nhi\r\n"))
        assert [(r.provider, r.result.kind) for r in routed] == [("backup", Kind.DELIVERED)]
        assert len(self.upstream.messages()) == 1
