"""The control channel: ``run_command`` (one request to one reply, never raising) over a fake
QueueCommands and over OfflineCommands on a real spool, and ControlProtocol (one JSON line
each way, in order, bounded, with an idle timeout) over a StringTransport and a task.Clock."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailrelay.control import (
    HANDLERS,
    IDLE_TIMEOUT,
    MAX_REQUEST,
    ControlFactory,
    ControlProtocol,
    OfflineCommands,
    run_command,
)
from mailrelay.spool.admin import QueueCommandError, QueueEntry, SpoolAdmin
from mailrelay.spool.format import Outcome, Status, decode_journal
from mailrelay.spool.store import CORRUPT, FAILED, HOLD, JOURNAL_SUFFIX, QUEUE, Spool
from tests.unit.fakes import LogCapture, envelope, make_spool, result_of, store

QID = "0000000000000100000001"
OTHER = "0000000000000100000002"
ENTRY = QueueEntry(QID, "deferred", 100.0, 1234, "s@example.test", 2, 1, 5000.0, "451 later")
SHOWN = {"queue_id": QID, "state": "deferred", "history": []}

Extra = dict[str, Callable[[], Awaitable[Any]]]


class FakeCommands:
    """A QueueCommands that records its calls; ``gates`` hold a command until fired and
    ``errors`` make a command raise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.gates: dict[str, defer.Deferred[None]] = {}
        self.errors: dict[str, BaseException] = {}

    async def _call(self, name: str, *args: str) -> None:
        self.calls.append((name, *args))
        if name in self.gates:
            await self.gates[name]
        if name in self.errors:
            raise self.errors[name]

    async def listing(self) -> list[QueueEntry]:
        await self._call("listing")
        return [ENTRY]

    async def show(self, queue_id: str) -> dict[str, Any]:
        await self._call("show", queue_id)
        return dict(SHOWN)

    async def hold(self, queue_id: str) -> str:
        await self._call("hold", queue_id)
        return "held"

    async def release(self, queue_id: str) -> str:
        await self._call("release", queue_id)
        return "released"

    async def retry(self, queue_id: str) -> str:
        await self._call("retry", queue_id)
        return "scheduled"

    async def retry_failed(self) -> list[str]:
        await self._call("retry_failed")
        return [OTHER]

    async def flush(self) -> list[str]:
        await self._call("flush")
        return [QID]

    async def delete(self, queue_id: str) -> str:
        await self._call("delete", queue_id)
        return "deleted"


def ask(commands: Any, request: Any, extra: Extra | None = None) -> dict[str, Any]:
    """run_command to completion (everything here is synchronous)."""
    reply: dict[str, Any] = result_of(
        defer.Deferred.fromCoroutine(run_command(commands, request, extra))
    )
    # Every reply is one JSON object, whatever the result.
    assert json.loads(json.dumps(reply)) == reply
    return reply


# -- run_command over a fake ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "calls", "result"),
    [
        ({"command": "list"}, [("listing",)], [ENTRY.to_json()]),
        ({"command": "show", "id": QID}, [("show", QID)], SHOWN),
        ({"command": "hold", "id": QID}, [("hold", QID)], "held"),
        ({"command": "release", "id": QID}, [("release", QID)], "released"),
        ({"command": "delete", "id": QID}, [("delete", QID)], "deleted"),
        ({"command": "retry", "id": QID}, [("retry", QID)], "scheduled"),
        ({"command": "retry", "scope": "failed"}, [("retry_failed",)], {"requeued": [OTHER]}),
        (
            {"command": "retry", "scope": "all"},
            [("flush",), ("retry_failed",)],
            {"scheduled": [QID], "requeued": [OTHER]},
        ),
        ({"command": "flush"}, [("flush",)], {"scheduled": [QID]}),
    ],
)
def test_each_command_calls_its_method_and_replies_with_its_result(
    request_: dict[str, Any], calls: list[tuple[str, ...]], result: Any
) -> None:
    fake = FakeCommands()
    assert ask(fake, request_) == {"ok": True, "result": result}
    assert fake.calls == calls


def test_every_handler_is_covered_by_the_table_above() -> None:
    assert set(HANDLERS) == {"list", "show", "hold", "release", "delete", "retry", "flush"}


