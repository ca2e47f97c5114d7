"""WASI testsuite conformance, shared by tests/test_wasi_testsuite.py (a quick subset) and
benchmarks/wasi_testsuite.py (every program): each vendored program of
WebAssembly/wasi-testsuite (wasm32-wasip1) is run under plain wasmtime-py on this machine
as the reference, and through `sshwasm run` on a loopback host; each that passes the
reference must pass through sshwasm too (exit code, and stdout where the spec gives one).

A spec's `root` is preopened at / (`--dir ROOT::/`, as the suite's own wasmtime adapter
does), from a fresh copy for each run. Stdlib and wasmtime only: both callers load this
file by path and pass their own way of running `sshwasm`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import wasmtime

# Runs `sshwasm ARGS...` on a cluster of loopback hosts: (exit status, stdout, stderr).
RunSshwasm = Callable[[list[str]], tuple[int, str, str]]

SUITE = Path(__file__).parent / "wasm32-wasip1.tar.xz"
# tests/test_wasi_testsuite.py's quick subset: each language, and the programs that work
# hardest on directories.
QUICK = {
    "assemblyscript": ("environ_get-multiple-variables", "proc_exit-failure",
                       "fd_write-to-stdout", "args_get-multiple-arguments"),
    "c": ("fopen-with-access", "pwrite-with-access"),
    "rust": ("path_rename", "remove_nonempty_directory", "symlink_create", "fd_readdir"),
}  # fmt: skip
# A reference run that has not ended by then has hung: a failure, not a wait.
REFERENCE_LIMIT_S = 60.0


@dataclass(frozen=True)
class Case:
    """One program of the suite with its JSON spec (defaults as the suite's specification)."""

    language: str
    wasm: Path
    spec: dict[str, Any]

    @property
    def name(self) -> str:
        return self.wasm.stem

    @property
    def root(self) -> Path | None:
        root = self.spec.get("root")
        return None if root is None else self.wasm.parent / root

    def passed(self, exit_code: object, stdout: str) -> bool:
        """Whether a run ended as the spec says (its stdout only when the spec gives one)."""
        expected = self.spec.get("stdout")
        return exit_code == self.spec.get("exit_code", 0) and (
            expected is None or stdout == expected
        )


def load_suite(destination: Path) -> list[Case]:
    """Unpack the vendored programs into `destination`; every case, sorted."""
    with tarfile.open(SUITE) as archive:
        archive.extractall(destination, filter="data")
    cases = []
    for wasm in sorted(destination.glob("*/testsuite/wasm32-wasip1/*.wasm")):
        spec_path = wasm.with_suffix(".json")
        spec = json.loads(spec_path.read_text()) if spec_path.exists() else {}
        cases.append(Case(wasm.relative_to(destination).parts[0], wasm, spec))
    return cases


def fresh_root(case: Case, work: Path) -> Path | None:
    """A copy of the case's root for one run (the programs change it)."""
    if case.root is None:
        return None
    copy = work / "root"
    shutil.copytree(case.root, copy, symlinks=True)
    return copy


def run_reference(case: Case, work: Path) -> tuple[object, str]:
    """(exit code, stdout) of the program under plain wasmtime-py: the reference."""
    config = wasmtime.Config()
    config.epoch_interruption = True
    engine = wasmtime.Engine(config)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    store.set_epoch_deadline(1)
    wasi = wasmtime.WasiConfig()
    wasi.argv = [case.name, *case.spec.get("args", [])]
    wasi.env = list(case.spec.get("env", {}).items())
    wasi.stdout_file = str(work / "stdout")
    wasi.stderr_file = str(work / "stderr")
    root = fresh_root(case, work)
    if root is not None:
        wasi.preopen_dir(str(root), "/")
    store.set_wasi(wasi)
    timer = threading.Timer(REFERENCE_LIMIT_S, engine.increment_epoch)
    timer.start()
    code: object = 0
    try:
        instance = linker.instantiate(store, wasmtime.Module.from_file(engine, str(case.wasm)))
        instance.exports(store)["_start"](store)  # type: ignore[operator]
    except wasmtime.ExitTrap as exc:
        code = exc.code
    except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
        code = f"trap: {exc}"
    finally:
        timer.cancel()
    return code, (work / "stdout").read_text()


def run_through_sshwasm(case: Case, work: Path, sshwasm: RunSshwasm) -> tuple[object, str]:
    """(exit code, stdout) of the program run by `sshwasm run` on a loopback host."""
    flags = [f"--env={name}={value}" for name, value in case.spec.get("env", {}).items()]
    root = fresh_root(case, work)
    if root is not None:
        flags.append(f"--dir={root}::/")
    status, stdout, stderr = sshwasm(
        ["run", str(case.wasm), *flags, "--", *case.spec.get("args", [])]
    )
    if "Traceback" in stderr:
        return f"traceback: {stderr}", stdout
    if status == 1 and "sshwasm: error:" in stderr:  # sshwasm's own failure, not the job's
        return f"1 ({stderr.strip().splitlines()[-1]})", stdout
    return status, stdout


def check_conformance(
    cases: list[Case], sshwasm: RunSshwasm, work: Path, parallel: int = 4
) -> tuple[dict[str, Counter[str]], list[str]]:
    """Run each case both ways, `parallel` sshwasm runs at a time. Returns per language how
    many were counted (the reference passes them) and passed through sshwasm, and a line
    for each counted program that failed through sshwasm."""
    counts: dict[str, Counter[str]] = {}
    reference: dict[str, tuple[object, str]] = {}
    for case in cases:
        (work / "ref" / case.name).mkdir(parents=True)
        reference[case.name] = run_reference(case, work / "ref" / case.name)

    def remote(case: Case) -> tuple[Case, tuple[object, str]]:
        (work / "ssh" / case.name).mkdir(parents=True)
        return case, run_through_sshwasm(case, work / "ssh" / case.name, sshwasm)

    failures = []
    with ThreadPoolExecutor(parallel) as pool:
        for case, (code, stdout) in pool.map(remote, cases):
            count = counts.setdefault(case.language, Counter())
            if not case.passed(*reference[case.name]):
                continue  # not counted: plain wasmtime fails it too
            count["counted"] += 1
            if case.passed(code, stdout):
                count["passed"] += 1
            else:
                failures.append(f"{case.language}/{case.name}: exit {code!r}, stdout {stdout!r}")
    return counts, failures


def summary(counts: dict[str, Counter[str]]) -> str:
    """`LANGUAGE PASSED/COUNTED, ...`."""
    return ", ".join(
        f"{language} {count['passed']}/{count['counted']}" for language, count in counts.items()
    )


def completed(result: subprocess.CompletedProcess[Any]) -> tuple[int, str, str]:
    """A finished `sshwasm` run as RunSshwasm returns it (text or bytes output)."""

    def text(data: str | bytes) -> str:
        return data if isinstance(data, str) else data.decode(errors="replace")

    return result.returncode, text(result.stdout), text(result.stderr)
