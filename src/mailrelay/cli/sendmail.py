"""The ``mailrelay-sendmail`` command: sendmail's command line, mailrelay's spool.

Meant to be installed as /usr/sbin/sendmail for cron, PHP's mail() and mailx. It speaks no
SMTP: it writes the message into ``<spool>/maildrop/`` (see mailrelay.spool.maildrop), so it
works while the daemon is down, then asks a running daemon to pick it up at once.

Exit codes are sysexits.h's: 64 bad command line, 65 bad message or address (retrying will
not help), 70 a bug, 75 try again later (the caller keeps the message), 78 bad config.
Every error is one line on stderr; nothing is printed on success.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import sys
import time
from collections.abc import Mapping, Sequence
from email.utils import formataddr, formatdate, getaddresses
from pathlib import Path
from typing import BinaryIO

import attrs

from mailrelay.config import Config, ConfigError, load
from mailrelay.spool.format import Envelope
from mailrelay.spool.maildrop import (
    MAX_LINE,
    MaildropError,
    check_address,
    deposit,
    first_long_line,
    notify_daemon,
    validate,
)
from mailrelay.spool.store import SENDMAIL_TAG, new_queue_id

PROG = "mailrelay-sendmail"
EX_USAGE = 64
EX_DATAERR = 65
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78

# Options that take a value, attached (-fADDR) or as the next argument (-f ADDR).
_VALUE_OPTIONS = frozenset({"-f", "-r", "-F", "-C", "-B", "-N", "-R", "-V"})
# Accepted and ignored: cron, PHP and mailx pass these, and none changes what we must do.
_IGNORED_OPTIONS = frozenset({"-oem", "-oee", "-odi", "-odb", "-odq", "-om", "-bm", "-v", "-U"})
# A header field's first line: a printable name without spaces, then a colon (RFC 5322 2.2).
_HEADER_START = re.compile(rb"[!-9;-~]+[ \t]*:")
_MAX_FULL_NAME = 200  # keeps the generated From: line far below the line limit


@attrs.frozen
class Refused(Exception):
    """Why we stop, and the exit code that tells the caller whether to try again."""

    code: int
    message: str


@attrs.frozen
class Options:
    recipients: tuple[str, ...] = ()
    sender: str | None = None  # None: the caller's login name; "" the null sender
    full_name: str | None = None
    recipients_from_headers: bool = False  # -t
    dot_ends_input: bool = True  # traditional sendmail; -i and -oi turn it off
    config_path: str | None = None  # -C


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> Options:
    """Parse sendmail's flags by hand: its syntax (-fADDR, -oi, -oQ/dir) is not getopt's.

    Options may follow recipients (as with GNU getopt); ``--`` ends them.
    """
    options = Options()
    recipients: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            recipients.extend(args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            recipients.append(arg)
        elif arg[:2] in _VALUE_OPTIONS:
            value = arg[2:]
            if not value:
                if i == len(args):
                    raise Refused(EX_USAGE, f"option {arg} needs a value")
                value = args[i]
                i += 1
            options = _with_value(options, arg[:2], value)
        elif arg == "-t":
            options = attrs.evolve(options, recipients_from_headers=True)
        elif arg in ("-i", "-oi"):
            options = attrs.evolve(options, dot_ends_input=False)
        elif arg not in _IGNORED_OPTIONS and not arg.startswith("-oQ"):
            raise Refused(EX_USAGE, f"unsupported option {arg}")
    return attrs.evolve(options, recipients=tuple(recipients))


def _with_value(options: Options, option: str, value: str) -> Options:
    if option in ("-f", "-r"):  # -r is the old name of -f
        return attrs.evolve(options, sender=_strip_brackets(value.strip()))
    if option == "-F":
        # It becomes part of a header line: no line breaks or other controls in it.
        name = "".join(c if c.isprintable() else " " for c in value).strip()
        return attrs.evolve(options, full_name=name[:_MAX_FULL_NAME])
    if option == "-C":
        return attrs.evolve(options, config_path=value)
    return options  # -B, -N, -R, -V: DSN and body-type hints we do not use


def _strip_brackets(address: str) -> str:
    if address.startswith("<") and address.endswith(">"):
        return address[1:-1]
    return address


# -- addresses ----------------------------------------------------------------------------------


def qualify(address: str, hostname: str) -> str:
    """Cron writes to ``root``: a bare local part is one of ours."""
    return address if "@" in address else f"{address}@{hostname}"


def _checked(address: str, allow_null: bool) -> str:
    try:
        check_address(address, allow_null=allow_null)
    except MaildropError as e:
        raise Refused(EX_DATAERR, e.reason) from None
    return address


def _login_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid without a passwd entry (containers): still a valid local part
        return str(uid)


# -- the message --------------------------------------------------------------------------------


def normalize_line_endings(data: bytes) -> bytes:
    """CRLF, lone LF and lone CR all become CRLF, and the text ends with one."""
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text


def read_message(stdin: BinaryIO, limit: int, dot_ends_input: bool) -> bytes:
    """Read the message (at most ``limit`` bytes), with CRLF line endings."""
    raw = _read_until_dot(stdin, limit) if dot_ends_input else stdin.read(limit + 1)
    text = normalize_line_endings(raw)
    cut = False
    if dot_ends_input:
        text, cut = _cut_at_dot_line(text)
    if len(raw) > limit and not cut:
        raise Refused(EX_DATAERR, f"message too big (limit {limit} bytes)")
    line = first_long_line(text)
    if line is not None:
        raise Refused(EX_DATAERR, f"line {line} of the message is longer than {MAX_LINE} octets")
    return text


def _read_until_dot(stdin: BinaryIO, limit: int) -> bytes:
    # Line by line, so someone typing at a terminal is done at "." without needing ^D.
    lines: list[bytes] = []
    total = 0
    while total <= limit:
        line = stdin.readline(limit + 1 - total)
        if not line or line in (b".\n", b".\r\n"):
            break
        lines.append(line)
        total += len(line)
    return b"".join(lines)


def _cut_at_dot_line(text: bytes) -> tuple[bytes, bool]:
    # Again after normalising: input with CR-only line endings reaches here in one piece.
    if text.startswith(b".\r\n"):
        return b"", True
    end = text.find(b"\r\n.\r\n")
    if end >= 0:
        return text[: end + 2], True
    return text, False


def split_header(text: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each with its continuation lines and CRLFs) and the rest, which
    starts at the empty line. Without a header line first, everything is body."""
    if not _HEADER_START.match(text):
        return [], text
    end = text.find(b"\r\n\r\n")
    head, rest = (text, b"") if end < 0 else (text[: end + 2], text[end + 2 :])
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields, rest


