"""Delivery status notifications (RFC 3464) for recipients that failed for good.

A DSN is an ordinary message in our own spool, from the null sender ``<>`` to the original
envelope sender, so it is relayed like any other mail and a failing DSN is never bounced in
turn (no loops). It is a ``multipart/report; report-type=delivery-status`` with three parts:
a human-readable explanation, the ``message/delivery-status`` fields, and the original
message's headers (``text/rfc822-headers``; the body is not sent back).
"""

from __future__ import annotations

import email.utils
import re
import secrets
from collections.abc import Sequence

from mailrelay.spool.format import Envelope, Outcome

_ENHANCED_STATUS = re.compile(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")
_BASIC_CODE = re.compile(r"^([245])\d{2}\b")
MAX_HEADERS = 64 * 1024  # headers of the original returned at most; a line never split


def _ascii(text: str) -> str:
    # Upstream replies were decoded leniently; the report's text parts are us-ascii.
    return text.encode("ascii", "replace").decode("ascii")


def status_of(reply: str, expired: bool) -> str:
    """The RFC 3463 status for a failed recipient, from its last reply where it says one."""
    enhanced = _ENHANCED_STATUS.match(reply)
    if enhanced:
        return enhanced.group(1)
    if expired:
        return "4.4.7"  # delivery time expired
    basic = _BASIC_CODE.match(reply)
    return f"{basic.group(1)}.0.0" if basic else "5.0.0"


def original_headers(body: bytes) -> bytes:
    """The header block of the stored message (everything before the first empty line)."""
    end = body.find(b"\r\n\r\n")
    headers = body if end < 0 else body[: end + 2]
    if len(headers) > MAX_HEADERS:
        headers = headers[: headers.rfind(b"\r\n", 0, MAX_HEADERS) + 2]
    return headers


def build_dsn(
    envelope: Envelope,
    failed: Sequence[Outcome],
    original: bytes,
    reporting_mta: str,
    now: float,
) -> bytes:
    """The DSN message text (CRLF lines) for ``failed`` recipients of ``envelope``."""
    boundary = f"mailrelay-dsn-{secrets.token_hex(12)}"
    date = email.utils.formatdate(now, localtime=True)
    expired = ["expired" in o.reply for o in failed]
    reasons = "\r\n".join(f"<{o.recipient}>: {_ascii(o.reply)}" for o in failed)
    per_recipient = "\r\n\r\n".join(
        f"Final-Recipient: rfc822; {o.recipient}\r\n"
        f"Action: failed\r\n"
        f"Status: {status_of(o.reply, was_expired)}\r\n"
        f"Diagnostic-Code: smtp; {_ascii(o.reply)}\r\n"
        f"Last-Attempt-Date: {email.utils.formatdate(o.at, localtime=True)}"
        for o, was_expired in zip(failed, expired, strict=True)
    )
    text = (
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>\r\n"
        f"To: <{envelope.sender}>\r\n"
        f"Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {date}\r\n"
        f"Message-ID: <{envelope.queue_id}.dsn.{secrets.token_hex(4)}@{reporting_mta}>\r\n"
        f"Auto-Submitted: auto-replied\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
        f"\r\n"
        f"This is a MIME-encapsulated message.\r\n"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: text/plain; charset=us-ascii\r\n"
        f"\r\n"
        f"The mail relay on {reporting_mta} could not deliver your message\r\n"
        f"(queue ID {envelope.queue_id}) to the following recipient(s):\r\n"
        f"\r\n"
        f"{reasons}\r\n"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: message/delivery-status\r\n"
        f"\r\n"
        f"Reporting-MTA: dns; {reporting_mta}\r\n"
        f"X-Mailrelay-Queue-ID: {envelope.queue_id}\r\n"
        f"Arrival-Date: {email.utils.formatdate(envelope.received_at, localtime=True)}\r\n"
        f"\r\n"
        f"{per_recipient}\r\n"
        f"\r\n"
        f"--{boundary}\r\n"
        f"Content-Type: text/rfc822-headers\r\n"
        f"\r\n"
    ).encode("ascii", "replace")
    return text + original_headers(original) + f"\r\n--{boundary}--\r\n".encode()
