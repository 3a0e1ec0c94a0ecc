"""One message over a ready RelayClient: MAIL, RCPTs and DATA, and a result per recipient.

TransactionSteps is mixed into RelayClient (client.py): ``send`` takes a ready client to BUSY,
and the end of the transaction leaves it ready again, ready after an RSET, or on its way out
(QUIT):

- Our own payload (payload.py), one write (15, 16); MAIL, RCPTs and DATA in one write when
  the server advertises PIPELINING.
- Per-recipient results (19); no retries of our own, never a resend after the final dot (20).
- A reply to DATA other than 354/4xx/5xx is a protocol error: no body was sent, so nothing
  counts as delivered.
- A 421 in the middle of a transaction is that stage's answer (MAIL, RCPT or DATA, code 421)
  for every recipient still without one, and ends the session: QUIT, never RSET and reuse.
- A message with an 8-bit body is never sent to a server without 8BITMIME (RFC 6152).
- Every result carries its FailureClass (results.py) and, when a reply decided it, the code.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

from twisted.internet import defer

from mailrelay.netwrite import write_now
from mailrelay.outbound.payload import PayloadProducer, send_data_payload
from mailrelay.outbound.replies import ReplyReader
from mailrelay.outbound.results import (
    FailureClass,
    Kind,
    OutboundMessage,
    RecipientResult,
    kind_of_reply,
)
from mailrelay.outbound.session import ANY_REPLY, State, log

NO_8BITMIME = "upstream does not accept 8-bit mail (no 8BITMIME)"

# Our own answer (code None) for an address we cannot put in MAIL FROM / RCPT TO: we never
# use SMTPUTF8, so a non-ASCII address cannot be relayed by any provider.
NON_ASCII_ADDRESS = "553 5.6.7 non-ASCII address cannot be relayed (no SMTPUTF8)"

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
        # A large payload still being written (payload.PayloadProducer), else None.
        self.payload: PayloadProducer | None = None


class TransactionSteps(ReplyReader):
    """Sending one message: ``send`` and the handlers of the replies to its commands."""

    # Set up (and described) in RelayClient.__init__, with the rest of the client's state.
    _transaction: _Transaction | None
    messages_sent: int

    def send(self, message: OutboundMessage) -> defer.Deferred[list[RecipientResult]]:
        """Send one message over this ready connection; never fails, every outcome is a result.

        A message this session cannot carry is answered at once, nothing is sent and the
        client stays ready (``is_ready`` after the call tells the caller so). A recipient
        that is not ASCII is answered at once (permanent, class RCPT) and left out of the
        transaction the others get; a sender that is not ASCII fails the whole message
        (permanent, class MAIL) without a transaction.
        """
        assert self._state is State.READY, self._state
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
        self._state = State.BUSY
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
        self._expected = ANY_REPLY
        self._okresponse = self._failresponse = self._transaction_reply
        self.setTimeout(self.provider.command_timeout)
        if b"PIPELINING" in self._extensions:
            transaction.expecting.extend(what for _, what in commands)
            write_now(self._transport, b"".join(line + b"\r\n" for line, _ in commands))
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
        write_now(self._transport, line + b"\r\n")

    def _transaction_reply(self, code: int, resp: bytes) -> None:
        transaction = self._transaction
        if transaction is None:
            return
        if not transaction.expecting:
            self._session_failed("protocol", f"unexpected reply {self._reply_text(code, resp)}")
            return
        if transaction.payload is not None and not transaction.payload.finished:
            # A reply before our final dot: the upstream stopped reading the message (a 552
            # mid-DATA, a broken server). Nothing more may follow on this connection: the rest
            # of the body would be read as commands, or our next command as body. The body
            # was never complete, so the recipients stay temporary (not possible duplicates).
            transaction.payload.cancel()
            self._session_failed(
                "protocol",
                f"reply before the end of the message: {self._reply_text(code, resp)}",
            )
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
                # The payload is one write (a large one: pieces, as the connection takes them);
                # the reactor drains it while we wait, so the transfer and the wait for the
                # final reply share one deadline: the transfer allowance (data_timeout) plus
                # the reply's (final_timeout).
                self.setTimeout(self.provider.data_timeout + self.provider.final_timeout)
                transaction.expecting.append(("FINAL", ""))

                def dot_sent(transaction: _Transaction = transaction) -> None:
                    # From here a lost connection leaves the upstream maybe holding it.
                    transaction.after_final_dot = True

                transaction.payload = send_data_payload(
                    self._transport, transaction.message.body, dot_sent
                )
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
        log.info(
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
            self._expected = ANY_REPLY
            self._okresponse = self._failresponse = self._after_reset
            self.setTimeout(self.provider.command_timeout)
            write_now(self._transport, b"RSET\r\n")
        elif then == "quit":
            self.quit()  # before the results: whoever hears them sees a client going away
        else:
            self._become_ready()
        transaction.deferred.callback(results)
        if then == "ready" and self._state is State.READY and self.on_ready is not None:
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