@pytest.mark.parametrize(
    "request_",
    [
        None,
        "list",
        42,
        ["list"],
        {},
        {"id": QID},
        {"command": None},
        {"command": 7},
        {"command": ["list"]},
    ],
)
def test_a_request_that_is_no_command_object_is_a_bad_request(request_: Any) -> None:
    fake = FakeCommands()
    reply = ask(fake, request_)
    assert reply["ok"] is False and reply["code"] == "bad-request"
    assert isinstance(reply["error"], str) and reply["error"]
    assert fake.calls == []


@pytest.mark.parametrize("name", ["frobnicate", "", "LIST", "pickup", "__init__", "retry_failed"])
def test_an_unknown_command_is_a_bad_request_naming_it(name: str) -> None:
    fake = FakeCommands()
    reply = ask(fake, {"command": name, "id": QID})
    assert reply == {"ok": False, "code": "bad-request", "error": f"unknown command {name!r}"}
    assert fake.calls == []


@pytest.mark.parametrize("command", ["show", "hold", "release", "delete", "retry"])
@pytest.mark.parametrize("extra_fields", [{}, {"id": ""}, {"id": None}, {"id": 5}, {"id": [QID]}])
def test_a_command_without_a_usable_id_is_a_bad_request(
    command: str, extra_fields: dict[str, Any]
) -> None:
    fake = FakeCommands()
    reply = ask(fake, {"command": command, **extra_fields})
    assert reply == {"ok": False, "code": "bad-request", "error": "this command needs a queue ID"}
    assert fake.calls == []


def test_retry_with_an_unknown_scope_and_no_id_is_a_bad_request() -> None:
    fake = FakeCommands()
    reply = ask(fake, {"command": "retry", "scope": "everything"})
    assert reply["code"] == "bad-request"
    assert fake.calls == []


@pytest.mark.parametrize("code", ["unknown-id", "wrong-state", "bad-request"])
def test_a_queue_command_error_becomes_its_code_and_message(code: str) -> None:
    fake = FakeCommands()
    fake.errors["hold"] = QueueCommandError(code, f"{QID} says {code}")
    reply = ask(fake, {"command": "hold", "id": QID})
    assert reply == {"ok": False, "code": code, "error": f"{QID} says {code}"}


@pytest.mark.parametrize(
    "request_", [{"command": "list"}, {"command": "delete", "id": QID}, {"command": "flush"}]
)
def test_an_unexpected_exception_is_an_internal_reply_and_logged(
    request_: dict[str, Any],
) -> None:
    fake = FakeCommands()
    for name in ("listing", "delete", "flush"):
        fake.errors[name] = RuntimeError("disk on fire")
    with LogCapture() as logs:
        reply = ask(fake, request_)
    assert reply == {"ok": False, "code": "internal", "error": "RuntimeError: disk on fire"}
    failures = [e["log_failure"] for e in logs.events if "log_failure" in e]
    assert len(failures) == 1 and isinstance(failures[0].value, RuntimeError)


def test_retry_all_stops_at_a_failing_flush_and_reports_it() -> None:
    fake = FakeCommands()
    fake.errors["flush"] = OSError(28, "No space left on device")
    with LogCapture():
        reply = ask(fake, {"command": "retry", "scope": "all"})
    assert reply["code"] == "internal" and "No space left on device" in reply["error"]
    assert fake.calls == [("flush",)]


def test_an_extra_command_is_run_and_its_result_returned() -> None:
    fake = FakeCommands()
    ran: list[str] = []

    def pickup() -> defer.Deferred[int]:
        ran.append("pickup")
        return defer.succeed(3)

    assert ask(fake, {"command": "pickup"}, {"pickup": pickup}) == {"ok": True, "result": 3}
    assert ran == ["pickup"] and fake.calls == []
    # The queue commands are still there beside it.
    assert ask(fake, {"command": "flush"}, {"pickup": pickup})["ok"] is True


def test_an_extra_command_that_fails_is_an_internal_reply() -> None:
    def pickup() -> defer.Deferred[int]:
        return defer.fail(ValueError("maildrop gone"))

    with LogCapture():
        reply = ask(FakeCommands(), {"command": "pickup"}, {"pickup": pickup})
    assert reply == {"ok": False, "code": "internal", "error": "ValueError: maildrop gone"}


