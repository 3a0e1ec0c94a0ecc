"""Operations, end to end on the real twistd process: the JSON mail event log and the metric
values after a scripted run of deliveries, deferrals and failures; /health going to 503 when
the default chain's only provider is down, and back when it returns."""

from __future__ import annotations

import json
import signal
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.net import free_port, http_get, port_accepts, wait_until
from tests.support.relay import RelayProcess, relay_config, toml_value
from tests.support.upstream import UpstreamProcess

pytestmark = pytest.mark.e2e


def config_with(
    tmp_path: Path,
    upstream_port: int,
    provider: dict[str, Any],
    spool: dict[str, Any] | None = None,
    **sections: dict[str, Any],
) -> tuple[str, int, int]:
    """relay_config's listeners and spool, one provider "primary" with ``provider`` options,
    and further tables."""
    smtp_port, http_port = free_port(), free_port()
    text = relay_config(tmp_path / "spool", smtp_port, http_port, None, **(spool or {}))
    lines = [
        "[[providers]]",
        'name = "primary"',
        'host = "127.0.0.1"',
        f"port = {upstream_port}",
        'tls = "none"',
    ]
    lines += [f"{k} = {toml_value(v)}" for k, v in provider.items()]
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return text + "\n".join(lines) + "\n", smtp_port, http_port


def metrics(port: int) -> dict[str, float]:
    """Every sample of /metrics: 'name{labels}' -> value."""
    _, text = http_get(port, "/metrics")
    samples: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def send(port: int, recipients: list[str], subject: str) -> None:
    body = f"From: app@example.com\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="tester", timeout=30) as client:
        assert client.sendmail("app@example.com", recipients, body) == {}


def json_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_json_event_log_and_metric_values_after_a_scripted_run(tmp_path: Path) -> None:
    replies = {"RCPT:later": "451 4.2.0 mailbox busy, try later", "RCPT:bad": "550 5.1.1 no user"}
    with UpstreamProcess(tmp_path / "upstream", replies=replies) as upstream:
        text, smtp_port, http_port = config_with(tmp_path, upstream.port, {})
        relay = RelayProcess(
            tmp_path, text, smtp_port, http_port, extra_args=("--log-format", "json")
        )
        with relay:
            four = [f"ok{i}@example.com" for i in range(4)]
            send(smtp_port, four, "delivered")
            send(smtp_port, ["later@example.com"], "deferred")
            send(smtp_port, ["bad@example.com"], "failed")
            # The first message and the bounce (a DSN to app@example.com) arrive upstream.
            upstream.wait_for_messages(2, timeout=30)

            def settled() -> bool:
                m = metrics(http_port)
                return (
                    m.get("mailrelay_messages_deferred_total") == 1
                    and m.get("mailrelay_messages_delivered_total") == 2
                )

            wait_until(settled, 30, what="the scripted run to settle")
            m = metrics(http_port)
        events = json_events(relay.log_path)

    expected = {
        "mailrelay_messages_received_total": 3,
        "mailrelay_recipients_received_total": 6,
        'mailrelay_recipients_delivered_total{provider="primary"}': 5,  # 4 + the DSN
        "mailrelay_recipients_deferred_total": 1,
        "mailrelay_messages_deferred_total": 1,
        "mailrelay_recipients_failed_total": 1,
        "mailrelay_recipients_bounced_total": 1,
        "mailrelay_messages_bounced_total": 1,
        "mailrelay_messages_delivered_total": 2,
        "mailrelay_messages_failed_total": 0,
        "mailrelay_possible_duplicates_total": 0,
        'mailrelay_queue_depth{state="deferred"}': 1,
        'mailrelay_queue_depth{state="ready"}': 0,
        'mailrelay_queue_depth{state="failed"}': 0,
        "mailrelay_acceptance_seconds_count": 3,
        "mailrelay_delivery_seconds_count": 2,
        'mailrelay_upstream_transaction_seconds_count{provider="primary"}': 4,
        'mailrelay_upstream_breaker_state{provider="primary"}': 0,
    }
    assert {k: m.get(k, 0.0) for k in expected} == expected
    assert m['mailrelay_upstream_last_success_timestamp_seconds{provider="primary"}'] > 1e9
    assert m["mailrelay_queue_oldest_age_seconds"] > 0
    assert m["mailrelay_start_time_seconds"] <= time.time()

    # The event log: JSON lines, each mail event with its queue ID.
    by_event: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        assert {"time", "level", "namespace", "message"} <= e.keys()
        if "event" in e:
            by_event.setdefault(e["event"], []).append(e)
    received = by_event["received"]
    assert len(received) == 3
    first = next(e for e in received if e["count"] == 4)
    assert first["first_recipients"] == ["ok0@example.com", "ok1@example.com", "ok2@example.com"]
    assert first["sender"] == "app@example.com" and first["client"] == "127.0.0.1"
    assert (
        "from=<app@example.com> to=<ok0@example.com>,<ok1@example.com>,<ok2@example.com>"
        in (first["message"])
    )
    queue_id = first["queue_id"]
    mine = [e for e in events if e.get("queue_id") == queue_id]
    assert [e["event"] for e in mine] == [
        "received",
        "queued",
        "attempt",
        *["delivered"] * 4,
        "done",
    ]
    delivered = mine[3]
    assert delivered["provider"] == "primary" and delivered["reply"].startswith("250")
    assert isinstance(delivered["elapsed"], float)
    (deferred,) = by_event["deferred"]
    assert deferred["recipient"] == "later@example.com" and deferred["failure_class"] == "rcpt"
    assert deferred["reply"] == "451 4.2.0 mailbox busy, try later"
    assert by_event["retry"][0]["queue_id"] == deferred["queue_id"]
    (failed,) = by_event["failed"]
    assert failed["recipient"] == "bad@example.com" and failed["reply"].startswith("550")
    (bounced,) = by_event["bounced"]
    assert bounced["queue_id"] == failed["queue_id"]
    # The DSN was queued under its own ID and delivered.
    assert any(e["queue_id"] == bounced["dsn_id"] for e in by_event["queued"])


