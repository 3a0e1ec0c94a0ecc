"""A persistent ESMTP client connection to one provider.

Built on ``twisted.mail.smtp.ESMTPClient`` for its reply parsing and its EHLO / STARTTLS
steps, with what a relay needs in place of the rest (items of shared/twisted-pitfalls.md):

- Persistent (18): after the session is set up, and after each message, the connection is
  *ready* and waits for the pool to hand it the next message; no QUIT per message.
- Our own payload, one write, TCP_NODELAY (15-17); MAIL, RCPTs and DATA in one write when the
  server advertises PIPELINING.
- Per-recipient results (19); no retries of our own, never a resend after the final dot (20).
- A timeout per stage (21): greeting, command, data, final.
- AUTH only after TLS or to a loopback host (22), one attempt with one mechanism (24): the
  first of ``provider.auth_mechanisms`` (PLAIN, LOGIN, CRAM-MD5) that the server offers; a
  refusal never leads to another mechanism. Session logging off and generic error texts, so a
  credential can never reach an error string or a log line (23).
- STARTTLS: bytes the server sent after "220 ready" are an attack, not data: abort (26).
- Implicit TLS (25): the transport is TLS from the first byte (the pool wraps the endpoint), so
  the session counts as secure from connectionMade, whatever interfaces the transport declares,
  and STARTTLS is never tried.
- While ready, nothing is pending: any reply is unsolicited; a 4xx/5xx means the server is
  going away (421), so the client leaves; anything else is ignored. A reply to DATA other
  than 354/4xx/5xx is a protocol error: no body was sent, so nothing counts as delivered.
- A 421 in the middle of a transaction is that stage's answer (MAIL, RCPT or DATA, code 421)
  for every recipient still without one, and ends the session: QUIT, never RSET and reuse.
- A message with an 8-bit body is never sent to a server without 8BITMIME (RFC 6152).
- Idle (ready) connections: a NOOP every ``keepalive`` seconds finds a dead connection before a
  message does; QUIT after ``idle_timeout`` seconds idle in all (NOOPs do not count as use) or
  once ``max_connection_age`` is reached. One TimeoutMixin timer serves every deadline. While a
  NOOP waits for its reply the client is not ready (the pool hears ``on_leaving``, then
  ``on_ready`` on the 2xx), so a message is never handed over with a NOOP in flight.
- Every result carries its FailureClass (results.py) and, when a reply decided it, the code.
- Hostile servers: a reply is capped (MAX_LINE_LENGTH a line, MAX_REPLY_LINES lines,
  MAX_REPLY_BYTES in all); only a complete reply restarts a stage timer, so a drip of
  continuation lines cannot hold a connection (or a pool slot) past its deadline; every text
  taken from the server is scrubbed of what the client sent during AUTH and of
  non-printable characters before it reaches a result, an error or a log line.
- QUIT waits QUIT_TIMEOUT at most, then the connection is aborted.
"""

from __future__ import annotations

import base64
import enum
from collections import deque
from collections.abc import Callable, Collection
from typing import Any, Literal, Protocol, cast

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime, ITCPTransport, ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from mailrelay.clock import InjectedClockTimeouts
from mailrelay.config import ProviderConfig
from mailrelay.netaddr import is_local_peer, is_loopback_host
from mailrelay.outbound.auth import AUTH_MECHANISMS, Responder, auth_exchange
from mailrelay.outbound.payload import build_data_payload
from mailrelay.outbound.results import (
    FailureClass,
    Kind,
    OutboundMessage,
    RecipientResult,
    kind_of_reply,
)

MAX_REPLY_TEXT = 400

# What a server may send as one reply (RFC 5321 4.5.3.1.5 allows 512 bytes a line): a longer
# line, more lines or more bytes end the session as a protocol error.
MAX_LINE_LENGTH = 2048
MAX_REPLY_LINES = 100
MAX_REPLY_BYTES = 64 * 1024