def test_an_extra_command_that_is_a_coroutine_function_works() -> None:
    async def pickup() -> int:
        return 0

    assert ask(FakeCommands(), {"command": "pickup"}, {"pickup": pickup}) == {
        "ok": True,
        "result": 0,
    }


# -- run_command over OfflineCommands on a real spool -----------------------------------------

NOW = 1000.0
LATER = 5000.0
A, B = "a@example.test", "b@example.test"


def qid(n: int) -> str:
    return f"{n:022X}"


def put(
    spool: Spool,
    n: int,
    recipients: Sequence[str] = (A,),
    *,
    next_attempt: float = NOW,
    journal: Sequence[tuple[str, Status, str]] = (),
    area: str = QUEUE,
) -> str:
    queue_id = store(spool, envelope(qid(n), recipients, received_at=100.0))
    if journal:
        spool.append_journal_now(
            queue_id, [Outcome(r, s, reply, "p1", 200.0) for r, s, reply in journal]
        )
    os.utime(spool.queue / queue_id, (next_attempt, next_attempt))
    if area != QUEUE:
        spool.move_now(queue_id, QUEUE, area)
    return queue_id


class OfflineSpool:
    def __init__(self, root: Path) -> None:
        self.spool = make_spool(root, now=lambda: NOW)
        self.commands = OfflineCommands(SpoolAdmin(self.spool, lambda: NOW))
        self.ready = put(self.spool, 1)
        self.deferred = put(
            self.spool, 2, next_attempt=LATER, journal=[(A, Status.DEFERRED, "451 4.3.0 later")]
        )
        self.dead = put(
            self.spool,
            3,
            (A, B),
            journal=[(A, Status.DELIVERED, "250 ok"), (B, Status.FAILED, "550 no such user")],
            area=FAILED,
        )

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        return ask(self.commands, request)

    def files(self, area: str) -> list[str]:
        return sorted(p.name for p in self.spool.area(area).iterdir())

    def mtime(self, queue_id: str, area: str = QUEUE) -> float:
        return os.stat(self.spool.area(area) / queue_id).st_mtime


@pytest.fixture
def offline(tmp_path: Path) -> OfflineSpool:
    return OfflineSpool(tmp_path / "spool")


def test_offline_list_gives_every_message_as_json(offline: OfflineSpool) -> None:
    reply = offline.ask({"command": "list"})
    assert reply["ok"] is True
    states = {e["queue_id"]: (e["state"], e["last_error"]) for e in reply["result"]}
    assert states == {
        offline.ready: ("ready", None),
        offline.deferred: ("deferred", "451 4.3.0 later"),
        offline.dead: ("failed", "550 no such user"),
    }
    (deferred,) = [e for e in reply["result"] if e["queue_id"] == offline.deferred]
    assert deferred["next_attempt"] == LATER
    assert set(deferred) == set(ENTRY.to_json())


def test_offline_show_gives_envelope_and_history(offline: OfflineSpool) -> None:
    reply = offline.ask({"command": "show", "id": offline.dead})
    assert reply["ok"] is True
    report = reply["result"]
    assert report["state"] == "failed"
    assert report["recipient_status"] == {A: "delivered", B: "failed"}
    assert [(h["recipient"], h["status"]) for h in report["history"]] == [
        (A, "delivered"),
        (B, "failed"),
    ]
    assert report["client"] == "127.0.0.1" and report["helo"] == "client.test"


def test_offline_hold_and_release(offline: OfflineSpool) -> None:
    assert offline.ask({"command": "hold", "id": offline.deferred}) == {
        "ok": True,
        "result": "held",
    }
    assert offline.files(HOLD) == [offline.deferred, offline.deferred + JOURNAL_SUFFIX]
    assert offline.deferred not in offline.files(QUEUE)

    reply = offline.ask({"command": "release", "id": offline.deferred})
    assert reply == {"ok": True, "result": "released (delivered when the daemon runs)"}
    assert offline.files(HOLD) == []
    assert offline.mtime(offline.deferred) == NOW  # due at once when the daemon runs


