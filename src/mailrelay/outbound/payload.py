"""The DATA payload, built by us in one piece.

Twisted's client stuffs dots per 16 KiB chunk, so a '.' line that starts exactly on a chunk
boundary (or on the first line) goes out unstuffed: a smuggling hole (pitfall 15). It also
expects LF lines and turns a CRLF spool into CR CR LF (16). Here: every line ends in CRLF, no
bare CR or LF survives, every line starting with '.' gets one more, then the terminator.
"""

from __future__ import annotations

import re

_ANY_LINE_END = re.compile(rb"\r\n|\r|\n")
_LINE_STARTING_WITH_DOT = re.compile(rb"^\.", re.MULTILINE)


def normalize_line_endings(body: bytes) -> bytes:
    """Turn every bare CR and bare LF into CRLF (a no-op, quickly, for clean input)."""
    crlf = body.count(b"\r\n")
    if body.count(b"\r") == crlf and body.count(b"\n") == crlf:
        return body
    return _ANY_LINE_END.sub(b"\r\n", body)


def build_data_payload(body: bytes) -> bytes:
    """Everything sent after the 354: the stuffed message and the final ``.`` line."""
    body = normalize_line_endings(body)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    # With only CRLF line ends, '^' in MULTILINE mode is exactly "start of a line".
    return _LINE_STARTING_WITH_DOT.sub(b"..", body) + b".\r\n"


def unstuff(wire: bytes) -> bytes:
    """The inverse of the stuffing in build_data_payload (for tests and tools)."""
    return re.sub(rb"^\.", b"", wire, flags=re.MULTILINE)
