"""An acceptor's report pipe that nobody reads stops it accepting, until the pipe drains
(ReportBackpressure on a real StandardIO and real pipes, under twisted.trial)."""

from __future__ import annotations

import contextlib
import os

from twisted.internet import reactor, stdio
from twisted.trial import unittest

from mailrelay.acceptors.worker import ReportBackpressure, _Channel
from tests.support.polling import poll


class _Port:
    def __init__(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class ReportBackpressureTests(unittest.TestCase):
    async def test_a_full_pipe_pauses_accepting_and_a_drained_one_resumes_it(self) -> None:
        read_end, write_end = os.pipe()
        stdin_read, stdin_write = os.pipe()
        os.set_blocking(read_end, False)
        channel = _Channel(reactor)
        transport = stdio.StandardIO(
            channel,
            stdin=stdin_read,
            stdout=write_end,
            reactor=reactor,  # type: ignore[call-arg]  # the POSIX one
        )
        port = _Port()
        backpressure = ReportBackpressure(lambda: [port])
        transport.registerProducer(backpressure, True)

        def close() -> None:
            transport.unregisterProducer()
            transport.loseConnection()
            for fd in (read_end, stdin_write):
                os.close(fd)

        self.addCleanup(close)

        frame = b"Q" * 1000
        sent = 0
        while not backpressure.paused and sent < 1000:  # 1 MB: far past both buffers
            channel.send(frame)
            sent += 1
        assert backpressure.paused and not port.reading
        assert sent > 64, sent  # the kernel's pipe buffer took its share first

        received = 0

        def read_some() -> None:
            nonlocal received
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(read_end, 1 << 16):
                    received += len(chunk)

        def resumed() -> bool:
            read_some()
            return not backpressure.paused

        def all_arrived() -> bool:
            read_some()
            return received == sent * len(frame)

        await poll(resumed, 10, "accepting again")
        assert port.reading
        await poll(all_arrived, 10, "every report, in full")
