"""Numbers for people: ages, sizes and times, as the queue CLI, alerts and status page show them."""

from __future__ import annotations

import time


def age(seconds: float) -> str:
    """A short age: 45s, 12m, 3h05m, 2d04h."""
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def size(n: float) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 200.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def utc(at: float) -> str:
    """2026-11-27 11:32:05 UTC"""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))