def test_offline_retry_of_a_deferred_message_makes_it_due(offline: OfflineSpool) -> None:
    reply = offline.ask({"command": "retry", "id": offline.deferred})
    assert reply == {"ok": True, "result": "scheduled (delivered when the daemon runs)"}
    assert offline.mtime(offline.deferred) == NOW


def test_offline_retry_of_a_dead_letter_requeues_it(offline: OfflineSpool) -> None:
    reply = offline.ask({"command": "retry", "id": offline.dead})
    assert reply == {"ok": True, "result": "requeued (delivered when the daemon runs)"}
    assert offline.files(FAILED) == []
    journal = decode_journal((offline.spool.queue / (offline.dead + JOURNAL_SUFFIX)).read_bytes())
    assert (journal[-1].recipient, journal[-1].status) == (B, Status.REQUEUED)


def test_offline_retry_failed_and_retry_all(offline: OfflineSpool) -> None:
    assert offline.ask({"command": "retry", "scope": "failed"}) == {
        "ok": True,
        "result": {"requeued": [offline.dead]},
    }
    assert offline.ask({"command": "retry", "scope": "failed"}) == {
        "ok": True,
        "result": {"requeued": []},
    }
    put(offline.spool, 4, (B,), journal=[(B, Status.FAILED, "550 no")], area=FAILED)
    assert offline.ask({"command": "retry", "scope": "all"}) == {
        "ok": True,
        "result": {"scheduled": [offline.deferred], "requeued": [qid(4)]},
    }
    assert offline.mtime(offline.deferred) == NOW


def test_offline_flush(offline: OfflineSpool) -> None:
    assert offline.ask({"command": "flush"}) == {
        "ok": True,
        "result": {"scheduled": [offline.deferred]},
    }
    assert offline.mtime(offline.deferred) == NOW
    assert offline.ask({"command": "flush"}) == {"ok": True, "result": {"scheduled": []}}


def test_offline_delete(offline: OfflineSpool) -> None:
    assert offline.ask({"command": "delete", "id": offline.dead}) == {
        "ok": True,
        "result": "deleted",
    }
    assert offline.files(FAILED) == []


@pytest.mark.parametrize("command", ["show", "hold", "release", "delete", "retry"])
@pytest.mark.parametrize("queue_id", [qid(404), "../queue", "abcdefabcdefabcdefabcd"])
def test_offline_command_on_an_unknown_id(
    offline: OfflineSpool, command: str, queue_id: str
) -> None:
    reply = offline.ask({"command": command, "id": queue_id})
    assert reply["ok"] is False and reply["code"] == "unknown-id"
    assert queue_id in reply["error"]


@pytest.mark.parametrize(
    ("command", "which"),
    [("release", "ready"), ("hold", "dead"), ("retry", "held"), ("release", "dead")],
)
def test_offline_command_in_the_wrong_state(
    offline: OfflineSpool, command: str, which: str
) -> None:
    held = put(offline.spool, 5, area=HOLD)
    queue_id = {"ready": offline.ready, "dead": offline.dead, "held": held}[which]
    reply = offline.ask({"command": command, "id": queue_id})
    assert reply["ok"] is False and reply["code"] == "wrong-state"


def test_offline_retry_failed_sets_a_corrupt_dead_letter_aside_like_the_daemon(
    offline: OfflineSpool,
) -> None:
    broken = qid(0)  # sorts first: the good dead letter comes after it
    (offline.spool.failed / broken).write_bytes(b"MAILRELAY-SPOOL 1\ngarbage")
    with LogCapture():
        reply = offline.ask({"command": "retry", "scope": "failed"})
    assert reply == {"ok": True, "result": {"requeued": [offline.dead]}}
    assert broken in offline.files(CORRUPT)


# -- ControlProtocol ------------------------------------------------------------------------------


class Connection:
    def __init__(self, commands: Any, extra: Extra | None = None) -> None:
        self.clock = Clock()
        self.protocol = ControlFactory(commands, extra).buildProtocol(None)
        assert isinstance(self.protocol, ControlProtocol)
        # TimeoutMixin schedules through this attribute.
        self.protocol.callLater = self.clock.callLater  # type: ignore[method-assign,assignment]
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lines(self) -> list[bytes]:
        data: bytes = self.transport.value()
        assert data == b"" or data.endswith(b"\n")
        return data.splitlines()

    def replies(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)


