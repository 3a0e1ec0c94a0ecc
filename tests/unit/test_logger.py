"""Our Logger emits the events Twisted's would, and still reports a level that is not one."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.logger import Logger as TwistedLogger
from twisted.logger import LogLevel

from mailrelay.logger import Logger


class Owner:
    log = Logger()
    twisted_log = TwistedLogger()


def _events(logger: Any, emit: Any) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    logger.observer = seen.append
    emit(logger)
    return seen


@pytest.mark.parametrize("level", list(LogLevel.iterconstants()))
def test_an_event_is_the_one_twisted_builds(level: LogLevel) -> None:
    owner = Owner()

    def emit(logger: Any) -> None:
        logger.emit(level, "{queue_id} delivered", queue_id="Q", log_trace=[])

    (ours,) = _events(owner.log, emit)
    (theirs,) = _events(owner.twisted_log, emit)
    assert ours["log_logger"] is not theirs["log_logger"]
    assert abs(ours.pop("log_time") - theirs.pop("log_time")) < 5
    trace_ours, trace_theirs = ours.pop("log_trace"), theirs.pop("log_trace")
    assert [type(logger) for logger, _ in trace_ours] == [Logger]
    assert [type(logger) for logger, _ in trace_theirs] == [TwistedLogger]
    del ours["log_logger"], theirs["log_logger"]
    assert ours == theirs
    assert ours["log_level"] is level
    assert ours["log_namespace"] == f"{__name__}.Owner"
    assert ours["log_source"] is owner


@pytest.mark.parametrize("level", ["loud", ["unhashable"]])
def test_a_level_that_is_not_one_is_reported_as_twisted_reports_it(level: object) -> None:
    (event,) = _events(Owner().log, lambda logger: logger.emit(level, "hello"))
    assert event["log_level"] is LogLevel.critical
    assert event["invalidLevel"] == level
    assert "log_failure" in event
