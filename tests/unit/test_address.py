"""Envelope address and MAIL/RCPT parameter parsing (pitfall 14, reliability cases 9-11)."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.address import (
    AddressError,
    MailCommand,
    RcptCommand,
    parse_mail,
    parse_mailbox,
    parse_rcpt,
)

# -- valid forms -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argument, expected",
    [
        (b"FROM:<user@example.com>", MailCommand("user@example.com", None, False)),
        (b"from:<user@example.com>", MailCommand("user@example.com", None, False)),
        (b"FROM: <user@example.com>", MailCommand("user@example.com", None, False)),
        (b"FROM:<>", MailCommand("", None, False)),
        (b"FROM:<> SIZE=0", MailCommand("", 0, False)),
        (b'FROM:<"john smith"@example.com>', MailCommand('"john smith"@example.com', None, False)),
        (b'FROM:<"a>b"@example.com>', MailCommand('"a>b"@example.com', None, False)),
        (b'FROM:<"a\\"b"@example.com>', MailCommand('"a\\"b"@example.com', None, False)),
        (b"FROM:<a@[127.0.0.1]>", MailCommand("a@[127.0.0.1]", None, False)),
        (b"FROM:<a@[IPv6:2001:db8::1]>", MailCommand("a@[IPv6:2001:db8::1]", None, False)),
        (
            b"FROM:<@hop1.example,@hop2.example:u@example.com>",
            MailCommand("u@example.com", None, False),
        ),
        (b"FROM:user@example.com", MailCommand("user@example.com", None, False)),
        (b"FROM:user@example.com SIZE=10", MailCommand("user@example.com", 10, False)),
        (b"FROM:<u@example.com> SIZE=12345", MailCommand("u@example.com", 12345, False)),
        (b"FROM:<u@example.com> BODY=8BITMIME", MailCommand("u@example.com", None, True)),
        (b"FROM:<u@example.com> body=8bitmime", MailCommand("u@example.com", None, True)),
        (b"FROM:<u@example.com> BODY=7BIT SIZE=5", MailCommand("u@example.com", 5, False)),
        (b"FROM:<u@example.com>  SIZE=5   BODY=7BIT", MailCommand("u@example.com", 5, False)),
        (b"FROM:<!#$%&'*+/=?^_`{|}~-@x.y>", MailCommand("!#$%&'*+/=?^_`{|}~-@x.y", None, False)),
        (
            b"FROM:<first.last@sub-domain.example>",
            MailCommand("first.last@sub-domain.example", None, False),
        ),
    ],
)
def test_parse_mail_accepts_valid_forms(argument: bytes, expected: MailCommand) -> None:
    assert parse_mail(argument) == expected


@pytest.mark.parametrize(
    "argument, recipient",
    [
        (b"TO:<rcpt@example.org>", "rcpt@example.org"),
        (b"to: <rcpt@example.org>", "rcpt@example.org"),
        (b"TO:<Postmaster>", "Postmaster"),
        (b"TO:<postmaster>", "postmaster"),
        (b"TO:<@relay.example:rcpt@example.org>", "rcpt@example.org"),
        (b'TO:<"quoted local"@example.org>', '"quoted local"@example.org'),
        (b"TO:<rcpt@[192.0.2.1]>", "rcpt@[192.0.2.1]"),
        (b"TO:rcpt@example.org", "rcpt@example.org"),
    ],
)
def test_parse_rcpt_accepts_valid_forms(argument: bytes, recipient: str) -> None:
    assert parse_rcpt(argument) == RcptCommand(recipient)


def test_length_limits_are_inclusive() -> None:
    """64-octet local part and a 256-octet path (brackets included) are the RFC 5321 maxima."""
    local = b"l" * 64
    assert parse_mailbox(b"<" + local + b"@example.com>", allow_null=False).startswith("l" * 64)
    domain = b"a" * 63 + b"." + b"b" * 63 + b"." + b"c" * 63 + b"." + b"d" * 60
    path = b"<x@" + domain + b">"
    assert len(path) == 256
    assert parse_mailbox(path, allow_null=False) == "x@" + domain.decode()


# -- invalid forms ---------------------------------------------------------------------------


def _error(call: object) -> tuple[int, str]:
    assert callable(call)
    with pytest.raises(AddressError) as caught:
        call()
    return caught.value.code, caught.value.status


@pytest.mark.parametrize(
    "argument, code, status",
    [
        (b"FROM:<" + b"l" * 65 + b"@example.com>", 501, "5.1.3"),  # local part over 64
        (b"FROM:<x@" + b"d" * 253 + b">", 501, "5.1.3"),  # path of 257 octets
        (b"FROM:<" + b"a" * 300 + b">", 501, "5.1.3"),
        (b"FROM:<a\rb@c.d>", 501, "5.1.3"),
        (b"FROM:<a\nb@c.d>", 501, "5.1.3"),
        (b"FROM:<a\x00b@c.d>", 501, "5.1.3"),
        (b'FROM:<"a\rb"@c.d>', 501, "5.1.3"),
        (b'FROM:<"a\x00"@c.d>', 501, "5.1.3"),
        (b"FROM:<a\tb@c.d>", 501, "5.1.3"),
        (b"FROM:<a@c.d\x7f>", 501, "5.1.3"),
        (b"FROM:<j\xc3\xb6rg@c.d>", 553, "5.6.7"),
        (b"FROM:<a@b.c", 501, "5.5.4"),  # missing '>'
        (b'FROM:<"a>@b.c>', 501, "5.5.4"),  # the quote never closes, so neither does the path
        (b"FROM:<a@b.c>junk", 501, "5.5.4"),
        (b"FROM:<@b.c>", 501, "5.1.3"),  # empty local part
        (b"FROM:<a@>", 501, "5.1.3"),
        (b"FROM:<a>", 501, "5.1.3"),
        (b"FROM:<Postmaster>", 501, "5.1.3"),  # a domain-less Postmaster is for RCPT only
        (b"FROM:<a..b@c.d>", 501, "5.1.3"),
        (b"FROM:<.a@c.d>", 501, "5.1.3"),
        (b"FROM:<a b@c.d>", 501, "5.1.3"),
        (b"FROM:<a@-c.d>", 501, "5.1.3"),
        (b"FROM:<a@c..d>", 501, "5.1.3"),
        (b"FROM:<a@[1.2.3.4>", 501, "5.1.3"),
        (b"TO:<a@b.c>", 501, "5.5.4"),  # wrong keyword
        (b"FROM<a@b.c>", 501, "5.5.4"),
        (b"", 501, "5.5.4"),
        (b"FROM:<a@b.c> SIZE=1 SIZE=2", 501, "5.5.4"),
        (b"FROM:<a@b.c> size=1 SIZE=1", 501, "5.5.4"),  # keywords are case-insensitive
        (b"FROM:<a@b.c> SIZE", 501, "5.5.4"),
        (b"FROM:<a@b.c> SIZE=", 501, "5.5.4"),
        (b"FROM:<a@b.c> SIZE=-1", 501, "5.5.4"),
        (b"FROM:<a@b.c> SIZE=1e6", 501, "5.5.4"),
        (b"FROM:<a@b.c> SIZE=" + b"9" * 21, 501, "5.5.4"),
        (b"FROM:<a@b.c> BODY=BINARYMIME", 501, "5.5.4"),
        (b"FROM:<a@b.c> BODY", 501, "5.5.4"),
        (b"FROM:<a@b.c> =x", 501, "5.5.4"),
        (b"FROM:<a@b.c> -X=1", 501, "5.5.4"),
        (b"FROM:<a@b.c> SMTPUTF8", 555, "5.5.4"),
        (b"FROM:<a@b.c> AUTH=<>", 555, "5.5.4"),
        (b"FROM:<a@b.c> X-UNKNOWN=1", 555, "5.5.4"),
    ],
)
def test_parse_mail_refuses_invalid_forms_with_their_codes(
    argument: bytes, code: int, status: str
) -> None:
    assert _error(lambda: parse_mail(argument)) == (code, status)


@pytest.mark.parametrize(
    "argument, code, status",
    [
        (b"TO:<>", 501, "5.1.3"),  # the null path is a sender only
        (b"TO:<nodomain>", 501, "5.1.3"),
        (b"TO:<a\r\nb@c.d>", 501, "5.1.3"),
        (b"TO:<a\r\nRCPT TO:<b@c.d>@e.f>", 501, "5.5.4"),
        (b"TO:<\xe2\x98\x83@c.d>", 553, "5.6.7"),
        (b"TO:<a@b.c> NOTIFY=NEVER", 555, "5.5.4"),
        (b"TO:<a@b.c> ORCPT=rfc822;a@b.c", 555, "5.5.4"),
        (b"TO:<a@b.c> X=1 X=2", 501, "5.5.4"),
        (b"FROM:<a@b.c>", 501, "5.5.4"),
        (b"TO:<a@b.c", 501, "5.5.4"),
    ],
)
def test_parse_rcpt_refuses_invalid_forms_with_their_codes(
    argument: bytes, code: int, status: str
) -> None:
    assert _error(lambda: parse_rcpt(argument)) == (code, status)


# -- properties ------------------------------------------------------------------------------

_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def _check_mailbox(inner: bytes, allow_null: bool) -> None:
    """parse_mailbox raises only AddressError; what it returns is printable ASCII, no CR/LF/NUL,
    no space outside a quoted local part, and never longer than a path allows."""
    try:
        mailbox = parse_mailbox(b"<" + inner + b">", allow_null=allow_null)
    except AddressError as e:
        assert e.code in (501, 553)
        return
    assert not any(c in mailbox for c in "\r\n\x00")
    assert all(0x20 <= ord(c) < 0x7F for c in mailbox)
    assert " " not in _QUOTED.sub("", mailbox)
    assert len(mailbox) <= 254


@given(st.binary(max_size=300), st.booleans())
def test_parse_mailbox_on_arbitrary_bytes_raises_only_address_error_and_returns_clean_ascii(
    inner: bytes, allow_null: bool
) -> None:
    _check_mailbox(inner, allow_null)


# Mostly address-like input, so the property also reaches the branches past the first checks.
_address_bytes = st.lists(
    st.sampled_from(
        [
            b"a",
            b"Z",
            b"0",
            b".",
            b"@",
            b'"',
            b"\\",
            b" ",
            b"[",
            b"]",
            b":",
            b",",
            b"-",
            b"\r",
            b"\n",
            b"\x00",
            b"\x7f",
            b"\xc3\xa9",
            b"<",
            b">",
            b"=",
            b"SIZE=1",
            b"example.com",
        ]
    ),
    max_size=40,
).map(b"".join)


@given(_address_bytes, st.booleans())
def test_parse_mailbox_on_address_like_bytes_keeps_the_same_guarantees(
    inner: bytes, allow_null: bool
) -> None:
    _check_mailbox(inner, allow_null)


@given(st.one_of(_address_bytes, st.binary(max_size=300)))
def test_parse_mail_and_parse_rcpt_only_raise_address_error(tail: bytes) -> None:
    for parse, prefix in ((parse_mail, b"FROM:"), (parse_rcpt, b"TO:")):
        with contextlib.suppress(AddressError):
            parse(prefix + tail)


# -- the shortcuts in the parser agree with the plain definitions ---------------------------------


def _closing_bracket_by_scan(rest: bytes) -> int | None:
    """The '>' that closes a path, octet by octet (quoted strings and their escapes skipped)."""
    in_quotes = escaped = False
    for i, c in enumerate(rest):
        if escaped:
            escaped = False
        elif c == 0x5C and in_quotes:
            escaped = True
        elif c == 0x22:
            in_quotes = not in_quotes
        elif c == 0x3E and not in_quotes:
            return i
    return None


@given(_address_bytes)
def test_the_path_ends_where_a_quote_aware_scan_says(tail: bytes) -> None:
    end = _closing_bracket_by_scan(tail)
    try:
        command = parse_rcpt(b"TO:<" + tail)
    except AddressError as e:
        if end is None:
            assert e.text == "Syntax error: missing '>'"
        return
    assert end is not None
    mailbox = parse_mailbox(b"<" + tail[: end + 1], allow_null=False)
    assert command.recipient == mailbox


@pytest.mark.parametrize("octet", range(256))
def test_each_octet_outside_printable_ascii_is_refused_with_its_reply(octet: int) -> None:
    path = b"<a" + bytes([octet]) + b"b@example.com>"
    if 0x20 <= octet < 0x7F:
        with contextlib.suppress(AddressError):
            parse_mailbox(path, allow_null=False)
        return
    with pytest.raises(AddressError) as raised:
        parse_mailbox(path, allow_null=False)
    if octet < 0x20 or octet == 0x7F:
        assert (raised.value.code, raised.value.status) == (501, "5.1.3")
        assert raised.value.text == "Control characters are not allowed in an address"
    else:
        assert (raised.value.code, raised.value.status) == (553, "5.6.7")
