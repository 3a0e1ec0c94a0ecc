"""Which file system holds the spool, and how an acceptance is made durable on it
(mailrelay.spool.filesystems, Spool.acceptance_directory_fsync)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from mailrelay.blocking import InlineRunner
from mailrelay.config import parse
from mailrelay.inbound.delivery import RelayDelivery, Transaction
from mailrelay.metrics import Metrics
from mailrelay.service import buildService
from mailrelay.spool.filesystems import (
    Mount,
    acceptance_sync,
    decide,
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
from tests.unit.fakes import LogCapture, envelope, failure_of, result_of

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
    assert [(m.mount_point, m.fs_type, m.device) for m in mounts] == [
        ("/proc", "proc", "0:21"),
        ("/", "ext4", "254:0"),
        ("/dev/shm", "tmpfs", "0:23"),
        ("/var/spool", "xfs", "8:17"),
        ("/var/spool2", "btrfs", "8:18"),
        ("/var/spool/docker", "overlay", "0:50"),
        ("/srv/mail spool", "ext4", "0:51"),
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
        ("/var/spool2/mailrelay", "auto", True),  # btrfs: not verified (filesystems.py)
        ("/var/spool/docker/spool", "auto", True),  # overlayfs
        ("/dev/shm/spool", "auto", True),  # tmpfs
        ("/proc/spool", "auto", True),  # anything else
        ("/home/relay/spool", "always", True),
    ],
)
def test_one_fsync_only_where_the_file_system_is_known_to_keep_the_name(
    spool: str, setting: str, directory_fsync: bool
) -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    mount = mount_of(spool, mounts)
    assert mount is not None
    decided = decide(setting, spool, mounts, mount.device)
    assert decided.directory_fsync is directory_fsync
    assert decided.reason


@pytest.mark.parametrize("device", ["0:60", None])
def test_a_spool_not_on_the_device_of_its_mount_fsyncs_the_directory(device: str | None) -> None:
    """An NFS mount over /srv hides the ext4 /srv/spool that mountinfo still lists; or the
    spool's device could not be read."""
    mounts = [Mount("/", "ext4", "254:0"), Mount("/srv/spool", "ext4", "8:1")]
    mounts.append(Mount("/srv", "nfs4", "0:60"))
    decided = decide("auto", "/srv/spool/mailrelay", mounts, device)
    assert decided.directory_fsync
    assert "not 8:1" in decided.reason


def test_without_mountinfo_the_directory_is_fsynced_too(tmp_path: Path) -> None:
    decided = acceptance_sync(tmp_path, "auto", mountinfo=tmp_path / "missing")
    assert decided.directory_fsync
    assert "cannot read" in decided.reason
    empty = tmp_path / "empty"
    empty.write_text("")
    assert acceptance_sync(tmp_path, "auto", mountinfo=empty).directory_fsync


