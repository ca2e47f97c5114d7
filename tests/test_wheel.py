"""Packaging: `python -m build` makes an sdist and a wheel, and the wheel installed in a fresh
venv (from the index, as a user's `pip install` would) runs a job.

The build runs on a copy of the checkout, so the build's scratch files (build/, egg-info)
never land in the tree other tests are reading. `python -m build` builds the wheel from the
sdist, so an sdist that lacks a file the package needs fails here too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "sshwasm"
VERSION = version("sshwasm")
# Not part of a source tree: what the checkout's tools and builds leave behind (at its top
# level only: sshwasm/build is the package's build subpackage).
TOP_SCRATCH = {
    ".git", ".venv", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis", "build",
    "dist",
}  # fmt: skip
ANYWHERE_SCRATCH = shutil.ignore_patterns("__pycache__", "*.egg-info", "target")
# Every test here on one xdist worker (scripts/test runs `--dist loadgroup`): the `dist`
# fixture then builds once, not once per worker that happens to get one of these tests.
pytestmark = pytest.mark.xdist_group("wheel")


def scratch(folder: str, names: list[str]) -> set[str]:
    """shutil.copytree's ignore: the names in `folder` that are not source."""
    ignored = set(ANYWHERE_SCRATCH(folder, names))
    if Path(folder) == REPO:
        ignored |= TOP_SCRATCH.intersection(names)
    return ignored


def run(*command: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 900) -> subprocess.CompletedProcess[str]:  # fmt: skip
    done = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and wheel `python -m build` makes from a copy of this checkout.

    Without build isolation: an isolated build makes a venv and installs setuptools into
    it from the index twice (sdist, then the wheel from it), most of this fixture's time.
    The test extra installs the backend instead, and `build` still checks that this venv
    meets the [build-system] requirements (it fails on a missing one).
    """
    source = tmp_path_factory.mktemp("source") / "sshwasm"
    shutil.copytree(REPO, source, ignore=scratch)
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, source)
    return out


def only(folder: Path, pattern: str) -> Path:
    (found,) = folder.glob(pattern)
    return found


def package_files() -> set[str]:
    """Every file of the package in this checkout, as a path in the wheel."""
    return {
        path.relative_to(REPO).as_posix()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_the_wheel_holds_every_subpackage_and_py_typed(dist: Path) -> None:
    wheel = only(dist, f"sshwasm-{VERSION}-py3-none-any.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert package_files() <= names, sorted(package_files() - names)
    for needed in (
        "sshwasm/py.typed",
        "sshwasm/runner/__init__.py",
        "sshwasm/runner/protocol.py",
        "sshwasm/build/__init__.py",
        "sshwasm/cli/__init__.py",
        "sshwasm/cli/completion.py",
    ):
        assert needed in names
    assert not any(name.startswith(("tests/", "examples/", "docs/")) for name in names)
    entry_points = (
        zipfile.ZipFile(wheel).read(f"sshwasm-{VERSION}.dist-info/entry_points.txt").decode()
    )
    assert "sshwasm = sshwasm.cli:entry_point" in entry_points
    assert "sshwasm-exec = sshwasm.runner.commands:main" in entry_points


def test_the_sdist_holds_the_source_tests_and_docs(dist: Path) -> None:
    sdist = only(dist, f"sshwasm-{VERSION}.tar.gz")
    prefix = f"sshwasm-{VERSION}/"
    with tarfile.open(sdist) as archive:
        names = {name.removeprefix(prefix) for name in archive.getnames()}
    assert package_files() <= names, sorted(package_files() - names)
    for needed in (
        "pyproject.toml", "README.md", "MANIFEST.in", "cluster.example.yaml",
        "docs/architecture.md", "scripts/setup", "scripts/test", "examples/hello.rs",
        "examples/cargo-hello/Cargo.toml", "tests/conftest.py", "tests/test_wheel.py",
        "tests/shell/zsh_complete.zsh", "tests/programs/tiny.rs",
    ):  # fmt: skip
        assert needed in names, needed
    assert not any("__pycache__" in name for name in names)


def test_version_is_the_package_version() -> None:
    shown = run(sys.executable, "-m", "sshwasm", "--version")
    assert shown.stdout == f"sshwasm {VERSION}\n"
    import sshwasm

    assert sshwasm.__version__ == VERSION  # pyproject.toml takes its version from here


@pytest.mark.slow
def test_the_installed_wheel_runs_a_job(dist: Path, tmp_path: Path) -> None:
    wheel = only(dist, "*.whl")
    venv = tmp_path / "venv"
    # No pip of its own (ensurepip costs seconds): this pip installs into it (`--python`).
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python, command = venv / "bin" / "python", venv / "bin" / "sshwasm"
    # From the index, as a user's install would be (pip's cache makes it quick when warm).
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", wheel, env=env)

    # Nothing of the checkout on the path: the venv's own sshwasm runs, from anywhere.
    home = tmp_path / "user"
    home.mkdir()
    clean = {
        "HOME": str(home), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "SSHWASM_CACHE_DIR": os.environ["SSHWASM_CACHE_DIR"],
    }  # fmt: skip
    where = run(python, "-c", "import sshwasm; print(sshwasm.__file__)", cwd=home, env=clean)
    assert Path(where.stdout.strip()).is_relative_to(venv)
    shown = run(command, "--version", cwd=home, env=clean)
    assert shown.stdout.strip() == f"sshwasm {VERSION}"
    installed = run(
        python, "-c", "from importlib.metadata import version; print(version('sshwasm'))",
        cwd=home, env=clean,
    )  # fmt: skip
    assert installed.stdout.strip() == VERSION

    job = run(command, "run", "--quiet", REPO / "examples" / "hello.rs", cwd=home, env=clean)
    assert job.stdout == "job done, hello!\n"
    jobs = run(command, "jobs", "--json", cwd=home, env=clean)
    assert '"state": "succeeded"' in jobs.stdout
    assert (home / ".local" / "share" / "sshwasm").is_dir()  # its own data dir, in HOME
    # The runner it ships: `sshwasm-exec info` answers from the wheel's copy.
    info = run(venv / "bin" / "sshwasm-exec", "info", cwd=home, env=clean)
    assert '"runner_version"' in info.stdout
    # Completion works from the wheel (shtab is a dependency).
    script = run(command, "completion", "bash", cwd=home, env=clean)
    assert "complete -o bashdefault -F" in script.stdout