def field_name(field: bytes) -> str:
    return field.partition(b":")[0].strip().decode("ascii", "replace").lower()


def header_recipients(fields: Sequence[bytes]) -> list[str]:
    """The addresses in To:, Cc: and Bcc: (for -t); group syntax and comments are fine."""
    values = [
        # Unfold (every CRLF inside a field comes before a continuation line) and decode;
        # a non-ASCII address survives as such and is refused later.
        field.partition(b":")[2].replace(b"\r\n", b"").decode("utf-8", "surrogateescape")
        for field in fields
        if field_name(field) in ("to", "cc", "bcc")
    ]
    return [address for _name, address in getaddresses(values) if address]


@attrs.frozen
class Stamp:
    """What we add to the message, decided once."""

    queue_id: str
    hostname: str
    uid: int
    now: float
    from_address: str
    full_name: str | None


def complete_message(fields: Sequence[bytes], rest: bytes, stamp: Stamp) -> bytes:
    """Our Received: first, the caller's header byte for byte, then any From:, Date: and
    Message-ID: it lacks; then the body as it was."""
    date = formatdate(stamp.now, localtime=True)
    present = {field_name(field) for field in fields}
    added: list[str] = []
    if "from" not in present:
        added.append(f"From: {formataddr((stamp.full_name or '', stamp.from_address))}\r\n")
    if "date" not in present:
        added.append(f"Date: {date}\r\n")
    if "message-id" not in present:
        added.append(f"Message-ID: <{stamp.queue_id}@{stamp.hostname}>\r\n")
    received = (
        f"Received: by {stamp.hostname} (mailrelay sendmail, uid {stamp.uid})"
        f" id {stamp.queue_id};\r\n\t{date}\r\n"
    )
    if not fields:
        rest = b"\r\n" + rest  # the whole input was body: separate it from our header
    return received.encode("ascii") + b"".join(fields) + "".join(added).encode("ascii") + rest


