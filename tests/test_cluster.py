"""The cluster file: loading, defaults, and an error naming the line for every mistake."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from ci_skips import beyond_our_control
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sshwasm.cluster import (
    DEFAULT_WORKDIR,
    LOCAL_ADDRESS,
    Cluster,
    Host,
    default_cluster,
    load_cluster,
)
from sshwasm.errors import ClusterError

EXAMPLE = Path(__file__).resolve().parent.parent / "cluster.example.yaml"
HOST_FIELDS = (
    "name",
    "address",
    "cpus",
    "memory_mb",
    "labels",
    "user",
    "port",
    "identity_file",
    "known_hosts",
    "workdir",
    "python",
    "connection_persist_s",
    "keepalive_s",
)


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep '~' away from the developer's home, and run in a scratch directory.

    conftest's `isolated_home` does the same; this keeps the module safe on its own.
    """
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


def write(text: str, name: str = "cluster.yaml") -> Path:
    """Write `text` as is into the current (scratch) directory; return its relative path."""
    path = Path(name)
    path.write_text(text, encoding="utf-8")
    return path


def write_block(text: str) -> Path:
    """Write an indented triple-quoted block, its first line being line 1 of the file."""
    return write(textwrap.dedent(text).lstrip("\n"))


def load_error(path: Path) -> ClusterError:
    with pytest.raises(ClusterError) as caught:
        load_cluster(path)
    return caught.value


VALID = """
defaults:
  user: deploy
  port: 2200
  identity_file: ~/.ssh/id_ed25519
  labels: [linux]
hosts:
  - name: alpha
    address: 10.0.0.5
    cpus: 8
    memory_mb: 16384
    labels: [fast, gpu]
  - name: beta_2.lab-x
    address: beta.example.org
    cpus: 4
    memory_mb: 8192
    user: ops
    port: 22
    identity_file: keys/beta
    known_hosts: ~/kh
    workdir: ~/jobs
    python: /opt/venv/bin/python
    labels: slow
    keepalive_s: 2.5
  - name: here
    address: local
    cpus: 2
    memory_mb: 1024
"""


def test_valid_file_loads_every_field(home: Path, tmp_path: Path) -> None:
    cluster = load_cluster(write_block(VALID))

    assert cluster.source == "cluster.yaml"
    assert [host.name for host in cluster.hosts] == ["alpha", "beta_2.lab-x", "here"]
    alpha, beta, here = cluster.hosts
    assert alpha == Host(
        name="alpha",
        address="10.0.0.5",
        cpus=8,
        memory_mb=16384,
        labels=("fast", "gpu"),
        user="deploy",
        port=2200,
        identity_file=str(home / ".ssh" / "id_ed25519"),
        known_hosts=None,
        workdir=DEFAULT_WORKDIR,
        python="python3",
    )
    assert beta == Host(
        name="beta_2.lab-x",
        address="beta.example.org",
        cpus=4,
        memory_mb=8192,
        labels=("slow",),
        user="ops",
        port=22,
        # A relative key path is read from the cluster file's folder, not the current one.
        identity_file=str(tmp_path / "keys" / "beta"),
        known_hosts=str(home / "kh"),
        workdir="~/jobs",  # '~' stays: it is the remote user's home
        python="/opt/venv/bin/python",
        keepalive_s=2.5,
    )
    assert here.is_local and not alpha.is_local
    assert here.address == LOCAL_ADDRESS
    assert here.python == sys.executable
    assert (here.user, here.port, here.labels) == ("deploy", 2200, ("linux",))


def test_host_lookup_by_name() -> None:
    cluster = load_cluster(write_block(VALID))
    assert cluster.host("alpha") is cluster.hosts[0]
    assert cluster.host("gamma") is None


def test_defaults_apply_and_host_keys_override_them() -> None:
    path = write_block(
        """
        defaults:
          address: shared.example.org
          cpus: 2
          memory_mb: 512
          user: deploy
          port: 2222
          workdir: /srv/wasm
          python: python3.12
          labels: [base]
        hosts:
          - name: a
          - name: b
            address: b.example.org
            cpus: 16
            user: root
            labels: [own]
          - name: c
            address: local
          - name: d
            address: local
            python: /usr/bin/python3
        """
    )
    a, b, c, d = load_cluster(path).hosts
    assert (a.address, a.cpus, a.memory_mb, a.user, a.port) == (
        "shared.example.org",
        2,
        512,
        "deploy",
        2222,
    )
    assert (a.workdir, a.python, a.labels) == ("/srv/wasm", "python3.12", ("base",))
    assert (b.address, b.cpus, b.memory_mb, b.user, b.port) == (
        "b.example.org",
        16,
        512,
        "root",
        2222,
    )
    assert b.labels == ("own",)  # a host's labels replace the default list
    # A default python is meant for remote workers; a local host runs our own interpreter.
    assert c.python == sys.executable
    assert d.python == "/usr/bin/python3"


