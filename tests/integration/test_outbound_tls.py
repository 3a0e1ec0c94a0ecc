"""STARTTLS, implicit TLS and AUTH against a real upstream: verified certificates, no
plaintext fallback."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trustme
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from mailrelay.config import ProviderConfig
from mailrelay.metrics import Metrics
from mailrelay.outbound.payload import ONE_WRITE_LIMIT, PIECE
from mailrelay.outbound.pool import SMTPProvider
from mailrelay.outbound.results import Kind, OutboundMessage
from tests.support.loopback_reactor import LoopbackReactor
from tests.support.upstream import UpstreamProcess

pytestmark = pytest.mark.integration

PASSWORD_ENV = "MAILRELAY_TEST_UPSTREAM_PASSWORD"
SECRET = "correct horse battery staple"
MESSAGE = OutboundMessage(
    "Q1", "app@example.com", ("user@example.com",), b"Subject: tls\r\n\r\nhi\r\n"
)
# Not a loopback name, so the client's "AUTH in clear to loopback is fine" exemption does not
# apply; resolved to 127.0.0.1 by LoopbackReactor.
REMOTE_NAME = "smtp.example.test"


def tls_provider(
    tls: str, host: str, port: int, ca_file: Path, password_env: str, via: Any = reactor
) -> SMTPProvider:
    """A provider with TLS verified against the test CA and AUTH as user "relay"."""
    config = ProviderConfig(
        name=tls,
        kind="smtp",
        host=host,
        port=port,
        tls=tls,  # type: ignore[arg-type]
        ca_file=str(ca_file),
        username="relay",
        password_env=password_env,
        helo="relay.test",
        connect_timeout=5,
    )
    return SMTPProvider(config, via, Metrics())


class _WithTestCA(TestCase):
    """A fresh test CA in a temporary directory, and the AUTH secret in the environment."""

    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="mailrelay-tls-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.ca = trustme.CA()
        self.ca_file = self.tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        os.environ[PASSWORD_ENV] = SECRET
        self.addCleanup(os.environ.pop, PASSWORD_ENV, None)


class StartTLSUpstream(_WithTestCA):
    def upstream(
        self, names: tuple[str, ...] = ("127.0.0.1", "localhost"), tls: bool = True
    ) -> UpstreamProcess:
        options: dict[str, object] = {"auth": ("relay", SECRET)}
        if tls:
            cert = self.ca.issue_cert(*names)
            chain, key = self.tmp / f"chain-{len(names)}.pem", self.tmp / f"key-{len(names)}.pem"
            cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
            cert.private_key_pem.write_to_path(str(key))
            options.update(tls_cert=chain, tls_key=key)
        upstream = UpstreamProcess(self.tmp / f"upstream-{len(names)}-{tls}", **options).start()  # type: ignore[arg-type]
        self.addCleanup(upstream.stop)
        return upstream

    def provider(self, port: int, ca_file: Path, password_env: str = PASSWORD_ENV) -> SMTPProvider:
        provider = tls_provider("starttls", "127.0.0.1", port, ca_file, password_env)
        self.addCleanup(provider.close)
        return provider

    async def test_verified_starttls_and_auth_deliver(self) -> None:
        upstream = self.upstream()
        (result,) = await self.provider(upstream.port, self.ca_file).deliver(MESSAGE)
        assert result.kind is Kind.DELIVERED, result.reply
        (stored,) = upstream.messages()
        assert stored["body"] == MESSAGE.body

    async def test_a_large_body_goes_out_in_pieces_over_tls_intact(self) -> None:
        # Over ONE_WRITE_LIMIT the payload is produced piece by piece as the TLS transport
        # takes it: every '.' line stuffed, including one on a piece boundary, and nothing
        # lost or doubled where pieces meet.
        line = b"x" * 70 + b"\r\n"
        block = line * (PIECE // len(line))  # just under a piece: the next line opens one
        body = b"Subject: big over tls\r\n\r\n.first\r\n"
        for i in range(40):  # about 2.6 MB
            body += block + b".dot line %d\r\n" % i + b"..two dots\r\n" + b".\r\n"
        assert len(body) > 2 * ONE_WRITE_LIMIT
        message = OutboundMessage("Q2", "app@example.com", ("user@example.com",), body)
        upstream = self.upstream()
        (result,) = await self.provider(upstream.port, self.ca_file).deliver(message)
        assert result.kind is Kind.DELIVERED, result.reply
        (stored,) = upstream.messages()
        assert stored["body"] == body

    async def test_untrusted_certificate_is_a_temporary_failure(self) -> None:
        upstream = self.upstream()
        other_ca = self.tmp / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other_ca))
        (result,) = await self.provider(upstream.port, other_ca).deliver(MESSAGE)
        assert result.kind is Kind.TEMPORARY
        assert "tls" in result.reply
        assert upstream.messages() == []

    async def test_wrong_name_certificate_is_a_temporary_failure(self) -> None:
        upstream = self.upstream(names=("mail.example.com",))
        (result,) = await self.provider(upstream.port, self.ca_file).deliver(MESSAGE)
        assert result.kind is Kind.TEMPORARY
        assert "tls" in result.reply
        assert upstream.messages() == []

    async def test_no_starttls_offered_never_falls_back_to_plaintext(self) -> None:
        upstream = self.upstream(tls=False)
        (result,) = await self.provider(upstream.port, self.ca_file).deliver(MESSAGE)
        assert result.kind is Kind.TEMPORARY
        assert "tls" in result.reply
        assert upstream.messages() == []

    async def test_rejected_credentials_fail_without_leaking_the_secret(self) -> None:
        upstream = self.upstream()
        os.environ["MAILRELAY_TEST_WRONG_PASSWORD"] = "not-the-" + SECRET
        self.addCleanup(os.environ.pop, "MAILRELAY_TEST_WRONG_PASSWORD", None)
        provider = self.provider(upstream.port, self.ca_file, "MAILRELAY_TEST_WRONG_PASSWORD")
        (result,) = await provider.deliver(MESSAGE)
        assert result.kind is Kind.TEMPORARY
        assert "auth" in result.reply
        assert SECRET not in result.reply
        assert upstream.messages() == []


class ImplicitTLSUpstream(_WithTestCA):
    """tls = "implicit" (port 465 style): TLS from the first byte, then AUTH, never STARTTLS."""

    def upstream(self, *names: str) -> UpstreamProcess:
        cert = self.ca.issue_cert(*names)
        chain, key = self.tmp / "chain.pem", self.tmp / "key.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
        cert.private_key_pem.write_to_path(str(key))
        upstream = UpstreamProcess(
            self.tmp / "upstream",
            tls_cert=chain,
            tls_key=key,
            implicit_tls=True,
            auth=("relay", SECRET),
        ).start()
        self.addCleanup(upstream.stop)
        return upstream

    def provider(self, host: str, port: int, ca_file: Path, via: Any = reactor) -> SMTPProvider:
        provider = tls_provider("implicit", host, port, ca_file, PASSWORD_ENV, via)
        self.addCleanup(provider.close)
        return provider

    async def test_implicit_tls_and_auth_deliver_on_loopback(self) -> None:
        upstream = self.upstream("127.0.0.1")
        (result,) = await self.provider("127.0.0.1", upstream.port, self.ca_file).deliver(MESSAGE)
        assert result.kind is Kind.DELIVERED, result.reply
        (stored,) = upstream.messages()
        assert stored["body"] == MESSAGE.body

    async def test_implicit_tls_and_auth_deliver_to_a_remote_name(self) -> None:
        """Without the loopback exemption: AUTH goes out only because the session is TLS."""
        upstream = self.upstream(REMOTE_NAME)
        provider = self.provider(
            REMOTE_NAME, upstream.port, self.ca_file, via=LoopbackReactor(reactor)
        )
        (result,) = await provider.deliver(MESSAGE)
        assert result.kind is Kind.DELIVERED, result.reply
        (stored,) = upstream.messages()
        assert stored["body"] == MESSAGE.body

    async def test_implicit_tls_untrusted_certificate_is_a_temporary_tls_failure(self) -> None:
        upstream = self.upstream(REMOTE_NAME)
        other_ca = self.tmp / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other_ca))
        provider = self.provider(REMOTE_NAME, upstream.port, other_ca, via=LoopbackReactor(reactor))
        (result,) = await provider.deliver(MESSAGE)
        assert result.kind is Kind.TEMPORARY
        assert "tls" in result.reply
        assert SECRET not in result.reply
        assert upstream.messages() == []
