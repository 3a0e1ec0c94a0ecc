"""Reading a process's memory from /proc (Linux), for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path


def status_kib(pid: int, field_name: str = "VmRSS") -> int | None:
    """A /proc/<pid>/status field in KiB (VmRSS: resident now, VmHWM: peak resident), or None
    when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None
