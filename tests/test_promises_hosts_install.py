"""README promise of `hosts install`: it "makes sure each host's `python` can import
wasmtime, running `python -m pip install --user wasmtime` when it cannot".

The host's `python` is a fresh virtualenv that sees the base interpreter's packages (so
`pip install --user` is allowed in it, and the user site is on its path) but has no
wasmtime. The host's pip works offline: sshd's `SetEnv` gives the session its own HOME and
`PYTHONUSERBASE` (nothing lands in the real home) and a local wheel directory as its only
index. The wheel is packed from the wasmtime installed in this test environment, the same
files a user's pip would fetch from PyPI, so the test needs no network and no pip cache.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from ci_skips import beyond_our_control
from helpers import PROGRAMS, record_of, sshwasm
from sshd import SshServer

# pip regenerates these for what it installs; they describe this environment's install.
_NOT_PACKED = {"INSTALLER", "REQUESTED", "RECORD", "direct_url.json"}


def _wheel_of_installed(distribution: str, directory: Path) -> Path:
    """A wheel of `distribution` as installed here (its RECORD's files and WHEEL tag)."""
    dist = importlib.metadata.distribution(distribution)
    tags = [
        line.split(":", 1)[1].strip()
        for line in (dist.read_text("WHEEL") or "").splitlines()
        if line.startswith("Tag:")
    ]
    assert tags, f"{distribution} has no WHEEL tag"
    info_dir = f"{dist.metadata['Name']}-{dist.version}.dist-info"
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{dist.metadata['Name']}-{dist.version}-{tags[0]}.whl"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    # Stored, not deflated: a wheel may hold either, and deflating wasmtime's 40 MB cost
    # seconds of a core for a file read once, from this disk.
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        for file in dist.files or ():
            parts = file.parts
            if ".." in parts or "__pycache__" in parts:
                continue  # scripts outside site-packages; bytecode pip compiles itself
            if parts[0] == info_dir and parts[-1] in _NOT_PACKED:
                continue
            path = Path(str(file.locate()))
            if not path.is_file():
                continue
            data = path.read_bytes()
            archive.writestr(file.as_posix(), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            writer.writerow([file.as_posix(), f"sha256={digest.decode()}", len(data)])
        writer.writerow([f"{info_dir}/RECORD", "", ""])
        archive.writestr(f"{info_dir}/RECORD", record.getvalue())
    return wheel


def _python_without_wasmtime(root: Path) -> Path:
    """A virtualenv over the base interpreter, user site enabled, with pip, without wasmtime."""
    base = Path(sys.base_prefix) / "bin" / "python3"
    if not base.exists():
        base = Path(sys.executable).resolve()
    subprocess.run(
        [str(base), "-m", "venv", "--system-site-packages", "--without-pip", str(root)],
        check=True,
        capture_output=True,
    )
    python = root / "bin" / "python"
    if subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True).returncode:
        made = subprocess.run([str(python), "-m", "ensurepip"], capture_output=True, text=True)
        if made.returncode:
            pytest.skip(beyond_our_control(f"{base} has neither pip nor ensurepip"))
    if subprocess.run([str(python), "-c", "import wasmtime"], capture_output=True).returncode == 0:
        pytest.skip(beyond_our_control(f"the base interpreter {base} already has wasmtime"))
    return python


@pytest.mark.slow
def test_hosts_install_runs_pip_install_user_when_python_lacks_wasmtime(
    fresh_host: Callable[..., SshServer], make_cluster: Callable[..., Path], tmp_path: Path
) -> None:
    wheels = tmp_path / "wheels"
    _wheel_of_installed("wasmtime", wheels)
    python = _python_without_wasmtime(tmp_path / "host-python")
    user_base = tmp_path / "host-user-base"
    remote_home = tmp_path / "host-home"
    remote_home.mkdir()
    session_env = {
        "HOME": remote_home,
        "PYTHONUSERBASE": user_base,
        "PIP_CONFIG_FILE": "/dev/null",  # none of this machine's pip configuration
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": wheels,
        "PIP_NO_CACHE_DIR": "1",
    }
    setenv = " ".join(f"{name}={value}" for name, value in session_env.items())
    server = fresh_host("delta", extra_config=f"SetEnv {setenv}\n")
    cluster = make_cluster({"delta": (2, 1024)}, servers=[server], defaults={"python": str(python)})

    # Before: the host is reachable, and its python says it cannot import wasmtime.
    (before,) = json.loads(sshwasm("--cluster", str(cluster), "hosts", "--check", "--json").stdout)
    assert before["reachable"] and before["wasmtime_version"] is None, before

    installed = sshwasm("--cluster", str(cluster), "hosts", "install", timeout=300)
    assert installed.returncode == 0, installed.stderr
    version = importlib.metadata.version("wasmtime")
    assert f"delta: installed wasmtime {version} for {python}" in installed.stdout
    # It went where --user puts it: the session's user site, not the virtualenv.
    installed_here = list(user_base.glob("lib/python3*/site-packages/wasmtime/__init__.py"))
    assert len(installed_here) == 1, f"no wasmtime under the user base {user_base}"
    assert not list((tmp_path / "host-python").glob("lib/python3*/site-packages/wasmtime"))

    # The host now runs jobs, with that python.
    run = sshwasm("--cluster", str(cluster), "run", str(PROGRAMS / "tiny.rs"), "--json")
    assert run.returncode == 0, run.stderr
    record = record_of(run)
    assert record["state"] == "succeeded" and record["host"] == "delta", record
    again = sshwasm("--cluster", str(cluster), "hosts", "install")
    assert f"delta: wasmtime {version} is importable by {python}" in again.stdout, again.stderr
