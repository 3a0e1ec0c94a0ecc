"""A persistent ESMTP client connection to one provider.

Built on ``twisted.mail.smtp.ESMTPClient`` for its reply parsing and its EHLO / STARTTLS
steps, with what a relay needs in place of the rest (items of shared/twisted-pitfalls.md).
RelayClient keeps the session's state machine, sets the session up and takes it down; its
mixins do the rest, each with its own items: replies.py (reading replies, hostile servers,
scrubbed texts), transaction.py (one message, per-recipient results), idle.py (a ready
connection between messages); session.py holds the states and SessionError. Here:

- Persistent (18): after the session is set up, and after each message, the connection is
  *ready* and waits for the pool to hand it the next message; no QUIT per message.
- TCP_NODELAY (17).
- A timeout per stage (21): greeting, command, data, final (the last two: transaction.py).
- AUTH only after TLS or to a loopback host (22), one attempt with one mechanism (24): the
  first of ``provider.auth_mechanisms`` (PLAIN, LOGIN, CRAM-MD5) that the server offers; a
  refusal never leads to another mechanism. Session logging off and generic error texts, so a
  credential can never reach an error string or a log line (23).
- STARTTLS: bytes the server sent after "220 ready" are an attack, not data: abort (26).
- Implicit TLS (25): the transport is TLS from the first byte (the pool wraps the endpoint), so
  the session counts as secure from connectionMade, whatever interfaces the transport declares,
  and STARTTLS is never tried.
- QUIT waits QUIT_TIMEOUT at most, then the connection is aborted.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime, ITCPTransport, ITLSTransport
from twisted.mail import smtp
from twisted.python.failure import Failure

from mailrelay.clock import InjectedClockTimeouts
from mailrelay.config import ProviderConfig
from mailrelay.netaddr import is_local_peer, is_loopback_host
from mailrelay.netwrite import write_now
from mailrelay.outbound.auth import AUTH_MECHANISMS, Responder, auth_exchange
from mailrelay.outbound.idle import IdleSteps
from mailrelay.outbound.results import FailureClass
from mailrelay.outbound.session import (
    ANY_REPLY,
    LOSS_STAGES,
    ClientTransport,
    SessionError,
    State,
    failure_class_of_stage,
)
from mailrelay.outbound.transaction import TransactionSteps

# How long QUIT waits for its reply (at most command_timeout) before the connection is
# aborted: a connection on its way out should not hold a pool slot for minutes.
QUIT_TIMEOUT = 10.0

# The AUTH failure for a password that cannot be encoded: no byte, no offset.
BAD_PASSWORD = "cannot use the configured password (not UTF-8)"


class RelayClient(TransactionSteps, IdleSteps, InjectedClockTimeouts, smtp.ESMTPClient):
    debug = False  # the stock session log would keep the AUTH line (pitfall 23)

    # ESMTPClient defines __setattr__ only to warn about its deprecated ``tlsMode``, which we
    # never set; as a Python-level method it ran for every attribute assignment, ~47 times a
    # message in the profile of the relay process. Plain assignment instead.
    __setattr__ = object.__setattr__

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
        self._state = State.SETUP
        self._extensions: dict[bytes, bytes | None] = {}
        self._transaction = None
        self.messages_sent = 0
        # clock.seconds() when the TCP connection was made; for max_connection_age.
        self.connected_at: float | None = None
        # When the current idle spell began (session set up or a transaction ended); a
        # keepalive NOOP does not start a new one.
        self._idle_since = 0.0
        # What the idle timer does when it fires: QUIT (idle or age limit) or a NOOP.
        self._idle_tick_quits = True
        # The AUTH exchange in progress: the mechanism, the answers to its challenges still
        # to send, whether the credentials went out already (for the error text only).
        self._auth_mechanism = ""
        self._auth_responders: deque[Responder] = deque()
        self._auth_credentials_sent = False
        # Everything sent during AUTH (the password, base64 or not, the PLAIN token, the
        # LOGIN and CRAM-MD5 answers): scrubbed from every server-derived text until the
        # connection is closed, since a server may echo what it was sent, even later.
        self._secrets: set[str] = set()
        # The setup step in progress: greeting, ehlo, starttls, tls-handshake, auth; "done"
        # once set up. Names the stage of a connection lost during setup.
        self._setup_step = "greeting"
        self._starttls_done = False
        # The reply being received: its lines and bytes so far (MAX_REPLY_LINES/_BYTES).
        self._reply_lines = 0
        self._reply_bytes = 0
        # Fires with this client once the session is set up, or fails with SessionError.
        self.ready: defer.Deferred[RelayClient] = defer.Deferred()
        # True once the session was set up: a client that never got there is a failed attempt.
        self.established = False
        # Set by the pool: called when the client becomes ready again, when it stops being
        # ready on its own (a keepalive NOOP, QUIT on idle timeout or on a 421, a broken
        # session), and when the connection is gone.
        self.on_ready: Callable[[RelayClient], object] | None = None
        self.on_leaving: Callable[[RelayClient], object] | None = None
        self.on_closed: Callable[[RelayClient], object] | None = None

    @property
    def _transport(self) -> ClientTransport:
        assert self.transport is not None, "used only while connected"
        return cast(ClientTransport, self.transport)

    @property
    def is_ready(self) -> bool:
        return self._state is State.READY

    @property
    def in_setup(self) -> bool:
        return self._state is State.SETUP

    @property
    def may_serve(self) -> bool:
        """Ready, busy, in a keepalive or still setting up: this connection may yet carry
        waiting messages."""
        return self._state in (State.SETUP, State.READY, State.NOOP, State.BUSY)

    def _leave(self, state: State) -> None:
        """Enter a state other than READY; tell the pool when that ends a ready spell."""
        was_ready = self._state is State.READY
        self._state = state
        if was_ready and self.on_leaving is not None:
            self.on_leaving(self)

    # -- session setup ------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_at = self._clock.seconds()
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        super().connectionMade()
        if self.provider.tls == "implicit":
            # The stock client sets _tlsMode only when the transport provides ISSLTransport.
            # Twisted's TLS wrapper happens to (through INegotiated), but whether the session
            # is TLS is decided by our config and the endpoint the pool built, not by an
            # interface declaration: without _tlsMode, AUTH would be refused as "without TLS"
            # and tryTLS could try STARTTLS inside the TLS session.
            self._tlsMode = True

    def esmtpState_ehlo(self, code: int, resp: bytes) -> None:
        self._setup_step = "tls-handshake" if self._starttls_done else "ehlo"
        self.setTimeout(self.provider.command_timeout)
        super().esmtpState_ehlo(code, resp)

    def smtpConnectionFailed(self, code: int, resp: bytes) -> None:
        """The greeting was not 220 (a 421 "too many connections", a 554)."""
        self._session_failed("greeting", self._reply_text(code, resp), code=code)

    def esmtpEHLORequired(self, code: int = -1, resp: bytes | None = None) -> None:
        """EHLO refused; the stock step reports a made-up 502 instead of the reply."""
        self._session_failed(
            "greeting", "EHLO refused: " + self._reply_text(code, resp or b""), code=code
        )

    def tryTLS(self, code: int, resp: bytes, items: dict[bytes, bytes | None]) -> None:
        """The stock decision (STARTTLS when it can and should, else on to authenticate), with
        a timer for the STARTTLS reply and the setup step recorded."""
        offered = {k.upper() for k in items}
        can_tls = bool(self.context) and b"STARTTLS" in offered
        if self._tlsMode or not (can_tls or self.requireTransportSecurity):
            self.authenticate(code, resp, items)
        elif can_tls:
            self._setup_step = "starttls"
            self._expected = [220]
            self._okresponse = self.esmtpState_starttls
            self._failresponse = self._starttls_refused
            self.setTimeout(self.provider.command_timeout)
            self._transport.write(b"STARTTLS\r\n")
        else:
            self._session_failed("tls", "server does not offer STARTTLS")

    def _starttls_refused(self, code: int, resp: bytes) -> None:
        self._session_failed("tls", "STARTTLS refused: " + self._reply_text(code, resp), code=code)

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
        self._starttls_done = True  # the handshake and the EHLO after it: step tls-handshake
        self.esmtpState_ehlo(code, resp)

    def _secure_for_auth(self) -> bool:
        """TLS, or a loopback host that the connection really reaches over loopback."""
        if self._tlsMode:
            return True
        if not is_loopback_host(self.provider.host):
            return False
        # The configured name is not enough ("localhost" could resolve elsewhere): the peer
        # of this very connection must be local too.
        return self.transport is not None and is_local_peer(self.transport.getPeer())

    def authenticate(self, code: int, resp: bytes, items: dict[bytes, bytes | None]) -> None:
        """Called by ESMTPClient once TLS is settled; we take over from here."""
        self._extensions = {k.upper(): v for k, v in items.items()}
        if self.provider.username is None:
            self._session_ready()
            return
        if not self._secure_for_auth():
            self._session_failed("auth", "refusing to send credentials without TLS")
            return
        offered = (self._extensions.get(b"AUTH") or b"").upper().split()
        configured = [m.upper() for m in self.provider.auth_mechanisms]
        # Our order, not the server's: the first configured mechanism it offers (config.py
        # accepts only those _auth_exchange knows; the check keeps a hand-built config from
        # raising in the middle of the session).
        mechanism = next(
            (m for m in configured if m in AUTH_MECHANISMS and m.encode("ascii") in offered),
            None,
        )
        if mechanism is None:
            self._session_failed(
                "auth",
                "server offers none of the configured AUTH mechanisms: " + " ".join(configured),
            )
            return
        if not self._password:
            # The pool never connects without a password; an empty one would only count
            # toward the provider's lockout.
            self._session_failed("auth", "no password available")
            return
        # The password is a secret even before anything is sent (its base64 form below).
        self._secrets.add(self._password)
        failed: str | None = None
        try:
            # UnicodeEncodeError for a password that is not UTF-8 (os.environ keeps such
            # bytes as surrogates); its text names the offset, so it is not used.
            line, responders = auth_exchange(mechanism, self.provider.username, self._password)
            self._add_sent_secret(self._password.encode("utf-8"), always=True)
        except UnicodeError:
            failed = BAD_PASSWORD
        except Exception as e:
            failed = f"cannot prepare AUTH {mechanism}: {type(e).__name__}"
        if failed is not None:
            # Out of the except block: nothing keeps the exception (and the password in it).
            self._end_auth()
            self._session_failed("auth", failed)
            return
        initial = line.split(b" ", 2)[2:]  # PLAIN's initial response: the token
        for token in initial:
            # The token as sent, and what it encodes ("\0user\0password").
            self._add_sent_secret(base64.b64decode(token), always=True)
        self._auth_mechanism = mechanism
        self._auth_responders = deque(responders)
        # PLAIN carries the credentials in the command itself.
        self._auth_credentials_sent = not responders
        # One handler for every reply: it decides between success, the next challenge and
        # failure, so no reply can start another mechanism or a second try (pitfall 24).
        self._setup_step = "auth"
        self._expected = ANY_REPLY
        self._okresponse = self._failresponse = self._auth_reply
        self.setTimeout(self.provider.command_timeout)
        write_now(self._transport, line + b"\r\n")

    def _auth_reply(self, code: int, resp: bytes) -> None:
        if code == 235:
            self._end_auth()
            self._session_ready()
            return
        if code == 334 and self._auth_responders:
            responder = self._auth_responders.popleft()
            failed: str | None = None
            answer = b""
            try:
                answer = responder(resp.strip())
            except UnicodeError:  # a ValueError too: a password that is not UTF-8
                failed = BAD_PASSWORD
            except ValueError:  # binascii.Error: a challenge that is not base64
                failed = f"malformed AUTH {self._auth_mechanism} challenge"
            except Exception as e:
                failed = f"cannot answer the AUTH {self._auth_mechanism} challenge: " + (
                    type(e).__name__
                )
            if failed is not None:
                self._end_auth()
                self._session_failed("auth", failed, code=code)
                return
            self._add_sent_secret(answer)
            self._auth_credentials_sent = True
            self.setTimeout(self.provider.command_timeout)
            self._transport.write(base64.b64encode(answer) + b"\r\n")
            return
        # The reply's text is left out on purpose: a server may echo what it was sent.
        if self._auth_credentials_sent:
            detail = f"credentials rejected ({code})"
        else:
            detail = f"AUTH {self._auth_mechanism} refused ({code})"
        self._end_auth()
        self._session_failed("auth", detail, code=code)

    def _end_auth(self) -> None:
        # The responders and the password are not needed any more (success or failure); the
        # secrets set stays until the connection is closed, for the texts still to come.
        self._auth_responders.clear()
        self._password = None

    def _session_ready(self, idle_from_now: bool = True) -> None:
        self._become_ready(idle_from_now)
        if not self.ready.called:
            self._setup_step = "done"
            self.established = True
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
        if isinstance(code, int) and code > 0:
            detail = self._reply_text(code, resp)
        else:
            detail = self._detail_text(resp or type(exc).__name__)
        # A reply code only when a reply decided it (our own steps report the rest directly).
        from_reply = isinstance(exc, smtp.SMTPConnectError | smtp.TLSError | smtp.AUTHDeclinedError)
        from_reply = from_reply and not isinstance(exc, smtp.TLSRequiredError)
        reply_code = code if from_reply and isinstance(code, int) and code > 0 else None
        self._session_failed(stage, detail, code=reply_code)

    def _session_failed(self, stage: str, detail: str, code: int | None = None) -> None:
        failure = SessionError(stage, detail, code)
        # CLOSED first: whoever hears of the failure (the pool, through ``ready`` or a result)
        # must already see this client as unable to serve.
        self._leave(State.CLOSED)
        self.setTimeout(None)
        self._end_auth()
        self.resp = []
        if self._transaction is not None:
            self._lose_transaction(f"{stage}: {detail}", failure_class_of_stage(stage))
        if not self.ready.called:
            self.ready.errback(failure)
        if self.transport is not None:
            self._transport.abortConnection()

    def abort(self, detail: str) -> None:
        """Drop the connection now (shutdown grace expired); a running transaction ends at
        once with temporary results, uncertain ones if the final dot was sent."""
        if self._state is not State.CLOSED:
            self._session_failed("shutdown", detail)

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        raw = reason.getErrorMessage() if isinstance(reason, Failure) else str(reason)
        detail = self._detail_text(raw)
        self._leave(State.CLOSED)  # first, as in _session_failed
        self._end_auth()
        self.resp = []
        if self._transaction is not None:
            self._lose_transaction(f"connection lost: {detail}", FailureClass.LOST)
        if not self.ready.called:
            # With implicit TLS (or after STARTTLS) a failed handshake shows as an SSL.Error;
            # otherwise the step in progress says where: the handshake or the EHLO after
            # STARTTLS is TLS's, the wait for the AUTH reply is AUTH's, anything before is
            # just a lost connection.
            tls_failed = isinstance(reason, Failure) and reason.check(SSL.Error) is not None
            step = self._setup_step
            stage = "tls" if tls_failed else LOSS_STAGES.get(step, "connect")
            self.ready.errback(
                SessionError(stage, f"connection lost during setup ({step}): {detail}")
            )
        # The connection is gone: nothing will need the AUTH secrets again.
        self._secrets.clear()
        if self.on_closed is not None:
            self.on_closed(self)

    def quit(self) -> None:
        if self._state in (State.CLOSING, State.CLOSED):
            return
        self._leave(State.CLOSING)
        self.setTimeout(min(QUIT_TIMEOUT, self.provider.command_timeout))
        self._expected = ANY_REPLY
        self._okresponse = self._failresponse = lambda code, resp: self._transport.loseConnection()
        self._transport.write(b"QUIT\r\n")
