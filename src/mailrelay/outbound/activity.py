"""What the providers did lately: last success and last error per provider, recent failures.

Fed by the router with every provider's results (including those that moved on to the next
provider of the chain, which the queue never sees), read by /health and the status page. It
holds a fixed amount: one record per provider and a ring of the last ``keep`` failures.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import attrs
from twisted.internet.interfaces import IReactorTime

from mailrelay.outbound.results import FailureClass, Kind, RecipientResult


@attrs.frozen
class ProviderEvent:
    at: float
    reply: str
    failure: str | None = None  # the FailureClass value, for an error


@attrs.frozen
class FailedRecipient:
    """One recipient that a provider did not take (temporarily or for good)."""

    at: float
    queue_id: str
    recipient: str
    provider: str
    permanent: bool
    failure: str | None  # the FailureClass value, when known
    reply: str


class Activity:
    def __init__(self, clock: IReactorTime, keep: int = 50) -> None:
        self._clock = clock
        self._last_success: dict[str, ProviderEvent] = {}
        self._last_error: dict[str, ProviderEvent] = {}
        self._failures: deque[FailedRecipient] = deque(maxlen=keep)

    def record(self, provider: str, queue_id: str, results: Sequence[RecipientResult]) -> None:
        now = self._clock.seconds()
        for result in results:
            if result.kind is Kind.DELIVERED:
                self._last_success[provider] = ProviderEvent(now, result.reply)
                continue
            if result.failure is FailureClass.UNAVAILABLE:
                # Skipped by our own choice (breaker open, quota used): the provider's state
                # says so; the error that opened the breaker stays the last error shown, and
                # the list of failures is not flooded while it stays open.
                continue
            failure = result.failure.value if result.failure is not None else None
            self._last_error[provider] = ProviderEvent(now, result.reply, failure)
            self._failures.append(
                FailedRecipient(
                    at=now,
                    queue_id=queue_id,
                    recipient=result.recipient,
                    provider=provider,
                    permanent=result.kind is Kind.PERMANENT,
                    failure=failure,
                    reply=result.reply,
                )
            )

    def last_success(self, provider: str) -> ProviderEvent | None:
        return self._last_success.get(provider)

    def last_success_time(self, provider: str) -> Callable[[], float | None]:
        """A reader of the provider's last success time, for a gauge read at scrape time."""

        def read() -> float | None:
            event = self._last_success.get(provider)
            return event.at if event is not None else None

        return read

    def last_error(self, provider: str) -> ProviderEvent | None:
        return self._last_error.get(provider)

    def recent_failures(self) -> list[FailedRecipient]:
        """Newest first."""
        return list(reversed(self._failures))
