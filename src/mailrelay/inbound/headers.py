"""The header fields the relay adds to a message received over SMTP; pure, no Twisted.

Like Postfix's cleanup for local submissions, a message that lacks ``Date:`` or ``Message-ID:``
gets them, at the end of its header section; every other byte is passed on unchanged (line
endings, header order, folded lines, the body).

Where the header section ends (Postfix's rules, global/mime_state.c):

- at the first empty line: the missing fields go just before it;
- at the first line that is neither a header field (``name:``) nor the continuation (leading
  SP/HT) of one: that line and everything after it is body, and the fields go before it.
  When this is the *first* line (no header at all: "hello", a line starting with whitespace,
  an mbox ``From `` line), the whole message is body: the fields go on top and one empty line
  separates them from it, as Postfix (and our sendmail command) do. After at least one header
  field, Postfix also inserts an empty line there; we do not: it would change the message, and
  readers already end the header section at such a line, so the added fields stay in it;
- at the end of the message (a header-only or empty message): the fields are appended.

Only the primary header counts: ``Date:`` in the body or in a continuation line is not a
header field; names are compared case-insensitively, ignoring spaces before the colon (the
obsolete syntax). An empty ``Date:`` counts as present. ``Resent-*`` fields are not looked at
(Postfix adds ``Resent-Message-Id:``/``Resent-Date:`` instead when a message has them).

Memory: nothing is buffered. Lines before the end of the header section are passed on as they
arrive (the insertion point is where the section ends, so no line needs holding back) and the
scanner keeps two flags, so a header section of any length (the protocol's size limit bounds it)
costs no memory. Only a partial line between two writes is held; the protocol always writes
whole lines, and one over ``MAX_PARTIAL_LINE`` octets (or left unfinished at the end) makes us
stop looking: the message passes unchanged and nothing is added.

Message-ID is ``<queue ID@hostname>``: Postfix's form with ``enable_long_queue_ids`` (our queue
IDs are microsecond time plus 32 random bits, so unique), and what our sendmail command adds.
Date is RFC 5322 local time with its UTC offset, from the time the transaction was accepted.
"""

from __future__ import annotations

import email.utils
import functools
import math
import re
from enum import Enum, auto

# field-name = 1*ftext (RFC 5322 3.6.8), then optional WSP before the colon (obs-optional).
_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
MAX_PARTIAL_LINE = 64 * 1024
# HELO text that may appear in the Received header: host name characters, plus IPv6 colons.
_HELO_SAFE = re.compile(r"[A-Za-z0-9.\-_:]")
_ADDRESS_LITERAL = re.compile(r"\[[A-Za-z0-9.:\-]+\]")
HELO_IN_HEADER_MAX = 255
TRACKED = ("date", "message-id")


class HeaderEnd(Enum):
    """What a line did to the header section."""

    EMPTY_LINE = auto()  # the line is the empty line that separates header and body
    BODY_LINE = auto()  # the line is not a header field: it and what follows are body
    END_OF_MESSAGE = auto()  # the message ended inside the header section


