"""The queue commands, and the daemon's control channel that carries them.

The channel is a UNIX stream socket, ``<spool>/control.sock``, mode 0600, not a TCP port: a
loopback port (like the health page on 127.0.0.1:8025) is open to every local user, and these
commands delete and hold mail. The socket's file mode limits them to the daemon's own user
(and root), and it is local by construction: nothing off the host can ever reach it.

Protocol: one JSON object per line each way. A request is ``{"command": NAME, "id": ID}``
(``id`` only where a message is named); the reply is ``{"ok": true, "result": ...}`` or
``{"ok": false, "code": CODE, "error": TEXT}``. ``run_command`` turns a request into a reply
for any ``QueueCommands``: the daemon's queue, or ``OfflineCommands`` working on a stopped
daemon's spool under its lock; so the two modes answer alike.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.policies import TimeoutMixin

from mailrelay.logger import Logger
from mailrelay.spool.admin import QueueCommandError, QueueEntry, SpoolAdmin

log = Logger()

MAX_REQUEST = 4096
IDLE_TIMEOUT = 60.0


class QueueCommands(Protocol):
    async def listing(self) -> list[QueueEntry]: ...
    async def show(self, queue_id: str) -> dict[str, Any]: ...
    async def hold(self, queue_id: str) -> str: ...
    async def release(self, queue_id: str) -> str: ...
    async def retry(self, queue_id: str) -> str: ...
    async def retry_failed(self) -> list[str]: ...
    async def flush(self) -> list[str]: ...
    async def delete(self, queue_id: str) -> str: ...


class OfflineCommands:
    """The queue commands on a spool no daemon is running on (the caller holds its lock)."""

    def __init__(self, admin: SpoolAdmin) -> None:
        self._admin = admin

    async def listing(self) -> list[QueueEntry]:
        return self._admin.listing()

    async def show(self, queue_id: str) -> dict[str, Any]:
        return self._admin.show(queue_id)

    async def hold(self, queue_id: str) -> str:
        self._admin.hold(queue_id)
        return "held"

    async def release(self, queue_id: str) -> str:
        self._admin.release(queue_id)
        return "released (delivered when the daemon runs)"

    async def retry(self, queue_id: str) -> str:
        return self._admin.retry(queue_id) + " (delivered when the daemon runs)"

    async def retry_failed(self) -> list[str]:
        return self._admin.requeue_failed().requeued

    async def flush(self) -> list[str]:
        return self._admin.flush()

    async def delete(self, queue_id: str) -> str:
        self._admin.delete(queue_id)
        return "deleted"


def _need_id(request: dict[str, Any]) -> str:
    queue_id = request.get("id")
    if not isinstance(queue_id, str) or not queue_id:
        raise QueueCommandError("bad-request", "this command needs a queue ID")
    return queue_id


async def _retry(commands: QueueCommands, request: dict[str, Any]) -> Any:
    scope = request.get("scope")
    if scope == "failed":
        return {"requeued": await commands.retry_failed()}
    if scope == "all":
        # Every deferred message now, and every dead letter back in the queue.
        return {"scheduled": await commands.flush(), "requeued": await commands.retry_failed()}
    return await commands.retry(_need_id(request))


async def _listing(commands: QueueCommands, request: dict[str, Any]) -> Any:
    return [entry.to_json() for entry in await commands.listing()]


def _with_id(
    method: Callable[[QueueCommands], Callable[[str], Awaitable[Any]]],
) -> Callable[[QueueCommands, dict[str, Any]], Awaitable[Any]]:
    async def handler(commands: QueueCommands, request: dict[str, Any]) -> Any:
        return await method(commands)(_need_id(request))

    return handler


async def _flush(commands: QueueCommands, request: dict[str, Any]) -> Any:
    return {"scheduled": await commands.flush()}


HANDLERS: dict[str, Callable[[QueueCommands, dict[str, Any]], Awaitable[Any]]] = {
    "list": _listing,
    "show": _with_id(lambda c: c.show),
    "hold": _with_id(lambda c: c.hold),
    "release": _with_id(lambda c: c.release),
    "delete": _with_id(lambda c: c.delete),
    "retry": _retry,
    "flush": _flush,
}


async def run_command(
    commands: QueueCommands,
    request: Any,
    extra: dict[str, Callable[[], Awaitable[Any]]] | None = None,
) -> dict[str, Any]:
    """One request to one reply; never raises. ``extra``: daemon-only commands (pickup)."""
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        return {"ok": False, "code": "bad-request", "error": "a request is a JSON object"}
    name = request["command"]
    try:
        if extra and name in extra:
            result = await extra[name]()
        elif name in HANDLERS:
            result = await HANDLERS[name](commands, request)
        else:
            raise QueueCommandError("bad-request", f"unknown command {name!r}")
    except QueueCommandError as e:
        return {"ok": False, "code": e.code, "error": e.message}
    except Exception as e:
        log.failure("queue command {command} failed", command=name)
        return {"ok": False, "code": "internal", "error": f"{type(e).__name__}: {e}"}
    return {"ok": True, "result": result}


class ControlProtocol(LineOnlyReceiver, TimeoutMixin):
    """One client of the control socket; requests are answered one at a time, in order."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def __init__(
        self, commands: QueueCommands, extra: dict[str, Callable[[], Awaitable[Any]]]
    ) -> None:
        self._commands = commands
        self._extra = extra
        self._previous: defer.Deferred[None] = defer.succeed(None)
        self._pending = 0

    def connectionMade(self) -> None:
        self.setTimeout(IDLE_TIMEOUT)

    def connectionLost(self, reason: object = None) -> None:
        self.setTimeout(None)

    def lineReceived(self, line: bytes) -> None:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested deeply
            request = None

        async def answer() -> None:
            reply = await run_command(self._commands, request, self._extra)
            if isinstance(request, dict):
                log.info(
                    "control: {command} {queue_id} -> {outcome}",
                    command=request.get("command"),
                    queue_id=request.get("id") or request.get("scope") or "",
                    outcome="ok" if reply["ok"] else reply["code"],
                )
            self._reply(json.dumps(reply, separators=(",", ":")).encode())

        self._in_turn(answer)

    def _in_turn(self, step: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``step`` after every earlier request's reply, so replies keep their order.
        The idle timeout does not run while a request is being served (a long listing)."""
        self._pending += 1
        self.setTimeout(None)

        def done(_: object) -> None:
            self._pending -= 1
            if self._pending == 0 and self.transport is not None and self.connected:
                self.setTimeout(IDLE_TIMEOUT)

        self._previous = self._previous.addCallback(
            lambda _: defer.Deferred.fromCoroutine(step())
        ).addBoth(done)

    def _reply(self, line: bytes) -> None:
        if self.transport is not None and self.connected:
            self.sendLine(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        async def refuse() -> None:
            self._reply(b'{"ok":false,"code":"bad-request","error":"request too long"}')
            if self.transport is not None:
                self.transport.loseConnection()

        self._in_turn(refuse)

    def timeoutConnection(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


class ControlFactory(Factory):
    def __init__(
        self,
        commands: QueueCommands,
        extra: dict[str, Callable[[], Awaitable[Any]]] | None = None,
    ) -> None:
        self._commands = commands
        self._extra = extra or {}

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        return ControlProtocol(self._commands, self._extra)