# How long QUIT waits for its reply (at most command_timeout) before the connection is
# aborted: a connection on its way out should not hold a pool slot for minutes.
QUIT_TIMEOUT = 10.0

NO_8BITMIME = "upstream does not accept 8-bit mail (no 8BITMIME)"

# Our own answer (code None) for an address we cannot put in MAIL FROM / RCPT TO: we never
# use SMTPUTF8, so a non-ASCII address cannot be relayed by any provider.
NON_ASCII_ADDRESS = "553 5.6.7 non-ASCII address cannot be relayed (no SMTPUTF8)"

# The AUTH failure for a password that cannot be encoded: no byte, no offset.
BAD_PASSWORD = "cannot use the configured password (not UTF-8)"

# What replaces a credential the server echoed back.
REDACTED = "[redacted]"

# A raw (not base64) value sent during AUTH shorter than this is not scrubbed from texts (a
# username "u" would garble every reply); the password always is, whatever its length.
_MIN_SCRUBBED = 4

# Module level: SMTPClient already uses ``self.log`` for its session log (a LineLog).
_log = Logger(namespace="mailrelay.outbound.client")


class SessionError(Exception):
    """The connection could not be set up or broke; ``stage`` says where (for logs, breakers).

    ``code`` is the reply code when a server reply made setup fail (greeting, EHLO, STARTTLS,
    AUTH), e.g. 421 for "too many connections"; None otherwise (timeouts, losses, our own
    refusals).
    """

    def __init__(self, stage: str, detail: str, code: int | None = None) -> None:
        super().__init__(f"{stage}: {detail}")
        self.stage = stage
        self.detail = detail
        self.code = code


# SessionError.stage -> the class its results carry. "shutdown" is our own abort (grace
# expired): not the provider's failure. "lost" and "unavailable" name themselves.
_STAGE_CLASSES = {
    "connect": FailureClass.CONNECT,
    "greeting": FailureClass.GREETING,
    "tls": FailureClass.TLS,
    "auth": FailureClass.AUTH,
    "timeout": FailureClass.TIMEOUT,
    "protocol": FailureClass.PROTOCOL,
    "lost": FailureClass.LOST,
    "shutdown": FailureClass.UNAVAILABLE,
    "unavailable": FailureClass.UNAVAILABLE,
}


def failure_class_of_stage(stage: str) -> FailureClass:
    """The session class for a SessionError's ``stage`` (for setup failures and lost
    transactions). An unknown stage is still a session failure the provider answers for:
    CONNECT, so the recipients move on and the breaker counts it."""
    return _STAGE_CLASSES.get(stage, FailureClass.CONNECT)


class _State(enum.Enum):
    SETUP = "setup"
    READY = "ready"
    NOOP = "noop"  # a keepalive NOOP waits for its reply: not ready, but alive
    BUSY = "busy"
    CLOSING = "closing"
    CLOSED = "closed"


# The class of a reply by the command it answers; the final dot and the empty message sent
# to close a DATA nobody was accepted for are both DATA.
_COMMAND_CLASSES = {
    "MAIL": FailureClass.MAIL,
    "RCPT": FailureClass.RCPT,
    "DATA": FailureClass.DATA,
    "FINAL": FailureClass.DATA,
    "DISCARD": FailureClass.DATA,
}

# After a transaction: ready at once, RSET first, or QUIT (the server said 421).
_Then = Literal["ready", "reset", "quit"]


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
    text = _redact(text, secrets)
    text = " ".join(text.split())
    # Again: a secret with a run of whitespace of its own (or a line break) only matches now.
    text = _redact(text, secrets)
    return "".join(c if c.isprintable() else "?" for c in text)


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


