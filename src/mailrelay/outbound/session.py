"""What the parts of the outbound SMTP client share: the session's states, the error that ends
a session (SessionError, whose ``stage`` names where) and the FailureClass its results carry,
and what the client's step mixins (replies.py, idle.py, transaction.py) use of the client
they are mixed into."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.interfaces import IReactorTime

from mailrelay.config import ProviderConfig
from mailrelay.logger import Logger
from mailrelay.outbound.results import FailureClass

# One namespace for the whole client, whichever module logs. Module level: SMTPClient already
# uses ``self.log`` for its session log (a LineLog).
log = Logger(namespace="mailrelay.outbound.client")


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


# Where session setup is (RelayClient._setup_step) -> the SessionError stage of a connection
# lost there. A loss while waiting for the reply to STARTTLS is not yet TLS's failure.
LOSS_STAGES = {
    "greeting": "connect",
    "ehlo": "connect",
    "starttls": "connect",
    "tls-handshake": "tls",  # the handshake, or the EHLO after it
    "auth": "auth",
}


class State(enum.Enum):
    SETUP = "setup"
    READY = "ready"
    NOOP = "noop"  # a keepalive NOOP waits for its reply: not ready, but alive
    BUSY = "busy"
    CLOSING = "closing"
    CLOSED = "closed"


# Every reply code goes to one handler during a transaction; it classifies them itself.
ANY_REPLY: Any = range(0, 1000)


class ClientTransport(Protocol):
    """What the client uses of its transport."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def registerProducer(self, producer: Any, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


class ClientHost:
    """What the step mixins use of the client they are mixed into (RelayClient, on Twisted's
    ESMTPClient): declarations for the type checker only, nothing at run time."""

    provider: ProviderConfig
    _clock: IReactorTime
    _state: State
    _extensions: dict[bytes, bytes | None]
    connected_at: float | None
    # Set by the pool (see RelayClient.__init__), called with the client itself.
    on_ready: Callable[[Any], object] | None
    # ESMTPClient's: the lines of the reply being received, the codes that count as success,
    # and the handlers of the reply to the command in flight.
    resp: list[bytes]
    _expected: Any
    _okresponse: Callable[[int, bytes], Any]
    _failresponse: Callable[[int, bytes], Any]

    if TYPE_CHECKING:

        @property
        def _transport(self) -> ClientTransport: ...
        def setTimeout(self, period: float | None) -> float | None: ...
        def resetTimeout(self) -> None: ...
        def timeoutConnection(self) -> None: ...
        def quit(self) -> None: ...
        def _leave(self, state: State) -> None: ...
        def _become_ready(self, idle_from_now: bool = True) -> None: ...
        def _session_ready(self, idle_from_now: bool = True) -> None: ...
        def _session_failed(self, stage: str, detail: str, code: int | None = None) -> None: ...
