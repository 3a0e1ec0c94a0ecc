"""Waiting for a condition in a test that runs the real reactor (twisted.trial tests under
pytest): poll with a deadline while the reactor keeps running; never a blind sleep."""

from __future__ import annotations

import time
from collections.abc import Callable

from twisted.internet import reactor, task


async def poll(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 20 ms with the reactor running; AssertionError after
    ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            if predicate():
                return
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await task.deferLater(reactor, 0.02)
