"""The relay as a real ``twistd`` process, for end-to-end tests and benchmarks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.net import free_port, port_accepts, wait_until

TWISTD = str(Path(sys.executable).with_name("twistd"))
REPO_ROOT = Path(__file__).resolve().parents[2]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def relay_config(
    spool: Path,
    smtp_port: int,
    http_port: int,
    upstream_port: int | None,
    smtp_options: dict[str, Any] | None = None,
    **spool_options: Any,
) -> str:
    """A config for tests: loopback listeners on the given ports, [smtp] and [spool] options,
    one plain-SMTP upstream on loopback if given."""
    lines = ["[smtp]", f'listen = ["tcp:{smtp_port}:interface=127.0.0.1"]']
    lines += [f"{key} = {toml_value(value)}" for key, value in (smtp_options or {}).items()]
    lines += ["[http]", f'listen = "tcp:{http_port}:interface=127.0.0.1"']
    lines += ["[spool]", f"path = {toml_value(str(spool))}"]
    lines += [f"{key} = {toml_value(value)}" for key, value in spool_options.items()]
    if upstream_port is not None:
        lines += [
            "[[providers]]",
            'name = "primary"',
            'kind = "smtp"',
            'host = "127.0.0.1"',
            f"port = {upstream_port}",
            'tls = "none"',
            "[routing]",
            'default = ["primary"]',
        ]
    return "\n".join(lines) + "\n"


class RelayProcess:
    """``twistd -n mailrelay`` (or ``-ny relay.tac``) in a working directory of its own."""

    def __init__(
        self,
        workdir: Path,
        config_text: str | None = None,
        smtp_port: int = 2525,
        http_port: int = 8025,
        use_tac: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self._extra_args = extra_args
        self.smtp_port = smtp_port
        self.http_port = http_port
        self.log_path = workdir / "twistd.log"
        self.config_path: Path | None = None
        if config_text is not None:
            self.config_path = workdir / "relay.toml"
            self.config_path.write_text(config_text)
        self._use_tac = use_tac
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def with_upstream(
        cls, workdir: Path, upstream_port: int | None, **spool_options: Any
    ) -> RelayProcess:
        smtp_port, http_port = free_port(), free_port()
        text = relay_config(workdir / "spool", smtp_port, http_port, upstream_port, **spool_options)
        return cls(workdir, text, smtp_port, http_port)

    def command(self) -> list[str]:
        common = [TWISTD, "-n", "--pidfile=", f"--logfile={self.log_path}"]
        if self._use_tac:
            return [*common, "-y", str(REPO_ROOT / "relay.tac")]
        config = ["--config", str(self.config_path)] if self.config_path else []
        return [*common, "mailrelay", *config, *self._extra_args]

    def start(self, timeout: float = 20.0) -> RelayProcess:
        env = dict(os.environ)
        if self._use_tac and self.config_path is not None:
            env["MAILRELAY_CONFIG"] = str(self.config_path)
        self._proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise AssertionError(
                    f"relay exited with {self._proc.returncode}:\n{self.log_tail()}"
                )
            # The ports accept connections as soon as they are bound, before the reactor
            # runs (and before twistd installs its SIGTERM handler): only an HTTP answer shows
            # the relay is really up, so a stop() right after start() is a clean shutdown.
            return port_accepts("127.0.0.1", self.smtp_port) and self._health_answers()

        wait_until(up, timeout, what=f"relay listening on {self.smtp_port}")
        return self

    def _health_answers(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}/health", timeout=2
            ) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            body = e.read()  # a 503 while failing (a provider down, say): the reactor runs
        except (OSError, ValueError):
            return False
        try:
            # Up means delivering too: the queue starts a moment after the listeners.
            return bool(json.loads(body).get("delivering", True))
        except ValueError:
            return True

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGKILL)
        self._proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self._proc is None or self._proc.poll() is not None:
            return None if self._proc is None else self._proc.returncode
        self._proc.send_signal(signal.SIGTERM)
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self._proc.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
