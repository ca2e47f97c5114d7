"""What a job takes with it to the Dask pool besides its module: stdin, `--input`, and its
directories (`--dir`, `--host-dir`), with the SSH engine's semantics (directories.py).

- A `--dir` is packed here as the SSH engine packs it (`directories.stage_dirs`), and its
  tar travels as Dask data keyed by its content (`scatter(hash=True)`), as modules do: an
  array whose tasks share a directory sends it to each worker once, not once per task,
  and never through a shell. The worker appends the tars to the launch spec (the task
  function of `dask_engine`), so the host's runner stages them as under the SSH engine:
  the same checks (`safetar`), the same manifest of a read-write copy, and afterwards the
  same three-way bring-back (`recorded_jobs.record_end` -> `directories.collect_dirs`).
- A `--host-dir` pins the task to the hosts whose worker has the directory: the workers
  are asked once (`client.run`), those without it are skipped with a warning, and a job
  no host can run fails as under the SSH engine (`no host could run the job (...)`).
- What one task carries goes to the runner's `serve` as one request, so it is held to
  `SERVE_MAX_REQUEST_BYTES`; a bigger one is refused in one line before anything is
  submitted (`check_size`, `staged_size_estimate`).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cluster import Cluster
from ..coordinator import launch_spec
from ..directories import dirs_digest, job_mounts, stage_dirs
from ..errors import UsageError
from ..fingerprint import save_input_fingerprint
from ..runner.protocol import SERVE_MAX_REQUEST_BYTES
from ..staging import pack_input
from ..states import JobState
from ..store import Job, JobStore

# What a task may carry (spec line, stdin, input and directory tars): serve's request cap,
# less room for the frame's key line and the spec's own JSON.
MAX_TASK_BYTES = SERVE_MAX_REQUEST_BYTES - (64 << 10)
_TAR_BLOCK = 512

# Runs on every worker (`Client.run`): why each of these host paths cannot be preopened
# there (the runner's own check, launch.host_dir_problem), None when it can.
_HOST_DIRS_SOURCE = """
def sshwasm_host_dirs(paths, dask_worker=None):
    import os
    problems = {}
    for path in paths:
        full = os.path.expanduser(path)
        if not os.path.isdir(full):
            problems[path] = "no such directory on this host"
        elif not os.access(full, os.R_OK | os.X_OK):
            problems[path] = "not readable on this host"
    return [str(dask_worker.name), problems]