# -- main ---------------------------------------------------------------------------------------


def _load_config(path: str | None) -> Config:
    try:
        return load(path)
    except ConfigError as e:
        raise Refused(EX_CONFIG, f"config error: {e}") from None


def _send(
    options: Options,
    config: Config,
    stdin: BinaryIO,
    now: float,
    uid: int,
    login: str,
) -> None:
    hostname = config.smtp.hostname
    default_sender = qualify(login, hostname)
    sender = _envelope_sender(options.sender, default_sender, hostname)
    recipients = [_recipient(r, hostname) for r in options.recipients]

    text = read_message(stdin, config.smtp.max_message_size, options.dot_ends_input)
    fields, rest = split_header(text)
    if options.recipients_from_headers:
        recipients += [_recipient(r, hostname) for r in header_recipients(fields)]
    # Bcc: must never reach the recipients; Postfix's cleanup drops it with or without -t.
    fields = [field for field in fields if field_name(field) != "bcc"]
    if not recipients:
        raise Refused(EX_USAGE, "no recipients")

    queue_id = new_queue_id(now, SENDMAIL_TAG)  # never an acceptor's (see clear_tmp)
    stamp = Stamp(queue_id, hostname, uid, now, sender or default_sender, options.full_name)
    body = complete_message(fields, rest, stamp)
    envelope = Envelope(
        queue_id=queue_id,
        sender=sender,
        recipients=tuple(dict.fromkeys(recipients)),
        received_at=now,
        client=f"sendmail uid={uid}",
        helo="localhost",
        body_8bit=not body.isascii(),
    )
    _queue(envelope, body, config)


def _envelope_sender(given: str | None, default: str, hostname: str) -> str:
    if given is None:
        return _checked(default, allow_null=True)
    return _checked(qualify(given, hostname) if given else "", allow_null=True)


def _recipient(address: str, hostname: str) -> str:
    return _checked(qualify(address, hostname), allow_null=False)


def _queue(envelope: Envelope, body: bytes, config: Config) -> None:
    try:
        validate(envelope, body, config.smtp.max_message_size, config.smtp.max_recipients)
    except MaildropError as e:
        raise Refused(EX_DATAERR, e.reason) from None
    spool_root = Path(config.spool.path)
    try:
        deposit(spool_root, envelope, body)
    except MaildropError as e:  # SpoolMissing included: both are worth retrying later
        raise Refused(EX_TEMPFAIL, e.reason) from None
    notify_daemon(spool_root)  # best effort: the daemon polls the maildrop anyway


def main(
    argv: Sequence[str],
    config_path: str | None,
    stdin: BinaryIO | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    now: float | None = None,
    uid: int | None = None,
    login: str | None = None,
) -> int:
    """Run the command; return its exit code. Never raises, never prints a traceback."""
    try:
        options = parse_args(argv)
        if not options.recipients and not options.recipients_from_headers:
            raise Refused(EX_USAGE, "no recipients")
        env = os.environ if environ is None else environ
        config = _load_config(
            options.config_path or config_path or env.get("MAILRELAY_CONFIG") or None
        )
        uid = os.getuid() if uid is None else uid
        _send(
            options,
            config,
            sys.stdin.buffer if stdin is None else stdin,
            time.time() if now is None else now,
            uid,
            _login_name(uid) if login is None else login,
        )
    except Refused as e:
        return _fail(e.code, e.message)
    except KeyboardInterrupt:
        return _fail(EX_TEMPFAIL, "interrupted")
    except Exception as e:  # a bug: still one line and an exit code the caller understands
        return _fail(EX_SOFTWARE, f"internal error: {type(e).__name__}: {e}")
    return 0


def _fail(code: int, message: str) -> int:
    # The message text may hold what the caller gave us; keep it on one line.
    line = " ".join(message.split())
    with contextlib.suppress(OSError, ValueError):  # stderr closed: the exit code says it
        print(f"{PROG}: {line}", file=sys.stderr)
    return code


def console_main() -> None:
    raise SystemExit(main(sys.argv[1:], None))
