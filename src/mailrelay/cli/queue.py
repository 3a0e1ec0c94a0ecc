"""``mailrelay queue ...``: look at and act on the queue, daemon running or not.

With a daemon running, the request goes over its control socket (``<spool>/control.sock``),
so its in-memory index stays in step. Without one, the command takes the spool's lock and
works on the files directly, with the same code the daemon runs (mailrelay.control); the lock
keeps a daemon from starting on the spool meanwhile, and a busy lock is an error, not a wait.

Exit codes: 0 done; 1 the command named a message that does not exist or is in the wrong
state; 64 bad command line; 66 no spool at the configured path; 69 the daemon failed to
answer; 70 internal error; 75 the spool is locked (a daemon starting or stopping, or another
queue command); 77 the control socket is not ours to use; 78 config error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import ILogObserver, globalLogBeginner
from zope.interface import implementer

from mailrelay.blocking import InlineRunner
from mailrelay.cli import control_client
from mailrelay.config import ConfigError, load
from mailrelay.control import OfflineCommands, run_command
from mailrelay.humanize import age
from mailrelay.spool.admin import SpoolAdmin
from mailrelay.spool.store import Spool, SpoolBusy

EX_FAILED = 1
EX_USAGE = 64
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

REPLY_EXIT_CODES = {"unknown-id": EX_FAILED, "wrong-state": EX_FAILED, "bad-request": EX_USAGE}

# A listing of 100 000 messages reads every envelope: give it time.
LIST_TIMEOUT = 300.0
COMMAND_TIMEOUT = 60.0


class CommandFailed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def add_parser(sub: Any) -> None:
    queue = sub.add_parser("queue", help="list, inspect and act on queued mail")
    actions = queue.add_subparsers(dest="action", metavar="ACTION", parser_class=type(queue))
    actions.required = True
    listing = actions.add_parser("list", help="every message: ID, age, size, state, last error")
    listing.add_argument("--json", action="store_true", help="JSON output, one array")
    show = actions.add_parser("show", help="one message's envelope and per-recipient history")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="JSON output")
    retry = actions.add_parser("retry", help="try a message now, or requeue dead letters")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", nargs="?", help="a queued message, or a dead letter to requeue")
    which.add_argument("--all", action="store_true", help="every deferred message and dead letter")
    which.add_argument("--failed", action="store_true", help="every dead letter (failed/)")
    for name, text in (
        ("hold", "keep a message from being tried until released"),
        ("release", "put a held message back in the queue"),
        ("delete", "remove a message (queued, held, failed or corrupt) for good"),
    ):
        actions.add_parser(name, help=text).add_argument("id")
    actions.add_parser("flush", help="try every deferred message now")
    for parser in (queue, *actions.choices.values()):
        parser.set_defaults(func=cmd_queue)


def _request(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {"command": args.action}
    if getattr(args, "id", None):
        request["id"] = args.id
    if args.action == "retry" and not args.id:
        request["scope"] = "all" if args.all else "failed"
    return request


def cmd_queue(args: argparse.Namespace, config_path: str | None) -> int:
    # An internal error is reported in one line below; its traceback is not for this terminal.
    globalLogBeginner.beginLoggingTo([_discard], redirectStandardIO=False)
    try:
        config = load(config_path)
    except ConfigError as e:
        return _fail(EX_CONFIG, f"config error: {e}")
    root = Path(config.spool.path)
    request = _request(args)
    try:
        if not (root / "queue").is_dir():
            raise CommandFailed(
                EX_NOINPUT,
                f"no spool at {root.absolute()} (spool.path of"
                f" {config.source or 'the embedded default'}; has the daemon run with it?)",
            )
        reply = _ask_daemon(root, request)
        if reply is None:
            reply = _run_offline(root, request)
    except CommandFailed as e:
        return _fail(e.code, e.message)
    if not reply.get("ok"):
        code = REPLY_EXIT_CODES.get(str(reply.get("code")), EX_SOFTWARE)
        return _fail(code, str(reply.get("error")))
    if getattr(args, "json", False):
        json.dump(reply["result"], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(args.action, request, reply["result"], time.time()))
    return 0


@implementer(ILogObserver)
def _discard(event: dict[str, Any]) -> None:
    pass


def _fail(code: int, message: str) -> int:
    print(f"mailrelay: {message}", file=sys.stderr)
    return code


def _ask_daemon(root: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The daemon's reply, or None when no daemon is running on this spool."""
    socket_path = root / "control.sock"
    timeout = LIST_TIMEOUT if request["command"] == "list" else COMMAND_TIMEOUT
    try:
        return control_client.request(socket_path, request, timeout)
    except control_client.DaemonNotRunning:
        return None
    except PermissionError:
        raise CommandFailed(
            EX_NOPERM,
            f"cannot use the daemon's control socket {socket_path}: permission denied"
            " (run this as the daemon's user)",
        ) from None
    except (OSError, ValueError) as e:
        raise CommandFailed(EX_UNAVAILABLE, f"the daemon did not answer properly: {e}") from None


