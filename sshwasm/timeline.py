"""The HTML timeline of `sshwasm report --html`: one self-contained page, no network.

Hand-written SVG rather than a plotting library: the page must open from disk with nothing
fetched, and a library's offline bundle (Plotly: ~3.5 MB of JavaScript per page) would
outweigh the data many times over; three simple charts (lanes of bars, step lines, a
histogram) are a few dozen lines each, and plain SVG elements are what a test can check in
the rendered DOM. The only script is a fixed one that shows a clicked bar's details with
`textContent`.

Every user-controlled string (job names, hosts, errors) goes through `html.escape`, in
text and in attributes alike, so a job name cannot add markup or script to the page.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from .report import format_bytes, format_ratio, group_efficiency
from .states import JobState
from .store import Job

# One colour per state; the test reads these back from the rendered page.
STATE_COLOURS: dict[JobState, str] = {
    JobState.QUEUED: "#90a4ae",
    JobState.RUNNING: "#1e88e5",
    JobState.SUCCEEDED: "#43a047",
    JobState.FAILED: "#e53935",
    JobState.TIMEOUT: "#fb8c00",
    JobState.OUT_OF_MEMORY: "#8e24aa",
    JobState.CANCELLED: "#757575",
    JobState.LOST: "#4e342e",
}

WIDTH = 1000  # the charts' drawing width, in SVG units
LEFT = 140  # room for host names
LANE_HEIGHT = 28
ROW_HEIGHT = 8  # a bar's height when jobs overlap in a lane and are stacked
AXIS_HEIGHT = 24
UTIL_HEIGHT = 48
HIST_HEIGHT = 160


@dataclass(frozen=True)
class Bar:
    """One job drawn: where, when (seconds from the page's start) and in which row."""

    job: Job
    host: str
    start: float
    end: float
    row: int


def _ts(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        moment = datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _label(job: Job) -> str:
    name = job.name or ""
    return f"{name}[{job.array_task}]" if job.array_task is not None else name


def _lanes(jobs: Sequence[Job], now: float) -> tuple[list[str], list[Bar], float, float]:
    """Hosts in order, the bars (stacked into rows where jobs overlap), and the time span."""
    spans: list[tuple[Job, str, float, float]] = []
    for job in jobs:
        start = _ts(job.started_at)
        if start is None or not job.host:
            continue
        end = _ts(job.finished_at)
        if end is None:
            end = now if not job.is_final else start + (job.run_s or 0.0)
        spans.append((job, job.host, start, max(end, start)))
    if not spans:
        return [], [], now, now
    origin = min(span[2] for span in spans)
    last = max(span[3] for span in spans)
    hosts = sorted({span[1] for span in spans})
    bars: list[Bar] = []
    for host in hosts:
        row_ends: list[float] = []  # per row, when its last bar ends
        for job, _, start, end in sorted((s for s in spans if s[1] == host), key=lambda s: s[2]):
            row = next((i for i, ends in enumerate(row_ends) if ends <= start), len(row_ends))
            if row == len(row_ends):
                row_ends.append(end)
            else:
                row_ends[row] = end
            bars.append(Bar(job, host, start - origin, end - origin, row))
    return hosts, bars, origin, last


# Axis steps people read at a glance: fractions of a second, then whole seconds, minutes,
# hours and days.
_STEPS = (
    *(m * 10.0**e for e in range(-3, 0) for m in (1, 2, 5)),
    *(1, 2, 5, 10, 15, 30),
    *(60 * m for m in (1, 2, 5, 10, 15, 30)),
    *(3600 * m for m in (1, 2, 3, 6, 12)),
)


def _tick_step(span: float) -> float:
    """A round step giving at most about 8 ticks over `span` seconds."""
    wanted = max(span, 1e-3) / 8
    for step in _STEPS:
        if step >= wanted:
            return float(step)
    return 86400.0 * math.ceil(wanted / 86400)


def _duration(seconds: float, step: float) -> str:
    """An axis label in the unit that suits the axis's step: 250ms, 45s, 5m, 6h, 2d."""
    if seconds == 0:
        return "0"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if step >= size:
            return f"{round(seconds / size, 3):g}{unit}"
    return f"{round(seconds * 1000, 3):g}ms" if step < 0.1 else f"{round(seconds, 3):g}s"


def _axis(span: float, y: float, scale: float) -> list[str]:
    step = _tick_step(span)
    parts = [f'<line x1="{LEFT}" y1="{y}" x2="{WIDTH}" y2="{y}" stroke="#999"/>']
    count = 0
    while (tick := count * step) <= span + 1e-9:
        count += 1
        x = LEFT + tick * scale
        parts.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 4}" stroke="#999"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{y + 16}" text-anchor="middle" class="tick">'
            f"{_duration(tick, step)}</text>"
        )
    return parts