def test_health_fails_while_the_default_chain_is_down_and_recovers(tmp_path: Path) -> None:
    upstream_port = free_port()
    provider = {"breaker_threshold": 1, "breaker_cooldown": 0.5, "breaker_max_cooldown": 1.0}
    text, smtp_port, http_port = config_with(
        tmp_path, upstream_port, provider, spool={"retry_initial": 1.0, "retry_max": 2.0}
    )
    with RelayProcess(tmp_path, text, smtp_port, http_port):
        assert json.loads(http_get(http_port, "/health")[1])["status"] == "ok"
        send(smtp_port, ["user@example.com"], "while down")  # nobody listens upstream

        def status() -> tuple[int, str]:
            code, body = http_get(http_port, "/health")
            return code, json.loads(body)["status"]

        wait_until(lambda: status() == (503, "failing"), 20, what="/health failing")
        code, body = http_get(http_port, "/health")
        health = json.loads(body)
        assert health["reasons"][0].startswith("every provider of the default chain is down")
        (primary,) = health["providers"]
        assert primary["breaker"] in ("open", "half-open")
        assert primary["last_error_class"] == "connect"
        assert http_get(http_port, "/health/ready")[0] == 200  # mail is still accepted
        assert http_get(http_port, "/health/live")[0] == 200

        with UpstreamProcess(tmp_path / "upstream", port=upstream_port) as upstream:
            wait_until(lambda: status() == (200, "ok"), 20, what="/health ok again")
            upstream.wait_for_messages(1, timeout=20)


def test_at_stop_ready_turns_503_while_smtp_and_http_still_answer(tmp_path: Path) -> None:
    smtp_port, http_port = free_port(), free_port()
    text = relay_config(tmp_path / "spool", smtp_port, http_port, None)
    text = text.replace("[spool]", "drain_time = 3.0\n[spool]", 1)  # into [http]
    relay = RelayProcess(tmp_path, text, smtp_port, http_port)
    with relay:
        assert http_get(http_port, "/health/ready")[0] == 200
        assert relay._proc is not None
        relay._proc.send_signal(signal.SIGTERM)
        wait_until(lambda: http_get(http_port, "/health/ready")[0] == 503, 5, what="ready 503")
        # Draining: a load balancer's check sees 503 while mail is still taken.
        assert port_accepts("127.0.0.1", smtp_port)
        code, body = http_get(http_port, "/health")
        assert code == 503 and "not accepting mail" in json.loads(body)["reasons"][0]
        # twistd ends a clean stop by re-raising the signal it got.
        assert relay._proc.wait(timeout=20) in (0, -signal.SIGTERM)
    assert "draining: /health/ready answers 503 for 3.0s" in relay.log_path.read_text()
    assert "Server Shut Down." in relay.log_path.read_text()
