"""The maildrop: where ``mailrelay-sendmail`` leaves mail for the daemon to pick up.

Like Postfix's maildrop, ``<spool>/maildrop/`` is sticky and writable by every local user but
not listable (mode 1733), so a cron job or PHP's mail() can hand over a message while the
daemon is down. A file is written as ``.<queue_id>.tmp``, fsynced, renamed to ``<queue_id>``
and the directory fsynced: a file without the leading dot is complete. The files are written
by other users, so the pickup side trusts nothing in them and runs :func:`validate` again.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import attrs

from mailrelay.address import AddressError, parse_mailbox
from mailrelay.cli import control_client
from mailrelay.spool.format import Envelope, encode_message
from mailrelay.spool.store import fsync_directory, is_queue_id

MAILDROP = "maildrop"
CONTROL_SOCKET = "control.sock"
# Sticky, writable by all, not listable: users can drop files but not see or touch others'.
MAILDROP_MODE = 0o1733
# The daemon reads files other users wrote, so they must be readable whatever their umask.
FILE_MODE = 0o644
MAX_LINE = 998  # octets, excluding CRLF (RFC 5322 2.1.1)


@attrs.frozen
class MaildropError(Exception):
    """A message that may not go into (or come out of) the maildrop, and why."""

    reason: str


class SpoolMissing(MaildropError):
    """The spool root itself is absent: most likely sendmail and the daemon disagree on it."""


def check_address(address: str, allow_null: bool) -> None:
    """Refuse anything the SMTP side would refuse, and anything not already in canonical form
    (parse_mailbox drops a source route; what we store must be what we would forward)."""
    try:
        path = b"<" + address.encode("ascii") + b">"
    except UnicodeEncodeError:
        raise MaildropError(f"non-ASCII address {address!r}") from None
    try:
        parsed = parse_mailbox(path, allow_null=allow_null)
    except AddressError as e:
        raise MaildropError(f"invalid address {address!r}: {e.text}") from None
    if parsed != address:
        raise MaildropError(f"invalid address {address!r}: not in canonical form")


def first_long_line(body: bytes) -> int | None:
    """The 1-based number of the first line longer than MAX_LINE octets, or None.

    Probes every (MAX_LINE + 1)th offset and measures only the line around it: a line that
    long must contain a probe, so a 25 MB body costs ~26k find() calls, not a Python loop
    over every line.
    """
    for probe in range(0, len(body), MAX_LINE + 1):
        start = body.rfind(b"\n", 0, probe) + 1
        end = body.find(b"\n", probe)
        if end < 0:
            end = len(body)
        length = end - start
        if length and body[end - 1 : end] == b"\r":
            length -= 1
        if length > MAX_LINE:
            return body.count(b"\n", 0, start) + 1
    return None


def validate(envelope: Envelope, body: bytes, max_message_size: int, max_recipients: int) -> None:
    """Raise MaildropError unless the message may be relayed exactly as it is."""
    if not is_queue_id(envelope.queue_id):
        raise MaildropError(f"bad queue ID {envelope.queue_id!r}")
    check_address(envelope.sender, allow_null=True)
    if not envelope.recipients:
        raise MaildropError("no recipients")
    if len(envelope.recipients) > max_recipients:
        raise MaildropError(
            f"too many recipients ({len(envelope.recipients)}, limit {max_recipients})"
        )
    for recipient in envelope.recipients:
        check_address(recipient, allow_null=False)
    _check_body(body, max_message_size)


def _check_body(body: bytes, max_message_size: int) -> None:
    if len(body) > max_message_size:
        raise MaildropError(f"message too big (limit {max_message_size} bytes)")
    if b"\0" in body:
        raise MaildropError("NUL byte in message")
    # Every CR and every LF is part of a CRLF exactly when the three counts agree.
    crlf = body.count(b"\r\n")
    if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
        raise MaildropError("bare CR or LF in message (lines must end in CRLF)")
    if not body.endswith(b"\r\n"):
        raise MaildropError("message does not end with CRLF")
    line = first_long_line(body)
    if line is not None:
        raise MaildropError(f"line {line} is longer than {MAX_LINE} octets")


def deposit(spool_root: Path, envelope: Envelope, body: bytes) -> None:
    """Make the message durable in ``<spool_root>/maildrop/<queue_id>``, or raise."""
    if not is_queue_id(envelope.queue_id):
        raise MaildropError(f"bad queue ID {envelope.queue_id!r}")
    maildrop = _maildrop_directory(spool_root)
    data = encode_message(envelope, body)
    tmp = maildrop / f".{envelope.queue_id}.tmp"
    final = maildrop / envelope.queue_id
    written: Path | None = None  # what we made and must take back if a later step fails
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        written = tmp
        try:
            _write(fd, data)
            os.rename(tmp, final)
            written = final
            _make_rename_durable(maildrop, fd)
        finally:
            os.close(fd)
    except OSError as e:
        # The caller keeps its copy and gets a temporary failure: leave nothing to pick up.
        # (If only the last fsync failed, the daemon may already have the file: at worst a
        # duplicate, never a loss.)
        if written is not None:
            with contextlib.suppress(OSError):
                written.unlink()
        raise MaildropError(f"cannot write to {maildrop}: {e.strerror or e}") from None


def _maildrop_directory(spool_root: Path) -> Path:
    if not spool_root.is_dir():
        raise SpoolMissing(
            f"spool directory {spool_root.absolute()} does not exist"
            " (does the daemon use this config?)"
        )
    maildrop = spool_root / MAILDROP
    try:
        maildrop.mkdir(mode=MAILDROP_MODE)
    except FileExistsError:
        return maildrop
    except OSError as e:
        raise MaildropError(f"cannot create {maildrop}: {e.strerror or e}") from None
    try:
        os.chmod(maildrop, MAILDROP_MODE)  # mkdir's mode was cut down by the umask
        if os.geteuid() == 0:
            # In a sticky directory only the directory's owner may remove other users' files:
            # that must be the daemon (the spool's owner), not root's cron job that came first.
            owner = spool_root.stat()
            os.chown(maildrop, owner.st_uid, owner.st_gid)
    except OSError as e:
        raise MaildropError(f"cannot set up {maildrop}: {e.strerror or e}") from None
    return maildrop


def _write(fd: int, data: bytes) -> None:
    os.fchmod(fd, FILE_MODE)  # a umask of 077 would leave it unreadable to the daemon
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _make_rename_durable(maildrop: Path, fd: int) -> None:
    try:
        fsync_directory(maildrop)
    except PermissionError:
        # Mode 1733: a user who does not own the maildrop may not open it to fsync it.
        # fsync the file again instead: the rename changed its ctime, so ext4, XFS and btrfs
        # commit the journal transaction that holds the rename with it.
        os.fsync(fd)


def notify_daemon(spool_root: Path, timeout: float = 2.0) -> bool:
    """Ask a running daemon to look at the maildrop now; False on any failure.

    Best effort only: the daemon also polls the maildrop, so a daemon that is down, a socket
    we may not open, or a slow answer just means the mail waits a few seconds longer.
    """
    try:
        answer = control_client.request(spool_root / CONTROL_SOCKET, {"command": "pickup"}, timeout)
    except (OSError, ValueError, control_client.DaemonNotRunning):
        return False
    return answer.get("ok") is True