def test_this_machine_is_decided_from_its_own_mountinfo(tmp_path: Path) -> None:
    """The real /proc/self/mountinfo and st_dev agree on where tmp_path is (whatever the
    answer for its file system)."""
    try:
        text = Path("/proc/self/mountinfo").read_text(errors="surrogateescape")
    except OSError:
        pytest.skip("no /proc/self/mountinfo here")
    mount = mount_of(str(tmp_path.resolve()), parse_mountinfo(text))
    if mount is None:
        pytest.skip("tmp_path is on no listed mount (a chroot)")
    decided = acceptance_sync(tmp_path, "auto")
    assert mount.fs_type in decided.reason
    if mount.fs_type in ("ext4", "xfs"):
        assert "device" not in decided.reason  # the mount found is the one holding tmp_path
    assert acceptance_sync(tmp_path, "always").directory_fsync


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
        self.during_fsync: Callable[[], bool] | None = None
        self.seen_during_fsync: list[bool] = []

    def _record(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail:
            raise OSError(5, "Input/output error")

    def fsync(self, fd: int) -> None:
        self._record("fsync")
        if self.during_fsync is not None:
            self.seen_during_fsync.append(self.during_fsync())
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
    writer = spool.open_writer(env, smtp_acceptance=True)
    writer.write(b"x" * size)
    fs.calls.clear()
    fs.during_fsync = lambda: env.queue_id in spool.committing
    assert result_of(writer.commit()) == env.queue_id
    assert fs.calls == calls
    assert fs.seen_during_fsync == [True]  # the queue's start-up scan leaves it alone then
    assert spool.committing == set()
    assert decode_message((spool.queue / env.queue_id).read_bytes()).body == b"x" * size
    assert list(spool.tmp.iterdir()) == []


@pytest.mark.parametrize("directory_fsync", [True, False])
@pytest.mark.parametrize("failing", ["fsync", "rename tmp/ -> queue/", "fsync_directory queue/"])
def test_a_failed_step_leaves_no_copy_in_either_area_and_no_second_fsync(
    tmp_path: Path, directory_fsync: bool, failing: str
) -> None:
    fs = Recording(fail=failing)
    spool = spool_on(tmp_path, fs, directory_fsync)
    writer = spool.open_writer(envelope(), smtp_acceptance=True)
    writer.write(b"body\r\n")
    fs.calls.clear()
    if failing == "fsync_directory queue/" and not directory_fsync:
        result_of(writer.commit())  # the step is not made at all
        assert failing not in fs.calls
        return
    assert failure_of(writer.commit()).check(SpoolWriteError)
    assert list(spool.queue.iterdir()) == list(spool.tmp.iterdir()) == []
    assert fs.calls.count("fsync") <= 1  # never again after a failure ("fsyncgate")
    assert fs.calls[-1] == failing  # nothing after the step that failed
    assert spool.committing == set()


def test_a_bounce_or_any_other_writer_fsyncs_the_directory(tmp_path: Path) -> None:
    fs = Recording()
    spool = spool_on(tmp_path, fs, directory_fsync=False)
    writer = spool.open_writer(envelope())
    writer.write(b"body\r\n")
    fs.calls.clear()
    result_of(writer.commit())
    assert fs.calls == ["fsync", "rename tmp/ -> queue/", "fsync_directory queue/"]


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


@pytest.mark.parametrize("setting", ["auto", "always"])
def test_the_relay_decides_once_its_spool_exists_and_logs_the_choice(
    tmp_path: Path, setting: str
) -> None:
    spool = tmp_path / "new" / "spool"  # made by the relay before it looks at its device
    config = parse({"spool": {"path": str(spool), "directory_fsync": setting}})
    with LogCapture() as logged:
        buildService(Clock(), config)
    [event] = [e for e in logged.events if "each acceptance" in e.get("log_format", "")]
    expected = acceptance_sync(spool, setting)
    what = "the file and queue/" if expected.directory_fsync else "the file only"
    assert (event["what"], event["reason"]) == (what, expected.reason)
    assert "unknown" not in event["reason"]


def test_an_smtp_acceptance_takes_the_one_fsync_order(tmp_path: Path) -> None:
    """RelayDelivery's message is the one writer that opts in (the others keep the directory
    fsync)."""
    fs = Recording()
    spool = spool_on(tmp_path, fs, directory_fsync=False)
    delivery = RelayDelivery(
        peer=IPv4Address("TCP", "127.0.0.1", 40000),
        hostname="relay.test",
        spool=spool,
        clock=Clock(),
        on_accepted=lambda envelope, body: None,
        metrics=Metrics(),
    )
    transaction = Transaction(
        helo="client.test", sender="s@example.com", recipients=("r@example.org",), body_8bit=False
    )
    message = delivery.openMessage(transaction)
    message.write(b"Subject: x\r\n\r\nbody\r\n")
    fs.calls.clear()
    result_of(message.commit())
    assert fs.calls == ["rename tmp/ -> queue/", "fsync"]
