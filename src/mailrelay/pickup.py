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
import stat
import time
from collections.abc import Callable
from pathlib import Path

import attrs
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from mailrelay.config import SMTPConfig
from mailrelay.logger import Logger
from mailrelay.metrics import Metrics
from mailrelay.spool.format import CorruptSpoolFile, Envelope, decode_message, encode_message
from mailrelay.spool.fs import NotRegularFile, open_regular_file
from mailrelay.spool.maildrop import MaildropError, validate
from mailrelay.spool.store import Spool, SpoolWriteError, fsync_directory, is_queue_id

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


@attrs.frozen
class Stuck:
    """An entry left in the maildrop for now (reported once per daemon life)."""

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
        self._reported_stuck: set[str] = set()

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
            if isinstance(result, Stuck):
                if result.name not in self._reported_stuck:
                    self._reported_stuck.add(result.name)
                    self.log.error(
                        "maildrop entry {name} left in place: {reason}",
                        name=result.name,
                        reason=result.reason,
                    )
                continue
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
                event="received",
                sender=envelope.sender,
                first_recipients=list(envelope.recipients[:3]),
                count=len(envelope.recipients),
                size=result.size,
                client=envelope.client,
            )
            self._enqueue(envelope)
        return adopted

    # -- in the I/O thread ------------------------------------------------------------------------

    def adopt_all(self) -> list[Adopted | Refused | Stuck]:
        maildrop = self._spool.maildrop
        try:
            names = os.listdir(maildrop)
        except FileNotFoundError:
            return []
        results: list[Adopted | Refused | Stuck] = []
        for name in sorted(names):
            try:
                if name.startswith("."):
                    self._remove_if_stale(maildrop / name)
                    continue
                result = self._adopt(name)
            except OSError as e:
                # One entry we cannot handle (another user's directory, a file we may not
                # remove) must not stop the others, on this pass or any later one.
                result = Stuck(name, f"{e.strerror or e}")
            except Exception as e:
                # Whatever else a hostile file makes our code raise: same rule.
                result = Stuck(name, f"{type(e).__name__}: {e}")
            if result is not None:
                results.append(result)
        if any(isinstance(r, Adopted | Refused) for r in results):
            fsync_directory(maildrop)
        return results

    def _remove_if_stale(self, path: Path) -> None:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) or st.st_mtime >= self._now() - STALE_TMP:
            return
        path.unlink(missing_ok=True)

    def _adopt(self, name: str) -> Adopted | Refused | Stuck | None:
        source = self._spool.maildrop / name
        try:
            if not is_queue_id(name):
                raise MaildropError("not a queue ID")
            if self._spool.area_of(name) is not None:
                # Adopted before a crash that came before the maildrop copy was removed (and
                # maybe held or failed since), or a file naming another message's ID: either
                # way the message with that ID is the spool's, never replaced from here.
                source.unlink()
                return None
            data, owner = self._read_untrusted(source)
            stored = decode_message(data)
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
        except (MaildropError, CorruptSpoolFile) as e:
            self._quarantine(source, name)
            return Refused(name, str(e))
        except NotRegularFile as e:
            # Removed, never kept in corrupt/ (where the queue commands read every file).
            try:
                source.unlink()
            except IsADirectoryError:
                source.rmdir()  # a directory with something in it raises: reported, left
            return Refused(name, str(e))
        # The uid is the file owner's, from the kernel, not whatever the file claims; the time
        # is ours too (it is the first next-attempt time and starts the lifetime).
        envelope = attrs.evolve(
            stored.envelope, client=f"sendmail uid={owner}", received_at=self._now()
        )
        try:
            self._spool.write_durably(envelope, encode_message(envelope, stored.body))
        except SpoolWriteError as e:
            return Stuck(name, f"cannot write it into queue/: {e}")  # tried again next pass
        source.unlink()
        return Adopted(envelope, len(stored.body))

    def _read_untrusted(self, path: Path) -> tuple[bytes, int]:
        """The file's bytes and owner (see open_regular_file for what is refused)."""
        fd, st = open_regular_file(path)
        try:
            if st.st_size > self._limits.max_message_size + _FRAMING_ALLOWANCE:
                raise MaildropError("larger than smtp.max_message_size")
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(self._limits.max_message_size + _FRAMING_ALLOWANCE + 1)
        finally:
            os.close(fd)
        return data, st.st_uid

    def _quarantine(self, source: Path, name: str) -> None:
        try:
            os.rename(source, self._spool.corrupt / f"maildrop-{name}")
        except OSError:
            source.unlink(missing_ok=True)  # a directory raises here: the caller reports it
            return
        fsync_directory(self._spool.corrupt)  # kept for a person to look at, so kept durably
