#!/usr/bin/env python3
"""SIGKILL the relay many times under load and check the promise (reliability case 18).

The suite's crash test (tests/e2e/test_crash.py) runs 20 cycles; this runs as many as asked,
with the same code (tests/support/crash.py), and prints the counts: acknowledged, refused,
delivered, duplicate copies, and messages the relay logged as possible duplicates.
Exit status 1 if the promise was broken.

    .venv/bin/python bench/crash_cycles.py --cycles 200 [--seed N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# Run as `python bench/crash_cycles.py`, so the repository root is not on sys.path yet.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.crash import run_crash_cycles  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cycles", type=int, default=200, help="SIGKILLs (200)")
    parser.add_argument("--seed", type=int, default=20261127, help="when to kill (20261127)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mailrelay-crash-") as tmp:
        report = run_crash_cycles(Path(tmp), args.cycles, args.seed)
    print(f"{report.summary()} in {time.monotonic() - started:.0f} s")
    problems = report.problems()
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
