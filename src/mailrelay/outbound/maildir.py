"""A provider that writes each message into a local Maildir: the capture mode of the default.

Delivery is atomic in the Maildir way: written and fsynced in ``tmp/``, renamed into ``new/``,
then ``new/`` fsynced. One file per message (not per recipient); ``Return-Path`` and one
``X-Original-To`` per recipient are prepended so the envelope can be seen.
"""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.blocking import BlockingRunner
from mailrelay.config import ProviderConfig
from mailrelay.logger import Logger
from mailrelay.outbound.results import (
    IProvider,
    Kind,
    OutboundMessage,
    Progress,
    ProviderStatus,
    RecipientResult,
    all_results,
)


@implementer(IProvider)
class MaildirProvider:
    log = Logger()
    # A local write: a failure is our disk, which the next provider does not share.
    on_temporary = "next"
    on_permanent = "fail"

    def __init__(self, config: ProviderConfig, clock: IReactorTime, runner: BlockingRunner) -> None:
        self.name = config.name
        self.path = Path(config.path)
        self._clock = clock
        self._runner = runner
        self._counter = itertools.count(1)
        # The host part of a Maildir name may not contain '/' or ':'.
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")

    def deliver(
        self, message: OutboundMessage, progress: Progress | None = None
    ) -> defer.Deferred[list[RecipientResult]]:
        # One write per message: there is no partial progress to report.
        unique = f"M{message.queue_id}P{os.getpid()}Q{next(self._counter)}"
        name = f"{int(self._clock.seconds())}.{unique}.{self._host}"
        d = self._runner.run(self._write, name, message)

        def failed(failure: Failure) -> list[RecipientResult]:
            reason = getattr(failure.value, "strerror", None) or failure.getErrorMessage()
            self.log.error(
                "maildir {path}: cannot deliver: {reason}", path=str(self.path), reason=reason
            )
            return all_results(message, Kind.TEMPORARY, f"451 4.3.0 Maildir write failed: {reason}")

        def stored(_: None) -> list[RecipientResult]:
            return all_results(message, Kind.DELIVERED, f"250 2.0.0 Ok: stored as {name}")

        return d.addCallbacks(stored, failed)

    def _write(self, name: str, message: OutboundMessage) -> None:
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        header = f"Return-Path: <{message.sender}>\r\n" + "".join(
            f"X-Original-To: {r}\r\n" for r in message.recipients
        )
        tmp = self.path / "tmp" / name
        with open(tmp, "xb") as f:
            f.write(header.encode("ascii") + message.body)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.path / "new" / name)
        fd = os.open(self.path / "new", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def status(self) -> ProviderStatus:
        # A local directory has no breaker: a failed write is reported per message.
        return ProviderStatus(state="closed", open_connections=0)
