"""An acceptor's report pipe that nobody reads stops it accepting, until the pipe drains
(ReportBackpressure on a real StandardIO and real pipes, under twisted.trial)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from twisted.internet import reactor, stdio
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailrelay.acceptors.channel import METRICS
from mailrelay.acceptors.worker import (
    SNAPSHOT_INTERVAL,
    Acceptor,
    AcceptorSettings,
    ReportBackpressure,
    _Channel,
)
from mailrelay.config import LimitsConfig, SMTPConfig, SpoolConfig
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


class _Frames:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> None:
        self.sent.append(data)


def test_no_metrics_snapshot_piles_up_while_paused(tmp_path: Path) -> None:
    clock = Clock()
    frames = _Frames()
    settings = AcceptorSettings(
        index=1,
        tag=1,
        smtp=SMTPConfig(processes=2),
        limits=LimitsConfig(),
        spool=SpoolConfig(path=str(tmp_path / "spool")),
        listeners=(),
    )
    acceptor = Acceptor(clock, settings, frames)  # type: ignore[arg-type]  # a fake channel
    acceptor._snapshots.start(SNAPSHOT_INTERVAL, now=False)

    def metrics_frames() -> int:
        return sum(1 for data in frames.sent if data[:1] == METRICS)

    acceptor.metrics.messages_received.inc()
    clock.advance(SNAPSHOT_INTERVAL)
    assert metrics_frames() == 1
    acceptor.backpressure.pauseProducing()
    for _ in range(5):
        acceptor.metrics.messages_received.inc()
        clock.advance(SNAPSHOT_INTERVAL)
    assert metrics_frames() == 1  # none while the relay process reads nothing
    acceptor.backpressure.resumeProducing()
    clock.advance(SNAPSHOT_INTERVAL)
    assert metrics_frames() == 2  # the latest, once
    acceptor._snapshots.stop()
