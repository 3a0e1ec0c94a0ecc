"""``[log] format = "json"`` / ``--log-format json``: one JSON object per line, for shippers.

Each line has ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``namespace``, ``message``
(the same text the plain format prints) and every named field of the event: ``event``
(received, queued, attempt, delivered, deferred, failed, bounced, expired, ...), ``queue_id``,
``recipient``, ``provider``, ``reply``, ``queued_as``, ... Only plain values are written
(strings, numbers, booleans, null, lists of those): an object in an event (a protocol, a
Failure) is never serialised by its repr. A logged failure adds ``error`` and ``traceback``.

twistd picks the observer up from the application (see service.makeService/makeApplication).
"""

from __future__ import annotations

import json
import math
import time
from typing import IO, Any

from twisted.logger import FileLogObserver, LogEvent, formatEvent

# Keys of legacy twisted.python.log events that are not fields of ours.
_LEGACY = frozenset({"format", "message", "system", "isError", "time", "printed", "why", "failure"})
_PLAIN = (str, int, float, bool, type(None))


def _plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    return isinstance(value, list | tuple) and all(isinstance(v, _PLAIN) for v in value)


def _timestamp(seconds: float) -> str:
    whole = int(seconds)
    millis = int((seconds - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def event_as_json(event: LogEvent) -> str:
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": _timestamp(event.get("log_time") or time.time()),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace") or event.get("system") or "-",
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY or key in record or not _plain(value):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            value = None  # JSON has no NaN or Infinity
        record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


def json_observer(out: IO[str]) -> FileLogObserver:
    return FileLogObserver(out, event_as_json)
