"""Where blocking file work (fsync, rename, reading the spool) runs.

fsync can take milliseconds; done in the reactor thread it would stall every connection. The
service runs such work in a small set of threads of its own (IOThreads); unit tests run it
inline.

Not Twisted's ThreadPool: per call it goes through a Team, a LockWorker and a Python-level
Condition, and the profile of the relay at full load showed the hand-off (Condition.notify
and the Team's bookkeeping) at ~8% of the reactor thread, for two or three calls a message.
IOThreads hands a call over with one put on a C-level SimpleQueue and hands the result back
with one callFromThread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, Protocol, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

P = ParamSpec("P")
R = TypeVar("R")


class BlockingRunner(Protocol):
    def run(self, f: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> defer.Deferred[R]: ...


# Threads for spool work: fsyncs of concurrent sessions overlap (the disk batches them).
IO_THREADS = 8

_STOP = object()


class IOThreads:
    """A fixed set of threads for blocking calls; ``start`` and ``stop`` with the service
    (calls made before ``start`` run once it is called).

    ``stop`` lets every call already handed over finish (a commit in flight completes), then
    joins the threads; a call after ``stop`` fails at once."""

    def __init__(self, reactor: IReactorFromThreads, count: int, name: str) -> None:
        self._reactor = reactor
        self._count = count
        self._name = name
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._accepting = True  # calls before start wait for it

    def start(self) -> None:
        self._accepting = True
        for i in range(self._count - len(self._threads)):
            thread = threading.Thread(target=self._work, name=f"{self._name}-{i}")
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._accepting = False
        for _ in self._threads:
            self._calls.put(_STOP)
        for thread in self._threads:
            thread.join()
        self._threads = []

    def run(self, f: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> defer.Deferred[R]:
        if not self._accepting:
            return defer.fail(RuntimeError(f"{self._name}: stopped"))
        d: defer.Deferred[R] = defer.Deferred()
        self._calls.put((d, f, args, kwargs))
        return d

    def _work(self) -> None:
        calls = self._calls
        call_back = self._reactor.callFromThread
        while True:
            item = calls.get()
            if item is _STOP:
                return
            d, f, args, kwargs = item
            try:
                result = f(*args, **kwargs)
            except BaseException:
                call_back(d.errback, Failure())
            else:
                call_back(d.callback, result)
            del item, d, f, args, kwargs  # nothing of the call outlives it in this frame


class InlineRunner:
    """Runs the call at once in the calling thread: for tests and for the CLI."""

    def run(self, f: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> defer.Deferred[R]:
        result: defer.Deferred[Any] = defer.maybeDeferred(f, *args, **kwargs)
        return result
