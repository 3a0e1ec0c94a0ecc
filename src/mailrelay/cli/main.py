"""The ``mailrelay`` command: operator tools beside the daemon.

Each subcommand finds its config as the daemon does: ``--config PATH``, else the environment
variable ``MAILRELAY_CONFIG``, else the embedded default. Errors are one line on stderr and a
non-zero exit (64, EX_USAGE, for a bad command line; 78, EX_CONFIG, for a bad config; the
queue and sendmail commands document theirs).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import attrs

from mailrelay import __version__
from mailrelay.alerts.webhook import origin
from mailrelay.cli import queue, sendmail
from mailrelay.config import Config, ConfigError, load

EX_USAGE = 64
EX_CONFIG = 78


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line and EX_USAGE, not argparse's exit 2
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EX_USAGE)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def render_config(config: Config) -> str:
    """The effective configuration as TOML. It holds no secret, only where secrets come from."""
    out = [f"# effective configuration, from {config.source or 'the embedded default'}"]
    for section in ("smtp", "limits", "http", "spool", "alerts", "log"):
        out.append(f"\n[{section}]")
        for key, value in attrs.asdict(getattr(config, section)).items():
            if value is None:
                continue  # not set (TOML has no null)
            if section == "alerts" and key == "webhook_url":
                # A webhook's path and query often carry its token: show where it goes only.
                out.append(f"# {key} = {_toml_value(origin(value) + '/...')} (path hidden)")
                continue
            out.append(f"{key} = {_toml_value(value)}")
    for provider in config.providers:
        out.append("\n[[providers]]")
        fields = attrs.asdict(provider)
        relevant = ("name", "kind", "path") if provider.kind == "maildir" else tuple(fields)
        for key in relevant:
            value = fields[key]
            if value is None or (provider.kind == "smtp" and key == "path"):
                continue
            line = f"{key} = {_toml_value(value)}"
            if key == "password_env":
                line += "  # set" if value in os.environ else "  # NOT SET in this environment"
            out.append(line)
    out.append("\n[routing]")
    out.append(f"default = {_toml_value(config.routing.default)}")
    if config.routing.sender_domains:
        out.append("\n[routing.sender_domains]")
        for domain, chain in config.routing.sender_domains.items():
            out.append(f"{_toml_value(domain)} = {_toml_value(chain)}")
    return "\n".join(out) + "\n"


def _config_path(args: argparse.Namespace) -> str | None:
    path: str | None = args.config or os.environ.get("MAILRELAY_CONFIG") or None
    return path


def cmd_check_config(args: argparse.Namespace, config_path: str | None) -> int:
    path = args.path or config_path
    try:
        config = load(path)
    except ConfigError as e:
        print(f"mailrelay: config error: {e}", file=sys.stderr)
        return EX_CONFIG
    sys.stdout.write(render_config(config))
    print(f"# OK: {config.source or 'embedded default'} is valid", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mailrelay", description="Operator tools for the mailrelay daemon.")
    parser.add_argument("--version", action="version", version=f"mailrelay {__version__}")
    parser.add_argument("--config", "-c", help="TOML config file (default: $MAILRELAY_CONFIG)")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    check = sub.add_parser("check-config", help="validate a config and print it in full")
    check.add_argument("path", nargs="?", help="config file (default: --config)")
    check.set_defaults(func=cmd_check_config)
    queue.add_parser(sub)
    sendmail_parser = sub.add_parser(
        "sendmail",
        help="sendmail-compatible submission into the spool (also: mailrelay-sendmail)",
        add_help=False,
    )
    sendmail_parser.add_argument("args", nargs=argparse.REMAINDER)
    sendmail_parser.set_defaults(func=_cmd_sendmail)
    return parser


def _cmd_sendmail(args: argparse.Namespace, config_path: str | None) -> int:
    return sendmail.main(args.args, config_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EX_USAGE
    result: int = args.func(args, _config_path(args))
    return result


if __name__ == "__main__":
    raise SystemExit(main())
