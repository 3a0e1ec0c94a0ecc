"""End to end: the status page of the real ``twistd`` process, rendered by headless Chromium.

The relay has two providers: ``dead`` (first in the chain, a closed loopback port, with
breaker_threshold = 1, so its breaker opens at once) and ``primary`` (a live aiosmtpd
upstream that answers 451 to every recipient starting with ``later``, so those messages stay
deferred). The page Chromium renders must show both providers in their states and a queue
chart whose series carry the live counts. A screenshot is kept at
/tmp/mailrelay-status-page.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import smtplib
import struct
import subprocess
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest

from tests.support.net import free_port, wait_until
from tests.support.relay import RelayProcess, relay_config
from tests.support.upstream import UpstreamProcess

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium")
SCREENSHOT_COPY = Path("/tmp/mailrelay-status-page.png")
DEFERRED = 2  # messages to "later..." recipients, deferred by the upstream's 451


def config(workdir: Path, smtp_port: int, http_port: int, upstream_port: int) -> str:
    base = relay_config(
        workdir / "spool", smtp_port, http_port, None, retry_initial=600, retry_max=3600
    )
    provider = """
[[providers]]
name = "{name}"
kind = "smtp"
host = "127.0.0.1"
port = {port}
tls = "none"
connect_timeout = 2
breaker_threshold = 1
breaker_cooldown = 300
"""
    return (
        base
        + provider.format(name="dead", port=free_port())  # nothing listens there
        + provider.format(name="primary", port=upstream_port)
        + '[routing]\ndefault = ["dead", "primary"]\n'
        + "[alerts]\ncheck_interval = 0.2\n"
    )


def send(port: int, recipient: str, subject: str) -> None:
    data = f"From: app@example.com\r\nTo: {recipient}\r\nSubject: {subject}\r\n\r\nhi\r\n"
    with smtplib.SMTP("127.0.0.1", port, local_hostname="tester", timeout=30) as client:
        assert client.sendmail("app@example.com", [recipient], data) == {}


def http_get(port: int, path: str) -> bytes:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as error:  # /health is 503 while failing: still a body
        body = error.read()
    return body


def chromium(home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={home / 'profile'}",
        *args,
    ]
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run(command, capture_output=True, timeout=60, env=env, check=True, cwd=home)


def element(dom: str, tag: str, attribute: str, value: str) -> str:
    match = re.search(
        rf'<{tag}\b[^>]*\s{attribute}="{re.escape(value)}"[^>]*>.*?</{tag}>', dom, re.S
    )
    assert match is not None, f"no <{tag} {attribute}={value!r}> in the rendered DOM"
    return match.group(0)


def png_pixels(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """Width, height, bytes per pixel and rows of RGB(A) pixels of an 8-bit, non-interlaced
    PNG (what Chromium writes), with the scanline filters undone."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, chunk = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        header = chunk if kind == b"IHDR" else header
        idat += chunk if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, "an unexpected PNG format"
    bpp = 4 if colour == 6 else 3
    raw, stride, rows = zlib.decompress(idat), width * bpp, []
    previous = bytearray(stride)
    for y in range(height):
        kind, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = previous[i], previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, bpp, rows


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: chromium)")
def test_status_page_renders_live_providers_and_queue_chart_in_chromium(tmp_path: Path) -> None:
    browser_home = tmp_path / "browser"
    browser_home.mkdir()
    with UpstreamProcess(tmp_path / "upstream", rcpt_4xx_prefix="later") as upstream:
        smtp_port, http_port = free_port(), free_port()
        text = config(tmp_path, smtp_port, http_port, upstream.port)
        with RelayProcess(tmp_path, text, smtp_port, http_port) as relay:
            send(smtp_port, "first@example.com", "delivered")
            for i in range(DEFERRED):
                send(smtp_port, f"later{i}@example.com", "deferred by the upstream")
            send(smtp_port, "second@example.com", "delivered")
            upstream.wait_for_messages(2, timeout=15)

            def settled() -> bool:
                health = json.loads(http_get(http_port, "/health"))
                breakers = {p["name"]: p["breaker"] for p in health["providers"]}
                return (
                    breakers == {"dead": "open", "primary": "closed"}
                    and health["queue"]["deferred"] == DEFERRED
                    and health["uptime_seconds"] >= 1.5  # several chart samples, 0.2 s apart
                )

            wait_until(settled, timeout=15, what="dead breaker open, 2 messages deferred")
            # The chart's newest sample shows the deferred messages too (the next tick).
            wait_until(
                lambda: (
                    f'data-series="deferred" data-latest="{DEFERRED}"'
                    in http_get(http_port, "/").decode()
                ),
                timeout=5,
                what="the chart's latest sample",
            )
            url = f"http://127.0.0.1:{relay.http_port}/"
            dom = chromium(browser_home, "--dump-dom", url).stdout.decode()
            shot = browser_home / "status.png"
            chromium(browser_home, f"--screenshot={shot}", "--window-size=1280,1000", url)
    shutil.copyfile(shot, SCREENSHOT_COPY)  # for a human to look at, pass or fail

    assert "<script" not in dom
    dead = element(dom, "tr", "data-provider", "dead")
    assert 'data-state="open"' in dead and ">open<" in dead
    # Why its breaker opened: the refused connection, not the skips that followed.
    assert '<span class="errclass">connect</span>' in dead
    primary = element(dom, "tr", "data-provider", "primary")
    assert 'data-state="closed"' in primary and ">closed<" in primary
    assert "ago" in primary  # a last success
    chart = element(dom, "svg", "id", "queue-chart")
    for name in ("ready", "deferred", "active", "held"):
        group = element(chart, "g", "data-series", name)
        assert "<path d=" in group, f"the {name} series has no area"
    assert 'data-latest="2"' in element(chart, "g", "data-series", "deferred")
    assert "collecting data" not in chart
    assert f'data-value="{DEFERRED}"' in element(dom, "div", "id", "count-deferred")
    failures = element(dom, "table", "id", "failures")
    assert "later0@example.com" in failures and "451" in failures  # the upstream's reply
    # Recipients that merely skipped the open breaker are not failures of their own.
    assert "<td>dead</td>" not in failures
    assert 'data-status="degraded"' in element(dom, "span", "id", "health")

    png = shot.read_bytes()
    width, height, bpp, rows = png_pixels(png)
    assert (width, height) == (1280, 1000)
    colours = {row[i : i + 3] for row in rows[::2] for i in range(0, len(row), 2 * bpp)}
    assert len(colours) > 50, "the screenshot is (nearly) blank"
