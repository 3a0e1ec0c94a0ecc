"""The relay's log observer: the text twistd writes, or one JSON object per line, written in
one system call per reactor turn.

Text (the default) is twistd's own classic line, ``2026-11-27T11:35:56+0000 [namespace#info]
message``, made cheaper: the time stamp is formatted once a second, and a message's format
string is filled in by ``str.format_map`` (C code) when it can be; anything unusual (a
failure, a legacy event, a format that str.format cannot fill) goes through Twisted's own
formatter, so the text is the same. A relay logs five or six lines per message: Twisted's
observer cost ~50 µs a line, a flush (one write system call) each.

Lines are buffered and written once per reactor turn (or every 64 KiB). A line logged from
another thread, before the reactor runs or after it stopped is written at once, after
whatever is buffered. A crash (SIGKILL) can lose the lines of the turn it interrupted.

``[log] format = "json"`` / ``--log-format json``: one JSON object per line, for shippers.

Each line has ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``namespace``, ``message``
(the same text the plain format prints) and every named field of the event: ``event``
(received, queued, attempt, delivered, deferred, failed, bounced, expired, ...), ``queue_id``,
``recipient``, ``provider``, ``reply``, ``queued_as``, ... Only plain values are written
(strings, numbers, booleans, null, lists of those): an object in an event (a protocol, a
Failure) is never serialised by its repr. A logged failure adds ``error`` and ``traceback``.

twistd picks the observer up from the application (the service sets it as the application's
ILogObserver); ``twistd_log_observer`` decides where it writes from twistd's own options
(--logfile, daemon mode, --syslog), as twistd would for its text log.
"""

from __future__ import annotations

import atexit
import json
import math
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import IO, Any, cast

