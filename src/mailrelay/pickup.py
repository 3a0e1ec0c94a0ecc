"""Adopting the messages the sendmail command dropped into ``<spool>/maildrop/``.

The maildrop is writable by every local user, so each file is untrusted: it is decoded
(framing and checksums), checked like a message arriving over SMTP (addresses, size, line
endings, line length), and then *copied* into queue/ as the daemon's own file, written the
same durable way as mail received over SMTP: never renamed, since a file owned by another user
could not be rescheduled (utime) and would stay in that user's hands. The copy is durable
before the maildrop file is removed; a crash in between leaves both, and the next pass sees
the ID in queue/ and only removes the maildrop copy. A file that fails the checks moves to
corrupt/ (as ``maildrop-<name>``), logged and counted.

Runs when the sendmail command pokes the control socket, and every ``interval`` seconds for
users who may not (the socket is the daemon user's only), and once at start, before the queue
is indexed (so a crash-window leftover is recognised while its queue copy is still there).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import attrs
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailrelay.config import SMTPConfig
from mailrelay.metrics import Metrics
from mailrelay.spool.format import CorruptSpoolFile, Envelope, decode_message, encode_message
from mailrelay.spool.maildrop import MaildropError, validate
from mailrelay.spool.store import Spool, fsync_directory, is_queue_id

# Framing adds a few bytes per 256 KiB record; a file much bigger than the size limit is
# refused without being read.
_FRAMING_ALLOWANCE = 1024 * 1024
# A sendmail that died mid-write leaves a dot-file; after this long it is nobody's.
STALE_TMP = 24 * 3600.0


@attrs.frozen
class Adopted:
    envelope: Envelope
    size: int


@attrs.frozen
class Refused:
    name: str
    reason: str


class MaildropPickup:
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        spool: Spool,
        limits: SMTPConfig,
        enqueue: Callable[[Envelope], None],
        metrics: Metrics,
        interval: float = 5.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._spool = spool
        self._limits = limits
        self._enqueue = enqueue
        self._metrics = metrics
        self._interval = interval
        self._now = now
        self._loop: task.LoopingCall | None = None
        self._busy = False
        self._waiters: list[defer.Deferred[int]] = []

    def start_polling(self) -> None:
        self._loop = task.LoopingCall(self.pickup)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False).addErrback(
            lambda f: self.log.failure("maildrop polling stopped", f)
        )

    def stop_polling(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def pickup(self) -> defer.Deferred[int]:
        """Adopt whatever is in the maildrop; fires with how many messages were adopted.

        A call during a pass gets the next pass (its file may have come after this one
        listed the directory); calls during one pass share the next.
        """
        waiter: defer.Deferred[int] = defer.Deferred()
        self._waiters.append(waiter)
        if not self._busy:
            self._start_pass()
        return waiter

    def _start_pass(self) -> None:
        self._busy = True
        waiters, self._waiters = self._waiters, []

        def done(result: int | Failure) -> None:
            self._busy = False
            if isinstance(result, Failure):
                self.log.failure("maildrop pickup failed", result)
                result = 0
            for waiter in waiters:
                waiter.callback(result)
            if self._waiters:
                self._start_pass()

        defer.Deferred.fromCoroutine(self._pass()).addBoth(done)

    async def _pass(self) -> int:
        results = await self._spool.run(self.adopt_all)
        adopted = 0
        for result in results:
            if isinstance(result, Refused):
                self._metrics.messages_rejected.labels("maildrop").inc()
                self.log.error(
                    "maildrop file {name} refused, moved to corrupt/: {reason}",
                    name=result.name,
                    reason=result.reason,
                )
                continue
            adopted += 1
            envelope = result.envelope
            self._metrics.messages_received.inc()
            self._metrics.recipients_received.inc(len(envelope.recipients))
            self.log.info(
                "{queue_id} picked up from maildrop: from=<{sender}> recipients={count}"
                " size={size} client={client}",
                queue_id=envelope.queue_id,
                sender=envelope.sender,
                count=len(envelope.recipients),
                size=result.size,
                client=envelope.client,
            )
            self._enqueue(envelope)
        return adopted

    # -- in the I/O thread ------------------------------------------------------------------------

    def adopt_all(self) -> list[Adopted | Refused]:
        maildrop = self._spool.maildrop
        try:
            names = os.listdir(maildrop)
        except FileNotFoundError:
            return []
        results: list[Adopted | Refused] = []
        for name in sorted(names):
            if name.startswith("."):
                self._remove_if_stale(maildrop / name)
                continue
            result = self._adopt(name)
            if result is not None:
                results.append(result)
        if results:
            fsync_directory(maildrop)
        return results

    def _remove_if_stale(self, path: Path) -> None:
        try:
            if path.stat().st_mtime < self._now() - STALE_TMP:
                path.unlink()
        except FileNotFoundError:
            pass

    def _adopt(self, name: str) -> Adopted | Refused | None:
        source = self._spool.maildrop / name
        try:
            st = os.lstat(source)
            if not is_queue_id(name):
                raise MaildropError("not a queue ID")
            if (self._spool.queue / name).exists():
                # Adopted before a crash that came before the maildrop copy was removed.
                source.unlink()
                return None
            if not os.path.isfile(source) or os.path.islink(source):
                raise MaildropError("not a regular file")
            if st.st_size > self._limits.max_message_size + _FRAMING_ALLOWANCE:
                raise MaildropError("larger than smtp.max_message_size")
            stored = decode_message(source.read_bytes())
            if stored.envelope.queue_id != name:
                raise MaildropError("the envelope names another queue ID")
            validate(
                stored.envelope,
                stored.body,
                self._limits.max_message_size,
                self._limits.max_recipients,
            )
        except FileNotFoundError:
            return None  # gone meanwhile
        except (MaildropError, CorruptSpoolFile, OSError) as e:
            self._quarantine(source, name)
            return Refused(name, str(e))
        # The uid is the file owner's, from the kernel, not whatever the file claims.
        envelope = attrs.evolve(stored.envelope, client=f"sendmail uid={st.st_uid}")
        self._spool.write_durably(envelope, encode_message(envelope, stored.body))
        source.unlink()
        return Adopted(envelope, len(stored.body))

    def _quarantine(self, source: Path, name: str) -> None:
        try:
            os.rename(source, self._spool.corrupt / f"maildrop-{name}")
        except OSError:
            source.unlink(missing_ok=True)
