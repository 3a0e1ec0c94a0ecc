"""FreeSpace: statvfs arithmetic, the one-second cache on an injected clock, failing open."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from mailrelay.diskspace import CACHE_SECONDS, FreeSpace

from .fakes import LogCapture
from .helpers_inbound import StatvfsStub

MiB = 1024 * 1024
FLOOR = 100 * MiB


@pytest.fixture
def statvfs(monkeypatch: pytest.MonkeyPatch) -> StatvfsStub:
    stub = StatvfsStub(free=500 * MiB)
    monkeypatch.setattr(os, "statvfs", stub)
    return stub


def _ours(logs: LogCapture) -> list[dict[str, Any]]:
    return [e for e in logs.events if e.get("log_namespace", "").startswith("mailrelay.diskspace")]


@pytest.mark.parametrize(
    ("free", "low"),
    [(0, True), (FLOOR - 4096, True), (FLOOR, False), (FLOOR + 4096, False), (10_000 * MiB, False)],
)
def test_low_means_fewer_available_bytes_than_the_floor(
    statvfs: StatvfsStub, tmp_path: Path, free: int, low: bool
) -> None:
    statvfs.free = free
    assert FreeSpace(tmp_path, FLOOR, Clock()).is_low() is low
    assert statvfs.calls == [str(tmp_path)]


def test_available_is_f_bavail_times_f_frsize(statvfs: StatvfsStub, tmp_path: Path) -> None:
    # f_bfree counts root's reserved blocks and f_bsize can be larger than the fragment size:
    # the stub makes both products far above the floor while f_bavail * f_frsize is below it.
    statvfs.free, statvfs.frsize = FLOOR - 512, 512
    result = os.statvfs(tmp_path)
    assert result.f_bfree * result.f_frsize > FLOOR and result.f_bavail * result.f_bsize > FLOOR
    assert FreeSpace(tmp_path, FLOOR, Clock()).is_low()


@pytest.mark.parametrize(("needed", "low"), [(0, False), (50 * MiB, False), (50 * MiB + 1, True)])
def test_needed_bytes_are_subtracted_before_comparing_with_the_floor(
    statvfs: StatvfsStub, tmp_path: Path, needed: int, low: bool
) -> None:
    statvfs.free = FLOOR + 50 * MiB
    assert FreeSpace(tmp_path, FLOOR, Clock()).is_low(needed) is low


def test_one_statvfs_per_second_however_many_questions(
    statvfs: StatvfsStub, tmp_path: Path
) -> None:
    clock = Clock()
    space = FreeSpace(tmp_path, FLOOR, clock)
    assert not space.is_low()
    assert not space.is_low(10 * MiB)
    assert len(statvfs.calls) == 1
    statvfs.free = 0  # the disk fills; the cached answer stands for the rest of the second
    clock.advance(CACHE_SECONDS - 0.001)
    assert not space.is_low()
    assert len(statvfs.calls) == 1
    clock.advance(0.001)  # one second after the first measurement
    assert space.is_low()
    assert len(statvfs.calls) == 2
    assert space.is_low()
    assert len(statvfs.calls) == 2


def test_cache_is_dropped_when_the_clock_steps_backwards(
    statvfs: StatvfsStub, tmp_path: Path
) -> None:
    clock = Clock()
    clock.advance(100)
    space = FreeSpace(tmp_path, FLOOR, clock)
    space.is_low()
    clock.rightNow = 50.0  # the wall clock was set back: the cached answer's age is unknown
    statvfs.free = 0
    assert space.is_low()
    assert len(statvfs.calls) == 2


def test_statvfs_error_is_not_low_and_logged_once_per_outage(
    statvfs: StatvfsStub, tmp_path: Path
) -> None:
    clock = Clock()
    space = FreeSpace(tmp_path, FLOOR, clock)
    statvfs.error = OSError(errno.EIO, "Input/output error")
    with LogCapture() as logs:
        assert not space.is_low()
        assert not space.is_low(10_000 * MiB)  # a declared size cannot make "unknown" low
        clock.advance(CACHE_SECONDS)
        assert not space.is_low()
        clock.advance(CACHE_SECONDS)
        assert not space.is_low()
    assert len(statvfs.calls) == 3  # still retried once a second, still cached in between
    [event] = _ours(logs)
    assert event["log_level"].name == "error"
    assert event["path"] == str(tmp_path) and event["error"] == "Input/output error"

    # It works again (said once), and a later failure is a new outage, logged again.
    statvfs.error = None
    statvfs.free = 0
    with LogCapture() as logs:
        clock.advance(CACHE_SECONDS)
        assert space.is_low()
        statvfs.error = OSError(errno.ENOENT, "No such file or directory")
        clock.advance(CACHE_SECONDS)
        assert not space.is_low()
        clock.advance(CACHE_SECONDS)
        assert not space.is_low()
    levels = [(e["log_level"].name, e.get("error")) for e in _ours(logs)]
    assert levels == [
        ("info", None),  # can be checked again
        ("warn", None),  # and it is low
        ("error", "No such file or directory"),
    ]


def test_going_low_and_recovering_are_each_logged_once(
    statvfs: StatvfsStub, tmp_path: Path
) -> None:
    clock = Clock()
    space = FreeSpace(tmp_path, FLOOR, clock)
    with LogCapture() as logs:
        for free in (FLOOR, 0, 4096, 0, FLOOR, FLOOR * 2):
            statvfs.free = free
            space.is_low()
            clock.advance(CACHE_SECONDS)
    events = _ours(logs)
    assert [e["log_level"].name for e in events] == ["warn", "info"]
    assert events[0]["free"] == 0 and events[0]["floor"] == FLOOR
    assert events[1]["free"] == FLOOR