def _timeline_svg(hosts: list[str], bars: list[Bar], span: float) -> str:
    scale = (WIDTH - LEFT - 10) / max(span, 1e-3)
    rows = {host: 1 + max((b.row for b in bars if b.host == host), default=0) for host in hosts}
    parts: list[str] = []
    y = 0.0
    for index, host in enumerate(hosts):
        height = float(max(LANE_HEIGHT, rows[host] * ROW_HEIGHT + 8))
        bar_height = (height - 8) / rows[host]
        parts.append(f'<g class="lane" data-host="{_esc(host)}">')
        fill = "#f5f5f5" if index % 2 == 0 else "#ffffff"
        parts.append(f'<rect x="0" y="{y:.1f}" width="{WIDTH}" height="{height}" fill="{fill}"/>')
        parts.append(f'<text x="6" y="{y + height / 2 + 4:.1f}" class="host">{_esc(host)}</text>')
        for bar in (b for b in bars if b.host == host):
            job = bar.job
            x = LEFT + bar.start * scale
            width = max((bar.end - bar.start) * scale, 1.5)
            top = y + 4 + bar.row * bar_height
            colour = STATE_COLOURS[job.state]
            tooltip = (
                f"job {job.id} {_label(job)}\nhost {job.host}\nstate {job.state}"
                f"\nexit code {'-' if job.exit_code is None else job.exit_code}"
                f"\nrun {_seconds(job.run_s)}, cpu {_seconds(job.cpu_s)}"
                f"\npeak memory {format_bytes(job.peak_memory_bytes)}"
            )
            if job.error:
                tooltip += f"\n{job.error}"
            parts.append(
                f'<rect class="job" x="{x:.2f}" y="{top:.2f}" width="{width:.2f}" '
                f'height="{max(bar_height - 1, 1):.2f}" fill="{colour}" '
                f'data-id="{job.id}" data-name="{_esc(_label(job))}" '
                f'data-host="{_esc(job.host)}" data-state="{_esc(job.state.value)}" '
                f'data-exit="{_esc("-" if job.exit_code is None else job.exit_code)}" '
                f'data-run="{_esc(_seconds(job.run_s))}" data-cpu="{_esc(_seconds(job.cpu_s))}" '
                f'data-peak="{_esc(format_bytes(job.peak_memory_bytes))}" '
                f'data-error="{_esc(job.error or "")}">'
                f"<title>{_esc(tooltip)}</title></rect>"
            )
        parts.append("</g>")
        y += height
    parts.extend(_axis(span, y, scale))
    total = y + AXIS_HEIGHT
    return (
        f'<svg id="timeline" viewBox="0 0 {WIDTH} {total:.0f}" width="{WIDTH}" '
        f'height="{total:.0f}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'
    )