def test_empty_defaults_section_is_allowed() -> None:
    path = write("defaults:\nhosts:\n  - {name: a, address: a, cpus: 1, memory_mb: 1}\n")
    assert load_cluster(path).hosts == (Host(name="a", address="a", cpus=1, memory_mb=1),)


def test_local_host_may_carry_ssh_settings() -> None:
    path = write_block(
        """
        hosts:
          - name: here
            address: local
            cpus: 1
            memory_mb: 64
            user: someone
            port: 2022
            identity_file: /k
        """
    )
    (host,) = load_cluster(path).hosts
    assert host.is_local
    assert (host.user, host.port, host.identity_file) == ("someone", 2022, "/k")


def test_anchors_aliases_and_merge_keys() -> None:
    path = write_block(
        """
        hosts:
          - &big
            name: a
            address: a.example.org
            cpus: 8
            memory_mb: 4096
            labels: &tags [x, y]
          - <<: *big
            name: b
            cpus: 4
          - <<: [{address: c.example.org, port: 1}, *big]
            name: c
            labels: *tags
        """
    )
    a, b, c = load_cluster(path).hosts
    assert a.labels == ("x", "y")
    assert (b.address, b.cpus, b.memory_mb, b.labels) == ("a.example.org", 4, 4096, ("x", "y"))
    # Among merged mappings the first listed wins.
    assert (c.address, c.port, c.cpus, c.labels) == ("c.example.org", 1, 8, ("x", "y"))


def test_a_mapping_merged_into_itself_does_not_hang() -> None:
    path = write_block(
        """
        hosts:
          - &me
            name: a
            address: a
            cpus: 1
            memory_mb: 1
            <<: *me
        """
    )
    assert load_cluster(path).hosts[0].name == "a"


def test_utf8_byte_order_mark_is_accepted() -> None:
    path = Path("bom.yaml")
    path.write_bytes(b"\xef\xbb\xbfhosts: [{name: a, address: a, cpus: 1, memory_mb: 1}]\n")
    assert load_cluster(path).hosts[0].name == "a"


def test_error_text_is_path_colon_line_colon_message() -> None:
    path = write_block(
        """
        hosts:
          - name: alpha
            address: a
            cpus: 1
            memory_mb: 1
          - name: beta
            address: b
            memory_mb: 1
        """
    )
    error = load_error(path)
    assert str(error) == "cluster.yaml:6: host 'beta' has no 'cpus'"
    assert (error.path, error.line, error.message) == (
        "cluster.yaml",
        6,
        "host 'beta' has no 'cpus'",
    )


HOST_A = "  - {name: a, address: a, cpus: 1, memory_mb: 1}\n"

