"""The file-system calls the spool makes, behind one small object a test can replace.

``Spool`` (and its ``MessageWriter``) make every file-system call for messages, journals and
the attempt log through a ``FileSystem``: one method per call, with the same arguments and
semantics as the ``os`` / ``pathlib`` call it stands for. The default, ``REAL_FS``, is
exactly those calls (no extra work, no caching), so behaviour and speed are those of plain
``os``. A test substitutes a subclass, e.g. one that models what survives a power cut
(tests/support/powerloss.py).

Each method looks up the ``os`` function when it is called, so a test that monkeypatches
``os.fsync`` or ``os.rename`` still reaches the spool's calls.

Calls that change what a power cut can leave behind: ``create_exclusive`` and the writes to
the file it returns, ``open_append``, ``write``, ``truncate``, ``fsync``, ``utime_fd``,
``utime``, ``rename``, ``unlink``, ``mkdir``, ``chmod``, ``fsync_directory``.
The others only read.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol


class SpoolFile(Protocol):
    """A file opened for writing a message (``open(path, "xb")``): written, flushed, then
    fsynced through its descriptor (``FileSystem.fsync``), then closed."""

    def write(self, data: bytes | bytearray, /) -> int: ...

    def flush(self) -> None: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


# What read_bytes asks for after the first read (a file that grew since its fstat).
READ_CHUNK = 1 << 20


class _WholeWrites(io.FileIO):
    """A file without a buffer whose ``write`` writes everything it is given.

    A message is written in one call (or a few large ones when it spills), so a buffer only
    costs: opening a buffered file takes three more system calls (a tty check, two seeks),
    each a turn of the GIL for the I/O thread that makes it. A raw write may be short (a
    signal, a huge size), hence the loop."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += super().write(view[done:]) or 0
        return done


def fsync_directory(path: Path) -> None:
    """Make the entries of a directory durable (its creations, renames and removals)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSystem:
    """The real file system: each method is the ``os`` / ``pathlib`` call it is named for."""

    # -- message files ----------------------------------------------------------------------

    def create_exclusive(self, path: Path) -> SpoolFile:
        """A new file, opened for writing, mode 0600 (mail is private); FileExistsError if
        the name exists."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return _WholeWrites(fd, "wb")

    def utime_fd(self, fd: int, when: float) -> None:
        """Set an open file's atime and mtime."""
        os.utime(fd, (when, when))

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    # -- journals and the attempt log, by descriptor -----------------------------------------

    def open_append(self, path: Path) -> int:
        """Open for reading and appending, creating the file (mode 0600) if missing. Not
        inherited by a child process (the attempt log's descriptor stays open for long)."""
        return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def size(self, fd: int) -> int:
        return os.fstat(fd).st_size

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset)

    def truncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def close(self, fd: int) -> None:
        os.close(fd)

    # -- names ------------------------------------------------------------------------------

    def rename(self, source: Path, target: Path) -> None:
        """``os.rename``: replaces ``target`` if it exists."""
        os.rename(source, target)

    def unlink(self, path: Path, missing_ok: bool = False) -> None:
        path.unlink(missing_ok=missing_ok)

    def fsync_directory(self, path: Path) -> None:
        fsync_directory(path)

    def mkdir(self, path: Path, parents: bool = False, exist_ok: bool = False) -> None:
        path.mkdir(parents=parents, exist_ok=exist_ok)

    def chmod(self, path: Path, mode: int) -> None:
        os.chmod(path, mode)

    def utime(self, path: Path, when: float) -> None:
        """Set a file's atime and mtime by name (FileNotFoundError if it is gone)."""
        os.utime(path, (when, when))

    # -- reading ----------------------------------------------------------------------------

    def read_bytes(self, path: Path) -> bytes:
        """The whole file, as ``path.read_bytes()``, in five system calls instead of nine (no
        buffered file object: the queue reads every message it sends once)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = [os.read(fd, os.fstat(fd).st_size + 1)]
            while chunks[-1]:  # until end of file: a read may return less than asked
                chunks.append(os.read(fd, READ_CHUNK))
        finally:
            os.close(fd)
        return chunks[0] if len(chunks) == 2 else b"".join(chunks)

    def exists(self, path: Path) -> bool:
        return path.exists()

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def listdir(self, path: Path) -> list[str]:
        """Names in a directory, in directory order (FileNotFoundError if it is missing)."""
        return os.listdir(path)

    def scandir(self, path: Path) -> AbstractContextManager[Iterator[os.DirEntry[str]]]:
        """``os.scandir``: entries with a cached ``stat`` (one call per entry)."""
        return os.scandir(path)


REAL_FS = FileSystem()


class NotRegularFile(Exception):
    """A FIFO, a directory, a symbolic link...: not a file we read."""


def open_regular_file(path: Path) -> tuple[int, os.stat_result]:
    """Open for reading a file another user may have put there: a descriptor and its stat.

    Checked on the open file itself: a symbolic link is refused (O_NOFOLLOW, so one swapped in
    after a check cannot redirect us), a FIFO cannot block the open (O_NONBLOCK), and anything
    but a regular file raises NotRegularFile (the descriptor is closed then).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegularFile("not a regular file (a symbolic link)") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegularFile("not a regular file")
    return fd, st
