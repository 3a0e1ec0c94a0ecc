"""Timeouts on the injected clock, for protocols built on Twisted's TimeoutMixin."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class InjectedClockTimeouts:
    """TimeoutMixin schedules through ``self.callLater``, which defaults to the global
    reactor; this sends it to ``self._clock`` instead, so tests drive it with task.Clock."""

    _clock: IReactorTime

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        return self._clock.callLater(period, func)
