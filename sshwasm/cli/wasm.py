"""`sshwasm wasm ID -o FILE`: save the exact module a job ran."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from ..errors import UsageError
from .context import Context
from .exits import ExitStatus
from .show import say


def cmd_wasm(ctx: Context) -> int:
    """`sshwasm wasm ID -o FILE`: the exact module the job ran."""
    job = ctx.store.get(ctx.args.job_id)
    module = Path(job.wasm_path or "")
    try:
        data = module.read_bytes()
    except OSError as exc:
        raise UsageError(f"the module of job {job.id} is no longer cached ({exc})") from exc
    if hashlib.sha256(data).hexdigest() != job.wasm_sha256:
        raise UsageError(f"the cached module of job {job.id} changed since it ran")
    output = Path(ctx.args.output)
    try:
        shutil.copyfile(module, output)
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from exc
    say(f"{output}: {len(data)} bytes, sha256 {job.wasm_sha256}")
    return ExitStatus.OK
