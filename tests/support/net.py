"""Small loopback networking helpers shared by tests and benchmarks.

Everything here polls with a deadline instead of sleeping a fixed time: a fixed sleep is
either too short on a loaded CI machine or wastes time everywhere else.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable


def _family(host: str) -> socket.AddressFamily:
    # "::1" and friends contain a colon; dotted IPv4 and names do not.
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that was free a moment ago.

    The port is released before returning, so another process can grab it before the caller
    binds it. Prefer letting the server bind port 0 itself when the server supports it.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connection to (host, port) succeeds right now (it is closed at once)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Poll until (host, port) accepts a TCP connection; raise TimeoutError after `timeout` s.

    Note that every probe is a real connection the server will see (and may count).
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"nothing accepted connections on {host}:{port} after {timeout}s")
        if port_accepts(host, port, timeout=min(0.5, remaining)):
            return
        time.sleep(0.02)


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    interval: float = 0.02,
    what: str = "",
) -> None:
    """Call `predicate` until it returns something truthy; AssertionError after `timeout` s.

    The predicate is always evaluated once more after the deadline, so a slow final poll
    cannot turn a success into a spurious failure.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            if predicate():
                return
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate!r}")
        time.sleep(interval)


def http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path: (status, body), an HTTP error status included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
