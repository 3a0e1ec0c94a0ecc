"""A persistent ESMTP client connection to one provider.

Built on ``twisted.mail.smtp.ESMTPClient`` for its reply parsing and its EHLO / STARTTLS
steps, with what a relay needs in place of the rest (items of shared/twisted-pitfalls.md):

- Persistent (18): after the session is set up, and after each message, the connection is
  *ready* and waits for the pool to hand it the next message; no QUIT per message.
- Our own payload, one write, TCP_NODELAY (15-17); MAIL, RCPTs and DATA in one write when the
  server advertises PIPELINING.
- Per-recipient results (19); no retries of our own, never a resend after the final dot (20).
- A timeout per stage (21): greeting, command, data, final.
- AUTH only after TLS or to a loopback host (22), one attempt (24); session logging off so a
  credential can never reach an error string (23).
- STARTTLS: bytes the server sent after "220 ready" are an attack, not data: abort (26).
"""

from __future__ import annotations

import base64
import enum
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, cast

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport, ITLSTransport
from twisted.mail import smtp
from twisted.python.failure import Failure

from mailrelay.config import ProviderConfig
from mailrelay.netaddr import is_loopback_host
from mailrelay.outbound.payload import build_data_payload
from mailrelay.outbound.results import Kind, OutboundMessage, RecipientResult, kind_of_reply

MAX_REPLY_TEXT = 400


class SessionError(Exception):
    """The connection could not be set up or broke; ``stage`` says where (for logs, breakers)."""

    def __init__(self, stage: str, detail: str) -> None:
        super().__init__(f"{stage}: {detail}")
        self.stage = stage
        self.detail = detail


class _State(enum.Enum):
    SETUP = "setup"
    READY = "ready"
    BUSY = "busy"
    CLOSING = "closing"
    CLOSED = "closed"


def _reply_text(code: int, resp: bytes | str) -> str:
    if isinstance(resp, bytes):
        resp = resp.decode("utf-8", "replace")
    text = " ".join(resp.split())  # multi-line replies become one line
    return f"{code} {text}"[:MAX_REPLY_TEXT]


class _Transaction:
    def __init__(self, message: OutboundMessage) -> None:
        self.message = message
        self.deferred: defer.Deferred[list[RecipientResult]] = defer.Deferred()
        self.results: dict[str, RecipientResult] = {}
        self.accepted: list[str] = []
        self.mail_failure: tuple[int, bytes] | None = None
        self.expecting: deque[tuple[str, str]] = deque()  # (command, recipient or "")
        self.unsent: deque[tuple[bytes, tuple[str, str]]] = deque()
        self.after_final_dot = False