# Where session setup is (RelayClient._setup_step) -> the SessionError stage of a connection
# lost there. A loss while waiting for the reply to STARTTLS is not yet TLS's failure.
_LOSS_STAGES = {
    "greeting": "connect",
    "ehlo": "connect",
    "starttls": "connect",
    "tls-handshake": "tls",  # the handshake, or the EHLO after it
    "auth": "auth",
}


class RelayClient(InjectedClockTimeouts, smtp.ESMTPClient):
    debug = False  # the stock session log would keep the AUTH line (pitfall 23)
    MAX_LENGTH = MAX_LINE_LENGTH  # LineReceiver: a longer line is lineLengthExceeded

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
    def _transport(self) -> _ClientTransport:
        assert self.transport is not None, "used only while connected"
        return cast(_ClientTransport, self.transport)

    @property
    def is_ready(self) -> bool:
        return self._state is _State.READY

    @property
    def in_setup(self) -> bool:
        return self._state is _State.SETUP

    @property
    def may_serve(self) -> bool:
        """Ready, busy, in a keepalive or still setting up: this connection may yet carry
        waiting messages."""
        return self._state in (_State.SETUP, _State.READY, _State.NOOP, _State.BUSY)

    @property
    def too_old(self) -> bool:
        """Connected for ``max_connection_age`` seconds or more: QUIT instead of reuse, so a
        connection never outlives the upstream's session limits."""
        if self.connected_at is None:
            return False
        return self._clock.seconds() - self.connected_at >= self.provider.max_connection_age

    def _leave(self, state: _State) -> None:
        """Enter a state other than READY; tell the pool when that ends a ready spell."""
        was_ready = self._state is _State.READY
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

    # -- replies --------------------------------------------------------------------------------

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
        if self._state is _State.CLOSED:
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
        if self._state is not _State.CLOSED:
            self._session_failed("protocol", "reply line too long")

    def _reply_text(self, code: int, resp: bytes | str) -> str:
        """A reply for results, errors and logs: scrubbed, one line, MAX_REPLY_TEXT at most."""
        return f"{code} {_clean_text(resp, self._secrets)}"[:MAX_REPLY_TEXT]

    def _detail_text(self, text: bytes | str) -> str:
        """Any other text that came from the server or the network, cleaned the same way."""
        return _clean_text(text, self._secrets)[:MAX_REPLY_TEXT]

    # -- setup steps --------------------------------------------------------------------------

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
        self._expected = _ANY_REPLY
        self._okresponse = self._failresponse = self._auth_reply
        self.setTimeout(self.provider.command_timeout)
        self._transport.write(line + b"\r\n")

    def _add_sent_secret(self, raw: bytes, always: bool = False) -> None:
        """Remember a value sent during AUTH, as sent (base64) and as it was before."""
        self._secrets.add(base64.b64encode(raw).decode("ascii"))
        text = raw.decode("utf-8", "replace")
        if always or len(text) >= _MIN_SCRUBBED:
            self._secrets.add(text)

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

    def _become_ready(self, idle_from_now: bool = True) -> None:
        self._state = _State.READY
        if idle_from_now:
            self._idle_since = self._clock.seconds()
        # Nothing is pending while ready: every reply from now on is unsolicited. Leaving the
        # previous step's handler in place (AUTH, EHLO, RSET) would run that step again and
        # report the client ready a second time.
        self._expected = _ANY_REPLY
        self._okresponse = self._failresponse = self._unsolicited_reply
        self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:
        """The one timer of a ready client: the next keepalive NOOP, or QUIT at the idle or
        age limit, whichever comes first. What the tick does is decided here, not when it
        fires: comparing clock times then could miss a deadline by a rounding error."""
        now = self._clock.seconds()
        idle_deadline = self._idle_since + self.provider.idle_timeout
        connected_at = now if self.connected_at is None else self.connected_at
        age_deadline = connected_at + self.provider.max_connection_age
        quit_in = max(0.0, min(idle_deadline, age_deadline) - now)
        keepalive = self.provider.keepalive
        self._idle_tick_quits = not 0 < keepalive < quit_in
        self.setTimeout(quit_in if self._idle_tick_quits else keepalive)

    def _unsolicited_reply(self, code: int, resp: bytes) -> None:
        if 400 <= code < 600:
            # RFC 5321 3.8: a server going away says 421 and closes; whatever it says, this
            # session is not worth keeping.
            _log.info(
                "provider {provider}: server closing an idle connection: {reply}",
                provider=self.provider.name,
                reply=self._reply_text(code, resp),
            )
            self.quit()
        else:
            _log.debug(
                "provider {provider}: ignoring unsolicited reply {reply}",
                provider=self.provider.name,
                reply=self._reply_text(code, resp),
            )
            # The line restarted the timer (TimeoutMixin) with the last period: back to the
            # real deadlines.
            self._arm_idle_timer()

    def _send_noop(self) -> None:
        # Not ready until the reply: the pool takes the client out of its idle list now
        # (on_leaving) and back on the 2xx (on_ready), so it never hands over a message
        # while the NOOP is in flight and its reply could be read as the reply to MAIL.
        self._leave(_State.NOOP)
        self.setTimeout(self.provider.command_timeout)  # no reply: timeoutConnection aborts
        self._expected = _ANY_REPLY
        self._okresponse = self._failresponse = self._noop_reply
        self._transport.write(b"NOOP\r\n")

    def _noop_reply(self, code: int, resp: bytes) -> None:
        if 200 <= code < 300:
            self._session_ready(idle_from_now=False)  # a NOOP is not use
            return
        _log.info(
            "provider {provider}: keepalive NOOP refused, closing: {reply}",
            provider=self.provider.name,
            reply=self._reply_text(code, resp),
        )
        self.quit()

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
        self._leave(_State.CLOSED)
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
        if self._state is not _State.CLOSED:
            self._session_failed("shutdown", detail)

    def timeoutConnection(self) -> None:
        if self._state is _State.READY:
            if self._idle_tick_quits or self.too_old:
                self.quit()  # idle or age limit reached: leave politely
            else:
                self._send_noop()
        else:
            super().timeoutConnection()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        raw = reason.getErrorMessage() if isinstance(reason, Failure) else str(reason)
        detail = self._detail_text(raw)
        self._leave(_State.CLOSED)  # first, as in _session_failed
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
            stage = "tls" if tls_failed else _LOSS_STAGES.get(step, "connect")
            self.ready.errback(
                SessionError(stage, f"connection lost during setup ({step}): {detail}")
            )
        # The connection is gone: nothing will need the AUTH secrets again.
        self._secrets.clear()
        if self.on_closed is not None:
            self.on_closed(self)

    def quit(self) -> None:
        if self._state in (_State.CLOSING, _State.CLOSED):
            return
        self._leave(_State.CLOSING)
        self.setTimeout(min(QUIT_TIMEOUT, self.provider.command_timeout))
        self._expected = _ANY_REPLY
        self._okresponse = self._failresponse = lambda code, resp: self._transport.loseConnection()
        self._transport.write(b"QUIT\r\n")

    # -- transactions ---------------------------------------------------------------------------

    def send(self, message: OutboundMessage) -> defer.Deferred[list[RecipientResult]]:
        """Send one message over this ready connection; never fails, every outcome is a result.

        A message this session cannot carry is answered at once, nothing is sent and the
        client stays ready (``is_ready`` after the call tells the caller so). A recipient
        that is not ASCII is answered at once (permanent, class RCPT) and left out of the
        transaction the others get; a sender that is not ASCII fails the whole message
        (permanent, class MAIL) without a transaction.
        """
        assert self._state is _State.READY, self._state
        # Checked before anything changes: an address that cannot be encoded must not leave
        # the client busy with a Deferred that never fires. We never use SMTPUTF8 (inbound
        # refuses such addresses today), so the refusal is permanent, and our own (no code).
        if not message.sender.isascii():
            return defer.succeed(
                [
                    RecipientResult(r, Kind.PERMANENT, NON_ASCII_ADDRESS, failure=FailureClass.MAIL)
                    for r in message.recipients
                ]
            )
        refused = {
            r: RecipientResult(r, Kind.PERMANENT, NON_ASCII_ADDRESS, failure=FailureClass.RCPT)
            for r in message.recipients
            if not r.isascii()
        }
        sendable = [r for r in message.recipients if r not in refused]
        if not sendable:
            return defer.succeed([refused[r] for r in message.recipients])
        if message.body_8bit and b"8BITMIME" not in self._extensions:
            # RFC 6152: 8-bit data only to a server that said 8BITMIME. A session class
            # (this provider cannot take the message at all), so the router moves on to a
            # provider that takes it; UNAVAILABLE, our own refusal: not held against it.
            return defer.succeed(
                [
                    refused.get(r)
                    or RecipientResult(
                        r, Kind.TEMPORARY, NO_8BITMIME, failure=FailureClass.UNAVAILABLE
                    )
                    for r in message.recipients
                ]
            )
        self._state = _State.BUSY
        transaction = _Transaction(message)
        # The non-ASCII recipients have their answer; the transaction is for the others.
        transaction.results.update(refused)
        self._transaction = transaction
        params = b""
        if b"SIZE" in self._extensions:
            params += b" SIZE=%d" % len(message.body)
        if message.body_8bit and b"8BITMIME" in self._extensions:
            params += b" BODY=8BITMIME"
        commands: list[tuple[bytes, tuple[str, str]]] = [
            (b"MAIL FROM:<" + message.sender.encode("ascii") + b">" + params, ("MAIL", ""))
        ]
        commands += [(b"RCPT TO:<" + r.encode("ascii") + b">", ("RCPT", r)) for r in sendable]
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
        if what[0] == "DATA":
            # As in the pipelined case: the wait for the 354 is the DATA stage's.
            self.setTimeout(self.provider.data_timeout)
        self._transport.write(line + b"\r\n")

    def _transaction_reply(self, code: int, resp: bytes) -> None:
        transaction = self._transaction
        if transaction is None:
            return
        if not transaction.expecting:
            self._session_failed("protocol", f"unexpected reply {self._reply_text(code, resp)}")
            return
        command, recipient = transaction.expecting.popleft()
        if code == 421:
            self._server_closing(transaction, command, code, resp)
            return
        if transaction.expecting and transaction.expecting[0][0] == "DATA":
            # RFC 5321 4.5.3.2.5 / Postfix's smtp_data_init_timeout: the wait for the 354.
            self.setTimeout(self.provider.data_timeout)
        if command == "MAIL":
            if not 200 <= code < 300:
                transaction.mail_failure = (code, resp)
        elif command == "RCPT":
            if transaction.mail_failure is not None:
                mail_code, mail_resp = transaction.mail_failure
                self._result(transaction, recipient, mail_code, mail_resp, FailureClass.MAIL)
            elif 200 <= code < 300:
                transaction.accepted.append(recipient)
            else:
                self._result(transaction, recipient, code, resp, FailureClass.RCPT)
        elif command == "DATA":
            if code != 354 and not 400 <= code < 600:
                # Only 354 opens the data phase. A 2xx here (replies shifted by one, a broken
                # server) would otherwise count as delivered although no body was sent; the
                # session's state is unknown, so it is dropped and the accepted recipients
                # stay temporary (the body was never sent: certain, not a possible duplicate).
                self._session_failed(
                    "protocol",
                    f"unexpected reply to DATA instead of 354: {self._reply_text(code, resp)}",
                )
                return
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
                self._result(transaction, r, code, resp, FailureClass.DATA)
            self._finish(transaction, "reset")
            return
        elif command == "FINAL":
            for r in transaction.accepted:
                self._result(transaction, r, code, resp, FailureClass.DATA)
            self._finish(transaction, "ready" if 200 <= code < 300 else "reset")
            return
        elif command == "DISCARD":
            self._finish(transaction, "reset")
            return

        if transaction.unsent:
            if transaction.mail_failure is not None or (
                transaction.unsent[0][1][0] == "DATA" and not transaction.accepted
            ):
                # Without pipelining, stop at the first step that makes the rest pointless.
                for _, (_, r) in transaction.unsent:
                    if r and transaction.mail_failure is not None:
                        mail_code, mail_resp = transaction.mail_failure
                        self._result(transaction, r, mail_code, mail_resp, FailureClass.MAIL)
                transaction.unsent.clear()
                self._finish(transaction, "reset")
            else:
                self._send_next_command(transaction)

    def _server_closing(
        self, transaction: _Transaction, command: str, code: int, resp: bytes
    ) -> None:
        """A 421 in the middle of a transaction: the server is closing the session.

        It is still the answer of that stage (a 4xx to MAIL, RCPT or DATA, which the router
        handles like any other) for every recipient without an answer of its own; then QUIT
        rather than RSET: the session cannot be reused, whatever else arrives before the
        server closes.
        """
        failure = _COMMAND_CLASSES[command]
        for r in transaction.message.recipients:
            if r not in transaction.results:
                self._result(transaction, r, code, resp, failure)
        _log.info(
            "provider {provider}: server closing the session during {command}: {reply}",
            provider=self.provider.name,
            command=command,
            reply=self._reply_text(code, resp),
        )
        self._finish(transaction, "quit")

    def _result(
        self,
        transaction: _Transaction,
        recipient: str,
        code: int,
        resp: bytes,
        failure: FailureClass,
    ) -> None:
        """The outcome of a reply: ``failure`` is the stage it answered, None if delivered."""
        kind = kind_of_reply(code)
        transaction.results[recipient] = RecipientResult(
            recipient,
            kind,
            self._reply_text(code, resp),
            failure=None if kind is Kind.DELIVERED else failure,
            code=code,
        )

    def _finish(self, transaction: _Transaction, then: _Then) -> None:
        self._transaction = None
        self.messages_sent += 1
        results = [
            transaction.results.get(r)
            # Cannot happen with a well-behaved server: every path above answers each one.
            or RecipientResult(
                r, Kind.TEMPORARY, "no reply for this recipient", failure=FailureClass.PROTOCOL
            )
            for r in transaction.message.recipients
        ]
        if then == "reset":
            # A failed transaction leaves the server's state unknown: RSET before reuse.
            self._expected = _ANY_REPLY
            self._okresponse = self._failresponse = self._after_reset
            self.setTimeout(self.provider.command_timeout)
            self._transport.write(b"RSET\r\n")
        elif then == "quit":
            self.quit()  # before the results: whoever hears them sees a client going away
        else:
            self._become_ready()
        transaction.deferred.callback(results)
        if then == "ready" and self._state is _State.READY and self.on_ready is not None:
            self.on_ready(self)

    def _after_reset(self, code: int, resp: bytes) -> None:
        if 200 <= code < 300:
            self._session_ready()
        else:
            self.quit()

    def _lose_transaction(self, detail: str, failure: FailureClass) -> None:
        """End the transaction without (all) its replies: ``failure`` says why (the session
        failure's class, LOST for a lost connection) for every recipient not yet answered."""
        transaction, self._transaction = self._transaction, None
        if transaction is None:
            return
        uncertain = transaction.after_final_dot
        results = [
            transaction.results.get(r)
            or RecipientResult(
                r,
                Kind.TEMPORARY,
                detail,
                uncertain=uncertain and r in transaction.accepted,
                failure=failure,
            )
            for r in transaction.message.recipients
        ]
        transaction.deferred.callback(results)
