"""The inbound ESMTP protocol: ``twisted.mail.smtp.ESMTP`` with its input path replaced.

What the stock class gets wrong for a relay, and what this class does instead
(numbers are items of shared/twisted-pitfalls.md):

- Input framing (6, 7, 8): we own ``dataReceived``. Only CRLF ends a line. A command line over
  512 octets, a text line over 1000, or that much data without CRLF, gets ``500 5.5.2`` and the
  session is closed: the rest is never parsed as commands and the buffer never grows past a line.
  A bare CR, bare LF or NUL in a command gets 501; in DATA it makes the message refused (never
  stored, never forwarded), and only CRLF.CRLF ends DATA.
- Reply order (4): while a reply waits on a Deferred (fsync), the transport is paused and
  further input stays in the buffer; it is processed, in order, after the reply is written.
  The session deadline never cuts in between: it closes right after that reply.
- Backpressure: the protocol is the streaming producer of its own replies. When the transport's
  send buffer is full, input processing stops and reading pauses until the client reads.
- One spool file per transaction (3): DATA opens one message through ``IRelayDelivery``.
- Spool failure is ``451 4.3.0``, never 550 (9). SIZE is advertised and enforced (10).
- Free space on the spool's filesystem below ``spool.min_free_space`` (or below it once a
  declared SIZE is written) is ``452 4.3.1`` at MAIL, before any spool file exists.
- NOOP, RSET, VRFY (252), HELP (11); MAIL needs HELO/EHLO first.
- Idle timeout plus an absolute session deadline and an error budget (12); our own banner (13).
- Rate limits per client address and per envelope sender (the factory's, shared by every
  connection) answer MAIL with ``451 4.7.1``; the session goes on.
"""

from __future__ import annotations

from enum import Enum, auto
from typing import Any, Protocol, cast

from twisted.internet import defer
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
)
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from mailrelay.address import AddressError, MailCommand, parse_mail, parse_rcpt
from mailrelay.clock import InjectedClockTimeouts
from mailrelay.config import SMTPConfig
from mailrelay.diskspace import FreeSpace
from mailrelay.inbound.delivery import IIncomingMessage, IRelayDelivery, Transaction
from mailrelay.logger import Logger
from mailrelay.metrics import Metrics
from mailrelay.netaddr import peer_key
from mailrelay.netwrite import write_now
from mailrelay.ratelimit import MailRateLimits
from mailrelay.spool.store import SpoolWriteError

COMMAND_LINE_MAX = 512  # octets with CRLF, RFC 5321 4.5.3.1.4
TEXT_LINE_MAX = 1000  # octets with CRLF, RFC 5321 4.5.3.1.6
HELO_MAX = 255
CLOSE_GRACE = 30.0  # seconds a closing session may take to flush its last replies
# Input held unprocessed while a reply is pending, before reading pauses (see _update_reading).
HELD_INPUT_MAX = 64 * 1024
# Replies kept for one send while pipelined input is processed, at most (see _send).
REPLY_BATCH_MAX = 4096

_HTTP_METHODS = frozenset({b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"CONNECT"})
_NOT_IMPLEMENTED = frozenset(
    {b"EXPN", b"ETRN", b"TURN", b"ATRN", b"AUTH", b"STARTTLS", b"BDAT", b"SEND", b"SOML", b"SAML"}
)
_COMMANDS = frozenset(
    {b"HELO", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"QUIT", b"VRFY", b"HELP"}
)


def _data_line_max(line: bytes) -> int:
    """Octets a DATA line may hold before its CRLF: 998, and one more for the dot that
    stuffing added (RFC 5321 4.5.3.1.6 counts the line without it)."""
    return TEXT_LINE_MAX - 2 + (1 if line[:1] == b"." else 0)


class _Mode(Enum):
    COMMAND = auto()
    DATA = auto()
    CLOSED = auto()


class _DataProblem(Enum):
    TOO_BIG = auto()
    BAD_LINE_ENDING = auto()


def _has_bad_octets(line: bytes) -> bool:
    return b"\r" in line or b"\n" in line or b"\x00" in line


