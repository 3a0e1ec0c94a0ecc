"""Which file system holds the spool, and how an acceptance is made durable on it
(mailrelay.spool.filesystems, Spool.acceptance_directory_fsync)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailrelay.blocking import InlineRunner
from mailrelay.spool.filesystems import (
    Mount,
    acceptance_sync,
    mount_of,
    parse_mountinfo,
)
from mailrelay.spool.format import (
    CorruptSpoolFile,
    TruncatedSpoolFile,
    decode_message,
    encode_message,
)
from mailrelay.spool.fs import FileSystem
from mailrelay.spool.store import Spool, SpoolWriteError
from tests.unit.fakes import envelope, failure_of, result_of

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
25 24 0:23 / /dev/shm rw,relatime shared:3 - tmpfs tmpfs rw,size=24683656k
40 27 8:17 / /var/spool rw,noatime shared:12 master:1 - xfs /dev/sdb1 rw,attr2
41 27 8:18 / /var/spool2 rw - btrfs /dev/sdb2 rw,ssd
42 40 0:50 / /var/spool/docker rw - overlay overlay rw,lowerdir=/a
43 27 0:51 / /srv/mail\\040spool rw - ext4 /dev/sdc1 rw
this line is not a mount at all
"""


def test_mountinfo_is_parsed_with_optional_fields_and_escapes() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [(m.mount_point, m.fs_type) for m in mounts] == [
        ("/proc", "proc"),
        ("/", "ext4"),
        ("/dev/shm", "tmpfs"),
        ("/var/spool", "xfs"),
        ("/var/spool2", "btrfs"),
        ("/var/spool/docker", "overlay"),
        ("/srv/mail spool", "ext4"),
    ]


@pytest.mark.parametrize(
    ("path", "fs_type"),
    [
        ("/", "ext4"),
        ("/home/relay/spool", "ext4"),
        ("/var/spool", "xfs"),
        ("/var/spool/mailrelay", "xfs"),
        ("/var/spool2/mailrelay", "btrfs"),  # not inside /var/spool: a sibling name
        ("/var/spoolx", "ext4"),
        ("/var/spool/docker/x", "overlay"),  # the longest mount point wins
        ("/dev/shm/spool", "tmpfs"),
        ("/srv/mail spool/q", "ext4"),
    ],
)
def test_the_mount_of_a_path_is_the_longest_mount_point_above_it(path: str, fs_type: str) -> None:
    mount = mount_of(path, parse_mountinfo(MOUNTINFO))
    assert mount is not None and mount.fs_type == fs_type


def test_a_later_mount_on_the_same_point_hides_the_earlier_one() -> None:
    mounts = [Mount("/", "ext4"), Mount("/var", "ext4"), Mount("/var", "tmpfs")]
    assert mount_of("/var/spool", mounts) == Mount("/var", "tmpfs")


@pytest.mark.parametrize(
    ("spool", "setting", "directory_fsync"),
    [
        ("/home/relay/spool", "auto", False),  # ext4
        ("/var/spool/mailrelay", "auto", False),  # xfs
        ("/var/spool2/mailrelay", "auto", False),  # btrfs
        ("/var/spool/docker/spool", "auto", True),  # overlayfs
        ("/dev/shm/spool", "auto", True),  # tmpfs
        ("/home/relay/spool", "always", True),
    ],
)
def test_one_fsync_only_where_the_file_system_is_known_to_keep_the_name(
    tmp_path: Path, spool: str, setting: str, directory_fsync: bool
) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    decided = acceptance_sync(spool, setting, mountinfo=info)
    assert decided.directory_fsync is directory_fsync
    assert decided.reason


def test_without_mountinfo_the_directory_is_fsynced_too(tmp_path: Path) -> None:
    decided = acceptance_sync("/var/spool", "auto", mountinfo=tmp_path / "missing")
    assert decided.directory_fsync
    assert "cannot read" in decided.reason
    empty = tmp_path / "empty"
    empty.write_text("")
    assert acceptance_sync("/var/spool", "auto", mountinfo=empty).directory_fsync


