"""The `sshwasm report --html` page for a 120-task array over three loopback hosts, and a
screenshot of it taken with headless Chromium.

    .venv/bin/python -m benchmarks.timeline_demo [--out DIR] [--tasks 120]

Runs tests/programs/report_task.rs as an array (tasks sleep 0-160 ms, every seventh task
fails) on alpha (4 cpus), beta (2) and gamma (2), then writes DIR/timeline.html and
DIR/timeline.png (default DIR: $TMPDIR/sshwasm-timeline-demo). Needs `chromium`
(scripts/setup installs it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import Bench, BenchError, HostShape, program, run_main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=120, help="array size (default 120)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(tempfile.gettempdir()) / "sshwasm-timeline-demo",
        help="where to write (default: $TMPDIR/sshwasm-timeline-demo)",
    )
    return parser.parse_args(argv)


def screenshot(page: Path, png: Path) -> None:
    """A full-page screenshot of `page` by headless Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise BenchError("no chromium on PATH (scripts/setup installs it)")
    completed = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",  # running as root in CI containers
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1100,1300",
            f"--screenshot={png}",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    if completed.returncode != 0 or not png.exists():
        raise BenchError("chromium could not take the screenshot", completed)


def main() -> int:
    args = parse_args()
    shapes = {"alpha": HostShape(4, 4096), "beta": HostShape(2, 2048), "gamma": HostShape(2, 2048)}
    args.out.mkdir(parents=True, exist_ok=True)
    page = args.out / "timeline.html"
    png = args.out / "timeline.png"
    with Bench(hosts=3, shape=shapes) as bench:
        run = bench.sshwasm(
            "--cluster", str(bench.cluster_path), "run", str(program("report_task.rs")),
            "--array", str(args.tasks), "--job-name", "demo", "--quiet", "--", "7",
        )  # fmt: skip
        if run.returncode not in (0, 3):  # 3: the tasks that fail on purpose
            raise BenchError(f"the array exited {run.returncode}", run)
        bench.sshwasm(
            "--cluster", str(bench.cluster_path), "report", "1", "--html", str(page), check=True
        )
        summary = bench.sshwasm("--cluster", str(bench.cluster_path), "report", "1", check=True)
    screenshot(page, png)
    print(summary.stdout.decode().split("\n\n")[-1].strip())
    print(f"page: {page}")
    print(f"screenshot: {png}")
    return 0


if __name__ == "__main__":
    run_main(main)
