"""Acceptors' metrics in the relay process's /metrics.

An acceptor sends a snapshot of its registry (every sample of its counters, histograms and
gauges) once a second while it changes, and a last one as it stops. The relay process adds
the latest snapshot of every acceptor to its own samples of the same name and labels, so
``mailrelay_messages_received_total`` counts mail accepted by any process. When an acceptor
exits, its counters and histograms are kept (a restarted acceptor starts from zero, and a
counter must not go backwards); its gauges (open connections) leave with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

# Families an acceptor has whose value is not a count to add up: the build information, and
# the inbound limits (every process enforces the same share of each; see per_process_share).
NOT_SUMMED = frozenset(("mailrelay", "mailrelay_inbound_limit"))
_SUMMED_TYPES = frozenset(("counter", "histogram", "gauge"))
_KEPT_AFTER_EXIT = frozenset(("counter", "histogram"))

# (sample name, sorted label pairs) -> value
SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def _key(name: str, labels: dict[str, str]) -> SampleKey:
    return name, tuple(sorted(labels.items()))


def snapshot(registry: CollectorRegistry) -> bytes:
    """What an acceptor sends: [[family, type, [[sample, labels, value], ...]], ...]."""
    families = []
    for family in registry.collect():
        if family.type not in _SUMMED_TYPES or family.name in NOT_SUMMED:
            continue
        samples = [
            [s.name, s.labels, s.value]
            for s in family.samples
            if not s.name.endswith("_created")  # a time stamp, not a count
        ]
        families.append([family.name, family.type, samples])
    return json.dumps(families, separators=(",", ":")).encode()


class _Snapshot:
    def __init__(self, data: bytes) -> None:
        """Raises ValueError if ``data`` is not a snapshot."""
        self.values: dict[SampleKey, float] = {}
        self.kept: dict[SampleKey, float] = {}  # the part kept after the acceptor exits
        self.family_of: dict[SampleKey, str] = {}
        try:
            for family, kind, samples in json.loads(data):
                for name, labels, value in samples:
                    key = _key(str(name), {str(k): str(v) for k, v in labels.items()})
                    number = float(value)
                    self.values[key] = number
                    self.family_of[key] = str(family)
                    if kind in _KEPT_AFTER_EXIT:
                        self.kept[key] = number
        except (TypeError, ValueError, AttributeError, RecursionError) as e:
            raise ValueError(f"not a metrics snapshot: {e}") from None


class RemoteSamples:
    """The acceptors' samples, by acceptor, and what exited ones left behind."""

    def __init__(self) -> None:
        self._latest: dict[int, _Snapshot] = {}
        self._retired: dict[SampleKey, float] = {}
        self._retired_family: dict[SampleKey, str] = {}

    def update(self, acceptor: int, data: bytes) -> None:
        """Raises ValueError for a payload that is not a snapshot."""
        self._latest[acceptor] = _Snapshot(data)

    def retire(self, acceptor: int) -> None:
        gone = self._latest.pop(acceptor, None)
        if gone is None:
            return
        for key, value in gone.kept.items():
            self._retired[key] = self._retired.get(key, 0.0) + value
            self._retired_family[key] = gone.family_of[key]

    def totals(self) -> tuple[dict[SampleKey, float], dict[SampleKey, str]]:
        values = dict(self._retired)
        families = dict(self._retired_family)
        for snap in self._latest.values():
            for key, value in snap.values.items():
                values[key] = values.get(key, 0.0) + value
            families.update(snap.family_of)
        return values, families


class MergedRegistry:
    """A registry's families with the acceptors' samples added (for generate_latest)."""

    def __init__(self, registry: CollectorRegistry, remote: RemoteSamples) -> None:
        self._registry = registry
        self._remote = remote

    def collect(self) -> Iterator[Metric]:
        values, families = self._remote.totals()
        extra_by_family: dict[str, list[SampleKey]] = {}
        for key, family_name in families.items():
            extra_by_family.setdefault(family_name, []).append(key)
        for family in self._registry.collect():
            keys = extra_by_family.get(family.name)
            if keys and family.name not in NOT_SUMMED:
                family.samples = list(_merged(family.samples, keys, values))
            yield family


def _merged(
    own: Iterable[Sample], keys: list[SampleKey], values: dict[SampleKey, float]
) -> Iterator[Sample]:
    added = set()
    for sample in own:
        key = _key(sample.name, sample.labels)
        if key in values:
            added.add(key)
            yield sample._replace(value=sample.value + values[key])
        else:
            yield sample
    # Label sets only acceptors have seen (a refusal reason this process never met), in the
    # acceptor's order (a histogram's buckets stay ascending).
    for key in keys:
        if key not in added:
            name, labels = key
            yield Sample(name, dict(labels), values[key])
