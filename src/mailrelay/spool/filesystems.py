"""Which file system holds the spool, and whether one fsync can make an acceptance durable.

The durability contract for an accepted message is: its content and its name in queue/ are
on disk before the 250. The portable way is two flushes: fsync the file, rename it into
queue/, fsync queue/. Each flush is a separate trip to the disk, and on the test machine's
ext4 the second one cost 7-17% of the messages a second at one client, 3-14% at ten
(bench/README.md, "the sixth push").

On two Linux file systems the file's own fsync, made *after* the rename, already makes its
new name durable, so the directory's fsync adds nothing:

- ext4 with a journal: the fsync commits the running journal transaction, and the rename
  (which changed the file's inode) is in it or in an earlier one;
- ext4 without a journal: the rename's new directory entry marks the inode "new entry"
  (``EXT4_STATE_NEWENTRY``, set by ``ext4_add_entry``), and fsync then writes that parent
  directory too (``ext4_sync_parent``);
- XFS: the fsync forces the log up to the inode's last change, and the rename is logged in
  order before it.

Postfix makes its queue files durable with their own fsync alone and relies on these file
systems in the same way. Anything else gets the directory fsync as well: tmpfs, overlayfs,
NFS, ext2 mounted as ext2, btrfs (not verified here; its subvolumes' st_dev never matches
mountinfo either), a spool whose device is not the mount's, an unreadable mountinfo.
``spool.directory_fsync = "always"`` asks for it everywhere. Only SMTP acceptances take the
shortcut: bounces, pickups and moves fsync the directory.

ext4 without a journal needs its fsck after a crash, as it always does: a rename caught
half-written there can leave the file under both names with one link.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import attrs

Setting = Literal["auto", "always"]

# The file systems whose fsync of a renamed file makes its new name durable (see above).
NAME_DURABLE_WITH_FILE = frozenset({"ext4", "xfs"})

MOUNTINFO = Path("/proc/self/mountinfo")


@attrs.frozen
class Mount:
    mount_point: str
    fs_type: str
    device: str = ""  # "MAJOR:MINOR", as st_dev of a file on it reads


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts listed in /proc/self/mountinfo (proc(5)), in order; malformed lines skipped.

    A line: ID PARENT MAJOR:MINOR ROOT MOUNT-POINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER.
    """
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) <= separator + 1:
            continue
        mounts.append(Mount(_unescape(fields[4]), fields[separator + 1], fields[2]))
    return mounts


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount that holds ``path`` (absolute, symlinks resolved): the longest mount point
    that is ``path`` or one of its parents; the last one listed wins (mounted over)."""
    found: Mount | None = None
    for mount in mounts:
        point = mount.mount_point
        inside = point == "/" or path == point or path.startswith(point.rstrip("/") + "/")
        if inside and (found is None or len(point) >= len(found.mount_point)):
            found = mount
    return found


@attrs.frozen
class AcceptanceSync:
    """How an acceptance is made durable: ``directory_fsync`` (rename, then fsync queue/ as
    well) or not (rename, then the file's fsync alone); ``reason`` says why, for the log."""

    directory_fsync: bool
    reason: str


def decide(setting: Setting, path: str, mounts: list[Mount], device: str | None) -> AcceptanceSync:
    """The choice for ``spool.directory_fsync`` = ``setting`` ("auto" or "always"), the spool
    at ``path`` (absolute, symlinks resolved) on ``device`` ("MAJOR:MINOR" of its st_dev; None
    if unknown), given the system's ``mounts``."""
    if setting == "always":
        return AcceptanceSync(True, 'spool.directory_fsync = "always"')
    mount = mount_of(path, mounts)
    if mount is None:
        return AcceptanceSync(True, f"no mount found for {path}")
    where = f"{mount.fs_type} on {mount.mount_point}"
    if mount.fs_type not in NAME_DURABLE_WITH_FILE:
        return AcceptanceSync(True, f"{where}: not known to make a new name durable with the file")
    if device != mount.device:
        # A mount hidden under a later one on a parent directory (an NFS mount over /srv
        # hides an ext4 /srv/spool): the mount found is not the file system that holds the
        # spool, so no shortcut.
        return AcceptanceSync(
            True, f"{where}, but the spool is on device {device or 'unknown'}, not {mount.device}"
        )
    return AcceptanceSync(False, f"{where}: the file's fsync makes its new name durable")


def acceptance_sync(
    spool_path: str | Path, setting: Setting, mountinfo: Path = MOUNTINFO
) -> AcceptanceSync:
    """``decide`` for this system: reads ``mountinfo`` and the spool's st_dev (the spool
    directory must exist). The relay process decides once; its acceptors are told."""
    if setting == "always":
        return decide(setting, "", [], None)  # nothing to read
    try:
        mounts = parse_mountinfo(mountinfo.read_text(encoding="utf-8", errors="surrogateescape"))
    except OSError as e:
        return AcceptanceSync(True, f"cannot read {mountinfo}: {e.strerror or e}")
    path = os.path.realpath(spool_path)
    try:
        st_dev = os.stat(path).st_dev
        device: str | None = f"{os.major(st_dev)}:{os.minor(st_dev)}"
    except OSError:
        device = None
    return decide(setting, path, mounts, device)