class HeaderScanner:
    """Lines of a message (without their CRLF) in order; says where the header section ends
    and which of ``Date:`` and ``Message-ID:`` it lacks."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._fields = 0
        self.end: HeaderEnd | None = None

    @property
    def done(self) -> bool:
        return self.end is not None

    @property
    def has_fields(self) -> bool:
        """At least one header field came before the end (False: the message is all body)."""
        return self._fields > 0

    @property
    def missing(self) -> tuple[str, ...]:
        """Lower-case names in ``TRACKED`` not seen (so far) as header fields."""
        return tuple(name for name in TRACKED if name not in self._seen)

    def feed(self, line: bytes) -> HeaderEnd | None:
        """None while ``line`` belongs to the header section; else how it ended it.

        After the end, every line is body: returns None and looks at nothing.
        """
        if self.end is not None:
            return None
        if not line:
            self.end = HeaderEnd.EMPTY_LINE
        elif line[:1] in (b" ", b"\t"):
            if self._fields == 0:
                self.end = HeaderEnd.BODY_LINE  # a continuation of nothing
        else:
            match = _FIELD_NAME.match(line)
            if match is None:
                self.end = HeaderEnd.BODY_LINE
            else:
                self._fields += 1
                name = match.group(1).lower()
                if name in (b"date", b"message-id"):
                    self._seen.add(name.decode("ascii"))
        return self.end

    def finish(self) -> HeaderEnd:
        """The message ended: how its header section ended."""
        if self.end is None:
            self.end = HeaderEnd.END_OF_MESSAGE
        return self.end


def added_fields(missing: tuple[str, ...], date: str, message_id: str) -> bytes:
    """The header fields to add for the lower-case names in ``missing``, in a fixed order."""
    out = b""
    if "date" in missing:
        out += b"Date: " + date.encode("ascii") + b"\r\n"
    if "message-id" in missing:
        out += b"Message-ID: " + message_id.encode("ascii") + b"\r\n"
    return out


class HeaderCompleter:
    """The message's bytes in, the same bytes with the missing fields inserted out.

    ``feed`` returns what may be written now (possibly ``b""``); ``finish``, at the end of the
    message, what is left. Their concatenation is the message to store.
    """

    def __init__(self, date: str, message_id: str) -> None:
        self._date = date
        self._message_id = message_id
        self._scanner = HeaderScanner()
        self._partial = b""
        self._passing = False  # the header section is over (or we gave up): bytes pass as is
        self.added = b""  # what was inserted, once it has been

    def feed(self, data: bytes) -> bytes:
        if self._passing:
            return data
        buffer = self._partial + data if self._partial else data
        pos = 0
        while True:
            eol = buffer.find(b"\r\n", pos)
            if eol < 0:
                break
            end = self._scanner.feed(buffer[pos:eol])
            if end is not None:
                self._passing = True
                self._partial = b""
                return buffer[:pos] + self._insert(end) + buffer[pos:]
            pos = eol + 2
        self._partial = buffer[pos:]
        if len(self._partial) > MAX_PARTIAL_LINE:
            self._give_up()
            return buffer
        return buffer[:pos] if self._partial else buffer

    def finish(self) -> bytes:
        if self._passing:
            return b""
        if self._partial:
            # An unfinished last line: appending after it would need a CRLF of ours.
            partial, self._partial = self._partial, b""
            self._give_up()
            return partial
        self._passing = True
        return self._insert(self._scanner.finish())

    def _give_up(self) -> None:
        self._passing = True
        self._partial = b""

    def _insert(self, end: HeaderEnd) -> bytes:
        self.added = added_fields(self._scanner.missing, self._date, self._message_id)
        if end is HeaderEnd.BODY_LINE and not self._scanner.has_fields:
            return self.added + b"\r\n"  # all body: an empty line separates our fields from it
        return self.added


def message_date(now: float) -> str:
    """RFC 5322 date-time in local time, as Postfix's ``mail_date`` writes it."""
    return _date_of_second(math.floor(now))


@functools.lru_cache(maxsize=4)
def _date_of_second(second: int) -> str:
    # Whole seconds only, so one formatting (~20 us of datetime and time zone work) serves
    # every message of that second.
    return email.utils.formatdate(second, localtime=True)


def message_id(queue_id: str, hostname: str) -> str:
    return f"<{queue_id}@{hostname}>"


def sanitize_host(helo: str) -> str:
    """The HELO name (or the client's address) as it may appear in our Received header.

    The protocol allows any printable ASCII without spaces (up to 255 octets), so ``(``, ``)``,
    ``;``, ``\\``, quotes or brackets could end the comment, the clause list or start a domain
    literal in the header. An address literal (``[127.0.0.1]``, ``[IPv6:::1]``) is kept;
    otherwise every character outside letters, digits and ``.-_:`` becomes ``?`` (as Postfix's
    ``printable()`` does for non-printables), and the result is cut at 255 characters. Empty
    becomes ``unknown``.
    """
    helo = helo[:HELO_IN_HEADER_MAX]
    if _ADDRESS_LITERAL.fullmatch(helo):
        return helo
    safe = "".join(c if _HELO_SAFE.fullmatch(c) else "?" for c in helo)
    return safe or "unknown"
