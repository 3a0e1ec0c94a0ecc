"""Acceptors' metrics in the relay process's /metrics: counters, histograms and gauges summed
with the relay's own, every family once; build info and inbound limits never summed; an
exited acceptor's counters kept and its gauges dropped."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mailrelay.acceptors.samples import MergedRegistry, RemoteSamples, snapshot
from mailrelay.metrics import Metrics

RECEIVED = "mailrelay_messages_received_total"
CONNECTIONS = "mailrelay_smtp_connections_total"
OPEN = "mailrelay_smtp_open_connections"
ACCEPTANCE = "mailrelay_acceptance_seconds"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parsed(text: bytes) -> tuple[list[str], Samples]:
    """The family names in the order they appear, and every sample by (name, labels)."""
    names: list[str] = []
    samples: Samples = {}
    for family in text_string_to_metric_families(text.decode()):
        names.append(family.name)
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"sample {key} twice"
            samples[key] = s.value
    return names, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def merged(relay: Metrics, remote: RemoteSamples) -> Samples:
    names, samples = parsed(generate_latest(MergedRegistry(relay.registry, remote)))
    duplicates = [n for n, count in Counter(names).items() if count > 1]
    assert duplicates == []
    return samples


def busy_pair() -> tuple[Metrics, Metrics]:
    """A relay process's and an acceptor's metrics, each having accepted some mail."""
    relay, acceptor = Metrics(), Metrics()
    relay.messages_received.inc(3)
    relay.connections.labels("accepted").inc(4)
    relay.acceptance_seconds.observe(0.003)
    relay.smtp_open_connections.set(1)
    acceptor.messages_received.inc(5)
    acceptor.connections.labels("accepted").inc(6)
    acceptor.connections.labels("refused_rate").inc(2)  # a label set only the acceptor saw
    acceptor.acceptance_seconds.observe(0.003)
    acceptor.acceptance_seconds.observe(0.2)
    acceptor.smtp_open_connections.set(2)
    return relay, acceptor


def test_acceptor_counters_histograms_and_gauges_are_added_to_the_relays() -> None:
    relay, acceptor = busy_pair()
    remote = RemoteSamples()
    remote.update(1, snapshot(acceptor.registry))
    samples = merged(relay, remote)
    assert value(samples, RECEIVED) == 8
    assert value(samples, CONNECTIONS, result="accepted") == 10
    assert value(samples, CONNECTIONS, result="refused_rate") == 2
    assert value(samples, OPEN) == 3
    assert value(samples, ACCEPTANCE + "_count") == 3
    assert value(samples, ACCEPTANCE + "_sum") == pytest.approx(0.206)
    assert value(samples, ACCEPTANCE + "_bucket", le="0.005") == 2
    assert value(samples, ACCEPTANCE + "_bucket", le="0.1") == 2
    assert value(samples, ACCEPTANCE + "_bucket", le="0.25") == 3
    assert value(samples, ACCEPTANCE + "_bucket", le="+Inf") == 3


def test_the_relays_own_registry_is_left_as_it_was() -> None:
    relay, acceptor = busy_pair()
    remote = RemoteSamples()
    remote.update(1, snapshot(acceptor.registry))
    merged(relay, remote)
    _, own = parsed(generate_latest(relay.registry))
    assert value(own, RECEIVED) == 3
    assert value(own, CONNECTIONS, result="refused_rate") is None


def test_two_acceptors_add_up() -> None:
    relay, acceptor = busy_pair()
    other = Metrics()
    other.messages_received.inc(10)
    other.connections.labels("refused_rate").inc(1)
    remote = RemoteSamples()
    remote.update(1, snapshot(acceptor.registry))
    remote.update(2, snapshot(other.registry))
    samples = merged(relay, remote)
    assert value(samples, RECEIVED) == 18
    assert value(samples, CONNECTIONS, result="refused_rate") == 3


def test_created_samples_are_not_sent() -> None:
    _, acceptor = busy_pair()
    sent = json.loads(snapshot(acceptor.registry))
    names = {sample[0] for _, _, samples in sent for sample in samples}
    assert RECEIVED in names
    assert not [n for n in names if n.endswith("_created")]


def test_build_info_and_inbound_limits_are_not_summed() -> None:
    relay, acceptor = busy_pair()
    relay.inbound_limit.labels("max_connections").set(50)
    acceptor.inbound_limit.labels("max_connections").set(50)
    acceptor.inbound_limit.labels("only_in_acceptor").set(7)
    sent = json.loads(snapshot(acceptor.registry))
    assert {name for name, _, _ in sent}.isdisjoint({"mailrelay", "mailrelay_inbound_limit"})
    remote = RemoteSamples()
    remote.update(1, snapshot(acceptor.registry))
    # Even a snapshot that carries them (an acceptor of another version, say) is not added.
    forged = [
        ["mailrelay_inbound_limit", "gauge", [["mailrelay_inbound_limit", {"limit": "x"}, 1]]],
        [
            "mailrelay_inbound_limit",
            "gauge",
            [["mailrelay_inbound_limit", {"limit": "max_connections"}, 50]],
        ],
        ["mailrelay", "gauge", [["mailrelay_info", {"version": "0"}, 1]]],
    ]
    remote.update(2, json.dumps(forged).encode())
    samples = merged(relay, remote)
    assert value(samples, "mailrelay_inbound_limit", limit="max_connections") == 50
    assert value(samples, "mailrelay_inbound_limit", limit="only_in_acceptor") is None
    assert value(samples, "mailrelay_inbound_limit", limit="x") is None
    infos = [key for key in samples if key[0] == "mailrelay_info"]
    assert len(infos) == 1 and samples[infos[0]] == 1
    assert value(samples, RECEIVED) == 8  # the rest of acceptor 1's snapshot still counts


def test_an_exited_acceptor_leaves_its_counters_and_takes_its_gauges() -> None:
    relay, acceptor = busy_pair()
    remote = RemoteSamples()
    remote.update(1, snapshot(acceptor.registry))
    remote.retire(1)
    samples = merged(relay, remote)
    assert value(samples, RECEIVED) == 8
    assert value(samples, CONNECTIONS, result="refused_rate") == 2
    assert value(samples, ACCEPTANCE + "_count") == 3
    assert value(samples, OPEN) == 1  # the relay's own only


def test_a_restarted_acceptor_counts_on_top_of_what_the_exited_one_left() -> None:
    relay, acceptor = busy_pair()
    remote = RemoteSamples()
    remote.update(1, snapshot(acceptor.registry))
    remote.retire(1)
    restarted = Metrics()  # starts from zero
    restarted.messages_received.inc(1)
    restarted.smtp_open_connections.set(4)
    remote.update(1, snapshot(restarted.registry))
    samples = merged(relay, remote)
    assert value(samples, RECEIVED) == 9  # 3 + 5 (gone) + 1: never backwards
    assert value(samples, OPEN) == 5
    remote.retire(1)
    remote.retire(1)  # twice: nothing more to keep
    assert value(merged(relay, remote), RECEIVED) == 9


def test_a_later_snapshot_replaces_the_earlier_one() -> None:
    relay, acceptor = busy_pair()
    remote = RemoteSamples()
    remote.update(1, snapshot(acceptor.registry))
    acceptor.messages_received.inc(1)
    acceptor.smtp_open_connections.set(0)
    remote.update(1, snapshot(acceptor.registry))
    samples = merged(relay, remote)
    assert value(samples, RECEIVED) == 3 + 6
    assert value(samples, OPEN) == 1
    assert value(samples, CONNECTIONS, result="accepted") == 10


def test_no_acceptor_yet_is_the_relays_own_metrics() -> None:
    relay, _ = busy_pair()
    assert generate_latest(MergedRegistry(relay.registry, RemoteSamples())) == generate_latest(
        relay.registry
    )


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"5",
        b'{"a": 1}',
        b"[[1, 2, 3]]",
        b'[["f", "counter", [["n", {"a": "b"}, "many"]]]]',
        b'[["f", "counter", [["n", null, 1]]]]',
        b'[["f", "counter", [["n", {}]]]]',
    ],
)
def test_a_payload_that_is_not_a_snapshot_is_a_value_error(garbage: bytes) -> None:
    remote = RemoteSamples()
    remote.update(1, snapshot(Metrics().registry))
    with pytest.raises(ValueError):
        remote.update(1, garbage)


def test_deeply_nested_garbage_is_a_value_error_too() -> None:
    with pytest.raises(ValueError):
        RemoteSamples().update(1, b"[" * 100_000)


def test_exposition_renders_the_exposed_view() -> None:
    relay, acceptor = busy_pair()
    remote = RemoteSamples()
    remote.update(1, snapshot(acceptor.registry))
    assert value(parsed(relay.exposition())[1], RECEIVED) == 3  # the registry by default
    relay.expose(MergedRegistry(relay.registry, remote))
    assert value(parsed(relay.exposition())[1], RECEIVED) == 8
    acceptor.messages_received.inc(2)
    remote.update(1, snapshot(acceptor.registry))
    assert value(parsed(relay.exposition())[1], RECEIVED) == 10  # read at every scrape
