"""A FileSystem that models what survives a power cut (reliability case 19).

``PowerLossFS`` does every call on a real directory (so the code under test reads back what it
wrote, as on a running machine) and keeps, beside it, a model of what is *durable*:

- Inodes are tracked: a rename moves the inode (its durable content goes with it), an unlink
  only drops a name.
- A file's content (and mtime) is durable as of its last ``fsync``; a file never fsynced has
  the durable content ``b""``. Unsynced writes, truncates and ``utime`` calls are lost.
- Directory entries (create, mkdir, rename, unlink) depend on the model:

  ``"directory"`` (the default, a conservative POSIX reading): an entry change is durable only
  once its directory is fsynced. At a crash each directory reverts to its entries as of its
  last fsync: renamed files reappear under the old name, unlinked ones come back, new names
  vanish. A rename between directories whose target was fsynced but not its source leaves the
  file in both (two independent copies: hard links are not recreated).

  ``"journal"`` (a journaling file system such as ext4, with data=writeback): entry changes are
  committed in order, and any fsync commits all of them made before it. At a crash a prefix of
  the entry changes survives: all of them up to the last fsync, and a seeded random number of
  the later ones. File data is still durable only as of each file's own fsync, so a name can
  survive with content ``b""`` or an older content.

``cut_at=N`` makes the N-th mutating call (see ``FileSystem``: each write to an open file counts
once) raise ``PowerCut`` without doing anything; every call after it raises ``PowerCut`` too
(the machine is off). Reads are not counted (a cut at a read is the same as a cut at the next
mutating call). ``crash()`` then rewrites the real directory to exactly the durable state and
retires this instance; the next "boot" uses a new one.

Real fsyncs are not made (the model decides what survives), which keeps the test fast.

Limits (what the model does not cover): torn or reordered writes inside a file (unsynced data
is lost whole, never half-kept or zero-filled); an fsync that fails (EIO); file modes and
directory modes (``chmod``) are kept as if durable; files written by something other than this
object are adopted as durable when first seen (none are in the power-loss tests).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import stat
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mailrelay.spool.fs import FileSystem, SpoolFile

Model = Literal["directory", "journal"]


class PowerCut(Exception):
    """The power went out: raised by the call the cut falls on and by every call after it."""


@dataclass
class _Inode:
    number: int
    is_dir: bool
    data: bytes = b""  # files: durable content, as of the last fsync
    mtime: float = 0.0  # durable mtime, as of the last fsync (or of creation)
    mode: int = 0o700
    entries: dict[str, int] = field(default_factory=dict)  # directories: now
    synced_entries: dict[str, int] = field(default_factory=dict)  # as of the last fsync


# One change of the name space, as logged for the "journal" model.
_Change = tuple[str, int, str, int, str]  # (kind, dir, name, inode or target dir, target name)


class _File:
    """What ``create_exclusive`` returns: a buffered file whose writes are counted."""

    def __init__(self, fs: PowerLossFS, fd: int, path: Path) -> None:
        self._fs = fs
        self._fd = fd
        self._path = path
        self._file = os.fdopen(fd, "wb")
        self._closed = False

    def write(self, data: bytes | bytearray, /) -> int:
        self._fs._op("write", self._path)
        return self._file.write(data)

    def flush(self) -> None:
        self._fs._check()
        self._file.flush()

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        # Never raises, even after the cut: closing is what the kernel does to a dead process.
        if self._closed:
            return
        self._closed = True
        self._fs._fds.pop(self._fd, None)
        with contextlib.suppress(OSError):
            self._file.close()


class PowerLossFS(FileSystem):
    def __init__(
        self, base: Path, cut_at: int | None = None, model: Model = "directory", seed: int = 0
    ) -> None:
        """``base``: an existing directory; everything under it now counts as durable."""
        if not base.is_dir():
            raise ValueError(f"{base} is not a directory")
        self.base = base
        self.cut_at = cut_at
        self.model = model
        self._rand = random.Random(seed)
        self.ops = 0  # mutating calls so far (the cut one included)
        self.cut = False  # the power went out (PowerCut raised)
        self.crashed = False  # crash() ran: this instance is retired
        self.history: list[str] = []  # "N kind path" of every mutating call, for messages
        self._inodes: dict[int, _Inode] = {}
        self._fds: dict[int, int] = {}  # open descriptor -> inode number
        self._changes: list[_Change] = []  # "journal" model: every name-space change
        self._committed = 0  # "journal" model: changes made durable by an fsync
        self._initial: dict[int, dict[str, int]] = {}
        self._root = self._adopt(base)
        self._initial = {n: dict(i.entries) for n, i in self._inodes.items() if i.is_dir}

    # -- the model ------------------------------------------------------------------------------

    def _new_inode(self, is_dir: bool, mtime: float, mode: int, data: bytes = b"") -> _Inode:
        inode = _Inode(len(self._inodes) + 1, is_dir, data=data, mtime=mtime, mode=mode)
        self._inodes[inode.number] = inode
        return inode

    def _adopt(self, path: Path) -> _Inode:
        """A file or tree the model did not make: taken as durable as it is now."""
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            inode = self._new_inode(True, st.st_mtime, stat.S_IMODE(st.st_mode))
            for name in os.listdir(path):
                inode.entries[name] = self._adopt(path / name).number
            inode.synced_entries = dict(inode.entries)
            return inode
        return self._new_inode(False, st.st_mtime, stat.S_IMODE(st.st_mode), path.read_bytes())

    def _dir(self, path: Path) -> _Inode:
        inode = self._root
        for part in path.relative_to(self.base).parts:
            number = self._entry(inode, part, None)
            if number is None:
                raise FileNotFoundError(f"model: no directory {path}")
            inode = self._inodes[number]
        if not inode.is_dir:
            raise NotADirectoryError(f"model: {path} is not a directory")
        return inode

    def _entry(self, directory: _Inode, name: str, path: Path | None) -> int | None:
        """The inode a name stands for now; a name made by something else is adopted, as if
        it had been there, durable, from the start."""
        number = directory.entries.get(name)
        if number is None and path is not None and os.path.lexists(path):
            number = self._adopt(path).number
            directory.entries[name] = directory.synced_entries[name] = number
            self._initial.setdefault(directory.number, {})[name] = number
        return number

    def _link(self, directory: _Inode, name: str, inode: _Inode) -> int:
        directory.entries[name] = inode.number
        self._changes.append(("link", directory.number, name, inode.number, ""))
        return inode.number

    def _unlink(self, directory: _Inode, name: str) -> None:
        if directory.entries.pop(name, None) is not None:
            self._changes.append(("unlink", directory.number, name, 0, ""))

    def _op(self, kind: str, path: object) -> None:
        self._check()
        self.ops += 1
        self.history.append(f"{self.ops} {kind} {path}")
        if self.ops == self.cut_at:
            self.cut = True
            raise PowerCut(f"power cut at operation {self.ops}: {kind} {path}")

    def _check(self) -> None:
        if self.crashed:
            raise PowerCut("this file system crashed; mount it again with a new PowerLossFS")
        if self.cut:
            raise PowerCut("the power is off")

    def _commit(self) -> None:
        self._committed = len(self._changes)

    def _durable_entries(self) -> dict[int, dict[str, int]]:
        """Directory inode -> its entries after the crash."""
        if self.model == "directory":
            return {n: i.synced_entries for n, i in self._inodes.items() if i.is_dir}
        keep = self._rand.randint(self._committed, len(self._changes))
        entries = {n: dict(e) for n, e in self._initial.items()}
        for kind, directory, name, other, target in self._changes[:keep]:
            names = entries.setdefault(directory, {})
            if kind == "link":
                names[name] = other
            elif kind == "unlink":
                names.pop(name, None)
            elif name in names:  # rename
                entries.setdefault(other, {})[target] = names.pop(name)
        return entries

    def durable_state(self) -> dict[str, bytes | None]:
        """What a crash now would leave: relative path -> content (None for a directory)."""
        entries = self._durable_entries()
        state: dict[str, bytes | None] = {}

        def walk(number: int, prefix: str) -> None:
            for name, child in sorted(entries.get(number, {}).items()):
                inode = self._inodes[child]
                state[prefix + name] = None if inode.is_dir else inode.data
                if inode.is_dir:
                    walk(child, prefix + name + "/")

        walk(self._root.number, "")
        return state

    def crash(self) -> None:
        """Leave on disk exactly what survives the power cut (now, if none happened yet);
        every later call on this object raises PowerCut."""
        if self.crashed:
            raise PowerCut("crashed already")
        entries = self._durable_entries()
        self.cut = self.crashed = True
        for fd in list(self._fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        for name in os.listdir(self.base):
            path = self.base / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

        def build(number: int, path: Path) -> None:
            for name, child in entries.get(number, {}).items():
                inode = self._inodes[child]
                target = path / name
                if inode.is_dir:
                    target.mkdir()
                    build(child, target)
                else:
                    target.write_bytes(inode.data)
                os.chmod(target, inode.mode)
                os.utime(target, (inode.mtime, inode.mtime))

        build(self._root.number, self.base)

    # -- FileSystem: message files --------------------------------------------------------------

    def create_exclusive(self, path: Path) -> SpoolFile:
        self._op("create", path)
        directory = self._dir(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        st = os.fstat(fd)
        self._link(directory, path.name, self._new_inode(False, st.st_mtime, st.st_mode & 0o777))
        self._fds[fd] = directory.entries[path.name]
        return _File(self, fd, path)

    def utime_fd(self, fd: int, when: float) -> None:
        self._op("utime", fd)
        os.utime(fd, (when, when))

    def fsync(self, fd: int) -> None:
        self._op("fsync", fd)
        inode = self._inodes[self._fds[fd]]
        st = os.fstat(fd)
        inode.data = os.pread(fd, st.st_size, 0)
        inode.mtime = st.st_mtime
        self._commit()

    # -- FileSystem: journals ---------------------------------------------------------------------

    def open_append(self, path: Path) -> int:
        self._op("open_append", path)
        directory = self._dir(path.parent)
        number = self._entry(directory, path.name, path)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if number is None:
            number = self._link(directory, path.name, self._new_inode(False, 0.0, 0o600))
            self._inodes[number].mtime = os.fstat(fd).st_mtime
        self._fds[fd] = number
        return fd

    def size(self, fd: int) -> int:
        self._check()
        return super().size(fd)

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        self._check()
        return super().pread(fd, length, offset)

    def truncate(self, fd: int, length: int) -> None:
        self._op("truncate", fd)
        os.ftruncate(fd, length)

    def write(self, fd: int, data: bytes) -> int:
        self._op("write", fd)
        return os.write(fd, data)

    def close(self, fd: int) -> None:
        self._fds.pop(fd, None)
        os.close(fd)

    # -- FileSystem: names ------------------------------------------------------------------------

    def rename(self, source: Path, target: Path) -> None:
        self._op("rename", f"{source} -> {target}")
        from_dir, to_dir = self._dir(source.parent), self._dir(target.parent)
        number = self._entry(from_dir, source.name, source)
        self._entry(to_dir, target.name, target)
        os.rename(source, target)
        assert number is not None
        del from_dir.entries[source.name]
        to_dir.entries[target.name] = number
        self._changes.append(("rename", from_dir.number, source.name, to_dir.number, target.name))

    def unlink(self, path: Path, missing_ok: bool = False) -> None:
        self._op("unlink", path)
        directory = self._dir(path.parent)
        self._entry(directory, path.name, path)
        path.unlink(missing_ok=missing_ok)
        self._unlink(directory, path.name)

    def fsync_directory(self, path: Path) -> None:
        self._op("fsync_directory", path)
        directory = self._dir(path)
        on_disk = set(os.listdir(path))
        for name in on_disk - directory.entries.keys():
            self._entry(directory, name, path / name)
        for name in directory.entries.keys() - on_disk:
            self._unlink(directory, name)  # removed by something other than this object
        directory.synced_entries = dict(directory.entries)
        self._commit()

    def mkdir(self, path: Path, parents: bool = False, exist_ok: bool = False) -> None:
        self._op("mkdir", path)
        path.mkdir(parents=parents, exist_ok=exist_ok)
        inode = self._root
        current = self.base
        for part in path.relative_to(self.base).parts:
            current = current / part
            number = inode.entries.get(part)
            if number is None:
                st = os.stat(current)
                child = self._new_inode(True, st.st_mtime, stat.S_IMODE(st.st_mode))
                number = self._link(inode, part, child)
            inode = self._inodes[number]

    def chmod(self, path: Path, mode: int) -> None:
        self._op("chmod", path)
        os.chmod(path, mode)
        number = self._entry(self._dir(path.parent), path.name, path)
        assert number is not None
        self._inodes[number].mode = mode

    def utime(self, path: Path, when: float) -> None:
        self._op("utime", path)
        os.utime(path, (when, when))

    # -- FileSystem: reading ----------------------------------------------------------------------

    def read_bytes(self, path: Path) -> bytes:
        self._check()
        return path.read_bytes()

    def exists(self, path: Path) -> bool:
        self._check()
        return path.exists()

    def is_dir(self, path: Path) -> bool:
        self._check()
        return path.is_dir()

    def listdir(self, path: Path) -> list[str]:
        self._check()
        return os.listdir(path)

    def scandir(self, path: Path) -> AbstractContextManager[Iterator[os.DirEntry[str]]]:
        self._check()
        return os.scandir(path)