# (file text, line of the mistake, text the message must contain)
MISTAKES: list[tuple[str, int | None, str]] = [
    ("", None, "empty"),
    ("# only a comment\n\n", None, "empty"),
    ("- a\n- b\n", 1, "must be a mapping"),
    ("\n\njust text\n", 3, "must be a mapping"),
    ("hosts:\n  - name: a\n   address: b\n", 3, "malformed YAML"),
    ("hosts: [a\n", 2, "malformed YAML"),
    ("hosts:\n\t- a\n", 2, "malformed YAML"),
    ("a: *nope\n", 1, "undefined alias"),
    ("hosts: []\n---\nhosts: []\n", 2, "one YAML document"),
    ("hosts:\n  - name: \x01\n", 2, "not allowed"),
    ("hosts:\n" + HOST_A + "host:\n  - x\n", 3, "unknown key 'host' (did you mean 'hosts'?)"),
    ("hosts:\n" + HOST_A + "1: x\n", 3, "unknown key '1'"),
    ("hosts:\n" + HOST_A + "[a]: x\n", 3, "a key must be a name, not a list"),
    ("hosts:\n" + HOST_A + "hosts: []\n", 3, "duplicate key 'hosts' (first on line 1)"),
    (
        "defaults:\n  usr: me\nhosts:\n" + HOST_A,
        2,
        "defaults: unknown key 'usr' (did you mean 'user'?)",
    ),
    ("defaults:\n  name: x\nhosts:\n" + HOST_A, 2, "'name' cannot have a default"),
    ("defaults: [user]\nhosts:\n" + HOST_A, 1, "'defaults' must be a mapping, got a list"),
    ("defaults:\n  port: 0\nhosts:\n" + HOST_A, 2, "defaults: 'port' must be a port"),
    (
        "defaults:\n  user: a\n  user: b\nhosts:\n" + HOST_A,
        3,
        "duplicate key 'user' (first on line 2)",
    ),
    ("\ndefaults: {user: a}\n", 2, "no 'hosts' list"),
    ("hosts: alpha\n", 1, "'hosts' must be a list, got 'alpha' (a string)"),
    ("hosts:\n\n", 1, "'hosts' must be a list, got nothing"),
    ("hosts: {name: a}\n", 1, "'hosts' must be a list, got a mapping"),
    ("hosts: []\n", 1, "'hosts' is empty"),
    ("hosts:\n" + HOST_A + "  - alpha\n", 3, "host #2 must be a mapping of keys, got 'alpha'"),
    ("hosts:\n  - address: a\n    cpus: 1\n    memory_mb: 1\n", 2, "host #1 has no 'name'"),
    ("hosts:\n  - name: a\n    cpus: 1\n    memory_mb: 1\n", 2, "host 'a' has no 'address'"),
    ("hosts:\n  - name: a\n    address: b\n    memory_mb: 1\n", 2, "host 'a' has no 'cpus'"),
    ("hosts:\n  - name: a\n    address: b\n    cpus: 1\n", 2, "host 'a' has no 'memory_mb'"),
    (
        "hosts:\n  - name: beta\n    address: b\n    cpu: 4\n    memory_mb: 1\n",
        4,
        "host 'beta': unknown key 'cpu' (did you mean 'cpus'?)",
    ),
    ("hosts:\n  - name: b\n    memory: 1\n", 3, "unknown key 'memory' (did you mean 'memory_mb'?)"),
    ("hosts:\n  - name: b\n    <<: 5\n", 3, "'<<' must merge a mapping"),
    ("hosts:\n  - name: b\n    name: c\n", 3, "host #1: duplicate key 'name' (first on line 2)"),
    ("hosts:\n  - name: a b\n", 2, "host #1: name 'a b' may only use letters, digits"),
    ("hosts:\n  - name: a/b\n", 2, "may only use letters"),
    ("hosts:\n  - name: ''\n", 2, "host #1: 'name' must not be empty"),
    ("hosts:\n  - name: 7\n", 2, "'name' must be a string, got '7' (an integer) (quote it)"),
    ("hosts:\n  - name: [a]\n", 2, "'name' must be a string, got a list"),
    (
        "hosts:\n  - {name: a, address: '', cpus: 1, memory_mb: 1}\n",
        2,
        "'address' must not be empty",
    ),
    (
        "hosts:\n  - {name: a, address: 10, cpus: 1, memory_mb: 1}\n",
        2,
        "'address' must be a string",
    ),
    (
        "hosts:\n  - {name: a, address: a, cpus: true, memory_mb: 1}\n",
        2,
        "'cpus' must be an integer, got 'true' (a boolean)",
    ),
    (
        "hosts:\n  - {name: a, address: a, cpus: eight, memory_mb: 1}\n",
        2,
        "'cpus' must be an integer, got 'eight' (a string)",
    ),
    (
        "hosts:\n  - {name: a, address: a, cpus: 1.5, memory_mb: 1}\n",
        2,
        "'cpus' must be an integer, got '1.5' (a number)",
    ),
    (
        "hosts:\n  - {name: a, address: a, cpus: , memory_mb: 1}\n",
        2,
        "'cpus' must be an integer, got nothing",
    ),
    (
        "hosts:\n  - {name: a, address: a, cpus: 0, memory_mb: 1}\n",
        2,
        "host 'a': 'cpus' must be between 1 and",
    ),
    (
        "hosts:\n  - {name: a, address: a, cpus: 1, memory_mb: -5}\n",
        2,
        "'memory_mb' must be between 1 and",
    ),
    (
        "hosts:\n  - {name: a, address: a, cpus: 1, memory_mb: 99999999999999999999}\n",
        2,
        "'memory_mb' must be between",
    ),
    (
        "hosts:\n  - name: a\n    address: a\n    cpus: 1\n    memory_mb: 1\n    port: 0\n",
        6,
        "'port' must be a port between 1 and 65535, got 0",
    ),
    ("hosts:\n  - name: a\n    port: 65536\n", 3, "got 65536"),
    ("hosts:\n  - name: a\n    port: '22'\n", 3, "'port' must be an integer, got '22' (a string)"),
    ("hosts:\n  - name: a\n    port: no\n", 3, "'port' must be an integer, got 'no' (a boolean)"),
    ("hosts:\n  - name: a\n    user: ~\n", 3, "'user' must be a string, got nothing"),
    ('hosts:\n  - name: a\n    user: "a\\nb"\n', 3, "'user' contains a control character"),
    (
        "hosts:\n  - name: a\n    identity_file: [k]\n",
        3,
        "'identity_file' must be a string, got a list",
    ),
    ("hosts:\n  - name: a\n    known_hosts: ''\n", 3, "'known_hosts' must not be empty"),
    ("hosts:\n  - name: a\n    workdir: '   '\n", 3, "'workdir' must not be empty"),
    ("hosts:\n  - name: a\n    python: {x: 1}\n", 3, "'python' must be a string, got a mapping"),
    (
        "hosts:\n  - name: a\n    labels: {x: 1}\n",
        3,
        "'labels' must be a list of strings, got a mapping",
    ),
    (
        "hosts:\n  - name: a\n    labels:\n      - ok\n      - 3\n",
        5,
        "'labels' must be a string, got '3'",
    ),
    ("hosts:\n  - name: a\n    labels: [ok, ~]\n", 3, "'labels' must be a string, got nothing"),
    ("hosts:\n  - name: a\n    cpus: !!int eight\n", 3, "cannot read 'eight' as !!int"),
    ("hosts:\n  - name: a\n    cpus: !!timestamp x\n", 3, "cannot read 'x' as !!timestamp"),
    ("hosts:\n  - name: a\n    cpus: !!bool maybe\n", 3, "cannot read"),
    ("hosts:\n  - name: a\n    cpus: !custom 4\n", 3, "cannot read '4' as !custom"),
    ("hosts:\n  - name: a\n    address: !!binary aGk=\n", 3, "'address' must be a string"),
    (
        "defaults:\n  keepalive_s: 0\nhosts:\n" + HOST_A,
        2,
        "defaults: 'keepalive_s' must be between 0.5 and 3600, got 0",
    ),
    (
        "hosts:\n  - {name: a, address: a, cpus: 1, memory_mb: 1, keepalive_s: fast}\n",
        2,
        "host 'a': 'keepalive_s' must be a number of seconds, got 'fast'",
    ),
    (
        "hosts:\n" + HOST_A + "  - {name: b, address: b, cpus: 1, memory_mb: 1}\n" + HOST_A,
        4,
        "duplicate host name 'a' (first used on line 2)",
    ),
    (
        "hosts:\n  - name: a\n    address: a\n    cpus: 1\n    memory_mb: 1\n"
        "  - address: b\n    cpus: 1\n    memory_mb: 1\n    name: a\n",
        9,
        "duplicate host name 'a' (first used on line 2)",
    ),
]


