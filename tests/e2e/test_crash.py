"""The promise under SIGKILL (reliability case 18): every message that got a 250 arrives;
none that got a 4xx/5xx does; a message arrives twice only where the relay logged a possible
duplicate (the journal had not recorded the upstream's 250 when the relay died).

20 cycles here, bounded in time; bench/crash_cycles.py runs as many as you ask for.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.crash import run_crash_cycles

pytestmark = pytest.mark.e2e

CYCLES = 20


def test_acknowledged_mail_survives_repeated_sigkill(tmp_path: Path) -> None:
    report = run_crash_cycles(tmp_path, CYCLES)
    print(f"\ncrash test: {report.summary()}")
    assert report.problems() == []
    # Duplicates come only from the window SMTP cannot close: at most the pool's connections
    # (4) per kill.
    assert report.duplicates <= CYCLES * 4
