"""smtp.processes, and the share of the inbound limits each of those processes enforces."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from mailrelay.config import ConfigError, LimitsConfig, SMTPConfig, parse, per_process_share


def test_processes_defaults_to_one() -> None:
    assert parse({}).smtp.processes == 1
    assert parse({"smtp": {}}).smtp.processes == 1


@pytest.mark.parametrize("processes", [1, 4, 64])
def test_processes_accepts_1_to_64(processes: int) -> None:
    assert parse({"smtp": {"processes": processes}}).smtp.processes == processes


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "smtp.processes: must be at least 1"),
        (-2, "smtp.processes: must be at least 1"),
        (65, "smtp.processes: must be at most 64"),
        ("2", "smtp.processes: must be an integer"),
        (True, "smtp.processes: must be an integer"),
        (2.0, "smtp.processes: must be an integer"),
    ],
)
def test_a_bad_processes_value_is_a_one_line_error_naming_the_key(value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse({"smtp": {"processes": value}})
    assert str(error.value) == message
    assert "\n" not in str(error.value)


def test_one_process_keeps_the_limits_as_they_are() -> None:
    smtp, limits = SMTPConfig(processes=1), LimitsConfig(connection_rate=9.0)
    shared_smtp, shared_limits = per_process_share(smtp, limits)
    assert shared_smtp is smtp
    assert shared_limits is limits


def test_three_processes_share_every_limit() -> None:
    smtp = SMTPConfig(processes=3, max_connections=100, max_recipients=7, idle_timeout=12.0)
    limits = LimitsConfig(
        connections_per_peer=50,
        connection_rate=9.0,
        connection_burst=20,
        messages_per_client=1.5,
        client_burst=1,
        messages_per_sender=0.0,
        sender_burst=50,
        max_tracked_keys=1000,
    )
    shared_smtp, shared_limits = per_process_share(smtp, limits)
    # Counts rounded up: together the processes allow at least what the config says.
    assert shared_smtp == attrs.evolve(smtp, max_connections=34)
    assert shared_limits == LimitsConfig(
        connections_per_peer=17,
        connection_rate=3.0,
        connection_burst=7,
        messages_per_client=0.5,
        client_burst=1,  # never below 1
        messages_per_sender=0.0,  # off stays off
        sender_burst=17,
        max_tracked_keys=1000,  # a memory bound per process, not shared
    )


def test_a_limit_that_is_off_stays_off() -> None:
    _, shared = per_process_share(
        SMTPConfig(processes=3), LimitsConfig(connections_per_peer=0, connection_rate=0.0)
    )
    assert shared.connections_per_peer == 0
    assert shared.connection_rate == 0.0


@pytest.mark.parametrize(
    ("count", "processes", "share"),
    [(1, 64, 1), (64, 64, 1), (65, 64, 2), (99, 2, 50), (100, 2, 50), (5, 4, 2)],
)
def test_counts_are_rounded_up(count: int, processes: int, share: int) -> None:
    smtp, _ = per_process_share(
        SMTPConfig(processes=processes, max_connections=count), LimitsConfig()
    )
    assert smtp.max_connections == share
    assert smtp.processes == processes  # the share, not a new process count
