"""The client side of the daemon's control socket (see mailrelay.control), without a reactor:
one JSON request line out, one JSON reply line back, under one overall deadline."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any


class DaemonNotRunning(Exception):
    """No daemon listens on the socket (no socket file, or a dead daemon's)."""


def request(socket_path: Path, message: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send one request and return the reply object.

    Raises DaemonNotRunning when nothing listens, PermissionError when the socket is not ours
    to use, and OSError/ValueError for a daemon that fails mid-way or answers nonsense.
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise DaemonNotRunning(str(socket_path)) from None
        sock.sendall(json.dumps(message).encode() + b"\n")
        reply = json.loads(_read_line(sock, deadline))
    if not isinstance(reply, dict):
        raise ValueError("the daemon's reply is not a JSON object")
    return reply


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    chunks: list[bytes] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no reply from the daemon in time")
        # One overall deadline, not one per recv: a daemon dripping bytes cannot hold us.
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the daemon closed the connection before replying")
        line, newline, _ = chunk.partition(b"\n")
        chunks.append(line)
        if newline:
            return b"".join(chunks)
