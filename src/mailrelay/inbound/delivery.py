"""IMessageDelivery for the relay: the second loopback gate and one spool file per transaction.

The stock server builds one IMessage per recipient and fans every line out to each (pitfall 3).
``IRelayDelivery`` adds ``openMessage`` so the protocol opens one message for the whole
envelope; ``validateTo`` still returns a working per-recipient factory, so the object honours
the plain ``IMessageDelivery`` contract too.

What is stored is our Received header, then the client's message byte for byte except for the
``Date:`` and ``Message-ID:`` fields added when its header lacks them (``headers.py`` says
where and how). The protocol counts the message size limit over the client's bytes only, so a
message at the limit is still accepted; the size logged (and the stored body) includes the
header fields we add.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.mail import smtp
from zope.interface import implementer

from mailrelay.inbound.headers import HeaderCompleter, message_date, message_id, sanitize_host
from mailrelay.logger import Logger
from mailrelay.metrics import Metrics
from mailrelay.netaddr import IPNetwork, peer_allowed
from mailrelay.spool.format import Envelope
from mailrelay.spool.store import MessageWriter, Spool


@attrs.frozen
class Transaction:
    """What the client told us before DATA."""

    helo: str
    sender: str
    recipients: tuple[str, ...]
    body_8bit: bool


class IIncomingMessage(smtp.IMessage):
    def write(data: bytes) -> None:
        """Add message bytes (CRLF lines, dots already unstuffed)."""

    def commit() -> defer.Deferred[str]:
        """Make the message durable; fires with its queue ID."""

    def abort() -> None:
        """Throw the message away (the session ended or the message was refused)."""


class IRelayDelivery(smtp.IMessageDelivery):
    def openMessage(transaction: Transaction) -> IIncomingMessage:
        """Start the one spool file of a transaction; raise SMTPServerError to refuse it."""


def _peer_host(peer: IAddress) -> str:
    return str(getattr(peer, "host", None) or getattr(peer, "name", None) or "local")


@implementer(IIncomingMessage)
class IncomingMessage:
    def __init__(
        self,
        writer: MessageWriter,
        on_durable: Callable[[Envelope, int, bytes | None], None],
        headers: HeaderCompleter,
    ) -> None:
        self._writer = writer
        self._on_durable = on_durable
        self._headers = headers
        self.queue_id = writer.envelope.queue_id

    def write(self, data: bytes) -> None:
        out = self._headers.feed(data)
        if out:
            self._writer.write(out)

    def lineReceived(self, line: bytes) -> None:
        self.write(line + b"\r\n")

    def commit(self) -> defer.Deferred[str]:
        rest = self._headers.finish()
        if rest:
            self._writer.write(rest)
        d = self._writer.commit()

        def durable(queue_id: str) -> str:
            writer = self._writer
            self._on_durable(writer.envelope, writer.body_length, writer.body)
            return queue_id

        return d.addCallback(durable)

    def eomReceived(self) -> defer.Deferred[str]:
        return self.commit()

    def abort(self) -> None:
        self._writer.abort()

    def connectionLost(self) -> None:
        self.abort()


@implementer(IRelayDelivery)
class RelayDelivery:
    """One per connection: knows the peer, so every step can re-check that it is local."""

    log = Logger()

    def __init__(
        self,
        peer: IAddress,
        hostname: str,
        spool: Spool,
        clock: IReactorTime,
        on_accepted: Callable[[Envelope, bytes | None], None],
        metrics: Metrics,
        allow_networks: Iterable[IPNetwork] = (),
    ) -> None:
        self._peer = peer
        self._allow_networks = tuple(allow_networks)
        self._hostname = hostname
        self._spool = spool
        self._clock = clock
        self._on_accepted = on_accepted
        self._metrics = metrics
        self._received_header = b""

    def _require_local_peer(self) -> None:
        # Defence in depth: the factory already refused these peers in buildProtocol.
        if not peer_allowed(self._peer, self._allow_networks):
            raise smtp.SMTPServerError(554, "5.7.1 Relay access denied: local clients only")

    # -- IMessageDelivery -------------------------------------------------------------------

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        return self._received_header

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        self._require_local_peer()
        return origin

    def validateTo(self, user: Any) -> Callable[[], IIncomingMessage]:
        self._require_local_peer()
        helo = user.helo[0] if user.helo and user.helo[0] else b""
        transaction = Transaction(
            helo=helo.decode("ascii", "replace") if isinstance(helo, bytes) else str(helo),
            sender=str(user.orig),
            recipients=(str(user.dest),),
            body_8bit=False,
        )
        return lambda: self.openMessage(transaction)

    # -- IRelayDelivery -----------------------------------------------------------------------

    def openMessage(self, transaction: Transaction) -> IIncomingMessage:
        self._require_local_peer()
        now = self._clock.seconds()
        envelope = Envelope(
            queue_id=self._spool.new_queue_id(),
            sender=transaction.sender,
            recipients=transaction.recipients,
            received_at=now,
            client=_peer_host(self._peer),
            helo=transaction.helo,
            body_8bit=transaction.body_8bit,
        )
        try:
            writer = self._spool.open_writer(envelope, smtp_acceptance=True)
        except OSError as e:
            self.log.error("cannot open a spool file: {error}", error=e.strerror or str(e))
            raise smtp.SMTPServerError(
                451, "4.3.0 Local error: cannot write to the spool"
            ) from None
        date = message_date(now)  # (once: the Received header and the Date field share it)
        self._received_header = self._make_received_header(envelope, date)
        writer.write(self._received_header)
        headers = HeaderCompleter(
            date=date, message_id=message_id(envelope.queue_id, self._hostname)
        )
        return IncomingMessage(writer, self._accepted, headers)

    def _make_received_header(self, envelope: Envelope, date: str) -> bytes:
        # The protocol only checked HELO to be printable ASCII without spaces, up to 255
        # octets: "(", ")", ";" or "[" in it could break the header's structure.
        for_clause = (
            f"\r\n\tfor <{envelope.recipients[0]}>" if len(envelope.recipients) == 1 else ""
        )
        header = (
            f"Received: from {sanitize_host(envelope.helo)}"
            f" ([{sanitize_host(envelope.client)}])\r\n"
            f"\tby {self._hostname} (mailrelay) with ESMTP id {envelope.queue_id}"
            f"{for_clause};\r\n"
            f"\t{date}\r\n"
        )
        return header.encode("ascii")

    def _accepted(self, envelope: Envelope, size: int, body: bytes | None) -> None:
        recipients = envelope.recipients
        self.log.info(
            "{queue_id} received from=<{sender}> to={to} recipients={count}"
            " size={size} client={client}",
            queue_id=envelope.queue_id,
            event="received",
            sender=envelope.sender,
            to=",".join(f"<{r}>" for r in recipients[:3]),
            first_recipients=list(recipients[:3]),
            count=len(recipients),
            size=size,
            client=envelope.client,
        )
        self._metrics.messages_received.inc()
        self._metrics.recipients_received.inc(len(recipients))
        self._on_accepted(envelope, body)