@pytest.mark.parametrize(("text", "line", "message"), MISTAKES)
def test_each_mistake_is_reported_with_its_line(text: str, line: int | None, message: str) -> None:
    path = write(text)
    error = load_error(path)
    assert error.line == line, str(error)
    assert message in error.message
    assert error.path == "cluster.yaml"
    assert str(error) == (f"cluster.yaml:{line}: " if line else "cluster.yaml: ") + error.message


def test_missing_file_has_no_line() -> None:
    error = load_error(Path("nowhere.yaml"))
    assert (error.path, error.line) == ("nowhere.yaml", None)
    assert "cannot read the cluster file" in error.message
    assert str(error).startswith("nowhere.yaml: ")


def test_directory_instead_of_file() -> None:
    Path("adir").mkdir()
    error = load_error(Path("adir"))
    assert error.line is None
    assert "cannot read the cluster file" in error.message


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason=beyond_our_control("as root, every file is readable"),
)
def test_unreadable_file() -> None:
    path = write_block(VALID)
    path.chmod(0)
    error = load_error(path)
    assert error.line is None
    assert "cannot read the cluster file" in error.message


def test_file_that_is_not_utf8() -> None:
    path = Path("latin1.yaml")
    path.write_bytes("hosts:\n  - name: caf\xe9\n".encode("latin-1"))
    error = load_error(path)
    assert error.line is None
    assert "not UTF-8" in error.message and "0xe9 on line 2" in error.message


