"""The real FileSystem's own code: whole writes and whole reads with plain os calls."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from mailrelay.spool import fs as spool_fs
from mailrelay.spool.fs import REAL_FS


def test_read_bytes_returns_the_whole_file(tmp_path: Path) -> None:
    for size in (0, 1, 4603, (3 << 20) + 7):
        path = tmp_path / f"f{size}"
        data = os.urandom(size)
        path.write_bytes(data)
        assert REAL_FS.read_bytes(path) == data


def test_read_bytes_reads_past_a_short_first_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read may return less than asked (a signal, a file that grew since its fstat): the
    # rest is read until end of file, never taken for the end.
    path = tmp_path / "f"
    data = os.urandom(10_000)
    path.write_bytes(data)
    real_read = os.read
    monkeypatch.setattr(spool_fs.os, "read", lambda fd, n: real_read(fd, min(n, 999)))
    assert REAL_FS.read_bytes(path) == data


def test_read_bytes_of_a_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        REAL_FS.read_bytes(tmp_path / "missing")


def test_create_exclusive_writes_everything_it_is_given(tmp_path: Path) -> None:
    path = tmp_path / "m"
    file = REAL_FS.create_exclusive(path)
    assert file.write(b"abc") == 3
    assert file.write(bytearray(b"de")) == 2
    file.flush()
    file.close()
    file.close()  # closing twice is harmless, as for any file object
    assert path.read_bytes() == b"abcde"
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        REAL_FS.create_exclusive(path)


class _ShortWrites(io.FileIO):
    """A raw file that writes at most 3 bytes a call, as a raw write may."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int:  # type: ignore[override]
        return super().write(memoryview(data)[:3])


def test_a_short_raw_write_is_continued(tmp_path: Path) -> None:
    class Both(spool_fs._WholeWrites, _ShortWrites):
        pass

    path = tmp_path / "m"
    with Both(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as file:
        assert file.write(b"0123456789") == 10
    assert path.read_bytes() == b"0123456789"
