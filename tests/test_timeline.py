"""`sshwasm report --html`: the timeline page, rendered by headless Chromium.

The page is opened from disk (`file://`) by Debian's chromium, which scripts/setup installs;
a missing chromium fails these tests. What is checked is what Chromium laid out and
painted: each bar's box and computed fill, read back by a probe script the test adds to a
copy of the page (the page's own policy lets only its one script run, so the copy's adds
the probe's hash).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from helpers import PROGRAMS, no_traceback, sshwasm

from sshwasm.states import JobState
from sshwasm.store import JobSpec, JobStore
from sshwasm.timeline import STATE_COLOURS, _duration, _tick_step, render

# Runs after the page has been parsed: every bar's box and painted colour, the box of the
# lane it sits in, written as JSON into the DOM that --dump-dom prints.
PROBE = """<script>
(function () {
  var out = [];
  document.querySelectorAll("g.lane").forEach(function (lane) {
    var band = lane.querySelector("rect").getBoundingClientRect();
    lane.querySelectorAll("rect.job").forEach(function (bar) {
      var box = bar.getBoundingClientRect();
      out.push({id: bar.dataset.id, lane: lane.dataset.host, fill: getComputedStyle(bar).fill,
        box: [box.left, box.top, box.right, box.bottom],
        band: [band.left, band.top, band.right, band.bottom]});
    });
  });
  var first = document.querySelector("rect.job");
  if (first) { first.dispatchEvent(new MouseEvent("click", {bubbles: true})); }
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({bars: out, title: document.title,
    details: document.getElementById("details").textContent,
    scripts: document.scripts.length, images: document.images.length});
  document.body.appendChild(pre);
})();
</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("no chromium on PATH: scripts/setup installs Debian's `chromium`")
    return found


