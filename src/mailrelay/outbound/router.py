"""Failover along a provider chain.

The chain is chosen by the sender's domain (``[routing] sender_domains``), else the default.
Each provider in the chain gets the recipients still without an outcome for this attempt. What
a provider's result leads to is decided by its failure class (design.md, errors by class):

- delivered: settled where it happened;
- a session failure (connect, greeting, TLS, AUTH, timeout, lost connection, breaker open,
  quota used): the provider could not take mail at all, so the recipient moves on to the next
  provider;
- a 4xx to MAIL, RCPT or DATA (421 mid-session included): moves on by default (the seed's "try
  each provider until one succeeds"); with the provider's ``on_temporary = "defer"`` it stays
  with this provider and the queue retries it later;
- a 5xx: the recipient failed for good and is never tried elsewhere, unless the provider says
  ``on_permanent = "next"``.

What is still temporary at the end of the chain is deferred by the queue, with the last reply.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

import attrs
from twisted.internet import defer

from mailrelay.logger import Logger
from mailrelay.outbound.activity import Activity
from mailrelay.outbound.results import IProvider, Kind, OutboundMessage, RecipientResult


@attrs.frozen
class RoutedResult:
    result: RecipientResult
    provider: str


RecordStep = Callable[[list[RoutedResult]], Awaitable[None]]


def moves_on(result: RecipientResult, provider: IProvider) -> bool:
    """Does this result send the recipient on to the next provider of the chain?"""
    if result.kind is Kind.DELIVERED:
        return False
    if result.kind is Kind.PERMANENT:
        return bool(provider.on_permanent == "next")
    if result.failure is None or result.failure.is_session:
        return True  # the provider took nothing: the next one may
    return bool(provider.on_temporary == "next")


class Router:
    log = Logger()

    def __init__(
        self,
        chain: Sequence[IProvider],
        sender_domains: Mapping[str, Sequence[IProvider]] | None = None,
        activity: Activity | None = None,
    ) -> None:
        """``activity``, if given, is told every provider's results (health, status page)."""
        if not chain:
            raise ValueError("a routing chain needs at least one provider")
        self.chain = tuple(chain)
        self._by_domain = {d.lower(): tuple(c) for d, c in (sender_domains or {}).items()}
        if any(not c for c in self._by_domain.values()):
            raise ValueError("a routing chain needs at least one provider")
        self.activity = activity

    @property
    def providers(self) -> tuple[IProvider, ...]:
        """Every provider of every chain, once each, the default chain's first."""
        unique = {id(p): p for c in (self.chain, *self._by_domain.values()) for p in c}
        return tuple(unique.values())

    def chain_for(self, sender: str) -> tuple[IProvider, ...]:
        domain = sender.rpartition("@")[2].lower() if "@" in sender else ""
        return self._by_domain.get(domain, self.chain)

    def deliver(
        self, message: OutboundMessage, record: RecordStep | None = None
    ) -> defer.Deferred[list[RoutedResult]]:
        """One result per recipient. ``record`` is awaited with the recipients a provider
        settled (delivered or failed for good) before the rest go on to the next provider,
        and after each recipient batch but the last, so an upstream's 250 is made durable
        without waiting for the rest of the chain or of the message."""
        return defer.Deferred.fromCoroutine(self._deliver(message, record))

    async def _deliver(
        self, message: OutboundMessage, record: RecordStep | None
    ) -> list[RoutedResult]:
        chain = self.chain_for(message.sender)
        outcome: dict[str, RoutedResult] = {}
        recorded: set[str] = set()
        remaining = message.recipients

        async def record_settled(
            results: list[RecipientResult], provider: IProvider, has_next: bool
        ) -> None:
            # What this provider settled for good, not yet journalled.
            routed = [
                RoutedResult(r, provider.name)
                for r in results
                if r.kind is not Kind.TEMPORARY
                and not (has_next and moves_on(r, provider))
                and r.recipient not in recorded
            ]
            if routed and record is not None:
                await record(routed)
                recorded.update(r.result.recipient for r in routed)

        for index, provider in enumerate(chain):
            if not remaining:
                break
            has_next = index + 1 < len(chain)

            async def progress(
                part: list[RecipientResult],
                provider: IProvider = provider,
                has_next: bool = has_next,
            ) -> None:
                # One batch of several is done: what it settled is journalled before the
                # next batch, so a crash in between never sends it again.
                await record_settled(part, provider, has_next)

            results = await provider.deliver(attrs.evolve(message, recipients=remaining), progress)
            if self.activity is not None:
                self.activity.record(provider.name, message.queue_id, results)
            passed_on: list[RecipientResult] = []
            for result in results:
                outcome[result.recipient] = RoutedResult(result, provider.name)
                if has_next and moves_on(result, provider):
                    passed_on.append(result)
            if passed_on:
                await record_settled(results, provider, has_next)
                self.log.warn(
                    "{queue_id} provider {provider} failed for {count} recipient(s), trying"
                    " {next_provider}: {reply}",
                    queue_id=message.queue_id,
                    provider=provider.name,
                    count=len(passed_on),
                    next_provider=chain[index + 1].name,
                    reply=passed_on[0].reply,
                )
            moving = {r.recipient for r in passed_on}
            remaining = tuple(r for r in remaining if r in moving)
        return [outcome[r] for r in message.recipients]

    def close(self) -> defer.Deferred[None]:
        d = defer.gatherResults([p.close() for p in self.providers], consumeErrors=True)
        return d.addCallback(lambda _: None)
