"""Start/stop plumbing shared by the servers the tests run: the fault proxy (a thread),
smtp-sink and the aiosmtpd upstream (child processes).

Standard library only, so that tests/support/upstream.py can import it in its client half.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self


class ServerHandle:
    """A test server: `port` once started; a `with` block starts it and cleans it up.

    Subclasses implement start() (which sets `_port`) and stop(); cleanup() is stop() unless
    there is more to remove.
    """

    _port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._port

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def cleanup(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


class ServerProcess(ServerHandle):
    """A ServerHandle whose server is a child process (`_proc`, set by start()) with its
    output in `log_path`."""

    _proc: subprocess.Popen[bytes] | None = None
    log_path: Path

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the server (unless it has exited) and wait for it, SIGKILL after `timeout`
        seconds; returns its exit status (0 on a clean stop), None if it never started."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the log (CR, LF and CRLF all end a line), for error messages."""
        try:
            text = self.log_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return f"(no {self.log_path.name})"
        return "\n".join(text.splitlines()[-lines:])
