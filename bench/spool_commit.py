#!/usr/bin/env python3
"""Does group commit pay on this disk? Commit rate of the spool's durable write path, with
each commit fsyncing the queue directory itself vs commits sharing directory fsyncs.

One commit is what mailrelay does before a 250: write a 4 KiB file in tmp/, fsync it, rename
it into queue/, fsync queue/. "shared" lets a commit skip its directory fsync when one that
started after its rename completes (the classic group commit). Run with the spool's thread
count (8) and with 1:

    .venv/bin/python bench/spool_commit.py [--commits 2000] [--rounds 3] [--dir PATH]

Put --dir on the file system the spool will live on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mailrelay.spool.fs import fsync_directory  # the spool's own


class SharedDirectorySync:
    """One directory fsync covers every rename made before it started."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._cond = threading.Condition()
        self._started = 0
        self._completed = 0
        self._running = False

    def sync(self) -> None:
        with self._cond:
            after = self._started  # a sync that starts later than this point covers us
            while True:
                if self._completed > after:
                    return
                if not self._running:
                    self._running = True
                    self._started += 1
                    epoch = self._started
                    break
                self._cond.wait()
        try:
            fsync_directory(Path(self._path))
        finally:
            with self._cond:
                self._running = False
                self._completed = epoch
                self._cond.notify_all()


def commit_rate(base: str, commits: int, threads: int, shared: bool) -> float:
    root = tempfile.mkdtemp(dir=base)
    tmp, queue = os.path.join(root, "tmp"), os.path.join(root, "queue")
    os.mkdir(tmp)
    os.mkdir(queue)
    sync: Callable[[], None] = (
        SharedDirectorySync(queue).sync if shared else lambda: fsync_directory(Path(queue))
    )
    data = b"x" * 4096

    def commit(n: int) -> None:
        path = os.path.join(tmp, str(n))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(path, os.path.join(queue, str(n)))
        sync()

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(commit, range(commits)))
    rate = commits / (time.perf_counter() - started)
    for name in os.listdir(queue):
        os.unlink(os.path.join(queue, name))
    os.rmdir(queue)
    os.rmdir(tmp)
    os.rmdir(root)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--commits", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write")
    args = parser.parse_args()
    for threads in (1, 8):
        own, shared = [], []
        for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both
            own.append(commit_rate(args.dir, args.commits, threads, shared=False))
            shared.append(commit_rate(args.dir, args.commits, threads, shared=True))
        a, b = statistics.median(own), statistics.median(shared)
        print(
            f"{threads} thread(s): own directory fsync {a:.0f} commits/s, shared {b:.0f}"
            f" commits/s, ratio {b / a:.2f} (medians of {args.rounds})"
        )


if __name__ == "__main__":
    main()
