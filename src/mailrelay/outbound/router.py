"""Failover along a provider chain.

Each provider in the chain gets the recipients still without a final outcome. A delivered or
permanently failed recipient is settled where it happened; a temporary failure (connection,
TLS, greeting, AUTH, 4xx) moves that recipient on to the next provider (the seed's "try each
provider until one succeeds"). What is still temporary at the end of the chain is deferred by
the queue, with the last provider's reply.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from mailrelay.outbound.results import IProvider, Kind, OutboundMessage, RecipientResult


@attrs.frozen
class RoutedResult:
    result: RecipientResult
    provider: str


RecordStep = Callable[[list[RoutedResult]], Awaitable[None]]


class Router:
    log = Logger()

    def __init__(self, chain: Sequence[IProvider]) -> None:
        if not chain:
            raise ValueError("a routing chain needs at least one provider")
        self.chain = tuple(chain)

    def deliver(
        self, message: OutboundMessage, record: RecordStep | None = None
    ) -> defer.Deferred[list[RoutedResult]]:
        """One result per recipient. ``record`` is awaited with the recipients a provider
        settled (delivered or failed for good) before the rest go on to the next provider,
        so an upstream's 250 is made durable without waiting for the rest of the chain."""
        return defer.Deferred.fromCoroutine(self._deliver(message, record))

    async def _deliver(
        self, message: OutboundMessage, record: RecordStep | None
    ) -> list[RoutedResult]:
        settled: dict[str, RoutedResult] = {}
        last: dict[str, RoutedResult] = {}
        remaining = message.recipients
        for index, provider in enumerate(self.chain):
            if not remaining:
                break
            results = await provider.deliver(attrs.evolve(message, recipients=remaining))
            settled_here: list[RoutedResult] = []
            for result in results:
                routed = RoutedResult(result, provider.name)
                if result.kind is Kind.TEMPORARY:
                    last[result.recipient] = routed
                else:
                    settled[result.recipient] = routed
                    settled_here.append(routed)
            temporary = [r for r in results if r.kind is Kind.TEMPORARY]
            if temporary and settled_here and record is not None and index + 1 < len(self.chain):
                await record(settled_here)
            if temporary:
                self.log.warn(
                    "{queue_id} provider {provider} failed temporarily for {count} recipient(s):"
                    " {reply}",
                    queue_id=message.queue_id,
                    provider=provider.name,
                    count=len(temporary),
                    reply=temporary[0].reply,
                )
            remaining = tuple(r for r in remaining if r not in settled)
        return [settled.get(r) or last[r] for r in message.recipients]

    def close(self) -> defer.Deferred[None]:
        d = defer.gatherResults([p.close() for p in self.chain], consumeErrors=True)
        return d.addCallback(lambda _: None)