def line(request: dict[str, Any]) -> bytes:
    return json.dumps(request).encode() + b"\n"


def test_one_request_line_gets_one_compact_reply_line() -> None:
    c = Connection(FakeCommands())
    c.send(line({"command": "hold", "id": QID}))
    assert c.transport.value() == b'{"ok":true,"result":"held"}\n'
    assert not c.closing


def test_a_request_split_over_several_reads_is_answered_once_whole() -> None:
    c = Connection(FakeCommands())
    data = line({"command": "show", "id": QID})
    c.send(data[:5])
    c.send(data[5:20])
    assert c.transport.value() == b""
    c.send(data[20:])
    assert c.replies() == [{"ok": True, "result": SHOWN}]


def test_pipelined_requests_are_answered_one_at_a_time_in_order() -> None:
    fake = FakeCommands()
    gate: defer.Deferred[None] = defer.Deferred()
    fake.gates["hold"] = gate
    c = Connection(fake)
    c.send(line({"command": "hold", "id": QID}) + line({"command": "list"}))
    assert c.transport.value() == b""
    assert fake.calls == [("hold", QID)]  # the second waits for the first to be answered
    gate.callback(None)
    assert c.replies() == [
        {"ok": True, "result": "held"},
        {"ok": True, "result": [ENTRY.to_json()]},
    ]
    assert fake.calls == [("hold", QID), ("listing",)]


def test_a_request_arriving_while_another_runs_waits_for_it() -> None:
    fake = FakeCommands()
    gate: defer.Deferred[None] = defer.Deferred()
    fake.gates["flush"] = gate
    c = Connection(fake)
    c.send(line({"command": "flush"}))
    c.send(line({"command": "delete", "id": QID}))
    c.send(line({"command": "nope"}))
    assert c.transport.value() == b""
    gate.callback(None)
    assert c.replies() == [
        {"ok": True, "result": {"scheduled": [QID]}},
        {"ok": True, "result": "deleted"},
        {"ok": False, "code": "bad-request", "error": "unknown command 'nope'"},
    ]


def test_a_failing_request_does_not_stop_the_ones_behind_it() -> None:
    fake = FakeCommands()
    fake.errors["hold"] = RuntimeError("boom")
    c = Connection(fake)
    with LogCapture():
        c.send(line({"command": "hold", "id": QID}) + line({"command": "release", "id": QID}))
    assert c.replies() == [
        {"ok": False, "code": "internal", "error": "RuntimeError: boom"},
        {"ok": True, "result": "released"},
    ]


@pytest.mark.parametrize(
    "data", [b"not json", b"{", b"\xff\xfe", b"[1, 2]", b'"list"', b"null", b"{}"]
)
def test_invalid_or_non_object_json_gets_a_bad_request_reply_and_the_line_stays_open(
    data: bytes,
) -> None:
    fake = FakeCommands()
    c = Connection(fake)
    c.send(data + b"\n")
    (reply,) = c.replies()
    assert reply["ok"] is False and reply["code"] == "bad-request"
    assert not c.closing
    c.send(line({"command": "flush"}))
    assert c.replies()[1] == {"ok": True, "result": {"scheduled": [QID]}}


def test_deeply_nested_json_gets_a_bad_request_reply() -> None:
    c = Connection(FakeCommands())
    c.send(b"[" * 3000 + b"\n")
    (reply,) = c.replies()
    assert reply["code"] == "bad-request"


def test_a_line_of_exactly_max_request_bytes_is_served() -> None:
    request = line({"command": "flush"})[:-1]
    padded = request + b" " * (MAX_REQUEST - len(request))
    assert len(padded) == MAX_REQUEST
    c = Connection(FakeCommands())
    c.send(padded + b"\n")
    assert c.replies() == [{"ok": True, "result": {"scheduled": [QID]}}]
    assert not c.closing


@pytest.mark.parametrize("newline", [True, False])
def test_an_overlong_request_gets_an_error_reply_and_the_connection_is_closed(
    newline: bool,
) -> None:
    fake = FakeCommands()
    c = Connection(fake)
    data = b"{" + b" " * MAX_REQUEST + b"}" + (b"\n" if newline else b"")
    c.send(data)
    assert c.replies() == [{"ok": False, "code": "bad-request", "error": "request too long"}]
    assert c.closing
    assert fake.calls == []