def test_this_machine_is_decided_without_error() -> None:
    decided = acceptance_sync("/", "auto")
    assert isinstance(decided.directory_fsync, bool) and decided.reason


# -- the acceptance itself ------------------------------------------------------------------


def spool_on(root: Path, fs: FileSystem, directory_fsync: bool) -> Spool:
    spool = Spool(root, InlineRunner(), fs=fs, acceptance_directory_fsync=directory_fsync)
    spool.prepare()
    return spool


class Recording(FileSystem):
    """The real file system, with the durability calls recorded in order."""

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail

    def _record(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail:
            raise OSError(5, "Input/output error")

    def fsync(self, fd: int) -> None:
        self._record("fsync")
        super().fsync(fd)

    def rename(self, source: Path, target: Path) -> None:
        self._record(f"rename {source.parent.name}/ -> {target.parent.name}/")
        super().rename(source, target)

    def fsync_directory(self, path: Path) -> None:
        self._record(f"fsync_directory {path.name}/")
        super().fsync_directory(path)


@pytest.mark.parametrize(
    ("directory_fsync", "calls"),
    [
        (True, ["fsync", "rename tmp/ -> queue/", "fsync_directory queue/"]),
        (False, ["rename tmp/ -> queue/", "fsync"]),
    ],
)
@pytest.mark.parametrize("size", [100, 2 * 1024 * 1024])  # in memory, and spilled to tmp/
def test_an_acceptance_is_made_durable_in_this_order(
    tmp_path: Path, directory_fsync: bool, calls: list[str], size: int
) -> None:
    fs = Recording()
    spool = spool_on(tmp_path, fs, directory_fsync)
    env = envelope()
    writer = spool.open_writer(env)
    writer.write(b"x" * size)
    fs.calls.clear()
    assert result_of(writer.commit()) == env.queue_id
    assert fs.calls == calls
    assert decode_message((spool.queue / env.queue_id).read_bytes()).body == b"x" * size
    assert list(spool.tmp.iterdir()) == []


@pytest.mark.parametrize("directory_fsync", [True, False])
def test_a_failed_fsync_leaves_no_copy_in_either_area(
    tmp_path: Path, directory_fsync: bool
) -> None:
    fs = Recording(fail="fsync")
    spool = spool_on(tmp_path, fs, directory_fsync)
    writer = spool.open_writer(envelope())
    writer.write(b"body\r\n")
    assert failure_of(writer.commit()).check(SpoolWriteError)
    assert list(spool.queue.iterdir()) == list(spool.tmp.iterdir()) == []


def test_other_writes_into_queue_fsync_the_directory_whatever_the_setting(tmp_path: Path) -> None:
    fs = Recording()
    spool = spool_on(tmp_path, fs, directory_fsync=False)
    env = envelope()
    fs.calls.clear()
    spool.write_durably(env, encode_message(env, b"body\r\n"))
    assert fs.calls == ["fsync", "rename tmp/ -> queue/", "fsync_directory queue/"]


@pytest.mark.parametrize(
    ("cut", "truncated"),
    [
        (0, True),  # empty: renamed, nothing of it written back
        (5, True),  # part of the magic line
        (40, True),  # inside the envelope record
        (-1, True),  # all but the last byte: the end record is cut
        (None, False),  # a flipped bit: damage, not a cut
    ],
)
def test_a_file_cut_short_is_told_apart_from_a_damaged_one(
    cut: int | None, truncated: bool
) -> None:
    data = encode_message(envelope(), b"body\r\n" * 100)
    data = data[:60] + bytes([data[60] ^ 1]) + data[61:] if cut is None else data[:cut]
    with pytest.raises(CorruptSpoolFile) as raised:
        decode_message(data)
    assert isinstance(raised.value, TruncatedSpoolFile) is truncated
