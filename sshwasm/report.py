"""How well jobs used what they asked for (`sshwasm report`), as Slurm's `seff` says it.

Pure functions over `store.Job`: no I/O, nothing printed. A job's figures are its request
(cpus, memory_mb) against its measures (run_s, cpu_s, peak_memory_bytes); a group's (an
array, or any selection of jobs) are summed over its measured jobs. A figure that cannot be
computed (a job still running, one cancelled before it started, a zero run time) is None,
never a division by zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .states import JobState
from .store import Job

MIB = 1 << 20
# Below these a request counts as "far above use" and earns a line of advice: seff's
# thresholds are about the same. A wasm guest is single-threaded, so extra cpus are idle.
LOW_CPU_EFFICIENCY = 0.5
LOW_MEMORY_EFFICIENCY = 0.25
# Advice never suggests less memory than this, nor less than the peak times this margin.
MIN_SUGGESTED_MEMORY_MB = 16
MEMORY_MARGIN = 1.5


@dataclass(frozen=True)
class Efficiency:
    """Request against use, for one job or summed over a group of jobs.

    For a group: `cpus`/`memory_mb` are the largest request of its jobs, `run_s`/`cpu_s`
    the sums over measured jobs, `peak_memory_bytes` the largest peak, `cpu_efficiency` the
    summed cpu_s over the summed run_s x cpus, and `memory_efficiency` the largest peak over
    the request of the job that had it. `fuel_used` is the sum over the jobs that counted
    fuel (`--fuel`), in units that mean the same on every host; None when none did.
    """

    cpus: int
    memory_mb: int
    run_s: float | None
    cpu_s: float | None
    peak_memory_bytes: int | None
    cpu_efficiency: float | None
    memory_efficiency: float | None
    jobs: int
    measured: int
    unfinished: int
    advice: str | None
    note: str | None
    fuel_used: int | None = None

    def fields(self) -> dict[str, Any]:
        """The figures as JSON-able values, in the order `--json` prints them."""
        return {
            "cpus": self.cpus,
            "memory_mb": self.memory_mb,
            "run_s": self.run_s,
            "cpu_s": self.cpu_s,
            "peak_memory_bytes": self.peak_memory_bytes,
            "fuel_used": self.fuel_used,
            "cpu_efficiency": self.cpu_efficiency,
            "memory_efficiency": self.memory_efficiency,
            "jobs": self.jobs,
            "measured": self.measured,
            "unfinished": self.unfinished,
            "advice": self.advice,
            "note": self.note,
        }


def _number(value: object) -> float | None:
    """A stored measure as a float, or None (absent, or not a finite number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _ratio(used: float | None, available: float) -> float | None:
    return None if used is None or available <= 0 else used / available


def job_efficiency(job: Job) -> Efficiency:
    """One job's figures (see Efficiency)."""
    return group_efficiency([job])


def _measured(job: Job) -> bool:
    """Whether the job ran to an end that left its measures."""
    return job.is_final and _number(job.run_s) is not None


def group_efficiency(jobs: Sequence[Job]) -> Efficiency:
    """The figures summed over `jobs` (see Efficiency); one job gives its own."""
    measured = [job for job in jobs if _measured(job)]
    unfinished = sum(1 for job in jobs if not job.is_final)
    cpus = max((job.cpus for job in jobs), default=0)
    memory_mb = max((job.memory_mb for job in jobs), default=0)
    run_s = cpu_s = None
    cpu_efficiency = memory_efficiency = None
    peak: int | None = None
    if measured:
        run_s = sum(_number(job.run_s) or 0.0 for job in measured)
        cpu_times = [_number(job.cpu_s) for job in measured]
        timed = [(job, t) for job, t in zip(measured, cpu_times, strict=True) if t is not None]
        if timed:
            cpu_s = sum(t for _, t in timed)
            reserved = sum((_number(job.run_s) or 0.0) * job.cpus for job, _ in timed)
            cpu_efficiency = _ratio(cpu_s, reserved)
        peaks = [
            (job.peak_memory_bytes, job.memory_mb)
            for job in measured
            if isinstance(job.peak_memory_bytes, int)
        ]
        if peaks:
            peak, request_mb = max(peaks)
            memory_efficiency = _ratio(peak, request_mb * MIB)
    figures = Efficiency(
        cpus=cpus,
        memory_mb=memory_mb,
        run_s=run_s,
        cpu_s=cpu_s,
        peak_memory_bytes=peak,
        cpu_efficiency=cpu_efficiency,
        memory_efficiency=memory_efficiency,
        jobs=len(jobs),
        measured=len(measured),
        unfinished=unfinished,
        advice=None,
        note=_note(jobs, len(measured), unfinished),
        fuel_used=total_fuel_used(jobs),
    )
    return Efficiency(**{**figures.__dict__, "advice": advice(figures)})


def total_fuel_used(jobs: Sequence[Job]) -> int | None:
    """The fuel `jobs` used together (an array's cost in host-independent units); None
    when none of them counted fuel. A reused job ran nothing and adds nothing."""
    used = [
        job.fuel_used for job in jobs if isinstance(job.fuel_used, int) and job.reused_from is None
    ]
    return sum(used) if used else None


def _note(jobs: Sequence[Job], measured: int, unfinished: int) -> str | None:
    """What the figures leave out, in words; None when every job is measured."""
    if measured == len(jobs):
        return None
    if len(jobs) == 1:
        job = jobs[0]
        if job.state in (JobState.QUEUED, JobState.RUNNING):
            return f"job {job.id} is still {job.state}: no measures yet"
        return f"job {job.id} ended {job.state} without measures (it never ran to an end)"
    parts = [f"{measured} of {len(jobs)} jobs measured"]
    if unfinished:
        parts.append(f"{unfinished} still queued or running")
    unmeasured = len(jobs) - measured - unfinished
    if unmeasured:
        parts.append(f"{unmeasured} ended without measures")
    return "; ".join(parts)


def suggested_memory_mb(peak_bytes: int) -> int:
    """A memory request that fits `peak_bytes` with a margin, rounded up to 16 MB."""
    wanted = math.ceil(peak_bytes * MEMORY_MARGIN / MIB)
    return max(MIN_SUGGESTED_MEMORY_MB, -(-wanted // 16) * 16)


def advice(figures: Efficiency) -> str | None:
    """One line saying which request was far above use and what would do; None if none."""
    parts: list[str] = []
    if (
        figures.cpu_efficiency is not None
        and figures.cpus > 1
        and figures.cpu_efficiency < LOW_CPU_EFFICIENCY
        and figures.run_s
        and figures.cpu_s is not None
    ):
        # Over the summed run time, the cpus actually busy on average (at least one).
        busy = figures.cpu_s / (figures.run_s)
        wanted = max(1, math.ceil(busy))
        if wanted < figures.cpus:
            parts.append(
                f"--cpus {wanted} (used {figures.cpu_efficiency:.0%} of {figures.cpus} cpus)"
            )
    if (
        figures.memory_efficiency is not None
        and figures.peak_memory_bytes is not None
        and figures.memory_efficiency < LOW_MEMORY_EFFICIENCY
    ):
        wanted_mb = suggested_memory_mb(figures.peak_memory_bytes)
        if wanted_mb < figures.memory_mb:
            parts.append(
                f"--memory-mb {wanted_mb} (peak {format_bytes(figures.peak_memory_bytes)} "
                f"of {figures.memory_mb} MB asked)"
            )
    if not parts:
        return None
    return "asked for far more than used: " + " and ".join(parts) + " would do"


def format_bytes(count: int | float | None) -> str:
    """A byte count for people: 12.3 MiB."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_ratio(value: float | None) -> str:
    """An efficiency as a percentage, or `-` when there is none."""
    return "-" if value is None else f"{value:.1%}"
