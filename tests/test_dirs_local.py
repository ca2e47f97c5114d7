"""Directories without SSH: the three-way bring-back (what the runner's fetch-dir sends,
merged into LOCAL), the content digest for result reuse, and the launch spec's checks."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

from sshwasm.directories import (
    apply_dir_changes,
    describe_dirs,
    dirs_digest,
    mounts_json,
    parse_dir,
    parse_host_dir,
    tree_digest,
)
from sshwasm.runner.protocol import (
    DIR_CHANGES_KEYS,
    DIR_CHANGES_MEMBER,
    DIR_FILES_PREFIX,
    encode_launch_spec,
    validate_spec,
)
from sshwasm.runner.safetar import tree_changes, tree_manifest, write_changes_as_tar
from sshwasm.staging import TarExtractor


def _bring_back(staged: Path, job_copy: Path, local: Path, scratch: Path, overwrite: bool = False):
    """What a job's end does: diff its copy against the manifest made at staging, send the
    changes as fetch-dir does, extract them here and merge them into `local`."""
    import json

    before = tree_manifest(str(staged))
    changes = tree_changes(before, tree_manifest(str(job_copy)))
    trailer = json.dumps({key: changes[key] for key in DIR_CHANGES_KEYS}).encode()
    sink = io.BytesIO()
    write_changes_as_tar(
        str(job_copy), changes, sink, DIR_FILES_PREFIX, (DIR_CHANGES_MEMBER, trailer)
    )
    scratch.mkdir()
    extractor = TarExtractor(str(scratch))
    extractor.feed(sink.getvalue())
    extractor.close()
    return apply_dir_changes(scratch, local, 7, overwrite)


def _tree(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): path.read_text() if path.is_file() else "/"
        for path in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("overwrite", [False, True])
def test_changes_come_back_three_ways_and_nothing_changed_locally_is_lost(
    tmp_path: Path, overwrite: bool
) -> None:
    local = tmp_path / "local"
    (local / "d").mkdir(parents=True)
    for name in ("same", "edited", "both", "deleted", "deleted-but-edited", "d/inner"):
        (local / name).write_text(f"{name}\n")
    staged = tmp_path / "staged"
    shutil.copytree(local, staged)
    job = tmp_path / "job"
    shutil.copytree(local, job)
    # The job's work:
    (job / "edited").write_text("job\n")
    (job / "both").write_text("job\n")
    (job / "new").write_text("job\n")
    (job / "clash").write_text("job\n")
    os.unlink(job / "deleted")
    os.unlink(job / "deleted-but-edited")
    os.unlink(job / "d" / "inner")
    os.rmdir(job / "d")
    (job / "made" / "deeper").mkdir(parents=True)
    # Meanwhile, here:
    (local / "both").write_text("user\n")
    (local / "deleted-but-edited").write_text("user\n")
    (local / "clash").write_text("user\n")
    (local / "d" / "mine").write_text("user\n")

    done = _bring_back(staged, job, local, tmp_path / "scratch", overwrite)

    tree = _tree(local)
    assert tree["same"] == "same\n"
    assert tree["edited"] == "job\n"  # unchanged here since staging: replaced
    assert tree["new"] == "job\n"
    assert "deleted" not in tree  # unchanged here: deleted
    assert tree["deleted-but-edited"] == "user\n"  # changed here: kept, and said so
    assert done.kept == ["deleted-but-edited"]
    assert tree["d"] == "/" and tree["d/mine"] == "user\n" and "d/inner" not in tree
    assert tree["made/deeper"] == "/"
    if overwrite:
        assert tree["both"] == tree["clash"] == "job\n"
        assert not done.beside
    else:
        assert tree["both"] == tree["clash"] == "user\n"
        assert tree["both.sshwasm-7"] == tree["clash.sshwasm-7"] == "job\n"
        assert sorted(done.beside or []) == ["both.sshwasm-7", "clash.sshwasm-7"]


def test_only_what_changed_travels(tmp_path: Path) -> None:
    staged = tmp_path / "staged"
    staged.mkdir()
    for index in range(50):
        (staged / f"big-{index}").write_bytes(os.urandom(4096))
    job = tmp_path / "job"
    shutil.copytree(staged, job)
    (job / "big-3").write_bytes(b"changed")
    changes = tree_changes(tree_manifest(str(staged)), tree_manifest(str(job)))
    sink = io.BytesIO()
    write_changes_as_tar(str(job), changes, sink, DIR_FILES_PREFIX, (DIR_CHANGES_MEMBER, b"{}"))
    assert list(changes["changed"]) == ["big-3"]
    assert len(sink.getvalue()) < 4 * 4096  # one changed file, not 50


def test_links_in_local_are_never_followed(tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("outside\n")
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "sub").mkdir()
    (staged / "sub" / "victim").write_text("outside\n")
    job = tmp_path / "job"
    shutil.copytree(staged, job)
    os.unlink(job / "sub" / "victim")
    (job / "sub" / "new").write_text("job\n")
    (local / "sub").symlink_to(outside)  # swapped in here while the job ran
    _bring_back(staged, job, local, tmp_path / "scratch")
    assert (outside / "victim").read_text() == "outside\n"
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]


def test_the_content_digest_sees_names_and_bytes_never_times(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a").write_text("a")
    first = tree_digest(tree)
    os.utime(tree / "sub" / "a", (1, 1))
    (tree / "sub" / "a").chmod(0o644)
    assert tree_digest(tree) == first
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy)
    assert tree_digest(copy) == first  # where it is does not count
    (copy / "sub" / "a").write_text("b")
    assert tree_digest(copy) != first
    (copy / "sub" / "a").write_text("a")
    (copy / "sub" / "empty").mkdir()
    assert tree_digest(copy) != first
    as_data = mounts_json([parse_dir(f"{tree}::/data")])
    assert dirs_digest(as_data) != dirs_digest(mounts_json([parse_dir(f"{tree}::/other")]))
    assert dirs_digest(as_data) != dirs_digest(mounts_json([parse_dir(f"{tree}::/data:ro")]))


def test_mount_syntax_and_record_text(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    assert parse_dir(str(data)).guest == "/data"
    assert parse_dir(f"{data}::/").guest == "/"
    assert parse_dir(f"{data}:ro").read_only
    mounts = [parse_dir(f"{data}::/in:ro"), parse_host_dir("/srv/ref::/ref")]
    assert describe_dirs(mounts_json(mounts)) == f"{data}::/in:ro, /srv/ref::/ref (host)"
    assert describe_dirs("[]") is None


def test_the_runner_refuses_bad_dirs_in_a_spec() -> None:
    def spec(dirs: object) -> dict[str, object]:
        return {
            "runner_version": "x", "wasm_sha256": "0" * 64, "argv": ["p"], "env": [],
            "memory_mb": 64, "time_limit_s": None, "dirs": dirs,
        }  # fmt: skip

    good = {"guest": "/d", "read_only": False, "tar_bytes": 0}
    assert validate_spec(spec([good]))["dirs"] == [good]
    for bad, message in (
        ([{**good, "guest": "d"}], "absolute"),
        ([{**good, "guest": "/a/../b"}], "'..'"),
        ([good, good], "twice"),
        ([{**good, "read_only": "no"}], "read_only"),
        ([{"guest": "/d", "read_only": True, "host_path": ""}], "host_path"),
        ([{**good, "tar_bytes": -1}], "tar_bytes"),
        ("x", "list"),
    ):
        with pytest.raises(ValueError, match=message):
            validate_spec(spec(bad))
    # The staged trees follow the input tar, each named by its size in the spec line.
    payload = encode_launch_spec(
        wasm_sha256="0" * 64, argv=["p"], env=[], memory_mb=64, time_limit_s=None,
        dirs=[{"guest": "/a", "read_only": False}, {"guest": "/h", "read_only": True,
              "host_path": "/srv"}, {"guest": "/b", "read_only": True}],
        dir_tars=[b"AAA", b"BB"], stdin=b"",
    )  # fmt: skip
    line, rest = payload.split(b"\n", 1)
    import json

    dirs = json.loads(line)["dirs"]
    assert [entry.get("tar_bytes") for entry in dirs] == [3, None, 2] and rest == b"AAABB"