import attrs
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import (
    ILogObserver,
    LogEvent,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python import threadable
from twisted.python.logfile import LogFile
from zope.interface import implementer

# Flushed at once past this many buffered characters, whatever the turn.
BUFFER_LIMIT = 64 * 1024

# Keys of legacy twisted.python.log events that are not fields of ours.
_LEGACY = frozenset({"format", "message", "system", "isError", "time", "printed", "why", "failure"})
_PLAIN = (str, int, float, bool, type(None))


def is_plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    return isinstance(value, list | tuple) and all(isinstance(v, _PLAIN) for v in value)


def _timestamp(seconds: float) -> str:
    whole = int(seconds)
    millis = int((seconds - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def event_text(event: LogEvent) -> str:
    """An event's text, as ``twisted.logger.formatEvent`` gives it: by ``str.format_map``
    (in C; formatEvent's Formatter is Python, a few percent of the relay's time at full load)
    whenever that can do it, by formatEvent for what only it does ("{x()}" calls, a format
    that fails: it says so in the text)."""
    fmt = event.get("log_format")
    if isinstance(fmt, str):
        try:
            return fmt.format_map(event)
        except BaseException:  # as broad as formatEvent's own net: a log call never raises
            pass  # formatEvent, below, says in its text why the format failed
    return formatEvent(event)


def event_as_json(event: LogEvent) -> str:
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": _timestamp(event.get("log_time") or time.time()),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace") or event.get("system") or "-",
        "message": event_text(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY or key in record or not is_plain(value):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            value = None  # JSON has no NaN or Infinity
        record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


class _StampCache:
    """twistd's time stamp (RFC 3339, local time, whole seconds), formatted once a second."""

    def __init__(self) -> None:
        self._cached = (-1, "-")  # one tuple: a thread never reads half an update

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        cached = self._cached
        if cached[0] != second:
            cached = self._cached = (second, formatTime(when))
        return cached[1]


def classic_text(stamp: Callable[[float | None], str]) -> Callable[[LogEvent], str | None]:
    """The line twistd's text observer writes for an event (formatEventAsClassicLogText)."""

    def render(event: LogEvent) -> str | None:
        if event.get("log_format") is None or "log_failure" in event or "log_system" in event:
            return formatEventAsClassicLogText(event, formatTime=stamp)
        text = event_text(event)
        if not text:
            return None  # as Twisted's: an empty message is no line
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{level.name if level else '-'}"
        line = f"{stamp(event.get('log_time'))} [{system}] {text}"
        return line.replace("\n", "\n\t") + "\n"

    return render


def _in_reactor_thread() -> bool:
    # threadable.isInIOThread without its two Python-level calls (current_thread() and its
    # ident): this runs for every line logged.
    return threading.get_ident() == threadable.ioThread


class LineSink:
    """Whole lines to a file, written once per reactor turn (see the module docstring)."""

    def __init__(
        self,
        out: IO[str],
        reactor: Any,
        in_reactor_thread: Callable[[], bool] | None = None,
    ) -> None:
        self._out = out
        self._reactor = reactor
        self._in_reactor_thread = in_reactor_thread or _in_reactor_thread
        self._pending: list[str] = []
        self._size = 0
        self._flush_call: IDelayedCall | None = None
        # Threads write through here too. Re-entrant: a signal handler that logs may run in
        # the middle of a flush.
        self._lock = threading.RLock()
        _SINKS.add(self)

    def write(self, line: str) -> None:
        in_reactor_thread = self._in_reactor_thread()
        if not (in_reactor_thread and getattr(self._reactor, "running", False)):
            with self._lock:
                if in_reactor_thread:
                    self._cancel_flush_call()  # (from a thread it would not be safe)
                self._write_pending()
                self._out.write(line)
                self._out.flush()
            return
        with self._lock:  # uncontended but for a thread's direct write swapping the list
            self._pending.append(line)
            self._size += len(line)
            if self._size >= BUFFER_LIMIT:
                self.flush()
            elif self._flush_call is None:
                self._flush_call = self._reactor.callLater(0, self.flush)

    def flush(self) -> None:
        with self._lock:
            self._cancel_flush_call()
            if getattr(self._out, "closed", False):
                self._pending, self._size = [], 0  # nowhere to write them any more
                return
            self._write_pending()
            self._out.flush()

    def _cancel_flush_call(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None

    def _write_pending(self) -> None:
        if self._pending:
            text, self._pending, self._size = "".join(self._pending), [], 0
            self._out.write(text)


# Every sink, flushed when the process exits (lines logged after the reactor's last turn).
# Not when twistd ends a run stopped by a signal: it sends itself the signal again (so no
# atexit handler runs), but only after logging "Server Shut Down.", a direct write that
# writes everything buffered before it.
_SINKS: weakref.WeakSet[LineSink] = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    for sink in list(_SINKS):
        sink.flush()


@implementer(ILogObserver)
class LineObserver:
    def __init__(self, render: Callable[[LogEvent], str | None], sink: LineSink) -> None:
        self._render = render
        self._sink = sink

    def __call__(self, event: LogEvent) -> None:
        line = self._render(event)
        if line:
            self._sink.write(line)


def log_observer(log_format: str, out: IO[str], reactor: Any) -> LineObserver:
    """The observer for ``[log] format`` ("text" or "json"), writing to ``out``."""
    render = event_as_json if log_format == "json" else classic_text(_StampCache())
    return LineObserver(render, LineSink(out, reactor))


def json_observer(out: IO[str], reactor: Any = None) -> LineObserver:
    return log_observer("json", out, reactor)


# -- twistd's logging options -------------------------------------------------------------


@attrs.frozen
class LogSettings:
    """How twistd was asked to log, from the plugin's command line (see makeService)."""

    format: str | None = None  # --log-format; None: the config's [log] format
    file: str | None = None  # twistd's --logfile; None or "-": stdout
    daemon: bool = False  # twistd without -n
    syslog: bool = False  # twistd's --syslog


def _log_output(settings: LogSettings, reactor: Any) -> IO[str]:
    """Where twistd's own text observer would write, so --logfile keeps its meaning."""
    if settings.file in (None, "-") and not settings.daemon:
        return sys.stdout
    if settings.file == "-":
        raise SystemExit("Daemons cannot log to stdout, exiting!")  # twistd's words
    # Rotated like twistd's text log (1 MB files), and on SIGUSR1 as twistd does.
    log_file = LogFile.fromFullPath(settings.file or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):
        signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(log_file.rotate))
    return cast(IO[str], log_file)


def twistd_log_observer(
    config_format: str, settings: LogSettings | None, reactor: Any
) -> ILogObserver | None:
    """Our observer for twistd's application (for ``[log] format``), or None: twistd's own.

    Under relay.tac (``settings`` None) twistd's options are out of sight: its own text
    observer stays, and JSON goes to stdout. With --syslog, twistd's syslog observer."""
    log_format = (settings.format if settings else None) or config_format
    if settings is None:
        return log_observer("json", sys.stdout, reactor) if log_format == "json" else None
    if settings.syslog:
        if log_format == "json":
            raise SystemExit("mailrelay: --log-format json and --syslog exclude each other")
        return None
    return log_observer(log_format, _log_output(settings, reactor), reactor)