def test_absurd_nesting_is_a_cluster_error() -> None:
    error = load_error(write("hosts: " + "[" * 50_000 + "]" * 50_000 + "\n"))
    assert "nested too deeply" in error.message


def test_embedded_default_is_this_machine() -> None:
    cluster = load_cluster(None)
    assert cluster == default_cluster()
    assert cluster.source == "<embedded default>"
    (host,) = cluster.hosts
    assert host.name == "local" and host.is_local
    assert host.cpus >= 1
    assert host.memory_mb > 0
    assert host.python == sys.executable
    if hasattr(os, "sched_getaffinity"):
        assert host.cpus == len(os.sched_getaffinity(0))


def test_to_dict_from_dict_round_trip() -> None:
    for host in load_cluster(EXAMPLE).hosts + default_cluster().hosts:
        snapshot = json.loads(json.dumps(host.to_dict()))
        assert set(snapshot) == set(HOST_FIELDS)
        assert Host.from_dict(snapshot) == host


def test_from_dict_tolerates_older_and_newer_snapshots() -> None:
    host = Host.from_dict(
        {"name": "a", "address": "a", "cpus": 1, "memory_mb": 2, "added_later": True}
    )
    assert host == Host(name="a", address="a", cpus=1, memory_mb=2)


def test_example_file_loads_and_shows_every_key() -> None:
    cluster = load_cluster(EXAMPLE)
    assert isinstance(cluster, Cluster)
    assert len(cluster.hosts) == 3
    assert sum(host.is_local for host in cluster.hosts) == 1
    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert set(raw["defaults"]) == {
        "user",
        "port",
        "identity_file",
        "known_hosts",
        "workdir",
        "python",
        "labels",
    }
    keys_in_hosts = set().union(*(set(host) for host in raw["hosts"]))
    assert keys_in_hosts == set(HOST_FIELDS)


# Anything at all, fed to the loader, gives a Cluster or a ClusterError: never a traceback.

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from(["local", "a", "~", "8", "yes", "-1", "0x10", "1:30", "2001-01-01"])
)
YAMLISH = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=10) | st.sampled_from(HOST_FIELDS), inner, max_size=4)
    ),
    max_leaves=20,
)
NEAR_VALID_HOST = st.dictionaries(st.sampled_from((*HOST_FIELDS, "cpu")), YAMLISH | SCALARS)
NEAR_VALID = st.fixed_dictionaries(
    {"hosts": st.lists(NEAR_VALID_HOST, max_size=4) | YAMLISH},
    optional={
        "defaults": st.dictionaries(st.sampled_from(HOST_FIELDS), SCALARS) | YAMLISH,
        "extra": YAMLISH,
    },
)

