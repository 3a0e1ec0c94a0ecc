"""Where blocking file work (fsync, rename, reading the spool) runs.

fsync can take milliseconds; done in the reactor thread it would stall every connection. The
service runs such work in a small thread pool of its own; unit tests run it inline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, Protocol, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

P = ParamSpec("P")
R = TypeVar("R")


class BlockingRunner(Protocol):
    def run(self, f: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> defer.Deferred[R]: ...


class ThreadRunner:
    """Runs blocking calls in a dedicated pool; started and stopped with the service."""

    def __init__(self, reactor: IReactorFromThreads, pool: ThreadPool) -> None:
        self._reactor = reactor
        self._pool = pool

    def run(self, f: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> defer.Deferred[R]:
        result: defer.Deferred[R] = deferToThreadPool(
            self._reactor,
            self._pool,
            f,
            *args,
            **kwargs,
        )
        return result


class InlineRunner:
    """Runs the call at once in the calling thread: for tests and for the CLI."""

    def run(self, f: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> defer.Deferred[R]:
        result: defer.Deferred[Any] = defer.maybeDeferred(f, *args, **kwargs)
        return result
