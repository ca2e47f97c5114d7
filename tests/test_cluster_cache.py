"""The parsed cluster file kept as JSON (sshwasm/cluster_cache.py): reused without PyYAML
while the file is unchanged, never when it changed, was tampered with or is not private."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sshwasm import cluster as cluster_module
from sshwasm import cluster_cache
from sshwasm.cluster import load_cluster
from sshwasm.errors import ClusterError

TEXT = """\
defaults:
  connection_persist_s: 30
hosts:
  - name: alpha
    address: 127.0.0.1
    port: 2222
    cpus: 4
    memory_mb: 2048
    labels: [fast]
    identity_file: keys/id
"""


def without_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, importing PyYAML fails, and cluster.py has not imported it yet."""
    monkeypatch.setitem(sys.modules, "yaml", None)  # type: ignore[arg-type]
    monkeypatch.setattr(cluster_module, "yaml", cluster_module._LazyYaml())


def test_reused_unchanged_parsed_again_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(TEXT)
    parsed = load_cluster(path)
    (host,) = parsed.hosts
    assert host.identity_file == str(tmp_path / "keys" / "id")
    assert host.labels == ("fast",) and host.connection_persist_s == 30
    entry = cluster_cache._entry_path(path)
    assert entry.stat().st_mode & 0o777 == 0o600

    with monkeypatch.context() as patch:
        without_yaml(patch)
        assert load_cluster(path) == parsed  # from the entry: no PyYAML
        path.write_text(TEXT.replace("cpus: 4", "cpus: 5"))
        with pytest.raises(ImportError):
            load_cluster(path)  # changed: parsed again (here, without PyYAML: fails)
    assert load_cluster(path).hosts[0].cpus == 5

    # A mistake is reported by the parser, with its line, whatever was kept before.
    path.write_text(TEXT.replace("cpus: 4", "cpu: 4"))
    with pytest.raises(ClusterError, match=r"cluster.yaml:7: .*unknown key 'cpu'"):
        load_cluster(path)

    # An entry that is not the user's private file, or not a cluster, is not believed.
    path.write_text(TEXT)
    load_cluster(path)
    for damage in ("mode", "garbage"):
        if damage == "mode":
            entry.chmod(0o644)
        else:
            entry.write_text('{"digest": 1}')
        with monkeypatch.context() as patch:
            without_yaml(patch)
            with pytest.raises(ImportError):
                load_cluster(path)
        assert load_cluster(path) == parsed  # parsed again, and the entry made anew
        assert entry.stat().st_mode & 0o777 == 0o600
    assert cluster_cache.load(path, path.read_bytes()) == parsed
