"""The whole WASI testsuite (wasm32-wasip1, tests/wasi-testsuite) through `sshwasm run`.

Each program runs under plain wasmtime-py here as the reference, then through `sshwasm run`
on loopback hosts (`--dir ROOT::/` for a spec's root). Prints passed/counted per source
language; exits 1 when a program that passes the reference fails through sshwasm.
The default test run has a quick subset of it (tests/test_wasi_testsuite.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from benchmarks.common import REPO, Bench, HostShape, banner, run_main, verdict


def _conformance() -> ModuleType:
    path = REPO / "tests" / "wasi-testsuite" / "conformance.py"
    spec = importlib.util.spec_from_file_location("wasi_conformance", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", type=int, default=4, help="sshwasm runs at a time")
    options = parser.parse_args()
    conformance = _conformance()
    banner("WASI testsuite (wasm32-wasip1) through sshwasm run")
    with (
        Bench(2, HostShape(cpus=4, memory_mb=2048)) as bench,
        tempfile.TemporaryDirectory() as work,
    ):
        suite = conformance.load_suite(Path(work) / "suite")

        def run(args: list[str]) -> tuple[int, str, str]:
            completed = bench.sshwasm("--cluster", str(bench.cluster_path), *args)
            return conformance.completed(completed)

        started = time.monotonic()
        counts, failures = conformance.check_conformance(
            suite, run, Path(work) / "runs", options.parallel
        )
        elapsed = time.monotonic() - started
    for line in failures:
        print(f"  failed through sshwasm: {line}")
    print(f"passed/counted: {conformance.summary(counts)} ({len(suite)} programs, {elapsed:.0f} s)")
    print(verdict(not failures))
    return 1 if failures else 0


if __name__ == "__main__":
    run_main(main)