def _data_block(block: bytes) -> tuple[bytes, bool] | None:
    """Check and unstuff complete DATA lines: ``block`` is empty or ends with CRLF, and holds
    no end marker. Returns the message text and whether a line has a bare CR, bare LF or NUL
    in it; None if a line is too long (``_data_line_max``).

    The usual block costs a few C-level passes instead of several Python calls per line: one
    split (line lengths), two counts (each equals the number of CRLFs only if no CR and no LF
    stands alone), one search for NUL, and a replace only if a line starts with a dot. A block
    that fails a check (a line of 999+ octets, which a stuffing dot may allow, or a bad
    octet) goes line by line under the same rules.
    """
    if not block:
        return b"", False
    lines = block.split(b"\r\n")  # the last item is the b"" after the final CRLF
    crlfs = len(lines) - 1
    if (
        max(map(len, lines)) <= TEXT_LINE_MAX - 2
        and block.count(b"\r") == crlfs
        and block.count(b"\n") == crlfs
        and b"\x00" not in block
    ):
        # Every CRLF ends a line, so each line that starts with a dot is the first one or
        # follows a CRLF; take one dot off each.
        if block[:1] == b".":
            block = block[1:]
        if b"\r\n." in block:
            block = block.replace(b"\r\n.", b"\r\n")
        return block, False
    bad = False
    for index in range(crlfs):
        line = lines[index]
        if len(line) > _data_line_max(line):
            return None
        if line[:1] == b".":
            lines[index] = line = line[1:]
        bad = bad or _has_bad_octets(line)
    return b"\r\n".join(lines), bad


def _twisted_address(mailbox: str) -> smtp.Address:
    """``mailbox`` as an ``smtp.Address`` for the IMessageDelivery hooks, without re-parsing it.

    Twisted's parser raises on forms that mailrelay.address accepts (the address literal in
    ``a@[127.0.0.1]``, quoted pairs); raised inside do_MAIL/do_RCPT, that escaped dataReceived
    and dropped the connection. The mailbox is already checked, so only its parts are filled in.
    """
    local, at, domain = mailbox.rpartition("@")
    if not at:  # the null sender "" or a bare "Postmaster"
        local, domain = mailbox, ""
    address = smtp.Address(b"")
    address.addrstr = mailbox.encode("ascii")
    address.local = local.encode("ascii")
    address.domain = domain.encode("ascii")
    return address