def _utilisation_svg(
    hosts: list[str], bars: list[Bar], span: float, declared: Mapping[str, int]
) -> str:
    """Per host, cpus reserved by these jobs over cpus declared, as a step line (other jobs
    on the same host are not counted: the page is about these)."""
    scale = (WIDTH - LEFT - 10) / max(span, 1e-3)
    parts: list[str] = []
    y = 0.0
    for host in hosts:
        capacity = declared.get(host)
        events: dict[float, int] = {}
        for bar in (b for b in bars if b.host == host):
            events[bar.start] = events.get(bar.start, 0) + bar.job.cpus
            events[bar.end] = events.get(bar.end, 0) - bar.job.cpus
        reserved = 0
        peak = 0
        points = [f"{LEFT},{y + UTIL_HEIGHT:.1f}"]
        level = y + UTIL_HEIGHT
        for moment in sorted(events):
            x = LEFT + moment * scale
            points.append(f"{x:.1f},{level:.1f}")
            reserved += events[moment]
            peak = max(peak, reserved)
            share = reserved / capacity if capacity else 0.0
            level = y + UTIL_HEIGHT - min(share, 1.0) * (UTIL_HEIGHT - 6)
            points.append(f"{x:.1f},{level:.1f}")
        points.append(f"{WIDTH - 10},{level:.1f}")
        what = f"of {capacity} cpus" if capacity else "cpus (capacity unknown)"
        parts.append(f'<g class="utilisation" data-host="{_esc(host)}">')
        parts.append(f'<text x="6" y="{y + UTIL_HEIGHT / 2:.1f}" class="host">{_esc(host)}</text>')
        parts.append(
            f'<text x="6" y="{y + UTIL_HEIGHT / 2 + 14:.1f}" class="tick">'
            f"peak {peak} {_esc(what)}</text>"
        )
        parts.append(
            f'<line x1="{LEFT}" y1="{y + 6}" x2="{WIDTH - 10}" y2="{y + 6}" stroke="#ddd" '
            f'stroke-dasharray="4 3"/>'
        )
        parts.append(
            f'<polyline fill="none" stroke="#1e88e5" stroke-width="1.5" '
            f'points="{" ".join(points)}"/>'
        )
        parts.append("</g>")
        y += UTIL_HEIGHT + 8
    parts.extend(_axis(span, y, scale))
    height = y + AXIS_HEIGHT
    return (
        f'<svg id="utilisation" viewBox="0 0 {WIDTH} {height:.0f}" width="{WIDTH}" '
        f'height="{height:.0f}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'
    )


def _histogram_svg(jobs: Sequence[Job]) -> str:
    """Run times of the measured jobs, in about 1 + log2(n) bins (Sturges)."""
    times = [float(job.run_s) for job in jobs if isinstance(job.run_s, (int, float))]
    if not times:
        return '<p class="empty">No job has a run time yet.</p>'
    low, high = min(times), max(times)
    bins = max(1, min(40, math.ceil(1 + math.log2(len(times)))))
    width = (high - low) / bins or 1.0
    counts = [0] * bins
    for value in times:
        counts[min(int((value - low) / width), bins - 1)] += 1
    top = max(counts)
    slot = (WIDTH - LEFT - 10) / bins
    parts: list[str] = []
    for index, count in enumerate(counts):
        height = (HIST_HEIGHT - 10) * count / top
        x = LEFT + index * slot
        lo, hi = low + index * width, low + (index + 1) * width
        parts.append(
            f'<rect class="bin" x="{x + 1:.1f}" y="{HIST_HEIGHT - height:.1f}" '
            f'width="{max(slot - 2, 1):.1f}" height="{height:.1f}" fill="#5c6bc0" '
            f'data-count="{count}"><title>{lo:.2f}-{hi:.2f} s: {count} jobs</title></rect>'
        )
        if count:
            parts.append(
                f'<text x="{x + slot / 2:.1f}" y="{HIST_HEIGHT - height - 2:.1f}" '
                f'text-anchor="middle" class="tick">{count}</text>'
            )
    for index in range(bins + 1):
        if bins > 10 and index % math.ceil(bins / 10):
            continue
        x = LEFT + index * slot
        anchor = "end" if index == bins else "middle"  # the last label stays on the page
        parts.append(
            f'<text x="{x:.1f}" y="{HIST_HEIGHT + 16}" text-anchor="{anchor}" class="tick">'
            f"{low + index * width:.3g}s</text>"
        )
    parts.append(
        f'<line x1="{LEFT}" y1="{HIST_HEIGHT}" x2="{WIDTH - 10}" y2="{HIST_HEIGHT}" '
        f'stroke="#999"/><text x="6" y="{HIST_HEIGHT / 2}" class="host">jobs per run time</text>'
    )
    height = HIST_HEIGHT + AXIS_HEIGHT
    return (
        f'<svg id="histogram" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'
    )


