"""WASI testsuite conformance through `sshwasm run` (see tests/wasi-testsuite/conformance.py):
a quick subset covering each source language and the directory-heavy programs. Every
program runs in `python -m benchmarks.wasi_testsuite`, which prints the count per language.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from helpers import sshwasm


def _conformance() -> ModuleType:
    path = Path(__file__).parent / "wasi-testsuite" / "conformance.py"
    spec = importlib.util.spec_from_file_location("wasi_conformance", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


conformance = _conformance()


@pytest.mark.slow
def test_a_quick_subset_passes_as_under_plain_wasmtime(
    make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    cluster = make_cluster({"alpha": (4, 2048), "beta": (4, 2048)})
    suite = conformance.load_suite(tmp_path / "suite")
    quick = conformance.QUICK
    chosen = [case for case in suite if case.name in quick.get(case.language, ())]
    assert len(chosen) == sum(len(names) for names in quick.values())

    def run(args: list[str]) -> tuple[int, str, str]:
        return conformance.completed(sshwasm("--cluster", str(cluster), *args))

    counts, failures = conformance.check_conformance(chosen, run, tmp_path / "work")
    print(f"WASI testsuite through sshwasm (passed/counted): {conformance.summary(counts)}")
    assert not failures, "\n".join(failures)
    for language, names in quick.items():
        assert counts[language]["counted"] == len(names), counts  # the reference passes them
