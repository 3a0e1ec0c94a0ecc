"""contrib/: the deployment examples parse, load, pass their tools' own checks, and name only
metrics and labels the relay exposes."""

from __future__ import annotations

import configparser
import json
import platform
import pwd
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor

# twistd's own command-line parser on POSIX (twisted.scripts.twistd re-exports it untyped).
from twisted.scripts._twistd_unix import ServerOptions

from mailrelay.config import Config, load
from mailrelay.endpoints import parse_server_endpoint
from mailrelay.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
CONTRIB = REPO / "contrib"
PROMETHEUS = CONTRIB / "prometheus"
RULES = PROMETHEUS / "mailrelay-rules.yml"
UNIT = CONTRIB / "systemd" / "mailrelay.service"
SYSTEMD_TOML = CONTRIB / "systemd" / "mailrelay.toml"
SUPERVISOR = CONTRIB / "supervisor" / "mailrelay.conf"
DASHBOARD = CONTRIB / "grafana" / "mailrelay-dashboard.json"
HAPROXY_CFG = CONTRIB / "haproxy" / "haproxy.cfg"
INSTANCES = [CONTRIB / "haproxy" / "mailrelay-a.toml", CONTRIB / "haproxy" / "mailrelay-b.toml"]

# Labels Prometheus adds to every scraped series (the target's), beside the metric's own.
TARGET_LABELS = frozenset({"instance", "job"})


# -- what the relay exposes ------------------------------------------------------------------


def exposed_series() -> dict[str, frozenset[str]]:
    """Every sample name the relay's registry exposes, with its label names.

    A labelled metric has no sample until a child exists, so each one gets a child first;
    the names are then the library's own (``_total``, ``_bucket``, ``_info``, ...)."""
    metrics = Metrics()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            # prometheus_client keeps the declared label names here (no public accessor).
            label_names: tuple[str, ...] = tuple(value._labelnames)
            if label_names:
                value.labels(*(["probe"] * len(label_names)))
    series: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in series.items()}


class _AnyDepth:
    def __getattr__(self, name: str) -> int:
        return 0


class _State:
    def depth_now(self) -> Any:
        return _AnyDepth()

    def oldest_age_now(self) -> float | None:
        return None

    def free_bytes_now(self) -> int | None:
        return None


def queue_states() -> frozenset[str]:
    """The ``state`` values of mailrelay_queue_depth, as Metrics.watch() exports them."""
    metrics = Metrics()
    metrics.watch(_State())
    return frozenset(
        sample.labels["state"]
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "mailrelay_queue_depth"
    )


SERIES = exposed_series()
STATES = queue_states()


# -- PromQL, as far as these files use it ----------------------------------------------------

_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'""")
_NAME = re.compile(r"(?<![A-Za-z0-9_:])mailrelay_[a-z0-9_]+(?![A-Za-z0-9_:])")
_SELECTOR = re.compile(r"(?<![A-Za-z0-9_:])(mailrelay_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*(mailrelay_[a-z0-9_]+)[^,]*,\s*(\w+)\s*\)")


def promql_problems(expr: str) -> list[str]:
    """What in a PromQL expression names a metric, a label or a queue state the relay lacks."""
    problems: list[str] = []
    bare = _STRING.sub('""', expr)  # names inside strings are not metric names
    names = _NAME.findall(bare)
    if not names and "up{" not in bare.replace(" ", ""):
        problems.append("names no mailrelay metric")
    for name in names:
        if name not in SERIES:
            problems.append(f"{name}: no such metric")
    for name, matchers in _SELECTOR.findall(expr):
        labels = SERIES.get(name, frozenset()) | TARGET_LABELS
        for label, op, value in _MATCHER.findall(matchers):
            if label not in labels:
                problems.append(f"{name}: no label {label!r}")
            if name == "mailrelay_queue_depth" and label == "state" and op in ("=", "=~"):
                for state in value.split("|"):
                    if state not in STATES:
                        problems.append(f"{name}: no state {state!r}")
    # by (...), on (...): labels of some metric in the expression (or of the target).
    known = TARGET_LABELS.union(*(SERIES.get(name, frozenset()) for name in names))
    for group in _GROUPING.findall(bare):
        for label in filter(None, (s.strip() for s in group.split(","))):
            if label not in known:
                problems.append(f"grouping by {label!r}, which no metric here has")
    for name, label in _LABEL_VALUES.findall(expr):
        if label not in SERIES.get(name, frozenset()) | TARGET_LABELS:
            problems.append(f"label_values: {name} has no label {label!r}")
    return problems


