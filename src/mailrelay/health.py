"""The relay's health, decided from a monitor reading and the alerts firing.

- failing (HTTP 503): no mail can get through. Every provider of the default chain is down
  (its breaker open or probing), mail is refused for want of disk space, or the relay is not
  accepting mail (starting or stopping). A supervisor or load balancer should act.
- degraded (200): mail flows, but something needs a look: a provider down with others
  carrying its traffic, or an alert firing (backlog, oldest message, disk low).
- ok (200): none of these.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import attrs

from mailrelay import __version__
from mailrelay.alerts.rules import ActiveAlert
from mailrelay.monitor import Reading

Status = Literal["ok", "degraded", "failing"]


@attrs.frozen
class Health:
    status: Status
    reasons: tuple[str, ...]

    @property
    def http_code(self) -> int:
        return 503 if self.status == "failing" else 200


def refusing_for_disk(free_bytes: int | None, min_free_space: int) -> bool:
    """Is new mail refused (452 4.3.1) for want of space? (diskspace.FreeSpace's rule)"""
    return min_free_space > 0 and free_bytes is not None and free_bytes < min_free_space


def assess(reading: Reading, min_free_space: int, alerts: Sequence[ActiveAlert]) -> Health:
    failing: list[str] = []
    degraded: list[str] = []
    default_chain = [p for p in reading.providers if p.in_default_chain]
    if default_chain and all(p.down for p in default_chain):
        failing.append(
            "every provider of the default chain is down: "
            + ", ".join(f"{p.name} ({p.state})" for p in default_chain)
        )
    else:
        degraded.extend(
            f"provider {p.name} is down ({p.state})" for p in reading.providers if p.down
        )
    if refusing_for_disk(reading.free_bytes, min_free_space):
        failing.append(
            f"{reading.free_bytes} bytes free on the spool's filesystem, below"
            f" spool.min_free_space ({min_free_space}): new mail is refused"
        )
    if not reading.accepting:
        failing.append("not accepting mail (starting or stopping)")
    if not reading.delivering:
        failing.append(
            "the delivery queue is not running (starting, stopping, or it failed to start:"
            " see the log)"
        )
    # Provider alerts repeat what the breaker states above already say.
    degraded.extend(a.summary for a in alerts if not a.name.startswith("provider_down:"))
    if failing:
        return Health("failing", tuple(failing + degraded))
    if degraded:
        return Health("degraded", tuple(degraded))
    return Health("ok", ())


def iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def document(
    reading: Reading, health: Health, alerts: Sequence[ActiveAlert], min_free_space: int
) -> dict[str, Any]:
    """The /health JSON."""
    d = reading.depth
    oldest_age = reading.oldest_age
    return {
        "status": health.status,
        "reasons": list(health.reasons),
        "version": __version__,
        "uptime_seconds": round(reading.uptime, 3),
        "accepting": reading.accepting,
        "delivering": reading.delivering,
        "queue": {
            "ready": d.ready,
            "deferred": d.deferred,
            "active": d.active,
            "held": d.held,
            "failed": d.failed,
            "queued": d.queued,
            "oldest_age_seconds": None if oldest_age is None else round(oldest_age, 3),
        },
        "providers": [
            {
                "name": p.name,
                "kind": p.kind,
                "in_default_chain": p.in_default_chain,
                "breaker": p.state,
                "open_connections": p.open_connections,
                "next_probe_at": iso(p.next_probe_at),
                "last_success_at": iso(p.last_success_at),
                "last_error_at": iso(p.last_error_at),
                "last_error_class": p.last_error_class,
                "last_error": p.last_error,
            }
            for p in reading.providers
        ],
        "disk": {"free_bytes": reading.free_bytes, "min_free_space": min_free_space},
        "alerts": [{"alert": a.name, "since": iso(a.since), "summary": a.summary} for a in alerts],
    }