"""


def too_big(size: int) -> str:
    """The refusal of a task carrying `size` bytes."""
    return (
        f"{size / (1 << 20):.1f} MiB to stage (stdin, --input, --dir) is more than one task "
        f"on engine: dask carries ({SERVE_MAX_REQUEST_BYTES >> 20} MiB with the spec): use "
        "--host-dir for big data"
    )


def staged_size_estimate(dirs: Sequence[str], *others: int) -> int:
    """About how many bytes the --dir trees `dirs` take as tars, plus `others` (stdin, the
    input's tar): each file's bytes in 512-byte blocks and a header per entry."""
    total = sum(others)
    for root in dirs:
        for directory, names, files in os.walk(root):
            total += _TAR_BLOCK * (1 + len(names))
            for name in files:
                try:
                    size = os.lstat(os.path.join(directory, name)).st_size
                except OSError:
                    continue
                total += _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK
    return total


def check_size(size: int) -> None:
    """A UsageError when a task would carry more than serve takes in one request."""
    if size > MAX_TASK_BYTES:
        raise UsageError(too_big(size))


@dataclass(frozen=True)
class _StagedDirs:
    """A job's directories once staged: the spec's entries (with each tar's size), the
    tars' futures in their order, and their total size."""

    entries: tuple[dict[str, Any], ...]
    futures: tuple[Any, ...]
    size: int


class DaskStaging:
    """The staged content of the jobs one `DaskRun._submit` sends: each input packed once,
    each directory tar scattered once by content, the host-dir probe asked once."""

    def __init__(
        self,
        store: JobStore,
        cluster: Cluster,
        client: Any,
        warning: Callable[[str], None],
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.client = client
        self.warning = warning
        self._inputs: dict[str, bytes] = {}
        self._dirs: dict[str, _StagedDirs] = {}
        self._probed: dict[tuple[str, ...], dict[str, dict[str, str]]] = {}
        # Jobs `workers` failed (no host can run them): not to be submitted at all.
        self.refused: set[int] = set()

    # ------------------------------------------------------------------ the payload

    def payload(self, job: Job) -> bytes:
        """The job's launch spec as serve takes it: stdin and input inside, and its
        directories described, their tars left for the worker to append (`data`)."""
        stdin = Path(job.stdin_path).read_bytes() if job.stdin_path else None
        input_tar = self._input(job)
        encoded = launch_spec(job).encode(stdin, input_tar, key=job.remote_key)
        staged = self._staged_dirs(job)
        if staged is None:
            check_size(len(encoded))
            return encoded
        line, _, rest = encoded.partition(b"\n")
        header = json.loads(line)
        header["dirs"] = list(staged.entries)
        body = json.dumps(header).encode() + b"\n" + rest
        check_size(len(body) + staged.size)
        return body

    def data(self, job: Job, module: Any) -> Any:
        """The task's second argument: the module's future, or for a job with --dir copies
        a tuple of it and their tars' futures (packed and scattered once per content)."""
        staged = self._staged_dirs(job)
        if staged is None or not staged.futures:
            return module
        return (module, *staged.futures)

    def _input(self, job: Job) -> bytes:
        """The job's --input as a tar (packed once per path), its fingerprint kept for
        `rerun` and --reuse, and its size and time on the record, as the SSH engine does."""
        if not job.input_path:
            return b""
        started = time.monotonic()
        tar = self._inputs.get(job.input_path)
        if tar is None:
            tar = self._inputs[job.input_path] = pack_input(Path(job.input_path))
        save_input_fingerprint(self.store.path, job.id, tar)
        self.store.update(
            job.id, input_bytes=len(tar), stage_in_s=round(time.monotonic() - started, 6)
        )
        return tar

    def _staged_dirs(self, job: Job) -> _StagedDirs | None:
        """The job's directories as staged: packed and scattered once per content (an
        array's tasks share them: each task gets `LOCAL` as it was when the array went to
        the pool). None for a job without directories."""
        if job.dirs in ("", "[]"):
            return None
        key = dirs_digest(job.dirs)  # by content: unchanged trees are not read again
        staged = self._dirs.get(key)
        if staged is None:
            spec = stage_dirs(launch_spec(job), job)
            futures = []
            for tar in spec.dir_tars:
                # On every worker, as the module (a worker that dies must not take the
                # only copy with it); Dask keys it by content, so each gets it once.
                futures.append(self.client.scatter(tar, hash=True, broadcast=True))
            tars = iter(spec.dir_tars)
            entries = tuple(
                entry if "host_path" in entry else {**entry, "tar_bytes": len(next(tars))}
                for entry in spec.dirs
            )
            size = sum(len(tar) for tar in spec.dir_tars)
            staged = self._dirs[key] = _StagedDirs(entries, tuple(futures), size)
        return staged

    # -------------------------------------------------------------- where it may run

    def workers(self, job: Job, allowed: list[str] | None) -> list[str] | None:
        """`allowed` (dask_engine.eligible_workers) narrowed, for a job with --host-dir
        directories, to the hosts whose worker has them all. A job no host can run is
        recorded `failed` at once, as the SSH engine fails it, and noted in `refused`: its
        task is never submitted (nothing of it reaches the pool)."""
        paths = tuple(sorted({m.host_path for m in job_mounts(job.dirs) if m.host_path}))
        if not paths:
            return allowed
        problems = self._probe(paths)
        # The hosts the job may run on, by name (eligible_workers names hosts by address).
        candidates = [
            host
            for host in self.cluster.hosts
            if allowed is None or host.address in allowed or host.name in allowed
        ]
        having = []
        reasons = []
        for host in candidates:
            missing = problems.get(host.name)
            if missing is None:
                reasons.append(f"{host.name}: no worker of the pool")
            elif missing:
                path, problem = next(iter(sorted(missing.items())))
                reasons.append(f"{host.name}: --host-dir {path}: {problem}")
            else:
                having.append(host)
        if not having:
            self.store.finish(
                job.id,
                JobState.FAILED,
                error=f"no host could run the job ({'; '.join(reasons)})",
            )
            self.refused.add(job.id)
            return allowed
        for reason in reasons:
            self.warning(f"job {job.id}: skipping {reason}")
        # As eligible_workers names them: by address, unless another host shares it.
        addresses = Counter(host.address for host in self.cluster.hosts)
        return [host.address if addresses[host.address] == 1 else host.name for host in having]

    def _probe(self, paths: tuple[str, ...]) -> dict[str, dict[str, str]]:
        """Per host (its worker's name), why each of `paths` cannot be used there."""
        if paths not in self._probed:
            from .dask_engine import _by_value

            probe = _by_value(_HOST_DIRS_SOURCE, "sshwasm_host_dirs")
            answers: dict[str, list[Any]] = self.client.run(probe, list(paths))
            self._probed[paths] = {str(name): dict(found) for name, found in answers.values()}
        return self._probed[paths]
