"""The client's side of the server's replies: read with limits, made into clean text.

ReplyReader is mixed into RelayClient (client.py) in place of SMTPClient's reply parsing:

- Hostile servers: a reply is capped (MAX_LINE_LENGTH a line, MAX_REPLY_LINES lines,
  MAX_REPLY_BYTES in all); only a complete reply restarts a stage timer, so a drip of
  continuation lines cannot hold a connection (or a pool slot) past its deadline; every text
  taken from the server is scrubbed of what the client sent during AUTH and of
  non-printable characters before it reaches a result, an error or a log line.
"""

from __future__ import annotations

import base64
from collections.abc import Collection
from typing import Any

from mailrelay.outbound.session import ClientHost, State

MAX_REPLY_TEXT = 400

# What a server may send as one reply (RFC 5321 4.5.3.1.5 allows 512 bytes a line): a longer
# line, more lines or more bytes end the session as a protocol error.
MAX_LINE_LENGTH = 2048
MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 64 * 1024

# What replaces a credential the server echoed back.
REDACTED = "[redacted]"

# A raw (not base64) value sent during AUTH shorter than this is not scrubbed from texts (a
# username "u" would garble every reply); the password always is, whatever its length.
_MIN_SCRUBBED = 4


def _redact(text: str, secrets: Collection[str]) -> str:
    # Longest first: a secret may contain a shorter one (the CRAM-MD5 answer, the username).
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def _clean_text(text: bytes | str, secrets: Collection[str] = ()) -> str:
    """Server-derived text made fit for a result, an error or a log line: every ``secrets``
    string replaced by REDACTED, whitespace runs (line breaks of a multi-line reply
    included) collapsed to one space, and every other non-printable character (ESC, NUL,
    DEL, C1 controls, bidi overrides, ...) replaced by "?". Not truncated."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if secrets:
        text = _redact(text, secrets)
    text = " ".join(text.split())
    if secrets:
        # Again: a secret with a run of whitespace of its own (or a line break) only matches
        # now.
        text = _redact(text, secrets)
    if text.isprintable():
        return text  # the usual reply: no character to replace, none looked at in Python
    return "".join(c if c.isprintable() else "?" for c in text)


class ReplyReader(ClientHost):
    """Reply parsing with limits, and the texts made of replies (scrubbed of ``_secrets``)."""

    MAX_LENGTH = MAX_LINE_LENGTH  # LineReceiver: a longer line is lineLengthExceeded

    # Set up (and described) in RelayClient.__init__, with the rest of the client's state.
    _secrets: set[str]
    _reply_lines: int
    _reply_bytes: int

    def resetTimeout(self) -> None:
        """Never called for us: the stock lineReceived (on every line) and TimeoutMixin users
        would push the current deadline back on any input, so a server dripping continuation
        lines could hold the connection forever. Deadlines move only by setTimeout, and by
        _restart_timer when a complete reply arrives."""

    def _restart_timer(self) -> None:
        # The current period again, from now (TimeoutMixin's own reset).
        super().resetTimeout()

    def lineReceived(self, line: bytes) -> Any:
        """SMTPClient.lineReceived with limits: a reply of at most MAX_REPLY_LINES lines and
        MAX_REPLY_BYTES bytes (informational "0xx" lines count), and the stage timer
        restarted by a complete reply only, never by a continuation or an ignored line."""
        if self._state is State.CLOSED:
            # The session failed and the transport was aborted, but a TCP transport does not
            # set ``disconnecting`` on abort, so LineReceiver goes on parsing the rest of the
            # chunk: such lines (e.g. an injected second "220" after STARTTLS) must not drive
            # the state machine any further.
            return None
        self._reply_lines += 1
        self._reply_bytes += len(line) + 2
        if self._reply_lines > MAX_REPLY_LINES or self._reply_bytes > MAX_REPLY_BYTES:
            self._session_failed("protocol", "reply too long")
            return None
        if len(line) < 3 or not line[:3].isdigit():
            self._session_failed(
                "protocol", self._detail_text(b"invalid reply from server: " + line)
            )
            return None
        if line[:1] == b"0":
            return None  # informational, ignored (as the stock client does)
        self.resp.append(line[4:])
        if line[3:4] == b"-":
            return None  # continuation
        code = int(line[:3])
        resp = b"\n".join(self.resp)
        self.resp = []
        self._reply_lines = self._reply_bytes = 0
        self._restart_timer()
        if code in self._expected:
            return self._okresponse(code, resp)
        return self._failresponse(code, resp)

    def lineLengthExceeded(self, line: bytes) -> None:
        # The default drops the connection quietly (loseConnection): fail like any other
        # protocol error instead, so the transaction and ``ready`` are answered.
        if self._state is not State.CLOSED:
            self._session_failed("protocol", "reply line too long")

    def _reply_text(self, code: int, resp: bytes | str) -> str:
        """A reply for results, errors and logs: scrubbed, one line, MAX_REPLY_TEXT at most."""
        return f"{code} {_clean_text(resp, self._secrets)}"[:MAX_REPLY_TEXT]

    def _detail_text(self, text: bytes | str) -> str:
        """Any other text that came from the server or the network, cleaned the same way."""
        return _clean_text(text, self._secrets)[:MAX_REPLY_TEXT]

    def _add_sent_secret(self, raw: bytes, always: bool = False) -> None:
        """Remember a value sent during AUTH, as sent (base64) and as it was before."""
        self._secrets.add(base64.b64encode(raw).decode("ascii"))
        text = raw.decode("utf-8", "replace")
        if always or len(text) >= _MIN_SCRUBBED:
            self._secrets.add(text)
