"""WASI testsuite conformance: every program of WebAssembly/wasi-testsuite (wasm32-wasip1)
that passes under plain wasmtime-py on this machine passes through `sshwasm run` too.

The programs are vendored in tests/wasi-testsuite (see its README.md). A spec's `root` is
preopened at / (`--dir ROOT::/`, as the suite's own wasmtime adapter does), from a fresh copy
for each run. The default run takes a quick subset covering the three source languages and
the directory tests; `-m slow` runs all of them and prints the count per language.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import wasmtime
from helpers import sshwasm

SUITE = Path(__file__).parent / "wasi-testsuite" / "wasm32-wasip1.tar.xz"
# The default run: each language, and the programs that work hardest on directories.
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


def run_through_sshwasm(case: Case, work: Path, cluster: Path) -> tuple[object, str]:
    """(exit code, stdout) of the program run by `sshwasm run` on a loopback host."""
    flags = [f"--env={name}={value}" for name, value in case.spec.get("env", {}).items()]
    root = fresh_root(case, work)
    if root is not None:
        flags.append(f"--dir={root}::/")
    result = sshwasm(
        "--cluster", str(cluster), "run", str(case.wasm), *flags, "--", *case.spec.get("args", []),
    )  # fmt: skip
    if "Traceback" in result.stderr:
        return f"traceback: {result.stderr}", result.stdout
    return result.returncode, result.stdout


def check_conformance(cases: list[Case], cluster: Path, work: Path) -> dict[str, Counter[str]]:
    """Run each case both ways; fail naming each program that passes the reference but not
    through sshwasm. Returns per language how many were counted and passed."""
    counts: dict[str, Counter[str]] = {}
    reference: dict[str, tuple[object, str]] = {}
    for case in cases:
        (work / "ref" / case.name).mkdir(parents=True)
        reference[case.name] = run_reference(case, work / "ref" / case.name)

    def remote(case: Case) -> tuple[Case, tuple[object, str]]:
        (work / "ssh" / case.name).mkdir(parents=True)
        return case, run_through_sshwasm(case, work / "ssh" / case.name, cluster)

    failures = []
    with ThreadPoolExecutor(4) as pool:
        for case, (code, stdout) in pool.map(remote, cases):
            count = counts.setdefault(case.language, Counter())
            if not case.passed(*reference[case.name]):
                continue  # not counted: plain wasmtime fails it too
            count["counted"] += 1
            if case.passed(code, stdout):
                count["passed"] += 1
            else:
                failures.append(f"{case.language}/{case.name}: exit {code!r}, stdout {stdout!r}")
    summary = ", ".join(
        f"{language} {count['passed']}/{count['counted']}" for language, count in counts.items()
    )
    print(f"WASI testsuite through sshwasm (passed/counted): {summary}")
    assert not failures, "\n".join(failures)
    return counts


@pytest.fixture
def suite(tmp_path: Path) -> list[Case]:
    return load_suite(tmp_path / "suite")


def test_a_quick_subset_passes_as_under_plain_wasmtime(
    suite: list[Case], make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    cluster = make_cluster({"alpha": (4, 2048), "beta": (4, 2048)})
    chosen = [case for case in suite if case.name in QUICK.get(case.language, ())]
    assert len(chosen) == sum(len(names) for names in QUICK.values())
    counts = check_conformance(chosen, cluster, tmp_path / "work")
    for language, names in QUICK.items():
        assert counts[language]["counted"] == len(names), counts  # the reference passes them


@pytest.mark.slow
def test_the_whole_suite_passes_as_under_plain_wasmtime(
    suite: list[Case], make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    cluster = make_cluster({"alpha": (4, 2048), "beta": (4, 2048)})
    counts = check_conformance(suite, cluster, tmp_path / "work")
    assert set(counts) == {"assemblyscript", "c", "rust"}
    assert sum(count["counted"] for count in counts.values()) >= len(suite) * 9 // 10