def render_in_chromium(page: Path, tmp_path: Path, keep_policy: bool = True) -> dict[str, Any]:
    """Open a probed copy of `page` in headless Chromium; what the probe saw.

    With `keep_policy` the page's Content-Security-Policy stays, extended by the probe's
    hash alone: the page's own script must then pass it as it is. Without, the policy is
    dropped, so that escaping alone must keep a job name's script from running.
    """
    text = page.read_text(encoding="utf-8")
    policy = re.compile(r'(<meta http-equiv="Content-Security-Policy" content="[^"]*)(">)')
    assert len(policy.findall(text)) == 1
    if keep_policy:
        probe_code = PROBE.removeprefix("<script>").removesuffix("</script>")
        digest = base64.b64encode(hashlib.sha256(probe_code.encode()).digest()).decode()
        probed = policy.sub(rf"\1 'sha256-{digest}'\2", text)
    else:
        probed = policy.sub("", text)
    copy = tmp_path / "probed.html"
    copy.write_text(probed.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    result = subprocess.run(
        [
            chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,900",
            "--dump-dom", copy.as_uri(),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert match, result.stdout[-2000:]
    probe: dict[str, Any] = json.loads(html.unescape(match.group(1)))
    return probe


def rgb(colour: str) -> str:
    """`#43a047` as Chromium's computed style writes it: `rgb(67, 160, 71)`."""
    red, green, blue = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({red}, {green}, {blue})"


@pytest.fixture
def cluster(make_cluster: Callable[..., Path]) -> Path:
    return make_cluster({"alpha": (2, 2048), "beta": (2, 2048), "gamma": (2, 2048)})


def test_every_task_is_drawn_in_its_hosts_lane_in_its_states_colour(
    cluster: Path, tmp_path: Path
) -> None:
    run = sshwasm(
        "--cluster", str(cluster), "run", str(PROGRAMS / "report_task.rs"), "--array", "12",
        "--job-name", "lanes", "--env", "REPORT_SLEEP_MS=30", "--quiet", "--", "4",
    )  # fmt: skip
    assert run.returncode == 3, run.stderr  # tasks 1, 5 and 9 fail on purpose
    records = json.loads(sshwasm("jobs", "--json").stdout)
    assert sorted(r["state"] for r in records) == ["failed"] * 3 + ["succeeded"] * 9
    assert len({r["host"] for r in records}) >= 2

    page = tmp_path / "timeline.html"
    made = sshwasm("--cluster", str(cluster), "report", "7", "--html", str(page))
    no_traceback(made)
    assert made.returncode == 0, made.stderr
    assert made.stderr.strip() == f"sshwasm: wrote {page} (12 jobs)"
    assert "http://" not in page.read_text().replace("http://www.w3.org/2000/svg", "")

    probe = render_in_chromium(page, tmp_path)
    bars = {int(bar["id"]): bar for bar in probe["bars"]}
    assert sorted(bars) == sorted(r["id"] for r in records)
    for record in records:
        bar = bars[record["id"]]
        assert bar["lane"] == record["host"]
        assert bar["fill"] == rgb(STATE_COLOURS[JobState(record["state"])])
        left, top, right, bottom = bar["box"]
        band_left, band_top, band_right, band_bottom = bar["band"]
        assert right > left and bottom > top  # painted, not empty
        assert band_top <= top and bottom <= band_bottom  # inside its host's lane
        assert band_left <= left and right <= band_right
    assert probe["scripts"] == 2  # the page's own and the probe
    # A click on a bar (the probe clicks the first) shows its details, as text.
    first = next(r for r in records if r["id"] == int(probe["bars"][0]["id"]))
    assert probe["details"].splitlines()[:3] == [
        f"job {first['id']} lanes[{first['array_task']}]",
        f"host {first['host']}",
        f"state {first['state']}",
    ]


def test_the_pages_policy_allows_its_own_script_and_nothing_else(tmp_path: Path) -> None:
    assert sshwasm("run", str(PROGRAMS / "tiny.rs"), "--quiet").returncode == 0
    page = tmp_path / "page.html"
    assert sshwasm("report", "1", "--html", str(page)).returncode == 0
    text = page.read_text()
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', text)
    assert policy is not None
    (script,) = re.findall(r"<script>(.*?)</script>", text, re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert policy.group(1) == (
        f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"
    )


@pytest.mark.parametrize(
    ("span", "labels"),
    [
        (0.3, ["0", "50ms", "100ms", "150ms", "200ms", "250ms", "300ms"]),
        (4, ["0", "0.5s", "1s", "1.5s", "2s", "2.5s", "3s", "3.5s", "4s"]),
        (300, ["0", "1m", "2m", "3m", "4m", "5m"]),
        (20000, ["0", "1h", "2h", "3h", "4h", "5h"]),
        (600000, ["0", "1d", "2d", "3d", "4d", "5d", "6d"]),
    ],
)
def test_time_axis_labels_read_at_a_glance(span: float, labels: list[str]) -> None:
    step = _tick_step(span)
    assert [_duration(i * step, step) for i in range(int(span / step + 1e-9) + 1)] == labels


def test_a_job_name_cannot_put_script_in_the_page(tmp_path: Path) -> None:
    name = (
        "<img src=x onerror=\"document.title='pwned'\">"
        "<script>document.title='pwned'</script>\"'><svg onload=alert(1)>&amp;"
    )
    run = sshwasm("run", str(PROGRAMS / "tiny.rs"), "--job-name", name, "--quiet")
    assert run.returncode == 0, run.stderr
    page = tmp_path / "page.html"
    made = sshwasm("report", "--html", str(page))
    assert made.returncode == 0, made.stderr
    text = page.read_text()
    assert "<script>document.title" not in text and "<img" not in text
    probe = render_in_chromium(page, tmp_path, keep_policy=False)
    assert probe["title"] == "sshwasm: the last 1 jobs"
    assert probe["scripts"] == 2 and probe["images"] == 0

    found: list[str] = []

    class Names(HTMLParser):
        """The data-name of every bar, as a browser reads the attribute."""

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            values = dict(attrs)
            if tag == "rect" and values.get("class") == "job":
                found.append(values.get("data-name") or "")

    Names().feed(text)
    assert found == [name]  # shown exactly as typed, as text


def test_running_jobs_reach_now_and_unstarted_ones_are_counted(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    spec = JobSpec(
        name="r", cpus=2, memory_mb=64, time_limit_s=None, source="x.rs", language="rust",
        wasm_sha256="0" * 64, wasm_bytes=1, wasm_path="/nonexistent.wasm", compile_s=0.0,
        argv=("x",), env=(), array_size=3,
    )  # fmt: skip
    ids = store.submit_tasks(spec)
    base = [store.get(job_id) for job_id in ids]
    start = "2026-11-30T08:00:00+00:00"
    jobs = [
        dataclasses.replace(
            base[0], state=JobState.SUCCEEDED, host="alpha", started_at=start,
            finished_at="2026-11-30T08:00:10+00:00", run_s=10.0, cpu_s=9.0,
            peak_memory_bytes=1 << 20, exit_code=0,
        ),
        dataclasses.replace(base[1], state=JobState.RUNNING, host="zeta", started_at=start),
        base[2],  # still queued: never started, not drawn
    ]  # fmt: skip
    now = datetime.fromisoformat(start).timestamp() + 40
    page = render(jobs, "t", {"alpha": 4}, now=now)
    bars = re.findall(r'<rect class="job" x="([\d.]+)" y="[\d.]+" width="([\d.]+)"', page)
    (done_x, done_w), (running_x, running_w) = ((float(x), float(w)) for x, w in bars)
    assert done_x == running_x  # both started together
    assert running_w == pytest.approx(done_w * 4, rel=1e-3)  # 40 s so far against 10 s
    assert f'fill="{STATE_COLOURS[JobState.RUNNING]}" data-id="{ids[1]}"' in page
    assert "<td>not drawn</td><td>1 jobs that never started</td>" in page
    assert "peak 2 of 4 cpus" in page  # alpha: declared in the cluster file
    assert "peak 2 cpus (capacity unknown)" in page  # zeta: neither snapshot nor cluster