_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
svg text.host { font: 12px system-ui, sans-serif; fill: #222; }
svg text.tick { font: 10px system-ui, sans-serif; fill: #666; }
rect.job { cursor: pointer; } rect.job:hover { stroke: #000; stroke-width: 1; }
.legend span { display: inline-block; margin-right: 1em; }
.legend i { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.3em;
  vertical-align: -0.1em; }
#details { white-space: pre-wrap; background: #f5f5f5; padding: 0.6em; min-height: 1.2em;
  font-family: ui-monospace, monospace; }
table.summary td { padding: 0 1em 0 0; }
"""

# Fixed code: shows a clicked bar's data-* attributes as text (never as markup).
_SCRIPT = """
document.getElementById("timeline").addEventListener("click", function (event) {
  var bar = event.target.closest("rect.job");
  if (!bar) { return; }
  var d = bar.dataset;
  var lines = ["job " + d.id + " " + d.name, "host " + d.host, "state " + d.state,
    "exit code " + d.exit, "run " + d.run + ", cpu " + d.cpu, "peak memory " + d.peak];
  if (d.error) { lines.push("error " + d.error); }
  document.getElementById("details").textContent = lines.join("\\n");
});
"""

# The page's policy lets only this very script run: markup that escaping missed could not.
_SCRIPT_HASH = "sha256-" + base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()

_POLICY = f"default-src 'none'; style-src 'unsafe-inline'; script-src '{_SCRIPT_HASH}'"


def render(
    jobs: Sequence[Job], title: str, declared: Mapping[str, int], now: float | None = None
) -> str:
    """The page for `jobs`. `declared`: cpus per host name, from the cluster file, used for
    hosts whose jobs carry no snapshot of their host's settings."""
    now = datetime.now(timezone.utc).timestamp() if now is None else now
    capacity = dict(declared)
    for job in jobs:
        snapshot = job.host_snapshot if job.host and job.host_config else None
        if snapshot is not None and job.host:
            capacity[job.host] = snapshot.cpus  # what the host declared when the job ran
    hosts, bars, origin, last = _lanes(jobs, now)
    span = last - origin
    states: dict[str, int] = {}
    for job in jobs:
        states[job.state.value] = states.get(job.state.value, 0) + 1
    figures = group_efficiency(jobs)
    undrawn = len(jobs) - len(bars)
    started = (
        datetime.fromtimestamp(origin, timezone.utc).isoformat(timespec="seconds") if bars else "-"
    )
    summary = [
        ("jobs", f"{len(jobs)} ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))})"),
        ("hosts", ", ".join(hosts) or "-"),
        ("first start (UTC)", started),
        ("span", _seconds(span if bars else None)),
        ("run time, summed", _seconds(figures.run_s)),
        ("cpu time, summed", _seconds(figures.cpu_s)),
        ("cpu efficiency", format_ratio(figures.cpu_efficiency)),
        ("largest peak memory", format_bytes(figures.peak_memory_bytes)),
        ("memory efficiency", format_ratio(figures.memory_efficiency)),
    ]
    if undrawn:
        summary.append(("not drawn", f"{undrawn} jobs that never started"))
    if figures.advice:
        summary.append(("advice", figures.advice))
    rows = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in summary)
    legend = "".join(
        f'<span><i style="background:{colour}"></i>{state.value}</span>'
        for state, colour in STATE_COLOURS.items()
    )
    if bars:
        timeline = _timeline_svg(hosts, bars, span)
        utilisation = _utilisation_svg(hosts, bars, span, capacity)
    else:
        timeline = '<svg id="timeline" width="0" height="0"></svg><p>No job has started.</p>'
        utilisation = "<p>No job has started.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_POLICY}">
<title>{_esc(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{_esc(title)}</h1>
<table class="summary">{rows}</table>
<h2>Timeline: one lane per host, one bar per job</h2>
<p class="legend">{legend}</p>
{timeline}
<p>Click a bar for its details (hover shows them too):</p>
<div id="details"></div>
<h2>Host utilisation: cpus reserved over cpus declared</h2>
{utilisation}
<h2>Run times</h2>
{_histogram_svg(jobs)}
<script>{_SCRIPT}</script>
</body></html>
"""
