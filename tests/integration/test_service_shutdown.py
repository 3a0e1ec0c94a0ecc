"""Stopping the service with a delivery in flight loses nothing and sends nothing twice."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from twisted.application import service
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from mailrelay.config import parse
from mailrelay.outbound.maildir import MaildirProvider
from mailrelay.service import _QueueService, _SequentialMultiService, buildService
from mailrelay.spool.format import Envelope
from mailrelay.spool.store import Spool

pytestmark = pytest.mark.integration


class _Recorder(service.Service):
    def __init__(
        self, name: str, log: list[str], stopped: defer.Deferred[None] | None = None
    ) -> None:
        self.name = name
        self._log = log
        self._stopped = stopped

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        self._log.append(f"stop {self.name}")
        if self._stopped is None:
            return None
        return self._stopped.addCallback(lambda _: self._log.append(f"stopped {self.name}"))


def test_children_stop_in_reverse_order_one_after_another() -> None:
    log: list[str] = []
    slow: defer.Deferred[None] = defer.Deferred()
    top = _SequentialMultiService()
    _Recorder("pool", log).setServiceParent(top)
    _Recorder("queue", log, slow).setServiceParent(top)
    _Recorder("listener", log).setServiceParent(top)
    top.startService()
    done = top.stopService()
    # The pool must not stop while the queue is still stopping.
    assert log == ["stop listener", "stop queue"]
    assert not done.called
    slow.callback(None)
    assert log == ["stop listener", "stop queue", "stopped queue", "stop pool"]
    assert done.called


class ShutdownWithDeliveryInFlight(TestCase):
    timeout = 15  # without the fix, stopService never finishes

    async def test_stop_waits_for_the_attempt_and_records_it(self) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="mailrelay-stop-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        config = parse(
            {
                "smtp": {"listen": ["tcp:0:interface=127.0.0.1"]},
                "http": {"listen": "tcp:0:interface=127.0.0.1"},
                "spool": {"path": str(tmp / "spool")},
                "providers": [{"name": "local", "kind": "maildir", "path": str(tmp / "Maildir")}],
            }
        )
        writing = threading.Event()
        release = threading.Event()
        real_write = MaildirProvider._write

        def slow_write(provider: MaildirProvider, name: str, message: object) -> None:
            writing.set()
            release.wait(10)
            real_write(provider, name, message)  # type: ignore[arg-type]

        self.patch(MaildirProvider, "_write", slow_write)
        top = buildService(reactor, config)
        top.startService()
        # Put a message in the spool through the same writer the SMTP server uses.
        spool = Spool(tmp / "spool", _Inline())
        envelope = Envelope(
            "0000000000000000000001", "a@example.com", ("b@example.com",), 0.0, "127.0.0.1", "t"
        )
        writer = spool.open_writer(envelope)
        writer.write(b"Subject: stop\r\n\r\nbody\r\n")
        writer.commit()
        [queue_service] = [s for s in top if isinstance(s, _QueueService)]
        queue_service._queue.enqueue(envelope)
        while not writing.is_set():
            await task.deferLater(reactor, 0.01, lambda: None)
        stopping = top.stopService()
        reactor.callLater(0.2, release.set)
        await stopping
        # The delivery completed, was recorded (message removed), and happened exactly once.
        assert len(list((tmp / "Maildir" / "new").iterdir())) == 1
        assert list((tmp / "spool" / "queue").iterdir()) == []


class _Inline:
    def run(self, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        return defer.maybeDeferred(f, *args, **kwargs)