class _ServerTransport(Protocol):
    """What the protocol uses of its transport (a TCP or UNIX socket, or a test double)."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def getPeer(self) -> IAddress: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def abortConnection(self) -> None: ...
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


@implementer(IPushProducer)
class RelayESMTP(InjectedClockTimeouts, smtp.ESMTP):
    log = Logger()

    def __init__(
        self,
        config: SMTPConfig,
        clock: IReactorTime,
        delivery: IRelayDelivery,
        metrics: Metrics,
        free_space: FreeSpace | None = None,
        mail_limits: MailRateLimits | None = None,
    ) -> None:
        super().__init__()
        self.delivery = delivery
        self._delivery = delivery  # the same object, typed as our interface
        self.host = config.hostname.encode("ascii")
        self.timeout = config.idle_timeout  # type: ignore[assignment]  # float seconds are fine
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self._free_space = free_space  # None: no free-space check (min_free_space = 0)
        self._mail_limits = mail_limits  # shared by every connection (the factory's); None: off
        self._buffer = b""
        self._mode = _Mode.COMMAND
        # Two independent reasons to hold input (buffered, and reading paused): a reply is
        # pending on a Deferred, or the transport's send buffer is full. Reading resumes only
        # when neither holds.
        self._waiting = False
        self._output_paused = False
        self._reading_paused = False  # what we last asked of the transport
        self._producing = False  # registered with the transport as the producer of replies
        self._processing = False  # inside _process_input (guards against re-entry)
        self._replies: list[bytes] = []  # written while processing, sent at its end (_send)
        self._replies_size = 0
        self._expired = False  # the session deadline passed while a reply was pending
        self._shutting_down = False  # the relay is stopping: 421 once no reply is owed
        # Last resort: abort a session that neither finishes closing nor answers in time.
        self._abort_call: IDelayedCall | None = None
        self._errors = 0
        self._deadline: IDelayedCall | None = None
        self._greeting: IDelayedCall | None = None  # the banner, while greet_pause runs
        self._helo_name: str | None = None
        self._mail: MailCommand | None = None
        self._recipients: list[str] = []
        self._message: IIncomingMessage | None = None
        self._data_size = 0
        self._data_problem: _DataProblem | None = None

    @property
    def _transport(self) -> _ServerTransport:
        assert self.transport is not None, "used only while connected"
        return cast(_ServerTransport, self.transport)

    # -- connection -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        # Replies go out as soon as they are known (write_now), the replies of one read
        # together (_process_input): Nagle would hold a second reply written while the first
        # is unacknowledged for the client's delayed ACK, ~40 ms.
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        # A client that pipelines commands and never reads would otherwise grow our send
        # buffer without limit: let the transport pause us when it is full.
        self._transport.registerProducer(self, True)
        self._producing = True
        self._deadline = self._clock.callLater(self._config.session_timeout, self._session_expired)
        self.setTimeout(self._config.idle_timeout)
        if self._config.greet_pause > 0:
            # Input waits in the buffer (_can_process) until the banner; any input before it
            # is refused in dataReceived.
            self._greeting = self._clock.callLater(self._config.greet_pause, self._send_banner)
        else:
            self._send_banner()

    def _send_banner(self) -> None:
        self._greeting = None
        self._reply(220, None, f"{self._config.hostname} ESMTP mailrelay")

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._mode = _Mode.CLOSED
        try:
            self._discard_message()  # unlinks the partial spool file: may raise (EIO, EROFS)
        finally:
            # Whatever happened above, the connection counts (total and per peer) must go
            # down, or a failing disk would end in a permanent 421 for this client.
            self._buffer = b""
            self._unregister_producer()
            if self._deadline is not None and self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
            if self._greeting is not None and self._greeting.active():
                self._greeting.cancel()
            self._greeting = None
            self._cancel_abort()
            self.setTimeout(None)
            factory = getattr(self, "factory", None)
            if factory is not None and hasattr(factory, "connectionClosed"):
                factory.connectionClosed(self)

    def timeoutConnection(self) -> None:
        if self._mode is not _Mode.CLOSED:
            self._metrics.sessions_closed.labels("idle_timeout").inc()
        self._close(421, "4.4.2", f"{self._config.hostname} Idle timeout, closing connection")

    def _session_expired(self) -> None:
        self._deadline = None
        if self._waiting:
            # A 421 now, then the commit completing, would queue a message the client was told
            # to retry (a duplicate). Close right after the pending reply instead (_wait_for).
            self._expired = True
            # If the reply never comes (a hung fsync), the session must still end: abort
            # without a reply; the client treats it as a lost connection and retries.
            self._abort_after(self._config.idle_timeout)
            return
        if self._mode is not _Mode.CLOSED:
            self._metrics.sessions_closed.labels("session_timeout").inc()
        self._close(421, "4.4.2", f"{self._config.hostname} Session too long, closing connection")

    def shut_down(self) -> None:
        """The relay is stopping: 421 and close (RFC 5321 3.8), now if the session is between
        commands; while a message is being received or made durable, right after its reply,
        so a client that sent a message in full still hears whether it was taken."""
        if self._mode is _Mode.CLOSED:
            return
        self._shutting_down = True
        if self._mode is _Mode.DATA or self._waiting:
            return  # closed after the reply: in _wait_for's resume, or in _process_data
        self._close_for_shutdown()

    def _close_for_shutdown(self) -> None:
        if self._mode is _Mode.CLOSED:
            return
        self._metrics.sessions_closed.labels("shutdown").inc()
        self._close(
            421, "4.3.2", f"{self._config.hostname} Service shutting down, closing connection"
        )

    def abort(self) -> None:
        """End the session at once, without a reply (a stop whose grace ran out)."""
        self._cancel_abort()
        self._abort()

    def _abort_after(self, seconds: float) -> None:
        self._cancel_abort()
        self._abort_call = self._clock.callLater(seconds, self._abort)

    def _cancel_abort(self) -> None:
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None

    def _abort(self) -> None:
        self._abort_call = None
        self.log.warn(
            "aborting SMTP session with {peer}: it did not end in time", peer=self._peer()
        )
        self._mode = _Mode.CLOSED
        self._buffer = b""
        self._unregister_producer()
        self._transport.abortConnection()

    def _close(self, code: int, status: str, text: str) -> None:
        if self._mode is _Mode.CLOSED:
            return
        self._reply(code, status, text)
        self._hang_up()

    def _hang_up(self) -> None:
        """End the session after its last reply: no more input is parsed, nothing more written."""
        self._mode = _Mode.CLOSED
        self._buffer = b""
        self._discard_message()
        self.setTimeout(None)
        # A TCP transport does not close while a producer is registered.
        self._unregister_producer()
        self._flush_replies()
        self._transport.loseConnection()
        # loseConnection waits for our replies to be sent; a client that never reads would
        # keep the connection (and its slot) forever.
        self._abort_after(CLOSE_GRACE)

    def _reply(self, code: int, status: str | None, text: str) -> None:
        if self._mode is _Mode.CLOSED:
            # Nothing after the 421/221: a commit finishing late would put a stray 250 behind it
            # (a TCP transport still sends what is written between loseConnection and the close).
            return
        line = f"{code} {status} {text}" if status else f"{code} {text}"
        self._send(line.encode("ascii", "replace") + b"\r\n")

    def _send(self, data: bytes) -> None:
        """A reply: kept while _process_input runs, so the replies to one read of pipelined
        commands leave in one send; written at once otherwise (a commit's 250)."""
        if self._processing:
            self._replies.append(data)
            self._replies_size += len(data)
            if self._replies_size >= REPLY_BATCH_MAX:
                # Past this, out they go: the transport's buffer, when full, pauses us
                # (pauseProducing) before a client that never reads can make it grow.
                self._flush_replies()
        else:
            write_now(self._transport, data)

    def _flush_replies(self) -> None:
        if self._replies:
            data = b"".join(self._replies)
            self._replies.clear()
            self._replies_size = 0
            write_now(self._transport, data)

    def _error_reply(self, code: int, status: str, text: str) -> None:
        """A 4xx/5xx answer to the client's mistake; too many end the session."""
        self._reply(code, status, text)
        self._errors += 1
        if self._errors >= self._config.max_errors and self._mode is not _Mode.CLOSED:
            self._metrics.sessions_closed.labels("too_many_errors").inc()
            self._close(
                421, "4.7.0", f"{self._config.hostname} Too many errors, closing connection"
            )

    # -- output flow control (IPushProducer, called by the transport) ---------------------------

    def pauseProducing(self) -> None:
        """The send buffer is full: take no more commands until the client has read."""
        self._output_paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        """The send buffer drained: read again and answer what is already buffered."""
        self._output_paused = False
        self._update_reading()
        self._process_input()

    def stopProducing(self) -> None:
        """The transport is going away (connectionLost follows) and has dropped us already."""
        self._producing = False
        self._output_paused = True
        self._buffer = b""

    def _unregister_producer(self) -> None:
        if self._producing:
            self._producing = False
            self._transport.unregisterProducer()

    def _update_reading(self) -> None:
        """Pause reading while output is blocked, or while a reply is pending and the input
        held meanwhile has reached HELD_INPUT_MAX; resume when neither.

        While a reply is pending (the fsync after the dot) input is kept, not processed
        (_can_process), so the order of replies holds either way. Reading on until the limit
        costs nothing for a client that waits for its reply, where pausing cost two epoll_ctl
        calls per message; a client that pipelines a flood still meets a bound."""
        hold = self._output_paused or (self._waiting and len(self._buffer) >= HELD_INPUT_MAX)
        if self._mode is _Mode.CLOSED or hold == self._reading_paused:
            return
        self._reading_paused = hold
        if hold:
            self._transport.pauseProducing()
        else:
            self._transport.resumeProducing()

    # -- input --------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._mode is _Mode.CLOSED:
            return
        if self._greeting is not None:
            # A client that talks before the banner is a spam bot or a confused program, not
            # an SMTP client (reliability case 2).
            self._greeting.cancel()
            self._greeting = None
            self._close(554, "5.5.1", "Protocol error: talk before the banner")
            return
        self._buffer += data
        if self._waiting:
            self._update_reading()  # held input past its limit pauses reading
            return
        self._process_input()

    def _can_process(self) -> bool:
        return (
            not self._waiting
            and not self._output_paused
            and self._mode is not _Mode.CLOSED
            and self._greeting is None
        )

    def _process_input(self) -> None:
        if self._processing:
            # Re-entered from inside a handler (say, a transport calling resumeProducing from
            # write): the outer loop is still running, holds an offset into the buffer, and
            # re-checks its conditions before each line.
            return
        self._processing = True
        try:
            while self._can_process() and self._buffer:
                if self._mode is _Mode.DATA:
                    more = self._process_data()
                else:
                    more = self._process_commands()
                if not more:
                    return
        finally:
            self._processing = False
            self._flush_replies()

    def _process_commands(self) -> bool:
        """Run complete command lines; False when more input is needed or the session ended.

        Lines are found by offset and the buffer is cut once at the end: cutting it after each
        line made a large pipelined chunk cost O(n^2) in copying.
        """
        buffer = self._buffer
        pos = 0
        try:
            while self._mode is _Mode.COMMAND and self._can_process():
                # The CRLF of a line of at most COMMAND_LINE_MAX octets ends in this window; no
                # need to look further (a CRLF-less flood is refused without scanning it all).
                eol = buffer.find(b"\r\n", pos, pos + COMMAND_LINE_MAX)
                if eol < 0:
                    # 511 octets may still be a 510-octet line plus the CR of its CRLF.
                    if len(buffer) - pos > COMMAND_LINE_MAX - 1:
                        self._line_too_long()
                    return False
                line = buffer[pos:eol]
                pos = eol + 2
                self.resetTimeout()
                self._command(line)  # may switch to DATA, wait on a Deferred, pause or close
            return True
        finally:
            # A close cleared the buffer; otherwise keep exactly the input not yet consumed.
            # (Input can only be appended meanwhile, so the offset still holds.)
            if self._mode is not _Mode.CLOSED:
                self._buffer = self._buffer[pos:]

    def _line_too_long(self) -> None:
        self._close(500, "5.5.2", "Line too long, closing connection")

    def _command(self, line: bytes) -> None:
        if _has_bad_octets(line):
            # "EHLO x\nMAIL FROM:<a>" is one bad line, never two commands (bare LF, pitfall 8).
            self._error_reply(501, "5.5.2", "Bare CR, LF or NUL in command line")
            return
        verb, _, argument = line.strip(b" ").partition(b" ")
        verb = verb.upper()
        argument = argument.strip(b" ")
        if verb in _COMMANDS:
            getattr(self, "do_" + verb.decode("ascii"))(argument)
        elif verb in _HTTP_METHODS:
            self.log.warn("HTTP request on the SMTP port from {peer}", peer=self._peer())
            self._close(554, "5.7.0", "This is an SMTP server, not HTTP")
        elif verb in _NOT_IMPLEMENTED:
            self._error_reply(502, "5.5.1", "Command not implemented")
        else:
            self._error_reply(500, "5.5.2", "Command unrecognized")

    def _peer(self) -> str:
        peer = self._transport.getPeer()
        return str(getattr(peer, "host", peer))

    # -- waiting on Deferreds without reordering replies -----------------------------------------

    def _wait_for(self, d: defer.Deferred[Any]) -> None:
        """Hold further input until ``d`` has produced its reply (pitfall 4)."""
        if d.called:
            return  # already answered synchronously; nothing to hold
        self._waiting = True
        self._update_reading()
        # The client is waiting for us, not idle: no idle 421 in the middle of our own fsync.
        # The session deadline is held too (_session_expired): it closes right after the reply.
        self.setTimeout(None)

        def resume(_: object) -> None:
            # Runs after the callbacks added before it: the pending reply is written by now.
            self._waiting = False
            if self._mode is _Mode.CLOSED:
                return
            if self._expired:
                self._metrics.sessions_closed.labels("session_timeout").inc()
                self._close(
                    421, "4.4.2", f"{self._config.hostname} Session too long, closing connection"
                )
                return
            if self._shutting_down:
                self._close_for_shutdown()
                return
            self.setTimeout(self._config.idle_timeout)
            self._update_reading()
            self._process_input()

        d.addBoth(resume)

    # -- commands -------------------------------------------------------------------------------

    def do_HELO(self, argument: bytes) -> None:
        self._greet(argument, extended=False)

    def do_EHLO(self, argument: bytes) -> None:
        self._greet(argument, extended=True)

    def _greet(self, argument: bytes, extended: bool) -> None:
        if not argument or len(argument) > HELO_MAX or not all(0x21 <= c <= 0x7E for c in argument):
            self._error_reply(501, "5.5.4", "HELO/EHLO needs a host name (printable ASCII)")
            return
        self._reset_transaction()
        self._helo_name = argument.decode("ascii")
        self._helo = (argument, self._peer().encode("ascii", "replace"))
        greeting = f"{self._config.hostname} Hello {self._helo_name} [{self._peer()}]"
        if not extended:
            self._reply(250, None, greeting)
            return
        lines = [
            greeting,
            f"SIZE {self._config.max_message_size}",
            "PIPELINING",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]
        text = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
        self._send(text.encode("ascii"))

    def do_MAIL(self, argument: bytes) -> None:
        if self._helo_name is None:
            self._error_reply(503, "5.5.1", "Send HELO/EHLO first")
            return
        if self._mail is not None:
            self._error_reply(503, "5.5.1", "Nested MAIL command")
            return
        try:
            mail = parse_mail(argument)
        except AddressError as e:
            self._error_reply(e.code, e.status, e.text)
            return
        if mail.size is not None and mail.size > self._config.max_message_size:
            self._error_reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
            return
        # Checked here, not at DATA or the dot: a 452 now means nothing was written and the
        # client simply retries later. A declared SIZE must fit above the floor as well.
        if self._free_space is not None and self._free_space.is_low(mail.size or 0):
            self._metrics.messages_rejected.labels("low_disk").inc()
            self._error_reply(452, "4.3.1", "Insufficient system storage")
            return
        # Shared with every other connection; taken only by a MAIL that passed every check so
        # far. The session goes on: the client may retry later or send something else.
        if self._mail_limits is not None:
            refused = self._mail_limits.check(
                peer_key(self._transport.getPeer()), mail.sender, self._clock.seconds()
            )
            if refused is not None:
                self._metrics.messages_rejected.labels(refused).inc()
                # Not the client's mistake: it does not count toward max_errors.
                self._reply(451, "4.7.1", "Rate limit exceeded, try again later")
                return
        d = defer.maybeDeferred(
            self._delivery.validateFrom, self._helo, _twisted_address(mail.sender)
        )

        def accepted(_: object) -> None:
            self._mail = mail
            self._recipients = []
            self._reply(250, "2.1.0", "Sender OK")

        d.addCallbacks(accepted, self._validation_failed)
        self._wait_for(d)

    def do_RCPT(self, argument: bytes) -> None:
        if self._mail is None:
            self._error_reply(503, "5.5.1", "Need MAIL before RCPT")
            return
        try:
            rcpt = parse_rcpt(argument)
        except AddressError as e:
            self._error_reply(e.code, e.status, e.text)
            return
        if len(self._recipients) >= self._config.max_recipients:
            self._metrics.recipients_rejected.labels("too_many").inc()
            self._error_reply(452, "4.5.3", "Too many recipients")
            return
        user = smtp.User(
            _twisted_address(rcpt.recipient),
            self._helo,
            self,
            _twisted_address(self._mail.sender),
        )
        d = defer.maybeDeferred(self._delivery.validateTo, user)

        def accepted(_: object) -> None:
            self._recipients.append(rcpt.recipient)
            self._reply(250, "2.1.5", "Recipient OK")

        d.addCallbacks(accepted, self._validation_failed)
        self._wait_for(d)

    def _validation_failed(self, failure: Failure) -> None:
        error = failure.value
        if isinstance(error, smtp.SMTPServerError):
            status, _, text = str(error.resp).partition(" ")
            self._error_reply(error.code, status, text)
        else:
            self.log.failure("validation failed", failure)
            self._error_reply(451, "4.3.0", "Local error in processing")

    def do_DATA(self, argument: bytes) -> None:
        if self._mail is None:
            self._error_reply(503, "5.5.1", "Need MAIL before DATA")
            return
        if not self._recipients:
            self._error_reply(554, "5.5.1", "No valid recipients")
            return
        if argument:
            self._error_reply(501, "5.5.4", "DATA takes no argument")
            return
        transaction = Transaction(
            helo=self._helo_name or "",
            sender=self._mail.sender,
            recipients=tuple(self._recipients),
            body_8bit=self._mail.body_8bit,
        )
        try:
            self._message = self._delivery.openMessage(transaction)
        except smtp.SMTPServerError as e:
            status, _, text = str(e.resp).partition(" ")
            self._reset_transaction()
            self._error_reply(e.code, status, text)
            return
        self._mode = _Mode.DATA
        self._data_size = 0
        self._data_problem = None
        self._reply(354, None, "End data with <CR><LF>.<CR><LF>")

    def do_RSET(self, argument: bytes) -> None:
        self._reset_transaction()
        self._reply(250, "2.0.0", "Reset OK")

    def do_NOOP(self, argument: bytes) -> None:
        self._reply(250, "2.0.0", "OK")

    def do_VRFY(self, argument: bytes) -> None:
        self._reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def do_HELP(self, argument: bytes) -> None:
        self._reply(214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT")

    def do_QUIT(self, argument: bytes) -> None:
        self._reply(221, "2.0.0", "Bye")
        self._hang_up()

    def _reset_transaction(self) -> None:
        self._mail = None
        self._recipients = []
        self._discard_message()

    def _discard_message(self) -> None:
        if self._message is not None:
            message, self._message = self._message, None
            message.abort()

    # -- DATA -------------------------------------------------------------------------------------

    def _process_data(self) -> bool:
        """Consume DATA up to the end of the message or of the last complete line; False when
        more input is needed or the session ended.

        The buffer starts at the start of a line and only CRLF ends a line, so the message
        ends at the first ``CRLF.CRLF`` (or at ``.CRLF`` first thing): one ``find``. The lines
        before it are checked, unstuffed and written as one block (``_data_block``); at most
        one partial line stays in the buffer. What follows the dot is commands, run in order
        once the message is answered.
        """
        buffer = self._buffer
        if buffer[:3] == b".\r\n":
            end = 0
        else:
            end = buffer.find(b"\r\n.\r\n")
            if end >= 0:
                end += 2  # where the dot's line starts
        if end >= 0:
            block, rest = buffer[:end], buffer[end + 3 :]
        else:
            last_eol = buffer.rfind(b"\r\n")
            rest = buffer[last_eol + 2 :] if last_eol >= 0 else buffer
            # A partial line may still get its CR: one octet more than a line's content.
            if len(rest) > _data_line_max(rest) + 1:
                self._line_too_long()
                return False
            if last_eol < 0:
                return False
            block = buffer[: last_eol + 2]
        self.resetTimeout()
        checked = _data_block(block)
        if checked is None:
            self._line_too_long()
            return False
        text, bad = checked
        if bad:
            self._data_problem = self._data_problem or _DataProblem.BAD_LINE_ENDING
        self._buffer = rest
        self._store(text)
        if end >= 0:
            self._end_of_data()
            if self._shutting_down and not self._waiting:
                # A stop came while this message arrived, and its reply is written (the
                # reply owed): nothing the client sent after the dot is run.
                self._close_for_shutdown()
                return False
        return True

    def _store(self, text: bytes) -> None:
        """Count unstuffed message text (CRLF lines) toward the size limit; write it unless
        the message is already refused."""
        if not text or self._message is None:
            return
        self._data_size += len(text)
        if self._data_size > self._config.max_message_size:
            self._data_problem = _DataProblem.TOO_BIG
        if self._data_problem is None:
            self._message.write(text)

    def _end_of_data(self) -> None:
        self._mode = _Mode.COMMAND
        message, self._message = self._message, None
        self._mail = None
        self._recipients = []
        if message is None:
            return
        if self._data_problem is not None:
            message.abort()
            if self._data_problem is _DataProblem.TOO_BIG:
                self._metrics.messages_rejected.labels("too_big").inc()
                self._error_reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
            else:
                self._metrics.messages_rejected.labels("bare_line_ending").inc()
                self._error_reply(
                    550, "5.5.2", "Bare CR or LF, or NUL, in message text (RFC 5321 2.3.8)"
                )
            return
        started = self._clock.seconds()
        d = message.commit()

        def durable(queue_id: str) -> None:
            self._metrics.acceptance_seconds.observe(max(0.0, self._clock.seconds() - started))
            self._reply(250, "2.0.0", f"Ok: queued as {queue_id}")

        def failed(failure: Failure) -> None:
            self._metrics.messages_rejected.labels("spool_error").inc()
            if failure.check(SpoolWriteError):
                self.log.error(
                    "spool write failed, answered 451: {error}", error=str(failure.value)
                )
            else:
                self.log.failure("accepting a message failed, answered 451", failure)
            self._reply(451, "4.3.0", "Local error: message not accepted, try again later")

        d.addCallbacks(durable, failed)
        self._wait_for(d)