def test_the_promql_check_finds_unknown_metrics_labels_and_states() -> None:
    """The checker the contrib tests rely on reports each kind of mistake."""
    assert promql_problems('sum by (state) (mailrelay_queue_depth{state="ready"})') == []
    assert promql_problems("rate(mailrelay_messages_received[5m])") == [
        "mailrelay_messages_received: no such metric"
    ]
    assert promql_problems('mailrelay_queue_depth{provider="ses"}') == [
        "mailrelay_queue_depth: no label 'provider'"
    ]
    assert promql_problems('mailrelay_queue_depth{state=~"ready|deffered"}') == [
        "mailrelay_queue_depth: no state 'deffered'"
    ]
    assert promql_problems("sum by (provider) (mailrelay_recipients_failed_total)") == [
        "grouping by 'provider', which no metric here has"
    ]
    assert promql_problems('sum(up{job="mailrelay_x"})') == []
    assert promql_problems("label_values(mailrelay_info, provider)") == [
        "label_values: mailrelay_info has no label 'provider'"
    ]


def test_the_registry_exposes_the_histograms_and_labels_the_examples_use() -> None:
    """The catalogue is built from the registry itself: sample names and their labels."""
    assert "mailrelay_acceptance_seconds_bucket" in SERIES
    assert "le" in SERIES["mailrelay_upstream_transaction_seconds_bucket"]
    assert "provider" in SERIES["mailrelay_upstream_transaction_seconds_bucket"]
    assert SERIES["mailrelay_info"] == {"version"}
    assert {"ready", "deferred", "active", "held", "failed"} <= STATES


# -- Prometheus -------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """promtool is a test dependency (tests/system-deps.sh installs it): missing, it fails."""
    binary = shutil.which("promtool")
    assert binary is not None, "promtool is missing: run tests/system-deps.sh"
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS
    )


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_accepts_the_scrape_config_and_finds_its_rule_file() -> None:
    # rule_files is relative to the config file; check config fails on a missing one.
    result = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    """mailrelay-rules.test.yml: backlog fires on 101 waiting and not on 100, the breaker
    alert on state 2 and not on half-open, disk low never on -1 (unknown), and more."""
    test_file = PROMETHEUS / "mailrelay-rules.test.yml"
    text = test_file.read_text()
    for alert in ("MailrelayBacklog", "MailrelayProviderBreakerOpen"):
        assert f"alertname: {alert}" in text
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


_RULE_KEY = re.compile(r"(\s*)(?:- )?(alert|record|expr|for|severity|summary|description):\s*(.*)$")


