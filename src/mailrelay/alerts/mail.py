"""Alert notifications as mail to an admin, handed straight to a provider.

An alert is often about the queue itself (a backlog, an old message, a provider down), so its
mail must not wait in that queue: it goes directly to the first provider of the default chain
that takes it, and nothing of it is written to the spool. If the relay restarts meanwhile, the
notification is lost; the alert fires again from the next reading.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.header import Header
from email.quoprimime import body_encode
from email.utils import format_datetime

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from mailrelay.alerts.rules import ChannelError, Notice
from mailrelay.humanize import utc
from mailrelay.logger import Logger
from mailrelay.outbound.results import IProvider, Kind, OutboundMessage, RecipientResult

# RFC 5322 2.1.1: a line is at most 998 octets plus CRLF.
MAX_LINE = 998
# A subject longer than this is cut: it is a summary line, not a report.
MAX_SUBJECT = 200
# Any one field of the body (a summary may quote a provider's reply) is cut at this length.
MAX_FIELD = 2000
# Alert mails being sent at once, at most: each may wait for a provider's timeouts, and a
# flapping alert must not pile them up (past it a notification fails at once, unsent).
MAX_IN_FLIGHT = 10
# How long one provider may take with an alert mail before the next is tried: past every
# stage timeout of a healthy session, short of an alert that arrives an hour late.
PROVIDER_WAIT = 300.0

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class AlertMailError(ChannelError):
    """No provider took the alert mail; the message names each provider's reason."""


@attrs.frozen
class _Answer:
    """How one provider's try ended: its results, or why there are none."""

    results: list[RecipientResult] | None = None
    error: str = ""


@attrs.frozen
class AlertMail:
    queue_id: str
    body: bytes  # CRLF lines, 7-bit
    body_8bit: bool = False


def one_line(text: str, limit: int) -> str:
    """``text`` with every control character (CR and LF included) replaced by a space, so
    nothing that comes from a notice (provider replies end up in summaries) can start a new
    header or line; cut to ``limit`` characters."""
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3f}"


def _encoded_subject(subject: str) -> str:
    """The Subject field's value: ASCII as it is, anything else as RFC 2047 encoded words,
    folded with CRLF + space so no line gets near the limit."""
    subject = one_line(subject, MAX_SUBJECT)
    if subject.isascii() and "=?" not in subject:
        # (An upstream reply quoted in a summary could hold "=?utf-8?...?=", which a mail
        # reader would decode into other text: then it is encoded itself.)
        return subject
    return Header(subject, "utf-8", header_name="Subject").encode(linesep="\r\n")


def _body_text(notice: Notice) -> str:
    label = {"firing": "FIRING", "repeat": "STILL FIRING", "resolved": "RESOLVED"}[notice.kind]
    lines = [
        f"Alert:     {one_line(notice.name, MAX_FIELD)}",
        f"Status:    {label}",
        f"Summary:   {one_line(notice.summary, MAX_FIELD)}",
        f"Value:     {_number(notice.value)} (threshold {_number(notice.threshold)})",
        f"Since:     {utc(notice.since)}",
        f"At:        {utc(notice.at)}",
        f"Host:      {one_line(notice.host, MAX_FIELD)}",
        "",
        "Sent directly to an upstream provider, not through mailrelay's queue,",
        "so that it arrives even while the queue is stuck.",
    ]
    return "\r\n".join(lines) + "\r\n"


def build_message(
    notice: Notice,
    mail_from: str,
    mail_to: str,
    hostname: str,
    message_id: str,
    now: float,
) -> bytes:
    """The alert as an RFC 5322 message: CRLF lines, all 7-bit (quoted-printable when the
    text is not ASCII or has a line too long for SMTP)."""
    text = _body_text(notice)
    plain = text.isascii() and all(len(line) <= MAX_LINE for line in text.split("\r\n"))
    if plain:
        cte, body = "7bit", text
    else:
        # body_encode works on str: each non-ASCII character must be QP'd as its UTF-8 bytes.
        raw = text.encode("utf-8").decode("latin-1")
        cte, body = "quoted-printable", body_encode(raw, maxlinelen=76, eol="\r\n")
        if not body.endswith("\r\n"):
            body += "\r\n"
    headers = [
        ("From", one_line(mail_from, MAX_LINE - 10)),
        ("To", one_line(mail_to, MAX_LINE - 10)),
        ("Subject", _encoded_subject(notice.subject)),
        ("Date", format_datetime(datetime.fromtimestamp(now, UTC))),
        ("Message-ID", f"<{one_line(message_id, 200)}@{one_line(hostname, 255)}>"),
        # RFC 3834: an automatic message; vacation responders and the like must not answer.
        ("Auto-Submitted", "auto-generated"),
        ("X-Mailrelay-Alert", one_line(notice.name, 200)),
        ("MIME-Version", "1.0"),
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Transfer-Encoding", cte),
    ]
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return (head + "\r\n" + body).encode("ascii")