READ_ONLY = ("list", "show")


def _run_offline(root: Path, request: dict[str, Any]) -> dict[str, Any]:
    owner = root.stat().st_uid
    if request["command"] not in READ_ONLY and os.geteuid() != owner:
        # Files we create or move would be ours (root's, say), and the daemon, running as
        # the spool's owner, could then not use them.
        raise CommandFailed(
            EX_NOPERM, f"run this as the spool's owner (uid {owner}): the daemon is stopped"
        )
    spool = Spool(root, InlineRunner())
    try:
        lock = spool.lock(f"mailrelay queue {request['command']}")
    except SpoolBusy as e:
        raise CommandFailed(
            EX_TEMPFAIL, f"{e}; a daemon starting or stopping? try again in a moment"
        ) from None
    except OSError as e:
        raise CommandFailed(EX_NOPERM, f"cannot lock the spool {root}: {e.strerror}") from None
    try:
        spool.ensure_areas()
        commands = OfflineCommands(SpoolAdmin(spool, time.time))
        d = defer.Deferred.fromCoroutine(run_command(commands, request))
        # Every step is synchronous here (InlineRunner, no reactor): d has fired.
        replies: list[dict[str, Any]] = []
        d.addCallback(replies.append)
        return replies[0]
    finally:
        lock.release()


# -- output -----------------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit in ("", "K", "M"):
        if n < 1024:
            return f"{n}{unit}"
        n //= 1024
    return f"{n}G"


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def render(action: str, request: dict[str, Any], result: Any, now: float) -> str:
    if action == "list":
        return _render_list(result, now)
    if action == "show":
        return _render_show(result, now)
    if isinstance(result, dict):  # retry --all / --failed, flush
        parts = []
        if "scheduled" in result:
            parts.append(f"{len(result['scheduled'])} deferred message(s) due now")
        if "requeued" in result:
            parts.append(f"{len(result['requeued'])} dead letter(s) requeued")
        return ", ".join(parts) + "\n"
    return f"{request.get('id')}: {result}\n"


def _render_list(entries: list[dict[str, Any]], now: float) -> str:
    lines = [
        f"{'QUEUE ID':<22}  {'STATE':<8}  {'AGE':>6}  {'SIZE':>5}  {'RCPT':>7}  "
        f"{'NEXT ATTEMPT':<20}  SENDER"
    ]
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["state"]] = counts.get(e["state"], 0) + 1
        waited = "-" if e["received_at"] is None else age(now - e["received_at"])
        rcpt = f"{e['pending']}/{e['recipients']}"
        sender = "-" if e["sender"] is None else f"<{e['sender']}>"
        lines.append(
            f"{e['queue_id']:<22}  {e['state']:<8}  {waited:>6}  {_size(e['size']):>5}  "
            f"{rcpt:>7}  {_when(e['next_attempt']):<20}  {sender}"
        )
        if e["last_error"]:
            lines.append(f"{'':<24}last error: {e['last_error']}")
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    lines.append(f"-- {len(entries)} message(s)" + (f": {summary}" if summary else ""))
    return _printable(lines)


def _render_show(report: dict[str, Any], now: float) -> str:
    received = report.get("received_at")
    lines = [
        f"queue id:     {report['queue_id']}",
        f"state:        {report['state']}",
        f"received:     {_when(received)}"
        + ("" if received is None else f" ({age(now - received)} ago)"),
        f"size:         {report['size']} bytes",
        f"sender:       <{report.get('sender') or ''}>",
        f"client:       {report.get('client', '-')} (helo {report.get('helo', '-')})",
        f"next attempt: {_when(report.get('next_attempt'))}",
    ]
    if report.get("last_error"):
        lines.append(f"last error:   {report['last_error']}")
    lines.append("recipients:")
    for recipient, status in report.get("recipient_status", {}).items():
        lines.append(f"  <{recipient}>  {status}")
    lines.append("history:")
    for h in report.get("history", []):
        via = f" via {h['provider']}" if h.get("provider") else ""
        maybe = " (uncertain: possible duplicate)" if h.get("uncertain") else ""
        lines.append(
            f"  {_when(h['at'])}  <{h['recipient']}>  {h['status']}{via}: {h['reply']}{maybe}"
        )
    return _printable(lines)


def _printable(lines: list[str]) -> str:
    """What other users wrote (a sendmail envelope's HELO, an upstream's reply) must not drive
    the operator's terminal: control characters become "?"."""
    return "".join("".join(c if c.isprintable() else "?" for c in line) + "\n" for line in lines)
