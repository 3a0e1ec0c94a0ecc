"""Values passed between the queue, the router and the providers."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Literal

import attrs
from twisted.internet import defer
from zope.interface import Attribute, Interface


class Kind(Enum):
    DELIVERED = "delivered"
    TEMPORARY = "temporary"  # 4xx, or no answer: try elsewhere or later
    PERMANENT = "permanent"  # 5xx: never retried


class FailureClass(Enum):
    """Where a recipient's attempt failed: what the router's failover policy and a provider's
    circuit breaker act on. Decided where the failure happens, never re-guessed from text.

    The session classes say the provider could not take mail at all: the recipients always
    move on to the next provider. The transaction classes are the provider's answer to this
    message (a 4xx or 5xx to MAIL, RCPT or DATA): the provider's ``on_temporary`` and
    ``on_permanent`` settings decide whether they move on.
    """

    # session: the provider could not take any mail
    CONNECT = "connect"  # refused, unreachable, connect timeout, lost before the greeting
    GREETING = "greeting"  # 421/5xx/garbage greeting, EHLO refused
    TLS = "tls"  # STARTTLS missing, handshake or verification failed, injection
    AUTH = "auth"  # credentials rejected, no usable mechanism, secret unavailable
    TIMEOUT = "timeout"  # a stage deadline passed
    PROTOCOL = "protocol"  # a reply that makes no sense in the session's state
    LOST = "lost"  # reset or EOF in the middle of a transaction
    UNAVAILABLE = "unavailable"  # our own: breaker open, daily quota used, shutting down
    # transaction: the provider answered this message
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # the reply to DATA or to the final dot

    @property
    def is_session(self) -> bool:
        return self not in _TRANSACTION

    @property
    def counts_against_provider(self) -> bool:
        """A failure the provider's circuit breaker counts (not our own refusals)."""
        return self.is_session and self is not FailureClass.UNAVAILABLE


_TRANSACTION = frozenset({FailureClass.MAIL, FailureClass.RCPT, FailureClass.DATA})


def kind_of_reply(code: int) -> Kind:
    """Classify a reply code where it arrives, once (never re-guessed from text later)."""
    if 200 <= code < 300:
        return Kind.DELIVERED
    if 500 <= code < 600:
        return Kind.PERMANENT
    return Kind.TEMPORARY


# "250 2.0.0 Ok: queued as 4Xyz" (Postfix), "250 Ok 0100018c...-000000" (SES),
# "250 2.0.0 OK id=1rAbc-000123-Xy" (Exim), "250 Message accepted <id@host>" and the like.
_QUEUED_AS = (
    re.compile(r"\bqueued as ([A-Za-z0-9][A-Za-z0-9._@<>-]{2,120})", re.IGNORECASE),
    re.compile(r"\bid=([A-Za-z0-9][A-Za-z0-9._-]{2,120})", re.IGNORECASE),
    re.compile(
        r"^250 (?:[245]\.\d{1,3}\.\d{1,3} )?Ok:? ([A-Za-z0-9][A-Za-z0-9._-]{7,120})$", re.IGNORECASE
    ),
)


def queued_as(reply: str) -> str | None:
    """The upstream's own ID for a delivered message, when its 250 reply names one."""
    for pattern in _QUEUED_AS:
        match = pattern.search(reply)
        if match:
            return match.group(1).strip("<>")
    return None


@attrs.frozen
class RecipientResult:
    recipient: str
    kind: Kind
    reply: str  # "250 2.0.0 Ok: queued as X", or our own description of a failure
    uncertain: bool = False  # lost after the final dot: the upstream may have it
    # None when delivered; otherwise where it failed (see FailureClass).
    failure: FailureClass | None = None
    code: int | None = None  # the upstream's reply code, when the outcome is a reply

    @property
    def queued_as(self) -> str | None:
        return queued_as(self.reply) if self.kind is Kind.DELIVERED else None


@attrs.frozen
class OutboundMessage:
    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    body: bytes  # CRLF lines, dots unstuffed: the message as the client meant it
    body_8bit: bool = False


# Called by a provider that sends a message in several transactions (recipient batches) with
# the results of each transaction but the last, so they are journalled before the next one:
# a crash between batches must not send the earlier batches again.
Progress = Callable[[list[RecipientResult]], Awaitable[None]]

OnTemporary = Literal["next", "defer"]
OnPermanent = Literal["fail", "next"]


@attrs.frozen
class ProviderError:
    at: float
    failure: str  # a FailureClass value
    reply: str  # the upstream's reply or our description, scrubbed like every reply


@attrs.frozen
class ProviderStatus:
    """A provider's own view of itself, for /health and the status page."""

    state: Literal["closed", "half-open", "open"]  # the circuit breaker's
    open_connections: int
    next_probe_at: float | None = None  # when open: the time of the half-open probe
    last_setup_error: ProviderError | None = None  # the last connection that failed to set up


class IProvider(Interface):
    name = Attribute("The provider's configured name.")
    on_temporary = Attribute(
        "'next': a 4xx to MAIL/RCPT/DATA moves the recipient on to the next provider;"
        " 'defer': it stays with this provider and is retried later."
    )
    on_permanent = Attribute(
        "'fail': a 5xx to a recipient is final; 'next': the next provider is tried."
    )

    def deliver(
        message: OutboundMessage, progress: Progress | None = None
    ) -> defer.Deferred[list[RecipientResult]]:
        """One result per recipient of ``message``. Never fails: a failure is a result.
        ``progress``, if given, is awaited with each finished transaction's results but the
        last's (see Progress)."""

    def close() -> defer.Deferred[None]:
        """Stop taking work and close connections politely."""

    def status() -> ProviderStatus:
        """The breaker's state and the open connections, now."""


def all_results(
    message: OutboundMessage,
    kind: Kind,
    reply: str,
    uncertain: bool = False,
    failure: FailureClass | None = None,
    code: int | None = None,
) -> list[RecipientResult]:
    return [RecipientResult(r, kind, reply, uncertain, failure, code) for r in message.recipients]
