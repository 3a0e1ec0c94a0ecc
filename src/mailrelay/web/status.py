"""The status page at /: one self-contained HTML document, rendered on the server.

No JavaScript and nothing loaded from elsewhere (the resource's CSP forbids both): the queue
chart is inline SVG, the page refreshes itself with ``<meta http-equiv="refresh">``. Every
value that comes from data (host names, provider replies, recipients, queue IDs) is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence

import attrs

from mailrelay import __version__
from mailrelay.alerts.rules import ActiveAlert
from mailrelay.health import Health
from mailrelay.humanize import age, size, utc
from mailrelay.monitor import ProviderHealth, QueueSample, Reading
from mailrelay.outbound.activity import FailedRecipient
from mailrelay.queue import QueuedMessage

# Reply texts longer than this are cut for display; the full text is in a title attribute.
CLIP = 200
# The chart draws at most this many points per series (an hour at 0.2 s is 18 000 samples).
MAX_POINTS = 360
SERIES = ("ready", "deferred", "active", "held")  # stacked bottom to top

# SVG geometry (viewBox units): the plot area sits inside these margins.
_W, _H = 1000, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 40, 30


@attrs.frozen
class StatusView:
    """Everything the page shows, read once per request."""

    reading: Reading
    health: Health
    alerts: tuple[ActiveAlert, ...]
    history: tuple[QueueSample, ...]  # oldest first, one per monitor interval, up to an hour
    failures: tuple[FailedRecipient, ...]  # newest first
    oldest: tuple[QueuedMessage, ...]  # oldest first
    hostname: str
    refresh_seconds: int


def render_status_page(view: StatusView) -> bytes:
    r = view.reading
    host = _e(view.hostname)
    body = "\n".join(
        [
            _header(view),
            _queue_now(r),
            '<section><h2>Queue depth, last hour</h2><div class="chart">',
            queue_chart(view.history, r.at),
            "</div></section>",
            _section("Providers", providers_table(r.providers, r.at)),
            _section("Active alerts", _alerts(view.alerts, r.at)),
            _section("Recent failures", failures_table(view.failures, r.at)),
            _section("Oldest messages", oldest_table(view.oldest, r.at)),
            f"<footer>mailrelay {_e(__version__)} on {host} · refreshes every"
            f" {int(view.refresh_seconds)}s</footer>",
        ]
    )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="refresh" content="{int(view.refresh_seconds)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>mailrelay · {host}</title>\n<style>{_CSS}</style></head>\n"
        f"<body><main>\n{body}\n</main></body></html>\n"
    )
    return page.encode("utf-8")


# -- formatting ----------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _n(value: int) -> str:
    """A count with thin spaces between thousands: 100 000."""
    return f"{value:,}".replace(",", "\u202f")


def _when(at: float | None, now: float) -> str:
    """'2024-05-01 12:00:00 UTC, 12s ago', or a dash."""
    if at is None:
        return '<span class="muted">never</span>'
    delta = now - at
    rel = f"{age(delta)} ago" if delta >= 0 else f"in {age(-delta)}"
    return f'<time title="{utc(at)}">{_e(rel)}</time> <small>{utc(at)}</small>'


def _clip(text: str | None, limit: int = CLIP) -> str:
    if not text:
        return '<span class="muted">–</span>'
    if len(text) <= limit:
        return f'<span class="reply">{_e(text)}</span>'
    return f'<span class="reply" title="{_e(text)}">{_e(text[:limit])}…</span>'


def _section(title: str, content: str) -> str:
    return f"<section><h2>{_e(title)}</h2>\n{content}\n</section>"


def _table(table_id: str, headers: Sequence[str], rows: Iterable[str], empty: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "\n".join(rows) or (
        f'<tr class="empty"><td colspan="{len(headers)}">{_e(empty)}</td></tr>'
    )
    return (
        f'<div class="scroll"><table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>\n{body}\n</tbody></table></div>"
    )


# -- page parts ----------------------------------------------------------------------------


def _header(view: StatusView) -> str:
    r, h = view.reading, view.health
    reasons = "".join(f"<li>{_e(reason)}</li>" for reason in h.reasons)
    accepting = "accepting mail" if r.accepting else "NOT accepting mail"
    return (
        f'<header><h1>mailrelay <span class="host">{_e(view.hostname)}</span></h1>\n'
        f'<p class="meta"><span id="health" class="badge status-{_e(h.status)}"'
        f' data-status="{_e(h.status)}">{_e(h.status.upper())}</span>'
        f" version {_e(__version__)} · up {age(r.uptime)} · {accepting}"
        f' · reading at <time id="reading-at">{utc(r.at)}</time></p>\n'
        + (f'<ul class="reasons" id="reasons">{reasons}</ul>' if reasons else "")
        + "</header>"
    )


def _queue_now(r: Reading) -> str:
    d = r.depth
    counts = [
        ("ready", d.ready),
        ("deferred", d.deferred),
        ("active", d.active),
        ("held", d.held),
        ("failed", d.failed),
    ]
    stats = [
        f'<div class="stat" id="count-{name}" data-value="{value}">'
        f'<span class="n">{_n(value)}</span><span class="label">{name}</span></div>'
        for name, value in counts
    ]
    oldest = r.oldest_age
    stats.append(
        '<div class="stat" id="oldest-age"'
        f' data-value="{"" if oldest is None else round(oldest, 3)}">'
        f'<span class="n">{"–" if oldest is None else age(oldest)}</span>'
        '<span class="label">oldest age</span></div>'
    )
    if r.free_bytes is not None:
        stats.append(
            f'<div class="stat" id="disk-free" data-value="{r.free_bytes}">'
            f'<span class="n">{size(r.free_bytes)}</span><span class="label">disk free</span></div>'
        )
    return _section("Queue now", f'<div class="stats">{"".join(stats)}</div>')


def providers_table(providers: Sequence[ProviderHealth], now: float) -> str:
    rows = []
    for p in providers:
        if p.state == "open" and p.next_probe_at is not None:
            probe = _when(p.next_probe_at, now)
        elif p.state == "half-open":
            probe = "probing now"
        else:
            probe = '<span class="muted">–</span>'
        if p.last_error_class is None and p.last_error is None:
            error = '<span class="muted">none</span>'
        else:
            error = (
                f'<span class="errclass">{_e(p.last_error_class or "error")}</span> '
                f"{_clip(p.last_error)}<br>{_when(p.last_error_at, now)}"
            )
        rows.append(
            f'<tr data-provider="{_e(p.name)}" data-state="{_e(p.state)}">'
            f'<td class="name">{_e(p.name)}</td><td>{_e(p.kind)}</td>'
            f"<td>{'yes' if p.in_default_chain else 'no'}</td>"
            f'<td><span class="badge state-{_e(p.state)}">{_e(p.state)}</span></td>'
            f'<td class="num">{_n(p.open_connections)}</td><td>{probe}</td>'
            f"<td>{_when(p.last_success_at, now)}</td><td>{error}</td></tr>"
        )
    headers = ("Provider", "Kind", "Default chain", "Breaker", "Connections", "Next probe")
    return _table(
        "providers", (*headers, "Last success", "Last error"), rows, "No provider configured"
    )


def _alerts(alerts: Sequence[ActiveAlert], now: float) -> str:
    if not alerts:
        return '<ul id="alerts" class="alerts"><li class="empty">No alert firing.</li></ul>'
    items = "".join(
        f'<li data-alert="{_e(a.name)}"><strong>{_e(a.name)}</strong> {_e(a.summary)}'
        f" <small>since {_when(a.since, now)}</small></li>"
        for a in alerts
    )
    return f'<ul id="alerts" class="alerts firing">{items}</ul>'


def failures_table(failures: Sequence[FailedRecipient], now: float) -> str:
    rows = [
        f'<tr data-queue-id="{_e(f.queue_id)}"><td>{_when(f.at, now)}</td>'
        f'<td class="mono">{_e(f.queue_id)}</td><td>{_e(f.recipient)}</td>'
        f"<td>{_e(f.provider)}</td>"
        f'<td><span class="badge {"perm" if f.permanent else "temp"}">'
        f"{'permanent' if f.permanent else 'temporary'}</span></td>"
        f"<td>{_e(f.failure or '–')}</td><td>{_clip(f.reply)}</td></tr>"
        for f in failures
    ]
    headers = ("Time", "Queue ID", "Recipient", "Provider", "Outcome", "Class", "Reply")
    return _table("failures", headers, rows, "No recent failures.")


def oldest_table(messages: Sequence[QueuedMessage], now: float) -> str:
    rows = [
        f'<tr data-queue-id="{_e(m.queue_id)}"><td class="mono">{_e(m.queue_id)}</td>'
        f"<td>{age(now - m.received_at)} <small>{utc(m.received_at)}</small></td>"
        f"<td>{_e(m.state)}</td>"
        f"<td>{_when(m.next_attempt, now) if m.next_attempt is not None else '–'}</td></tr>"
        for m in messages
    ]
    headers = ("Queue ID", "Age", "State", "Next attempt")
    return _table("oldest", headers, rows, "The queue is empty.")


# -- the chart -------------------------------------------------------------------------------


def nice_ticks(maximum: int, intervals: int = 4) -> list[int]:
    """Round y ticks from 0 up to at least ``maximum`` (and 4): steps of 1, 2, 2.5, 5 x 10^k."""
    maximum = max(maximum, intervals)
    raw = maximum / intervals
    power = 10 ** math.floor(math.log10(raw))
    step = next(
        int(m * power) for m in (1, 2, 2.5, 5, 10) if m * power >= raw and m * power % 1 == 0
    )
    top = math.ceil(maximum / step) * step
    return list(range(0, top + 1, step))


def _time_ticks(span: float) -> list[tuple[float, str]]:
    """(seconds ago, label) for the x axis: about five ticks with round steps."""
    steps = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1200, 1800)
    step = next((s for s in steps if span / s <= 6), 1800)
    ticks = []
    for k in range(int(span // step) + 1):
        ago = k * step
        label = "now" if ago == 0 else f"{ago}s ago" if step < 60 else f"{ago // 60} min ago"
        ticks.append((float(ago), label))
    return ticks


def _downsample(samples: Sequence[QueueSample], limit: int) -> list[QueueSample]:
    """At most ``limit`` samples: the busiest one of each bucket, so peaks survive."""
    if len(samples) <= limit:
        return list(samples)
    size = math.ceil(len(samples) / limit)
    picked = [
        max(samples[i : i + size], key=lambda s: s.ready + s.deferred + s.active + s.held)
        for i in range(0, len(samples) - 1, size)
    ]
    return [*picked, samples[-1]]  # the latest value is always drawn as it is


def queue_chart(history: Sequence[QueueSample], now: float) -> str:
    """Stacked areas of ready / deferred / active / held over the last hour, as inline SVG."""
    samples = [s for s in history if now - s.at <= 3600.0]
    latest = samples[-1] if samples else None
    out = [
        f'<svg id="queue-chart" viewBox="0 0 {_W} {_H}" role="img"'
        ' aria-labelledby="queue-chart-title" preserveAspectRatio="xMidYMid meet">',
        '<title id="queue-chart-title">Queue depth over the last hour, by state</title>',
    ]
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    bottom = _TOP + ph
    for i, name in enumerate(SERIES):  # the legend, with the latest value of each series
        lx = _LEFT + i * 150
        shown = _n(getattr(latest, name)) if latest else "–"
        out.append(
            f'<rect class="swatch s-{name}" x="{lx}" y="12" width="12" height="12" rx="2"/>'
            f'<text class="legend" x="{lx + 18}" y="22">{name} {shown}</text>'
        )
    if len(samples) < 2:
        out.append(
            f'<rect class="frame" x="{_LEFT}" y="{_TOP}" width="{pw}" height="{ph}"/>'
            f'<text class="note" x="{_LEFT + pw / 2}" y="{_TOP + ph / 2}"'
            ' text-anchor="middle">collecting data…</text>'
        )
        out.extend(_series_group(name, latest, "") for name in SERIES)
        return "\n".join(out) + "\n</svg>"

    points = _downsample(samples, MAX_POINTS)
    t0 = points[0].at
    # The last sample is at most one monitor interval old: it is the right edge, "now".
    span = max(points[-1].at - t0, 1.0)
    totals = [p.ready + p.deferred + p.active + p.held for p in points]
    ticks = nice_ticks(max(totals))
    top = ticks[-1]

    def xy(at: float, value: float) -> str:
        return f"{_LEFT + pw * (at - t0) / span:.1f},{bottom - ph * value / top:.1f}"

    for tick in ticks:  # y grid and scale
        y = bottom - ph * tick / top
        out.append(
            f'<line class="grid" x1="{_LEFT}" x2="{_LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{_n(tick)}</text>"
        )
    for ago, label in _time_ticks(span):  # x axis, in time before now
        x = _LEFT + pw * (span - ago) / span
        anchor = "end" if ago == 0 else "middle"
        out.append(
            f'<line class="tick" x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + 4}"/>'
            f'<text class="axis" x="{x:.1f}" y="{bottom + 18}" text-anchor="{anchor}">'
            f"{_e(label)}</text>"
        )
    below = [0] * len(points)
    for name in SERIES:
        above = [b + getattr(p, name) for b, p in zip(below, points, strict=True)]
        upper = [xy(p.at, v) for p, v in zip(points, above, strict=True)]
        lower = [xy(p.at, v) for p, v in zip(points, below, strict=True)]
        path = f'<path d="M{" L".join(upper)} L{" L".join(reversed(lower))} Z"/>'
        out.append(_series_group(name, latest, path))
        below = above
    if not any(totals):
        out.append(
            f'<text class="note" x="{_LEFT + pw / 2}" y="{_TOP + ph / 2}"'
            ' text-anchor="middle">no mail queued in this period</text>'
        )
    out.append(
        f'<line class="baseline" x1="{_LEFT}" x2="{_LEFT + pw}" y1="{bottom}" y2="{bottom}"/>'
    )
    return "\n".join(out) + "\n</svg>"


def _series_group(name: str, latest: QueueSample | None, shape: str) -> str:
    value = getattr(latest, name) if latest else 0
    return (
        f'<g class="series s-{name}" data-series="{name}" data-latest="{value}">'
        f"<title>{name}: {_n(value)} now</title>{shape}</g>"
    )


_CSS = """
:root{--bg:#f6f7f9;--fg:#1c2330;--muted:#6b7280;--card:#fff;--line:#e3e6eb;
--ok:#15803d;--warn:#b45309;--bad:#b91c1c;--ready:#2563eb;--deferred:#d97706;
--active:#059669;--held:#7c3aed}
@media (prefers-color-scheme:dark){:root{--bg:#111418;--fg:#e6e8eb;--muted:#9aa3ae;
--card:#1a1f26;--line:#2c333d;--ok:#22c55e;--warn:#f59e0b;--bad:#ef4444;--ready:#60a5fa;
--deferred:#fbbf24;--active:#34d399;--held:#a78bfa}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,
"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1240px;margin:0 auto;padding:16px 20px 32px}
h1{font-size:22px;margin:0 0 4px}h1 .host{color:var(--muted);font-weight:500}
h2{font-size:15px;margin:0 0 10px;text-transform:uppercase;letter-spacing:.04em;
color:var(--muted)}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:14px 16px;margin:14px 0}
.meta{margin:4px 0;color:var(--muted)}.reasons{margin:6px 0 0;padding-left:20px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;
font-weight:600;color:#fff;background:var(--muted)}
.status-ok,.state-closed{background:var(--ok)}.status-degraded,.state-half-open,.temp{
background:var(--warn)}.status-failing,.state-open,.perm{background:var(--bad)}
.stats{display:grid;grid-template-columns:repeat(auto-fit,minmax(120px,1fr));gap:10px}
.stat{border:1px solid var(--line);border-radius:6px;padding:8px 10px}
.stat .n{display:block;font-size:24px;font-weight:600;font-variant-numeric:tabular-nums}
.stat .label{color:var(--muted);font-size:12px}
.chart svg{width:100%;height:auto;display:block}
.scroll{overflow-x:auto}table{width:100%;border-collapse:collapse}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12px;color:var(--muted);font-weight:600}td.num{text-align:right}
td small,.muted,.empty{color:var(--muted)}td small{display:block}
.reply{word-break:break-word}.mono,.name{font-family:ui-monospace,Menlo,Consolas,monospace;
white-space:nowrap}
.errclass{font-weight:600}.alerts{margin:0;padding-left:20px}.alerts.firing li{color:var(--bad)}
footer{color:var(--muted);font-size:12px;text-align:center}
svg text{fill:var(--muted);font-size:12px}svg .legend{fill:var(--fg)}svg .note{font-size:15px}
.grid{stroke:var(--line)}.tick,.baseline{stroke:var(--muted)}.frame{fill:none;stroke:var(--line)}
.series path{stroke-width:1;fill-opacity:.7}
.s-ready{fill:var(--ready);stroke:var(--ready)}.s-deferred{fill:var(--deferred);
stroke:var(--deferred)}.s-active{fill:var(--active);stroke:var(--active)}
.s-held{fill:var(--held);stroke:var(--held)}
"""
