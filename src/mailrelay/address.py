"""Envelope addresses and MAIL/RCPT parameters, parsed strictly (RFC 5321 4.1.2, 4.5.3.1).

Twisted's ``smtp.Address`` accepts any byte inside a quoted local part, CR and LF included
(pitfall 14), so we parse paths ourselves. An address is kept as the ASCII ``str`` that goes
upstream unchanged; the null reverse-path is the empty string.
"""

from __future__ import annotations

import re

import attrs

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256  # including the angle brackets

# atext of RFC 5322 3.2.3; a dot-string is atoms joined by single dots.
_ATOM = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_STRING = re.compile(rb"%s(?:\.%s)*" % (_ATOM, _ATOM))
# Quoted string: printable ASCII (qtextSMTP) or backslash + printable ASCII; never CR/LF/NUL.
_QUOTED_STRING = re.compile(rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_LABEL = rb"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = re.compile(rb"%s(?:\.%s)*" % (_LABEL, _LABEL))
_ADDRESS_LITERAL = re.compile(rb"\[[\x21-\x5a\x5e-\x7e]+\]")
# A source route (@a,@b:) is obsolete; RFC 5321 C says accept it and ignore it.
_SOURCE_ROUTE = re.compile(rb"@[^,:]+(?:,@[^,:]+)*:")
_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


@attrs.frozen
class AddressError(Exception):
    """An address or parameter we refuse, with the reply that says why."""

    code: int
    status: str
    text: str


@attrs.frozen
class MailCommand:
    sender: str  # "" is the null reverse-path
    size: int | None  # SIZE= declared by the client
    body_8bit: bool  # BODY=8BITMIME


@attrs.frozen
class RcptCommand:
    recipient: str


def _bad_address(text: str) -> AddressError:
    return AddressError(501, "5.1.3", text)


def _split_path_and_params(argument: bytes, prefix: bytes) -> tuple[bytes, list[bytes]]:
    """Split ``FROM:<path> PARAM PARAM`` into the path (brackets kept) and parameters."""
    if argument[: len(prefix)].upper() != prefix:
        raise AddressError(501, "5.5.4", f"Syntax: {prefix.decode()}<address>")
    rest = argument[len(prefix) :].lstrip(b" ")
    if rest.startswith(b"<"):
        end = _closing_bracket(rest)
        path, tail = rest[: end + 1], rest[end + 1 :]
        if tail and not tail.startswith(b" "):
            raise AddressError(501, "5.5.4", "Syntax error after the address")
    else:
        # No brackets: tolerated, as most MTAs do, when the address is one word.
        path, _, tail = rest.partition(b" ")
        path = b"<" + path + b">"
    return path, tail.split()


def _closing_bracket(rest: bytes) -> int:
    """Index of the '>' closing the path, skipping over quoted strings."""
    end = rest.find(b">")
    if end >= 0 and rest.find(b'"', 0, end) < 0:
        return end  # no quoted string before it: the first '>' closes (the usual case)
    in_quotes = escaped = False
    for i, c in enumerate(rest):
        if escaped:
            escaped = False
        elif c == 0x5C and in_quotes:  # backslash
            escaped = True
        elif c == 0x22:  # double quote
            in_quotes = not in_quotes
        elif c == 0x3E and not in_quotes:  # '>'
            return i
    raise AddressError(501, "5.5.4", "Syntax error: missing '>'")


def parse_mailbox(path: bytes, allow_null: bool) -> str:
    """Check a bracketed path and return the mailbox as the ASCII string we store and forward."""
    if len(path) > MAX_PATH:
        raise _bad_address("Address too long")
    # (Searched in C: a Python loop over every octet was most of the parse, twice a message.)
    if _CONTROL.search(path):
        raise _bad_address("Control characters are not allowed in an address")
    if not path.isascii():  # 0x7F was refused above: what is left is 0x80 and up
        raise AddressError(553, "5.6.7", "Non-ASCII address without SMTPUTF8")
    inner = path[1:-1]
    if not inner:
        if allow_null:
            return ""
        raise _bad_address("The null address is not a valid recipient")
    route = _SOURCE_ROUTE.match(inner)
    if route:
        inner = inner[route.end() :]
    local, at, domain = inner.rpartition(b"@")
    if not at:
        # RFC 5321 4.5.1: <Postmaster> without a domain must be accepted as a recipient.
        if not allow_null and inner.lower() == b"postmaster":
            return inner.decode("ascii")
        raise _bad_address("Address needs a domain (user@example.com)")
    if not local or len(local) > MAX_LOCAL_PART:
        raise _bad_address("Bad local part length")
    if not (_DOT_STRING.fullmatch(local) or _QUOTED_STRING.fullmatch(local)):
        raise _bad_address("Bad local part syntax")
    if not domain or len(domain) > MAX_DOMAIN:
        raise _bad_address("Bad domain length")
    if not (_DOMAIN.fullmatch(domain) or _ADDRESS_LITERAL.fullmatch(domain)):
        raise _bad_address("Bad domain syntax")
    return (local + b"@" + domain).decode("ascii")


def _parse_params(params: list[bytes]) -> dict[str, bytes | None]:
    parsed: dict[str, bytes | None] = {}
    for param in params:
        keyword, eq, value = param.partition(b"=")
        if not _KEYWORD.fullmatch(keyword) or (eq and not value):
            raise AddressError(501, "5.5.4", "Malformed parameter")
        name = keyword.decode("ascii").upper()
        if name in parsed:
            raise AddressError(501, "5.5.4", f"Parameter {name} given twice")
        parsed[name] = value if eq else None
    return parsed


def parse_mail(argument: bytes) -> MailCommand:
    """Parse the argument of MAIL (``FROM:<a@b> SIZE=123 BODY=8BITMIME``)."""
    path, raw_params = _split_path_and_params(argument, b"FROM:")
    sender = parse_mailbox(path, allow_null=True)
    size: int | None = None
    body_8bit = False
    for name, value in _parse_params(raw_params).items():
        if name == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise AddressError(501, "5.5.4", "SIZE needs a number")
            size = int(value)
        elif name == "BODY":
            if value is None or value.upper() not in (b"7BIT", b"8BITMIME"):
                raise AddressError(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
            body_8bit = value.upper() == b"8BITMIME"
        else:
            # Never copied upstream unchecked: an unknown parameter is refused (RFC 5321 4.1.1.11).
            raise AddressError(555, "5.5.4", f"Unsupported MAIL parameter {name}")
    return MailCommand(sender=sender, size=size, body_8bit=body_8bit)


def parse_rcpt(argument: bytes) -> RcptCommand:
    """Parse the argument of RCPT (``TO:<a@b>``); we support no RCPT parameters."""
    path, raw_params = _split_path_and_params(argument, b"TO:")
    recipient = parse_mailbox(path, allow_null=False)
    for name in _parse_params(raw_params):
        raise AddressError(555, "5.5.4", f"Unsupported RCPT parameter {name}")
    return RcptCommand(recipient=recipient)