class _ClientTransport(Protocol):
    """What the client uses of its transport."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...


# Every reply code goes to one handler during a transaction; it classifies them itself.
_ANY_REPLY: Any = range(0, 1000)


class RelayClient(smtp.ESMTPClient):
    debug = False  # the stock session log would keep the AUTH line (pitfall 23)

    def __init__(
        self,
        provider: ProviderConfig,
        clock: IReactorTime,
        tls_options: Any | None,
        password: str | None = None,
    ) -> None:
        super().__init__(
            secret=None,
            contextFactory=tls_options if provider.tls == "starttls" else None,
            identity=provider.helo,
        )
        self.provider = provider
        self._clock = clock
        self.timeout = provider.greeting_timeout  # type: ignore[assignment]  # base: None
        self.requireTransportSecurity = provider.tls == "starttls"
        self.requireAuthentication = provider.username is not None
        self.heloFallback = False
        self._password = password
        self._state = _State.SETUP
        self._extensions: dict[bytes, bytes | None] = {}
        self._transaction: _Transaction | None = None
        self.messages_sent = 0
        # Fires with this client once the session is set up, or fails with SessionError.
        self.ready: defer.Deferred[RelayClient] = defer.Deferred()
        # Set by the pool: called when the client becomes ready again, and when it is gone.
        self.on_ready: Any = None
        self.on_closed: Any = None

    @property
    def _transport(self) -> _ClientTransport:
        assert self.transport is not None, "used only while connected"
        return cast(_ClientTransport, self.transport)

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        # TimeoutMixin schedules through this: route it to the injected clock.
        return self._clock.callLater(period, func)

    @property
    def is_ready(self) -> bool:
        return self._state is _State.READY

    # -- session setup ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        super().connectionMade()

    def esmtpState_ehlo(self, code: int, resp: bytes) -> None:
        self.setTimeout(self.provider.command_timeout)
        super().esmtpState_ehlo(code, resp)

    def lineReceived(self, line: bytes) -> Any:
        if self._state is _State.CLOSED:
            # The session failed and the transport was aborted, but a TCP transport does not
            # set ``disconnecting`` on abort, so LineReceiver goes on parsing the rest of the
            # chunk: such lines (e.g. an injected second "220" after STARTTLS) must not drive
            # the state machine any further.
            return None
        return super().lineReceived(line)

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:
        if self._buffer:
            # Anything after "220 ready for TLS" was sent in clear text and would be read as
            # if it came over TLS (a STARTTLS injection): give up on this connection.
            self._session_failed("tls", "data injected after the STARTTLS reply")
            return
        # Not the stock step: when startTLS raises, it logs, fails, and still sends EHLO.
        try:
            # Adapting fails (TypeError) for a transport that cannot do TLS at all.
            ITLSTransport(self.transport).startTLS(cast(Any, self.context))
        except Exception as e:
            self._session_failed("tls", f"cannot start TLS: {type(e).__name__}")
            return
        self._tlsMode = True
        self.esmtpState_ehlo(code, resp)

    def authenticate(self, code: int, resp: bytes, items: dict[bytes, bytes | None]) -> None:
        """Called by ESMTPClient once TLS is settled; we take over from here."""
        self._extensions = {k.upper(): v for k, v in items.items()}
        if self.provider.username is None:
            self._session_ready()
            return
        secure = self._tlsMode or is_loopback_host(self.provider.host)
        if not secure:
            self._session_failed("auth", "refusing to send credentials without TLS")
            return
        mechanisms = (self._extensions.get(b"AUTH") or b"").upper().split()
        if b"PLAIN" not in mechanisms:
            self._session_failed("auth", "server does not offer AUTH PLAIN")
            return
        token = base64.b64encode(
            b"\0"
            + self.provider.username.encode("utf-8")
            + b"\0"
            + (self._password or "").encode("utf-8")
        )
        self._expected = [235]
        self._okresponse = lambda code, resp: self._session_ready()
        # One attempt only (pitfall 24): a 535 must not become a second try.
        self._failresponse = lambda code, resp: self._session_failed(
            "auth", f"credentials rejected ({code})"
        )
        self._transport.write(b"AUTH PLAIN " + token + b"\r\n")

    def _session_ready(self) -> None:
        self._state = _State.READY
        self.setTimeout(self.provider.idle_timeout)
        if not self.ready.called:
            self.ready.callback(self)
        elif self.on_ready is not None:
            self.on_ready(self)

    def sendError(self, exc: Exception) -> None:
        """ESMTPClient reports every failure here; classify by type (pitfall 20)."""
        if isinstance(exc, smtp.SMTPTimeoutError):
            stage = "timeout"
        elif isinstance(exc, smtp.TLSError | smtp.TLSRequiredError):
            stage = "tls"
        elif isinstance(exc, smtp.AUTHDeclinedError | smtp.AUTHRequiredError):
            stage = "auth"
        elif isinstance(exc, smtp.SMTPConnectError | smtp.EHLORequiredError):
            stage = "greeting"
        else:
            stage = "protocol"
        code = getattr(exc, "code", -1)
        resp = getattr(exc, "resp", b"")
        detail = _reply_text(code, resp) if code and code > 0 else str(resp or type(exc).__name__)
        self._session_failed(stage, detail)

    def _session_failed(self, stage: str, detail: str) -> None:
        failure = SessionError(stage, detail)
        if self._transaction is not None:
            self._lose_transaction(f"{stage}: {detail}")
        if not self.ready.called:
            self.ready.errback(failure)
        self._state = _State.CLOSED
        self.setTimeout(None)
        if self.transport is not None:
            self._transport.abortConnection()

    def timeoutConnection(self) -> None:
        if self._state is _State.READY:
            self.quit()  # idle for idle_timeout: leave politely
        else:
            super().timeoutConnection()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        detail = reason.getErrorMessage() if isinstance(reason, Failure) else str(reason)
        if self._transaction is not None:
            self._lose_transaction(f"connection lost: {detail}")
        if not self.ready.called:
            tls_failed = isinstance(reason, Failure) and reason.check(SSL.Error) is not None
            stage = "tls" if tls_failed or self._tlsMode else "connect"
            self.ready.errback(SessionError(stage, f"connection lost during setup: {detail}"))
        self._state = _State.CLOSED
        if self.on_closed is not None:
            self.on_closed(self)

    def quit(self) -> None:
        if self._state in (_State.CLOSING, _State.CLOSED):
            return
        self._state = _State.CLOSING
        self.setTimeout(self.provider.command_timeout)
        self._expected = _ANY_REPLY
        self._okresponse = self._failresponse = lambda code, resp: self._transport.loseConnection()
        self._transport.write(b"QUIT\r\n")

    # -- transactions ---------------------------------------------------------------------------

    def send(self, message: OutboundMessage) -> defer.Deferred[list[RecipientResult]]:
        """Send one message over this ready connection; never fails, every outcome is a result."""
        assert self._state is _State.READY, self._state
        self._state = _State.BUSY
        transaction = _Transaction(message)
        self._transaction = transaction
        params = b""
        if b"SIZE" in self._extensions:
            params += b" SIZE=%d" % len(message.body)
        if message.body_8bit and b"8BITMIME" in self._extensions:
            params += b" BODY=8BITMIME"
        commands: list[tuple[bytes, tuple[str, str]]] = [
            (b"MAIL FROM:<" + message.sender.encode("ascii") + b">" + params, ("MAIL", ""))
        ]
        commands += [
            (b"RCPT TO:<" + r.encode("ascii") + b">", ("RCPT", r)) for r in message.recipients
        ]
        commands.append((b"DATA", ("DATA", "")))
        self._expected = _ANY_REPLY
        self._okresponse = self._failresponse = self._transaction_reply
        self.setTimeout(self.provider.command_timeout)
        if b"PIPELINING" in self._extensions:
            transaction.expecting.extend(what for _, what in commands)
            self._transport.write(b"".join(line + b"\r\n" for line, _ in commands))
        else:
            transaction.unsent.extend(commands)
            self._send_next_command(transaction)
        return transaction.deferred

    def _send_next_command(self, transaction: _Transaction) -> None:
        line, what = transaction.unsent.popleft()
        transaction.expecting.append(what)
        self._transport.write(line + b"\r\n")

    def _transaction_reply(self, code: int, resp: bytes) -> None:
        transaction = self._transaction
        if transaction is None:
            return
        if not transaction.expecting:
            self._session_failed("protocol", f"unexpected reply {_reply_text(code, resp)}")
            return
        command, recipient = transaction.expecting.popleft()
        if transaction.expecting and transaction.expecting[0][0] == "DATA":
            # RFC 5321 4.5.3.2.5 / Postfix's smtp_data_init_timeout: the wait for the 354.
            self.setTimeout(self.provider.data_timeout)
        if command == "MAIL":
            if not 200 <= code < 300:
                transaction.mail_failure = (code, resp)
        elif command == "RCPT":
            if transaction.mail_failure is not None:
                mail_code, mail_resp = transaction.mail_failure
                self._result(transaction, recipient, mail_code, mail_resp)
            elif 200 <= code < 300:
                transaction.accepted.append(recipient)
            else:
                self._result(transaction, recipient, code, resp)
        elif command == "DATA":
            if code == 354 and transaction.accepted:
                # The payload is one write; the reactor drains it while we wait, so the
                # transfer and the wait for the final reply share one deadline: the transfer
                # allowance (data_timeout) plus the reply's (final_timeout).
                self.setTimeout(self.provider.data_timeout + self.provider.final_timeout)
                transaction.after_final_dot = True
                transaction.expecting.append(("FINAL", ""))
                self._transport.write(build_data_payload(transaction.message.body))
                return
            if code == 354:
                # Every RCPT failed but the server still opened DATA (RFC 2920 3.1): send an
                # empty message to end it, and ignore its reply.
                transaction.expecting.append(("DISCARD", ""))
                self._transport.write(b".\r\n")
                return
            for r in transaction.accepted:
                self._result(transaction, r, code, resp)
            self._finish(transaction, reset=True)
            return
        elif command == "FINAL":
            for r in transaction.accepted:
                self._result(transaction, r, code, resp)
            self._finish(transaction, reset=not 200 <= code < 300)
            return
        elif command == "DISCARD":
            self._finish(transaction, reset=True)
            return

        if transaction.unsent:
            if transaction.mail_failure is not None or (
                transaction.unsent[0][1][0] == "DATA" and not transaction.accepted
            ):
                # Without pipelining, stop at the first step that makes the rest pointless.
                for _, (_, r) in transaction.unsent:
                    if r and transaction.mail_failure is not None:
                        self._result(transaction, r, *transaction.mail_failure)
                transaction.unsent.clear()
                self._finish(transaction, reset=True)
            else:
                self._send_next_command(transaction)

    def _result(self, transaction: _Transaction, recipient: str, code: int, resp: bytes) -> None:
        transaction.results[recipient] = RecipientResult(
            recipient, kind_of_reply(code), _reply_text(code, resp)
        )

    def _finish(self, transaction: _Transaction, reset: bool) -> None:
        self._transaction = None
        self.messages_sent += 1
        results = [
            transaction.results.get(r)
            or RecipientResult(r, Kind.TEMPORARY, "no reply for this recipient")
            for r in transaction.message.recipients
        ]
        if reset:
            # A failed transaction leaves the server's state unknown: RSET before reuse.
            self._expected = _ANY_REPLY
            self._okresponse = self._failresponse = self._after_reset
            self.setTimeout(self.provider.command_timeout)
            self._transport.write(b"RSET\r\n")
        else:
            self._state = _State.READY
            self.setTimeout(self.provider.idle_timeout)
        transaction.deferred.callback(results)
        if not reset and self._state is _State.READY and self.on_ready is not None:
            self.on_ready(self)

    def _after_reset(self, code: int, resp: bytes) -> None:
        if 200 <= code < 300:
            self._session_ready()
        else:
            self.quit()

    def _lose_transaction(self, detail: str) -> None:
        transaction, self._transaction = self._transaction, None
        if transaction is None:
            return
        uncertain = transaction.after_final_dot
        results = [
            transaction.results.get(r)
            or RecipientResult(
                r, Kind.TEMPORARY, detail, uncertain=uncertain and r in transaction.accepted
            )
            for r in transaction.message.recipients
        ]
        transaction.deferred.callback(results)