# Values drawn with whether the loader must accept them, to check it both ways.
GOOD_TEXT = st.text(min_size=1, max_size=12).filter(
    lambda text: bool(text.strip()) and not any(ord(c) < 32 or ord(c) == 127 for c in text)
)
BAD_TEXT = (
    st.sampled_from(["", "  ", "a\tb", "x\n"])
    | st.integers()
    | st.none()
    | st.lists(GOOD_TEXT, max_size=2)
)
NOT_AN_INT = st.booleans() | st.none() | st.text(max_size=5) | st.floats(allow_nan=False)
GOOD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "name": st.from_regex(r"[A-Za-z0-9._-]{1,6}", fullmatch=True),
    "address": GOOD_TEXT | st.just("local"),
    "cpus": st.integers(1, 512),
    "memory_mb": st.integers(1, 2**31 - 1),
    "labels": GOOD_TEXT | st.lists(GOOD_TEXT, max_size=3),
    "user": GOOD_TEXT,
    "port": st.integers(1, 65535),
    "identity_file": GOOD_TEXT,
    "known_hosts": GOOD_TEXT,
    "workdir": GOOD_TEXT,
    "python": GOOD_TEXT,
    "connection_persist_s": st.integers(0, 86400) | st.floats(0, 86400),
    "keepalive_s": st.integers(1, 3600) | st.floats(0.5, 3600),
}
BAD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "name": BAD_TEXT | st.sampled_from(["a b", "a/b", "é"]),
    "address": BAD_TEXT,
    "cpus": NOT_AN_INT | st.integers(max_value=0) | st.integers(min_value=2**31),
    "memory_mb": NOT_AN_INT | st.integers(max_value=0),
    "labels": st.none() | st.just("") | st.lists(st.integers() | st.none(), min_size=1),
    "user": BAD_TEXT,
    "port": NOT_AN_INT | st.integers(max_value=0) | st.integers(min_value=65536),
    "identity_file": BAD_TEXT,
    "known_hosts": BAD_TEXT,
    "workdir": BAD_TEXT,
    "python": BAD_TEXT,
    "connection_persist_s": st.none()
    | st.booleans()
    | GOOD_TEXT
    | st.integers(max_value=-1)
    | st.floats(min_value=86400.5, allow_infinity=False)
    | st.just(float("nan")),
    "keepalive_s": st.none()
    | st.booleans()
    | GOOD_TEXT
    | st.floats(max_value=0.49)
    | st.floats(min_value=3600.5, allow_infinity=False)
    | st.just(float("nan")),
}


@st.composite
def judged_host(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    """A host mapping, and whether every key in it is present when needed and valid."""
    host: dict[str, Any] = {}
    valid = True
    for key in HOST_FIELDS:
        required = key in ("name", "address", "cpus", "memory_mb")
        choice = draw(st.sampled_from(["good"] * 14 + ["bad", "absent"]))
        if choice == "absent" or (choice == "good" and not required and draw(st.booleans())):
            valid = valid and not required
        elif choice == "good":
            host[key] = draw(GOOD_VALUES[key])
        else:
            host[key] = draw(BAD_VALUES[key])
            valid = False
    if draw(st.integers(0, 9)) == 0:
        host["cpu"] = 1
        valid = False
    return host, valid


ANYTHING = settings(
    max_examples=300,
    deadline=None,
    # The fixtures only set HOME and the working directory; sharing them between examples is fine.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def loads_or_reports(path: Path) -> None:
    try:
        cluster = load_cluster(path)
    except ClusterError as error:
        assert error.path == str(path)
        assert error.line is None or error.line >= 1
    else:
        assert cluster.hosts
        for host in cluster.hosts:
            assert Host.from_dict(json.loads(json.dumps(host.to_dict()))) == host


@ANYTHING
@given(st.text())
def test_any_text_loads_or_reports(text: str) -> None:
    path = Path("fuzz.yaml")
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    loads_or_reports(path)


@ANYTHING
@given(st.binary())
def test_any_bytes_load_or_report(data: bytes) -> None:
    path = Path("fuzz.yaml")
    path.write_bytes(data)
    loads_or_reports(path)


@ANYTHING
@given(YAMLISH | NEAR_VALID)
def test_any_yaml_structure_loads_or_reports(document: Any) -> None:
    path = Path("fuzz.yaml")
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    loads_or_reports(path)


def expected_host(written: dict[str, Any]) -> Host:
    """What the loader must make of a valid host mapping."""
    values = dict(written)
    for key in ("identity_file", "known_hosts"):
        if key in values:
            values[key] = os.path.join(os.getcwd(), os.path.expanduser(values[key]))
    labels = values.get("labels", ())
    values["labels"] = (labels,) if isinstance(labels, str) else tuple(dict.fromkeys(labels))
    if values["address"] == "local" and "python" not in values:
        values["python"] = sys.executable
    return Host(**values)


@ANYTHING
@given(st.lists(judged_host(), min_size=1, max_size=3))
def test_valid_hosts_load_and_invalid_ones_are_refused(
    judged: list[tuple[dict[str, Any], bool]],
) -> None:
    hosts = [host for host, _ in judged]
    names = [host.get("name") for host in hosts]
    valid = all(ok for _, ok in judged) and len(set(names)) == len(names)
    path = Path("fuzz.yaml")
    path.write_text(yaml.safe_dump({"hosts": hosts}), encoding="utf-8")
    if not valid:
        with pytest.raises(ClusterError):
            load_cluster(path)
        return
    cluster = load_cluster(path)
    assert list(cluster.hosts) == [expected_host(host) for host in hosts]