def rule_items(path: Path) -> Iterator[dict[str, str]]:
    """The rules of a Prometheus rule file, each as its keys (alert/record, expr, for,
    severity, summary, description). A reader for this file's layout, not general YAML:
    no YAML library is a dependency. Plain, quoted and folded (>-) scalars."""
    lines = path.read_text().splitlines()
    item: dict[str, str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _RULE_KEY.match(line)
        if match is None:
            continue
        indent, key, value = len(match.group(1)), match.group(2), match.group(3)
        if key in ("alert", "record"):
            if item is not None:
                yield item
            item = {}
        if value in (">-", ">", "|", "|-"):
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
                block.append(lines[i].strip())
                i += 1
            value = " ".join(part for part in block if part)
        elif value[:1] in ('"', "'"):
            value = value[1:-1]
        assert item is not None, f"{path.name}: {key} outside a rule"
        item[key] = value
    if item is not None:
        yield item


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


RULE_ITEMS = list(rule_items(RULES))


def test_the_rule_reader_sees_every_rule_with_its_expression() -> None:
    text = RULES.read_text()
    count = len(re.findall(r"^\s*- (?:alert|record):", text, re.MULTILINE))
    assert count == len(RULE_ITEMS) > 10
    assert all(item.get("expr") for item in RULE_ITEMS)


@pytest.mark.parametrize(
    "item", RULE_ITEMS, ids=[i.get("alert") or i.get("record", "?") for i in RULE_ITEMS]
)
def test_every_rule_names_only_metrics_and_labels_the_relay_has(item: dict[str, str]) -> None:
    assert promql_problems(item["expr"]) == []


def test_every_alert_has_a_severity_and_a_summary_and_description() -> None:
    alerts = [item for item in RULE_ITEMS if "alert" in item]
    for alert in alerts:
        assert alert.get("severity") in ("critical", "warning", "info"), alert["alert"]
        assert alert.get("summary") and alert.get("description"), alert["alert"]
    # The alerts contrib/README.md promises.
    by_name = {alert["alert"]: alert for alert in alerts}
    assert by_name["MailrelayDown"]["expr"].startswith("up{")
    assert by_name["MailrelayBacklog"]["for"] == "5m"
    assert by_name["MailrelayProviderBreakerOpen"]["for"] == "2m"
    assert "mailrelay_spool_free_bytes >= 0" in by_name["MailrelayDiskLow"]["expr"]
    for name in (
        "MailrelayOldestMessageTooOld",
        "MailrelayAllProvidersDown",
        "MailrelayPermanentFailures",
        "MailrelayDeliveriesStalled",
        "MailrelayPossibleDuplicates",
        "MailrelayRelayAlertActive",
        "MailrelayDeadLetters",
    ):
        assert name in by_name


# -- Grafana ----------------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))  # a collapsed row holds its own


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every query variable."""
    dashboard = load_dashboard()
    found = [
        (f"panel {panel.get('title')!r}", target["expr"])
        for panel in dashboard_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            expr = query["query"] if isinstance(query, dict) else query
            found.append((f"variable {variable['name']}", expr))
    return found


DASHBOARD_EXPRS = dashboard_exprs()


@pytest.mark.parametrize(("where", "expr"), DASHBOARD_EXPRS, ids=[w for w, _ in DASHBOARD_EXPRS])
def test_every_dashboard_query_names_only_metrics_and_labels_the_relay_has(
    where: str, expr: str
) -> None:
    assert promql_problems(expr) == []


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel query (Grafana's variables filled in) as a recording rule."""
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".+"),
        }
        for i, (where, expr) in enumerate(DASHBOARD_EXPRS)
        if not where.startswith("variable")
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_is_importable_and_filters_by_instance() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    panels = list(dashboard_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert 'instance=~"$instance"' in target["expr"], panel["title"]


def test_the_dashboard_shows_what_an_operator_needs() -> None:
    exprs = " ".join(expr for _, expr in DASHBOARD_EXPRS)
    for name in (
        "mailrelay_queue_depth",
        "mailrelay_queue_oldest_age_seconds",
        "mailrelay_messages_received_total",
        "mailrelay_messages_delivered_total",
        "mailrelay_messages_deferred_total",
        "mailrelay_messages_failed_total",
        "mailrelay_messages_bounced_total",
        "mailrelay_recipients_delivered_total",
        "mailrelay_acceptance_seconds_bucket",
        "mailrelay_delivery_seconds_bucket",
        "mailrelay_upstream_transaction_seconds_bucket",
        "mailrelay_upstream_breaker_state",
        "mailrelay_upstream_open_connections",
        "mailrelay_smtp_open_connections",
        "mailrelay_smtp_connections_total",
        "mailrelay_messages_rejected_total",
        "mailrelay_alert_active",
        "mailrelay_spool_free_bytes",
        "mailrelay_upstream_throttled_total",
    ):
        assert name in exprs, name
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.5" in exprs


# -- systemd ----------------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values, in order]}} (keys may repeat in units)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a setting: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service_setting(key: str) -> str:
    values = unit_settings(UNIT.read_text())["Service"].get(key)
    assert values is not None and len(values) == 1, f"{key}: {values}"
    return values[0]


def test_the_unit_runs_the_twistd_plugin_with_the_example_config() -> None:
    argv = shlex.split(service_setting("ExecStart"))
    assert Path(argv[0]).name == "twistd"
    options = ServerOptions()
    options.parseOptions(argv[1:])  # twistd's own parser, with the mailrelay plugin
    assert options["nodaemon"] and options.subCommand == "mailrelay"
    assert options.subOptions["config"] == "/etc/mailrelay/mailrelay.toml"
    assert Path(options.subOptions["config"]).name == SYSTEMD_TOML.name


def test_the_unit_stops_gracefully_restarts_and_is_hardened() -> None:
    expected = {
        "Type": "simple",
        "User": "mailrelay",
        "Group": "mailrelay",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "60",
        "UMask": "0077",
        "StateDirectory": "mailrelay",
        "WorkingDirectory": "/var/lib/mailrelay",
        "ReadWritePaths": "/var/lib/mailrelay",
        "EnvironmentFile": "-/etc/mailrelay/secrets.env",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
        "SystemCallFilter": "@system-service",
        "CapabilityBoundingSet": "",
    }
    assert {key: service_setting(key) for key in expected} == expected
    assert int(service_setting("LimitNOFILE")) >= 4096
    assert "MemoryDenyWriteExecute" not in unit_settings(UNIT.read_text())["Service"]


def test_the_example_config_loads_and_keeps_its_spool_in_the_state_directory() -> None:
    config = load(SYSTEMD_TOML)
    assert Path(config.spool.path).is_relative_to("/var/lib/" + service_setting("StateDirectory"))
    smtp = [p for p in config.providers if p.kind == "smtp"]
    assert smtp and all(p.tls == "starttls" and p.username and p.password_env for p in smtp)
    assert config.alerts.webhook_url and config.alerts.mail_to
    assert config.log.format in ("text", "json")
    for listen in config.smtp.listen:
        assert not parse_server_endpoint(listen).proxied


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """The unit with ExecStart pointed at this virtualenv's twistd (verify checks that the
    binary exists); nothing it says may be about our unit."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    twistd = Path(sys.executable).with_name("twistd")
    assert twistd.exists()

    def verify(unit: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [analyze, "verify", "--man=no", str(unit)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    # Without systemd as PID 1 verify may not work at all: a trivial unit tells.
    control = tmp_path / "control" / "contrib-control.service"
    control.parent.mkdir()
    control.write_text(f"[Service]\nExecStart={sys.executable} -c pass\n")
    result = verify(control)
    if result.returncode != 0:
        pytest.skip(f"systemd-analyze verify does not work here: {result.stderr.strip()}")

    text = UNIT.read_text()
    rewritten, count = re.subn(
        r"^ExecStart=\S+/twistd ", f"ExecStart={twistd} ", text, flags=re.MULTILINE
    )
    assert count == 1
    unit = tmp_path / "mailrelay.service"
    unit.write_text(rewritten)
    result = verify(unit)
    output = result.stdout + result.stderr
    about_us = [line for line in output.splitlines() if "mailrelay" in line]
    assert result.returncode == 0 and about_us == [], output


# systemd's MemoryDenyWriteExecute=yes is a seccomp filter (src/shared/seccomp-util.c): EPERM
# for mmap() with PROT_WRITE|PROT_EXEC and for mprotect()/pkey_mprotect() with PROT_EXEC.
# This probe installs the same rules (x86_64 numbers; the shmat(SHM_EXEC) rule is left out),
# loads the example config and starts a TLS client connection to each provider, in memory, as
# the relay does after STARTTLS.
_DENY_WRITE_EXECUTE_PROBE = r"""
import ctypes, struct, sys

def deny_write_execute():
    LD_W_ABS, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
    ALLOW, EPERM = 0x7FFF0000, 0x00050000 | 1
    PROT = 16 + 8 * 2  # seccomp_data.args[2], low word
    program = [
        (LD_W_ABS, 0, 0, 4),            # 0: arch
        (JEQ, 0, 11, 0xC000003E),       # 1: not x86_64 -> 13
        (LD_W_ABS, 0, 0, 0),            # 2: syscall number
        (JEQ, 3, 0, 9),                 # 3: mmap -> 7
        (JEQ, 5, 0, 10),                # 4: mprotect -> 10
        (JEQ, 4, 0, 329),               # 5: pkey_mprotect -> 10
        (RET, 0, 0, ALLOW),             # 6
        (LD_W_ABS, 0, 0, PROT),         # 7: mmap's prot
        (AND, 0, 0, 6),                 # 8: PROT_WRITE | PROT_EXEC
        (JEQ, 4, 3, 6),                 # 9: both -> 14, else 13
        (LD_W_ABS, 0, 0, PROT),         # 10: mprotect's prot
        (AND, 0, 0, 4),                 # 11: PROT_EXEC
        (JEQ, 1, 0, 4),                 # 12: -> 14, else 13
        (RET, 0, 0, ALLOW),             # 13
        (RET, 0, 0, EPERM),             # 14
    ]
    code = b"".join(struct.pack("HBBI", *op) for op in program)
    buffer = ctypes.create_string_buffer(code)

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    ulong = ctypes.c_ulong
    prog = Program(len(program), ctypes.addressof(buffer))
    if libc.prctl(38, ulong(1), ulong(0), ulong(0), ulong(0)) != 0:  # PR_SET_NO_NEW_PRIVS
        sys.exit(3)
    if libc.prctl(22, ulong(2), ctypes.byref(prog), ulong(0), ulong(0)) != 0:  # seccomp
        sys.exit(3)

if sys.argv[1] == "deny":
    deny_write_execute()
    import mmap
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        pass
    else:
        sys.exit(4)  # the filter does not work here
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from mailrelay.config import load
from mailrelay.outbound.tls import client_tls_options
for provider in load(sys.argv[2]).providers:
    options = client_tls_options(provider)
    if options is not None:
        factory = TLSMemoryBIOFactory(options, True, Factory.forProtocol(Protocol))
        transport = StringTransport()
        factory.buildProtocol(None).makeConnection(transport)  # as STARTTLS does
        assert transport.value(), "no ClientHello"
print("TLS started")
"""


def test_memory_deny_write_execute_stays_off_while_it_breaks_tls() -> None:
    """Under systemd's MemoryDenyWriteExecute rules pyOpenSSL cannot create its callbacks
    (cffi's ffi.callback needs write+execute memory), so no TLS connection to a provider
    can start; then the unit must not set it."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("the probe's seccomp filter is written for Linux on x86_64")

    def probe(mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", _DENY_WRITE_EXECUTE_PROBE, mode, str(SYSTEMD_TOML)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    plain = probe("allow")
    assert plain.returncode == 0, plain.stderr
    denied = probe("deny")
    if denied.returncode in (3, 4):
        pytest.skip("cannot install a seccomp filter here")
    if denied.returncode == 0:
        return  # cffi no longer needs W+X: MemoryDenyWriteExecute=yes would be possible
    assert "write+execute memory" in denied.stderr, denied.stderr
    settings = unit_settings(UNIT.read_text())["Service"]
    assert settings.get("MemoryDenyWriteExecute", ["no"]) == ["no"]


# -- supervisor -------------------------------------------------------------------------------


def test_the_supervisor_program_runs_relay_tac_and_stops_gracefully() -> None:
    parser = configparser.ConfigParser(interpolation=None)
    assert parser.read(SUPERVISOR) == [str(SUPERVISOR)]
    program = parser["program:mailrelay"]
    argv = shlex.split(program["command"])
    assert Path(argv[0]).name == "twistd"
    options = ServerOptions()
    options.parseOptions(argv[1:])
    assert options["nodaemon"] and options.subCommand is None
    assert Path(options["python"]).name == "relay.tac" and (REPO / "relay.tac").exists()
    assert options["logfile"] == "-" and options["pidfile"] == ""
    assert program["stopsignal"] == "TERM"
    assert int(program["stopwaitsecs"]) >= 60
    assert program["autorestart"] == "true"
    assert program["user"] not in ("", "root")
    assert program.get("stdout_logfile") and program["redirect_stderr"] == "true"
    # The same config file as the systemd unit.
    environment = dict(
        (key.strip(), value.strip().strip('"'))
        for key, value in (pair.split("=", 1) for pair in program["environment"].split(","))
    )
    assert environment["MAILRELAY_CONFIG"] == "/etc/mailrelay/mailrelay.toml"


# -- HAProxy ----------------------------------------------------------------------------------


def tcp_listen(description: str) -> tuple[int, str]:
    """(port, interface) the endpoint string would listen on, via a memory reactor."""
    reactor = MemoryReactor()
    serverFromString(reactor, description).listen(Factory.forProtocol(Protocol))
    [(port, _factory, _backlog, interface)] = reactor.tcpServers
    return port, interface


def load_instances() -> list[Config]:
    return [load(path) for path in INSTANCES]


def test_both_instances_load_behind_haproxy_with_their_own_ports_and_spools() -> None:
    configs = load_instances()
    smtp_ports: list[int] = []
    for config in configs:
        assert config.smtp.allow_networks, "remote app servers need smtp.allow_networks"
        for listen in config.smtp.listen:
            assert parse_server_endpoint(listen).proxied, listen
            port, interface = tcp_listen(listen)
            assert interface == "127.0.0.1"
            smtp_ports.append(port)
    http_ports = [tcp_listen(config.http.listen)[0] for config in configs]
    spools = [config.spool.path for config in configs]
    assert len(set(smtp_ports)) == len(smtp_ports) == 2
    assert len(set(http_ports)) == 2 and len(set(spools)) == 2
    assert not set(smtp_ports) & set(http_ports)


def haproxy_servers() -> dict[int, int]:
    """{SMTP port: health-check port} of the backend's server lines."""
    servers: dict[int, int] = {}
    for line in HAPROXY_CFG.read_text().splitlines():
        words = line.split()
        if words[:1] == ["server"]:
            address = words[2]
            assert address.startswith("127.0.0.1:"), line
            assert "send-proxy-v2" in words, line
            assert "check" in words and "port" in words, line
            servers[int(address.rsplit(":", 1)[1])] = int(words[words.index("port") + 1])
    return servers


def test_haproxy_sends_proxy_v2_to_each_instance_and_checks_its_readiness() -> None:
    text = HAPROXY_CFG.read_text()
    assert re.search(r"^\s*mode tcp\s*$", text, re.MULTILINE)
    assert re.search(r"^\s*option httpchk GET /health/ready\s*$", text, re.MULTILINE)
    expected = {
        tcp_listen(config.smtp.listen[0])[0]: tcp_listen(config.http.listen)[0]
        for config in load_instances()
    }
    assert haproxy_servers() == expected


def test_haproxy_accepts_its_config(tmp_path: Path) -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed")
    config = HAPROXY_CFG.read_text()
    try:
        pwd.getpwnam("haproxy")
    except KeyError:
        # The haproxy package creates the user; a binary without it cannot resolve it.
        config = re.sub(r"^\s*(user|group) haproxy\s*$", "", config, flags=re.MULTILINE)
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    result = subprocess.run(
        [haproxy, "-c", "-f", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