def test_an_overlong_request_after_good_ones_in_the_same_read_closes_after_them() -> None:
    fake = FakeCommands()
    c = Connection(fake)
    c.send(
        line({"command": "flush"}) + b"x" * (MAX_REQUEST + 1) + b"\n" + line({"command": "list"})
    )
    assert c.replies() == [
        {"ok": True, "result": {"scheduled": [QID]}},
        {"ok": False, "code": "bad-request", "error": "request too long"},
    ]
    assert c.closing
    assert fake.calls == [("flush",)]  # nothing after the overlong line is served


def test_an_overlong_request_behind_a_running_one_is_answered_after_it() -> None:
    fake = FakeCommands()
    gate: defer.Deferred[None] = defer.Deferred()
    fake.gates["hold"] = gate
    c = Connection(fake)
    c.send(line({"command": "hold", "id": QID}) + b"x" * (MAX_REQUEST + 1) + b"\n")
    gate.callback(None)
    assert c.replies() == [
        {"ok": True, "result": "held"},
        {"ok": False, "code": "bad-request", "error": "request too long"},
    ]


def test_an_idle_connection_is_closed_after_the_idle_timeout() -> None:
    c = Connection(FakeCommands())
    c.clock.advance(IDLE_TIMEOUT - 1)
    assert not c.closing
    c.clock.advance(1)
    assert c.closing
    assert c.transport.value() == b""


def test_each_request_restarts_the_idle_timeout() -> None:
    c = Connection(FakeCommands())
    c.clock.advance(IDLE_TIMEOUT - 1)
    c.send(line({"command": "flush"}))
    c.clock.advance(IDLE_TIMEOUT - 1)
    assert not c.closing
    c.send(b'{"command":')  # a partial line is not a request: it does not count
    c.clock.advance(1)
    assert c.closing


def test_a_slow_request_is_not_cut_off_by_the_idle_timeout() -> None:
    fake = FakeCommands()
    gate: defer.Deferred[None] = defer.Deferred()
    fake.gates["listing"] = gate
    c = Connection(fake)
    c.send(line({"command": "list"}))
    c.clock.advance(IDLE_TIMEOUT * 2)
    assert not c.closing
    gate.callback(None)
    assert c.replies() == [{"ok": True, "result": [ENTRY.to_json()]}]


def test_a_reply_after_the_client_left_is_dropped_quietly() -> None:
    fake = FakeCommands()
    gate: defer.Deferred[None] = defer.Deferred()
    fake.gates["hold"] = gate
    c = Connection(fake)
    c.send(line({"command": "hold", "id": QID}))
    c.protocol.connectionLost(Failure(ConnectionDone()))
    c.transport.disconnecting = True
    with LogCapture() as logs:
        gate.callback(None)
    assert not any("log_failure" in e for e in logs.events)
    assert fake.calls == [("hold", QID)]


def test_the_factory_passes_the_extra_commands_to_each_connection() -> None:
    adopted: list[defer.Deferred[int]] = []

    def pickup() -> defer.Deferred[int]:
        d: defer.Deferred[int] = defer.Deferred()
        adopted.append(d)
        return d

    c = Connection(FakeCommands(), {"pickup": pickup})
    c.send(line({"command": "pickup"}))
    assert c.transport.value() == b""
    adopted[0].callback(2)
    assert c.replies() == [{"ok": True, "result": 2}]
    # Another connection from the same factory has it too; one without extra does not.
    other = Connection(FakeCommands())
    other.send(line({"command": "pickup"}))
    assert other.replies()[0]["code"] == "bad-request"


def test_each_served_request_is_logged_with_its_outcome() -> None:
    fake = FakeCommands()
    fake.errors["release"] = QueueCommandError("wrong-state", "not held")
    c = Connection(fake)
    with LogCapture() as logs:
        c.send(line({"command": "hold", "id": QID}) + line({"command": "release", "id": QID}))
        c.send(line({"command": "retry", "scope": "failed"}))
    texts = [t for t in logs.texts() if t.startswith("control: ")]
    assert texts == [
        f"control: hold {QID} -> ok",
        f"control: release {QID} -> wrong-state",
        "control: retry failed -> ok",
    ]