class MailChannel:
    """Mails each notification to ``mail_to``, straight through a provider.

    The providers of the default chain (``providers()``, read at each send) are tried in
    order, those whose circuit breaker is closed first; the others (open or half-open) come
    last rather than never: an open one answers "unavailable" at once, so asking costs
    nothing, and a half-open one may take the mail. The first provider that delivers it ends
    the send; if none does, the send fails with every provider's reason.
    """

    name = "mail"
    log = Logger(namespace="mailrelay.alerts")

    def __init__(
        self,
        reactor: IReactorTime,
        providers: Callable[[], Sequence[IProvider]],
        mail_from: str,
        mail_to: str,
        hostname: str,
        new_id: Callable[[], str],
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._clock = reactor
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._providers = providers
        self._mail_from = mail_from
        self._mail_to = mail_to
        self._hostname = hostname
        self._new_id = new_id

    def send(self, notice: Notice) -> defer.Deferred[None]:
        if self._in_flight >= self._max_in_flight:
            return defer.fail(
                AlertMailError(
                    f"{self._in_flight} alert mails already being sent;"
                    f" {notice.name} ({notice.kind}) dropped"
                )
            )
        queue_id = self._new_id()
        body = build_message(
            notice,
            self._mail_from,
            self._mail_to,
            self._hostname,
            message_id=queue_id,
            now=self._clock.seconds(),
        )
        message = OutboundMessage(
            queue_id=queue_id,
            sender=self._mail_from,
            recipients=(self._mail_to,),
            body=body,
            body_8bit=False,  # build_message writes 7-bit only
        )
        self._in_flight += 1

        def done(result: object) -> object:
            self._in_flight -= 1
            return result

        return defer.Deferred.fromCoroutine(self._deliver(notice, message)).addBoth(done)

    def candidates(self) -> list[IProvider]:
        """The providers to try, in order: closed breakers first, then the rest."""
        chain = list(self._providers())
        closed = [p for p in chain if p.status().state == "closed"]
        return closed + [p for p in chain if p not in closed]

    async def _deliver(self, notice: Notice, message: OutboundMessage) -> None:
        reasons: list[str] = []
        for provider in self.candidates():
            reason = await self._try(provider, message)
            if reason is None:
                self.log.info(
                    "alert {alert} ({status}) mailed to {mail_to} through {provider} as {queue_id}",
                    alert=notice.name,
                    status=notice.kind,
                    mail_to=self._mail_to,
                    provider=provider.name,
                    queue_id=message.queue_id,
                    event="alert_mailed",
                )
                return
            self.log.warn(
                "alert mail {queue_id} not taken by {provider}: {error}",
                queue_id=message.queue_id,
                provider=provider.name,
                error=reason,
                event="alert_mail_failed",
            )
            reasons.append(f"{provider.name}: {reason}")
        if not reasons:
            raise AlertMailError("no provider to send the alert mail through")
        raise AlertMailError("no provider took the alert mail: " + "; ".join(reasons))

    async def _try(self, provider: IProvider, message: OutboundMessage) -> str | None:
        """None if ``provider`` delivered ``message``, else why not."""
        # A provider whose delivery never ends (a bug, a pool stuck behind a hung upstream)
        # must not hold the alert forever: after PROVIDER_WAIT the next one is tried. The
        # delivery itself is not cancelled, so the admin may get this alert twice.
        answered: defer.Deferred[_Answer] = defer.Deferred()

        def settle(answer: _Answer) -> None:
            if not answered.called:
                answered.callback(answer)

        try:
            delivery = provider.deliver(message)
        except Exception as e:  # deliver() must not fail; if it does, one more reason
            settle(_Answer(error=f"{type(e).__name__}: {e}"))
        else:
            delivery.addCallbacks(
                lambda results: settle(_Answer(results=results)),
                lambda f: settle(_Answer(error=f"{type(f.value).__name__}: {f.value}")),
            )
        timer = self._clock.callLater(
            PROVIDER_WAIT, settle, _Answer(error=f"no answer within {PROVIDER_WAIT:.0f}s")
        )
        try:
            answer = await answered
        finally:
            if timer.active():
                timer.cancel()
        if answer.results is None:
            return answer.error
        results = answer.results
        if results and all(r.kind is Kind.DELIVERED for r in results):
            return None
        failed = [r for r in results if r.kind is not Kind.DELIVERED]
        if not failed:
            return "no result"
        return one_line(failed[0].reply, 300)
