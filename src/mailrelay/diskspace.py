"""Free space on the spool's filesystem, checked before a transaction starts.

Refusing at MAIL with ``452 4.3.1`` costs the client nothing (it keeps the message and retries
later) and costs us nothing (no spool file is opened). Running out in the middle of DATA, by
contrast, is only noticed at a failed write or fsync, after part of the message was written.
So the inbound side asks ``is_low`` before each MAIL, keeping a floor of free space in reserve
for the messages already being received and for the queue's journals.
"""

from __future__ import annotations

import os

from twisted.internet.interfaces import IReactorTime

from mailrelay.logger import Logger

# How long one statvfs answer is reused. A burst of pipelined MAIL commands (hundreds a second
# from a busy application) then costs one system call a second; free space does not move fast
# enough for a second's staleness to matter next to a floor of megabytes.
CACHE_SECONDS = 1.0


class FreeSpace:
    """Whether the filesystem holding ``path`` has less than ``floor`` bytes free."""

    log = Logger()

    def __init__(self, path: str | os.PathLike[str], floor: int, clock: IReactorTime) -> None:
        self._path = os.fspath(path)
        self._floor = floor
        self._clock = clock
        self._checked_at: float | None = None
        # None when statvfs failed: we do not know, and say "not low" (see _measure).
        self._free: int | None = None
        # Each condition is logged when it starts, not once per MAIL command.
        self._failing = False
        self._low = False

    def is_low(self, needed: int = 0) -> bool:
        """True when free space, less ``needed`` bytes (a declared SIZE), is under the floor."""
        free = self.available()
        if free is None:
            return False
        return free - needed < self._floor

    def available(self) -> int | None:
        """Free bytes for us (cached for CACHE_SECONDS); None when statvfs fails."""
        now = self._clock.seconds()
        # A wall clock can step backwards: then the cached answer's age is unknown, measure.
        if self._checked_at is None or not 0 <= now - self._checked_at < CACHE_SECONDS:
            self._free = self._measure()
            self._checked_at = now
        return self._free

    def _measure(self) -> int | None:
        try:
            # Looked up on the module at each call, so tests can monkeypatch os.statvfs.
            st = os.statvfs(self._path)
        except OSError as e:
            # Failing open: a check that cannot run must not stop all mail (the spool's own
            # write and fsync errors still answer 451 if the disk really is full). Logged once
            # per outage, since it would otherwise repeat on every MAIL command.
            if not self._failing:
                self._failing = True
                self.log.error(
                    "cannot check free space on {path}: {error}; accepting mail without the"
                    " min_free_space check until it works again",
                    path=self._path,
                    error=e.strerror or str(e),
                )
            return None
        if self._failing:
            self._failing = False
            self.log.info("free space on {path} can be checked again", path=self._path)
        # f_bavail, not f_bfree: blocks reserved for root are not ours to use.
        free = st.f_bavail * st.f_frsize
        low = free < self._floor
        if low != self._low:
            self._low = low
            if low:
                self.log.warn(
                    "free space on {path} is {free} bytes, below min_free_space {floor}:"
                    " new mail is refused with 452 4.3.1",
                    path=self._path,
                    free=free,
                    floor=self._floor,
                )
            else:
                self.log.info(
                    "free space on {path} is {free} bytes, above min_free_space {floor}:"
                    " accepting mail again",
                    path=self._path,
                    free=free,
                    floor=self._floor,
                )
        return free
