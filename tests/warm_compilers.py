"""Fill zig's and Go's build caches for the test run, in the background of lint and types.

On a fresh clone zig builds wasi-libc and libc++ and Go its standard library for wasip1
before the first C, C++ or Go test can compile anything: a minute or more of one core, while
`scripts/test` runs ruff and mypy (one core) first. `scripts/test` starts this script before
them, so that work overlaps. The caches are the ones `tests/conftest.py` keeps between runs
(`.pytest_cache/sshwasm-zig`, `.pytest_cache/sshwasm-go`); both tools lock their entries, so
a test that builds before this script is done waits for it rather than building twice.

Failures are not reported here: the tests build the same sources and say what went wrong.
"""

from __future__ import annotations

import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = [REPO / "examples" / name for name in ("hello.c", "hello.cpp", "hello.go")]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="sshwasm-warm-") as scratch:
        cache = Path(scratch) / "cache"
        cache.mkdir()
        for tool in ("zig", "go"):
            kept = REPO / ".pytest_cache" / f"sshwasm-{tool}"
            kept.mkdir(parents=True, exist_ok=True)
            (cache / tool).symlink_to(kept, target_is_directory=True)
        # The same environment the tests give a build: a private HOME and sshwasm cache.
        os.environ["HOME"] = scratch
        os.environ["SSHWASM_CACHE_DIR"] = str(cache)
        with ThreadPoolExecutor(max_workers=len(SOURCES)) as pool:
            for source, outcome in zip(SOURCES, pool.map(_try_build, SOURCES), strict=True):
                print(f"warm_compilers: {source.name}: {outcome}", file=sys.stderr)
    return 0


def _try_build(source: Path) -> str:
    from sshwasm.build import build

    try:
        build(source)
    except Exception as exc:  # reported by the tests that build it again
        return f"not built ({exc})"
    return "built"


if __name__ == "__main__":
    sys.exit(main())
