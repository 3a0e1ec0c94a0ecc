"""Values passed between the queue, the router and the providers."""

from __future__ import annotations

from enum import Enum

import attrs
from twisted.internet import defer
from zope.interface import Attribute, Interface


class Kind(Enum):
    DELIVERED = "delivered"
    TEMPORARY = "temporary"  # 4xx, or no answer: try elsewhere or later
    PERMANENT = "permanent"  # 5xx: never retried


def kind_of_reply(code: int) -> Kind:
    """Classify a reply code where it arrives, once (never re-guessed from text later)."""
    if 200 <= code < 300:
        return Kind.DELIVERED
    if 500 <= code < 600:
        return Kind.PERMANENT
    return Kind.TEMPORARY


@attrs.frozen
class RecipientResult:
    recipient: str
    kind: Kind
    reply: str  # "250 2.0.0 Ok: queued as X", or our own description of a failure
    uncertain: bool = False  # lost after the final dot: the upstream may have it


@attrs.frozen
class OutboundMessage:
    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    body: bytes  # CRLF lines, dots unstuffed: the message as the client meant it
    body_8bit: bool = False


class IProvider(Interface):
    name = Attribute("The provider's configured name.")

    def deliver(message: OutboundMessage) -> defer.Deferred[list[RecipientResult]]:
        """One result per recipient of ``message``. Never fails: a failure is a result."""

    def close() -> defer.Deferred[None]:
        """Stop taking work and close connections politely."""


def all_results(
    message: OutboundMessage, kind: Kind, reply: str, uncertain: bool = False
) -> list[RecipientResult]:
    return [RecipientResult(r, kind, reply, uncertain) for r in message.recipients]
