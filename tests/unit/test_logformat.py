"""The JSON log format: one object per line, named fields kept, objects never repr'd, and the
observer handed to twistd through the application."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
from twisted.application import service
from twisted.internet.task import Clock
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
)
from twisted.python import threadable, usage
from twisted.python.failure import Failure

from mailrelay.config import parse
from mailrelay.logformat import (
    BUFFER_LIMIT,
    LineObserver,
    LineSink,
    LogSettings,
    _in_reactor_thread,
    _StampCache,
    classic_text,
    event_as_json,
    event_text,
    json_observer,
    twistd_log_observer,
)
from mailrelay.service import Options, buildService


def logged(emit: object = None) -> list[dict[str, object]]:
    out = io.StringIO()
    log = Logger(namespace="mailrelay.test", observer=json_observer(out))
    log.info(
        "{queue_id} delivered to <{recipient}> via {provider}",
        queue_id="0644A1B2C3D4E5F6A7B8C9",
        event="delivered",
        recipient="a@example.com",
        provider="primary",
        elapsed=0.25,
        queued_as=None,
        protocol=object(),  # an object: never serialised
        recipients=("a@example.com", "b@example.com"),
    )
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_one_json_object_per_line_with_the_named_fields() -> None:
    (record,) = logged()
    assert record["message"] == "0644A1B2C3D4E5F6A7B8C9 delivered to <a@example.com> via primary"
    assert record["level"] == "info" and record["namespace"] == "mailrelay.test"
    assert record["time"].endswith("Z") and len(record["time"]) == 24
    assert record["event"] == "delivered" and record["elapsed"] == 0.25
    assert record["queued_as"] is None
    assert record["recipients"] == ["a@example.com", "b@example.com"]
    assert "protocol" not in record
    assert not any(key.startswith("log_") for key in record)


def test_a_failure_adds_error_and_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        failure = Failure()
    line = event_as_json(
        {
            "log_format": "attempt failed",
            "log_level": LogLevel.critical,
            "log_namespace": "mailrelay.queue",
            "log_time": 1_800_000_000.5,
            "log_failure": failure,
        }
    )
    record = json.loads(line)
    assert line.endswith("\n") and line.count("\n") == 1  # the traceback is escaped
    assert record["time"] == "2027-01-15T08:00:00.500Z"
    assert record["error"] == "boom" and "ValueError" in record["traceback"]


def test_a_legacy_event_keeps_its_text_and_drops_its_internals() -> None:
    record = json.loads(
        event_as_json(
            {
                "message": ("Starting factory", "x"),
                "system": "-",
                "isError": 0,
                "time": 1.0,
                "log_legacy": True,
                "log_format": "{log_text}",
                "log_text": "Starting factory x",
                "log_time": 1.0,
            }
        )
    )
    assert record["message"] == "Starting factory x"
    assert "isError" not in record and "system" not in record


def test_json_format_puts_an_observer_on_the_application(tmp_path: Path) -> None:
    config = parse({"spool": {"path": str(tmp_path / "spool")}, "log": {"format": "json"}})
    application = service.Application("mailrelay")
    top = buildService(Clock(), config)
    top.setServiceParent(application)
    observer = application.getComponent(ILogObserver, None)
    assert observer is not None
    text = buildService(Clock(), parse({"spool": {"path": str(tmp_path / "spool2")}}))
    plain = service.Application("mailrelay")
    text.setServiceParent(plain)
    assert plain.getComponent(ILogObserver, None) is None


def test_the_command_line_option_is_checked() -> None:
    options = Options()
    options.parseOptions(["--log-format", "json"])
    assert options["log-format"] == "json"
    with pytest.raises(usage.UsageError, match="--log-format must be text or json"):
        Options().parseOptions(["--log-format", "xml"])


def test_nan_and_infinity_are_null() -> None:
    record = json.loads(
        event_as_json(
            {"log_format": "x", "log_time": 1.0, "ratio": float("nan"), "top": float("inf")}
        )
    )
    assert record["ratio"] is None and record["top"] is None


# -- the text format: twistd's line, made cheaper, written once per reactor turn ---------------


class RunningClock(Clock):
    running = True


def classic_events() -> list[dict[str, object]]:
    try:
        raise ValueError("boom")
    except ValueError:
        failure = Failure()
    base = {
        "log_time": 1_800_000_000.25,
        "log_namespace": "mailrelay.q",
        "log_level": LogLevel.info,
    }
    return [
        base
        | {"log_format": "{queue_id} delivered in {elapsed:.3f}s", "queue_id": "Q", "elapsed": 0.5},
        base | {"log_format": "two\nlines {x!r}", "x": "y"},
        base | {"log_format": "missing {nope}"},
        base | {"log_format": "call {f()}", "f": lambda: 42},
        base | {"log_format": "failed", "log_failure": failure},
        base | {"log_format": "{log_text}", "log_text": "legacy", "log_system": "-"},
        base | {"log_format": "no level"} | {"log_level": None},
        {"log_format": "nothing else"},
        base | {"log_format": "{log_io}", "log_io": ""},  # print() of an empty line: no line
        base | {"message": ("no format",)},
    ]


def test_classic_text_is_twistds_line() -> None:
    render = classic_text(_StampCache())
    for event in classic_events():
        assert render(event) == formatEventAsClassicLogText(event), event


class _Interrupting:
    def __format__(self, spec: str) -> str:
        raise KeyboardInterrupt


def test_event_text_is_twisteds_text() -> None:
    extra = [
        {"log_format": "{x:.3f}", "x": "not a number"},
        {"log_format": "{e.args[0]} {d[k]}", "e": ValueError("v"), "d": {"k": 1}},
        {"log_format": None},
        {"log_format": b"bytes {x}", "x": 1},
        {"log_format": "{x}", "x": _Interrupting()},
    ]
    for event in classic_events() + extra:
        assert event_text(event) == formatEvent(event), event


def test_the_reactor_thread_is_told_as_twisted_tells_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threadable, "ioThread", threading.get_ident())
    seen: list[tuple[bool, bool]] = []
    thread = threading.Thread(
        target=lambda: seen.append((_in_reactor_thread(), threadable.isInIOThread()))
    )
    thread.start()
    thread.join()
    seen.append((_in_reactor_thread(), threadable.isInIOThread()))
    assert seen == [(False, False), (True, True)]


def test_lines_are_written_once_per_reactor_turn() -> None:
    out = io.StringIO()
    clock = RunningClock()
    sink_observer = LineObserver(
        classic_text(_StampCache()), LineSink(out, clock, in_reactor_thread=lambda: True)
    )
    for event in classic_events()[:3]:
        sink_observer(event)
    assert out.getvalue() == ""  # buffered for this turn
    clock.advance(0)
    assert out.getvalue().count("\n") >= 3
    assert out.getvalue().startswith(formatEventAsClassicLogText(classic_events()[0]) or "")


def test_lines_from_another_thread_or_a_stopped_reactor_are_written_at_once() -> None:
    out = io.StringIO()
    clock = RunningClock()
    in_thread = [True]
    sink = LineSink(out, clock, in_reactor_thread=lambda: in_thread[0])
    sink.write("first\n")
    in_thread[0] = False
    sink.write("second\n")  # from a thread: what was buffered goes first
    assert out.getvalue() == "first\nsecond\n"
    in_thread[0] = True
    clock.running = False
    sink.write("third\n")
    assert out.getvalue() == "first\nsecond\nthird\n"
    assert clock.getDelayedCalls() == []


def test_a_full_buffer_is_written_without_waiting_for_the_turn() -> None:
    out = io.StringIO()
    sink = LineSink(out, RunningClock(), in_reactor_thread=lambda: True)
    line = "x" * 1023 + "\n"
    for _ in range(BUFFER_LIMIT // len(line)):
        sink.write(line)
    assert len(out.getvalue()) == BUFFER_LIMIT


def test_plugin_log_settings_follow_twistds_rules(tmp_path: Path) -> None:
    text = parse({"spool": {"path": str(tmp_path / "spool")}}).log.format
    reactor = RunningClock()
    assert isinstance(twistd_log_observer(text, LogSettings(), reactor), LineObserver)
    assert twistd_log_observer(text, LogSettings(syslog=True), reactor) is None  # twistd's
    with pytest.raises(SystemExit, match="--syslog"):
        twistd_log_observer(text, LogSettings(format="json", syslog=True), reactor)
    with pytest.raises(SystemExit, match="Daemons cannot log to stdout"):
        twistd_log_observer(text, LogSettings(file="-", daemon=True), reactor)
    log_file = tmp_path / "relay.log"
    stopped = Clock()  # no reactor turn to wait for: written at once
    observer = twistd_log_observer(text, LogSettings(file=str(log_file), format="json"), stopped)
    assert observer is not None
    observer({"log_format": "hello {who}", "who": "file", "log_time": 1.0})
    assert json.loads(log_file.read_text())["message"] == "hello file"
