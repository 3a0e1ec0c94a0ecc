"""A private Postfix instance for the benchmarks: configured in a run directory, on loopback,
started with ``postfix -c DIR start`` and stopped with ``postfix -c DIR stop`` (``abort`` if it
does not stop). The system's Postfix instance is never touched.

    peer = PostfixPeer(run_dir, port, {"relayhost": "[127.0.0.1]:2600"})
    peer.setup()          # main.cf, master.cf, ``postfix check``
    peer.start()          # returns once smtpd accepts connections on 127.0.0.1:port
    ...
    peer.stop()

Needs root (the master runs as root), the ``postfix`` command and its ``postfix`` user.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from bench.common import (
    HOST,
    START_TIMEOUT,
    BenchError,
    TreeMemory,
    children,
    cpu_ticks,
    tail,
    tool,
    tree_cpu_ticks,
)
from tests.support.net import port_accepts

MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
smtp      unix  - - n -  - smtp
relay     unix  - - n -  - smtp
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def base_settings(root: Path) -> dict[str, str]:
    """main.cf settings every benchmark instance has: its queue in ``root``, loopback only, no
    chroot (in master.cf), no DNS, no local delivery, log to a file."""
    return {
        "compatibility_level": "3.6",
        "queue_directory": str(root / "queue"),
        "data_directory": str(root / "data"),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "myhostname": "bench.localhost",
        "mydomain": "localhost",
        "mydestination": "",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        "alias_maps": "",
        "alias_database": "",
        "local_recipient_maps": "",
        "smtpd_peername_lookup": "no",
        "biff": "no",
        # Keep every smtpd, cleanup and smtp alive for the whole run, so /proc still has the
        # CPU time of each one at the end (a process that exits takes its counters with it).
        "max_use": "1000000",
        "max_idle": "3600",
        # No syslog here: Postfix logs to a file (only allowed under these prefixes).
        "maillog_file": str(root / "maillog"),
        "maillog_file_prefixes": str(root),
    }


def postfix_unavailable() -> str | None:
    """Why a private Postfix instance cannot run here, or None."""
    if tool("postfix") is None:
        return "the postfix command is not installed"
    if os.geteuid() != 0:
        return "starting a Postfix instance needs root (its master runs as root)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no 'postfix' user for mail_owner"
    return None


def postfix_version() -> str:
    return subprocess.run(
        ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True
    ).stdout.strip()


class PostfixPeer:
    """One private instance: ``<root>/conf`` (main.cf, master.cf), ``<root>/queue``,
    ``<root>/data``, ``<root>/maillog``; smtpd on 127.0.0.1:``port``.

    ``settings`` are added to (or override) ``base_settings``; ``services`` are extra
    master.cf lines."""

    def __init__(
        self, root: Path, port: int, settings: Mapping[str, str], services: str = ""
    ) -> None:
        self.root = root
        self.port = port
        self.conf = root / "conf"
        self.queue = root / "queue"
        self.settings = {**base_settings(root), **settings}
        self.services = services

    def postfix(self, *words: str, command: str = "postfix") -> subprocess.CompletedProcess[str]:
        """``postfix -c <conf> WORDS`` (or another Postfix command taking -c)."""
        return subprocess.run(
            [command, "-c", str(self.conf), *words], capture_output=True, text=True, timeout=300
        )

    def _checked(self, *words: str, command: str = "postfix") -> None:
        done = self.postfix(*words, command=command)
        if done.returncode != 0:
            raise BenchError(
                f"{command} {' '.join(words)} failed ({done.returncode}): {done.stderr.strip()}\n"
                f"{self.maillog()}"
            )

    def setup(self) -> None:
        for sub in ("conf", "queue", "data"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # Postfix's daemons run as mail_owner: they must reach the queue through every parent.
        for path in (self.root, *self.root.parents):
            if path == Path("/"):
                break
            if path.stat().st_uid == os.getuid() and not path.stat().st_mode & 0o001:
                path.chmod(path.stat().st_mode | 0o011)
        owner = pwd.getpwnam("postfix")
        os.chown(self.root / "data", owner.pw_uid, owner.pw_gid)
        # Tools that log without postlogd (postsuper while the instance is stopped) write the
        # log file themselves, as mail_owner.
        (self.root / "maillog").touch()
        os.chown(self.root / "maillog", owner.pw_uid, owner.pw_gid)
        main_cf = "".join(f"{key} = {value}\n" for key, value in self.settings.items())
        (self.conf / "main.cf").write_text(main_cf)
        master_cf = MASTER_CF.format(listen=f"{HOST}:{self.port}") + self.services
        (self.conf / "master.cf").write_text(master_cf)
        self._checked("check")

    def start(self) -> None:
        self._checked("start")
        deadline = time.monotonic() + START_TIMEOUT
        while not port_accepts(HOST, self.port):
            if time.monotonic() > deadline:
                raise BenchError(f"Postfix not listening on {self.port}\n{self.maillog()}")
            time.sleep(0.05)

    def maillog(self, lines: int = 30) -> str:
        return tail(self.root / "maillog", lines)

    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def cpu(self) -> dict[int, tuple[str, int]]:
        """pid -> (name, CPU ticks) of the master and every process it started."""
        master = self.master_pid()
        if master is None:
            return {}
        out: dict[int, tuple[str, int]] = {}
        for pid, name in {master: "master", **children(master)}.items():
            ticks = cpu_ticks(pid)
            if ticks is not None:
                out[pid] = (name, ticks)
        return out

    def cpu_ticks(self) -> int | None:
        """CPU of the whole instance: master, its live children and the ones that exited."""
        master = self.master_pid()
        return None if master is None else tree_cpu_ticks(master)

    def memory(self) -> TreeMemory | None:
        """Memory of the whole instance (the master and its children), or None if not running."""
        master = self.master_pid()
        return None if master is None else TreeMemory(master)

    def queue_files(self, name: str) -> list[Path]:
        """Queue files in one of the instance's queues (``deferred``, ``active``...)."""
        top = self.queue / name
        return [p for p in top.rglob("*") if p.is_file()] if top.exists() else []

    def stop(self) -> None:
        """``postfix stop``; ``postfix abort`` if the master is still there after 15 s; SIGKILL
        after 10 s more."""
        master = self.master_pid()
        if master is None:
            return
        self.postfix("stop")
        if self._wait_gone(master, 15):
            return
        self.postfix("abort")
        if not self._wait_gone(master, 10):
            os.kill(master, 9)

    @staticmethod
    def _wait_gone(pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True
