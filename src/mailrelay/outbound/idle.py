"""A ready RelayClient between messages: unsolicited replies, keepalive NOOPs, and the idle
and age limits that end the connection.

IdleSteps is mixed into RelayClient (client.py); ``_become_ready`` enters READY, once the
session is set up and after every transaction:

- While ready, nothing is pending: any reply is unsolicited; a 4xx/5xx means the server is
  going away (421), so the client leaves; anything else is ignored.
- Idle (ready) connections: a NOOP every ``keepalive`` seconds finds a dead connection before a
  message does; QUIT after ``idle_timeout`` seconds idle in all (NOOPs do not count as use) or
  once ``max_connection_age`` is reached. One TimeoutMixin timer serves every deadline. While a
  NOOP waits for its reply the client is not ready (the pool hears ``on_leaving``, then
  ``on_ready`` on the 2xx), so a message is never handed over with a NOOP in flight.
"""

from __future__ import annotations

from mailrelay.outbound.replies import ReplyReader
from mailrelay.outbound.session import ANY_REPLY, State, log


class IdleSteps(ReplyReader):
    """The READY state's timer and replies."""

    # Set up (and described) in RelayClient.__init__, with the rest of the client's state.
    _idle_since: float
    _idle_tick_quits: bool

    @property
    def too_old(self) -> bool:
        """Connected for ``max_connection_age`` seconds or more: QUIT instead of reuse, so a
        connection never outlives the upstream's session limits."""
        if self.connected_at is None:
            return False
        return self._clock.seconds() - self.connected_at >= self.provider.max_connection_age

    def _become_ready(self, idle_from_now: bool = True) -> None:
        self._state = State.READY
        if idle_from_now:
            self._idle_since = self._clock.seconds()
        # Nothing is pending while ready: every reply from now on is unsolicited. Leaving the
        # previous step's handler in place (AUTH, EHLO, RSET) would run that step again and
        # report the client ready a second time.
        self._expected = ANY_REPLY
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
            log.info(
                "provider {provider}: server closing an idle connection: {reply}",
                provider=self.provider.name,
                reply=self._reply_text(code, resp),
            )
            self.quit()
        else:
            log.debug(
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
        self._leave(State.NOOP)
        self.setTimeout(self.provider.command_timeout)  # no reply: timeoutConnection aborts
        self._expected = ANY_REPLY
        self._okresponse = self._failresponse = self._noop_reply
        self._transport.write(b"NOOP\r\n")

    def _noop_reply(self, code: int, resp: bytes) -> None:
        if 200 <= code < 300:
            self._session_ready(idle_from_now=False)  # a NOOP is not use
            return
        log.info(
            "provider {provider}: keepalive NOOP refused, closing: {reply}",
            provider=self.provider.name,
            reply=self._reply_text(code, resp),
        )
        self.quit()

    def timeoutConnection(self) -> None:
        if self._state is State.READY:
            if self._idle_tick_quits or self.too_old:
                self.quit()  # idle or age limit reached: leave politely
            else:
                self._send_noop()
        else:
            super().timeoutConnection()
