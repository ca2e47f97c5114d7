"""Load and validate the cluster YAML into frozen dataclasses; every error names file and line."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sshwasm.errors import ClusterError


class _LazyYaml:
    """PyYAML, imported on first use: a cluster file found in cluster_cache needs none."""

    def __getattr__(self, name: str) -> Any:
        import yaml as module

        globals()["yaml"] = module  # later uses go straight to it
        return getattr(module, name)


if TYPE_CHECKING:
    import yaml
else:
    yaml = _LazyYaml()

DEFAULT_WORKDIR = "~/.sshwasm"

# -- engine (issue 12) ----------------------------------------------------------------------
# `engine: ssh` (the default) drives jobs from this machine over SSH; `engine: dask` hands
# them to a Dask distributed pool that `sshwasm pool up` starts on the hosts.
ENGINES = ("ssh", "dask")
_ENGINE_KEYS = ("engine", "dask")
_DASK_KEYS = ("scheduler", "port", "dashboard_port", "tls")
DEFAULT_DASK_PORT = 8786
DEFAULT_DASK_DASHBOARD_PORT = 8787
# -- end engine -----------------------------------------------------------------------------
LOCAL_ADDRESS = "local"
DEFAULT_CONNECTION_PERSIST_S = 600.0
# A persisting connection lasts at most a day after its last use.
MAX_CONNECTION_PERSIST_S = 86400.0
# How often an idle connection is probed (OpenSSH's ServerAliveInterval); a host that misses
# three probes in a row is taken for gone.
DEFAULT_KEEPALIVE_S = 5.0
KEEPALIVE_RANGE_S = (0.5, 3600.0)
EMBEDDED_SOURCE = "<embedded default>"

_TOP_KEYS = ("defaults", "hosts", *_ENGINE_KEYS)
_HOST_KEYS = (
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
_DEFAULT_KEYS = tuple(key for key in _HOST_KEYS if key != "name")
_REQUIRED_KEYS = ("name", "address", "cpus", "memory_mb")
_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
# Keeps capacities inside SQLite's and JSON's exact integer range, far above any real machine.
_MAX_CAPACITY = 2**31 - 1
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"


@dataclass(frozen=True)
class Host:
    """One machine jobs can run on, as the cluster file describes it."""

    name: str
    address: str
    cpus: int
    memory_mb: int
    labels: tuple[str, ...] = ()
    user: str | None = None
    port: int | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    workdir: str = DEFAULT_WORKDIR
    python: str = "python3"
    # How long the per-user connection process (sshwasm/mux) keeps this host's connection
    # open after its last use; 0 connects directly from each command, as ssh does.
    connection_persist_s: float = DEFAULT_CONNECTION_PERSIST_S
    # Between keepalive probes of an idle connection; three missed in a row and the host is
    # taken for gone (its jobs re-attach, or with --retries go elsewhere).
    keepalive_s: float = DEFAULT_KEEPALIVE_S

    @property
    def is_local(self) -> bool:
        """True when jobs run on this machine without SSH."""
        return self.address == LOCAL_ADDRESS

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot of this host, as stored with each job."""
        data = dataclasses.asdict(self)
        data["labels"] = list(self.labels)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Host:
        """Rebuild a host from `to_dict` output; keys it does not know are ignored."""
        known = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        if "labels" in values:
            values["labels"] = tuple(values["labels"])
        return cls(**values)


@dataclass(frozen=True)
class DaskSettings:
    """The `dask:` block: where the pool's scheduler runs, its ports, and whether it uses TLS."""

    scheduler: str
    port: int = DEFAULT_DASK_PORT
    dashboard_port: int = DEFAULT_DASK_DASHBOARD_PORT
    tls: bool = True


@dataclass(frozen=True)
class Cluster:
    """The hosts jobs can be placed on, and the file they came from."""

    hosts: tuple[Host, ...]
    source: str
    # "ssh" or "dask"; `dask` is set exactly when the engine is "dask".
    engine: str = "ssh"
    dask: DaskSettings | None = None

    def host(self, name: str) -> Host | None:
        """The host called `name`, or None."""
        for host in self.hosts:
            if host.name == name:
                return host
        return None


def default_cluster() -> Cluster:
    """One host, `local`: this machine with the CPUs and memory the OS reports."""
    host = Host(
        name="local",
        address=LOCAL_ADDRESS,
        cpus=_usable_cpus(),
        memory_mb=_physical_memory_mb(),
        python=sys.executable or "python3",
    )
    return Cluster(hosts=(host,), source=EMBEDDED_SOURCE)


def load_cluster(path: Path | None) -> Cluster:
    """Read and validate the cluster file at `path`; None gives `default_cluster()`."""
    if path is None:
        return default_cluster()
    from . import cluster_cache

    loader = _Loader(Path(path))
    data = loader.read_bytes()
    cached = cluster_cache.load(loader.path, data)
    if cached is not None:
        return cached
    cluster = loader.load(data)
    cluster_cache.save(loader.path, data, cluster)
    return cluster


def _usable_cpus() -> int:
    # Affinity counts what a container or taskset actually lets us use; cpu_count does not.
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


def _physical_memory_mb() -> int:
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page_size = os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 1024  # a platform without sysconf: a modest guess beats refusing to run
    if pages <= 0 or page_size <= 0:
        return 1024
    return max(1, pages * page_size // 2**20)


@dataclass(frozen=True)
class _Entry:
    """A key's value node and the line (1-based) the key is on."""

    key_line: int
    value: yaml.Node


@dataclass(frozen=True)
class _Setting:
    """A validated value and the line it came from."""

    value: Any
    line: int


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _describe(node: yaml.Node, value: Any) -> str:
    """How to show an unexpected value in a message."""
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if value is None:
        return "nothing"
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), "a " + type(value).__name__
    )
    text = node.value if len(node.value) <= 40 else node.value[:37] + "..."
    return f"{text!r} ({kind})"


def _written_name(node: yaml.MappingNode) -> yaml.Node | None:
    """The value of the one `name` key written directly in a host mapping, if any."""
    found = [
        value
        for key, value in node.value
        if isinstance(key, yaml.ScalarNode) and key.tag == _STR_TAG and key.value == "name"
    ]
    return found[0] if len(found) == 1 else None


def _suggest(key: str, valid: tuple[str, ...]) -> str:
    import difflib  # only for a mistake: not on every command's path

    matches = difflib.get_close_matches(key.lower(), valid, n=1)
    return f" (did you mean '{matches[0]}'?)" if matches else ""


class _Loader:
    """Validates one cluster file; holds its path so every error can name it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        # The validator for each host key.
        self.readers: dict[str, Callable[[str, str, yaml.Node], Any]] = {
            "name": self.read_name,
            "address": self.read_string,
            "cpus": self.read_capacity,
            "memory_mb": self.read_capacity,
            "labels": self.read_labels,
            "user": self.read_string,
            "port": self.read_port,
            "identity_file": self.read_local_path,
            "known_hosts": self.read_local_path,
            "workdir": self.read_string,
            "python": self.read_string,
            "connection_persist_s": self.read_persist,
            "keepalive_s": self.read_keepalive,
        }

    def fail(self, line: int | None, message: str) -> ClusterError:
        return ClusterError(self.where, line, message)

    def load(self, data: bytes) -> Cluster:
        root = self.compose(self.decode(data))
        if root is None:
            raise self.fail(None, "the cluster file is empty; it needs a 'hosts' list")
        if not isinstance(root, yaml.MappingNode):
            raise self.fail(
                _line(root),
                f"the cluster file must be a mapping with 'hosts', got {self.show(root)}",
            )
        top = self.read_mapping(root, "top level", _TOP_KEYS)
        defaults: dict[str, _Setting] = {}
        if "defaults" in top:
            defaults = self.read_defaults(top["defaults"])
        if "hosts" not in top:
            raise self.fail(_line(root), "no 'hosts' list: the cluster needs at least one host")
        hosts_node = top["hosts"].value
        if not isinstance(hosts_node, yaml.SequenceNode):
            raise self.fail(
                _line(hosts_node), f"'hosts' must be a list, got {self.show(hosts_node)}"
            )
        if not hosts_node.value:
            raise self.fail(_line(hosts_node), "'hosts' is empty: list at least one host")
        hosts: list[Host] = []
        name_lines: dict[str, int] = {}
        for index, host_node in enumerate(hosts_node.value, start=1):
            host, name_line = self.read_host(host_node, index, defaults)
            if host.name in name_lines:
                raise self.fail(
                    name_line,
                    f"duplicate host name '{host.name}' "
                    f"(first used on line {name_lines[host.name]})",
                )
            name_lines[host.name] = name_line
            hosts.append(host)
        engine, dask = self.read_engine(root, top, hosts)
        return Cluster(hosts=tuple(hosts), source=self.where, engine=engine, dask=dask)

    def read_engine(
        self, root: yaml.Node, top: Mapping[str, _Entry], hosts: list[Host]
    ) -> tuple[str, DaskSettings | None]:
        """`engine:` and its `dask:` block, checked against each other and the hosts."""
        engine = "ssh"
        if "engine" in top:
            node = top["engine"].value
            engine = self.read_string("top level", "engine", node)
            if engine not in ENGINES:
                raise self.fail(
                    _line(node),
                    f"'engine' must be one of {', '.join(ENGINES)}, got {engine!r}"
                    f"{_suggest(engine, ENGINES)}",
                )
        if "dask" not in top:
            if engine == "dask":
                raise self.fail(
                    _line(top["engine"].value),
                    "'engine: dask' needs a 'dask:' block naming its 'scheduler' host",
                )
            return engine, None
        node = top["dask"].value
        if engine != "dask":
            raise self.fail(
                top["dask"].key_line, "a 'dask:' block needs 'engine: dask' (the engine is ssh)"
            )
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(_line(node), f"'dask' must be a mapping, got {self.show(node)}")
        entries = self.read_mapping(node, "dask", _DASK_KEYS)
        if "scheduler" not in entries:
            raise self.fail(_line(node), "dask: no 'scheduler' (the host that runs it)")
        scheduler_node = entries["scheduler"].value
        scheduler = self.read_string("dask", "scheduler", scheduler_node)
        names = [host.name for host in hosts]
        if scheduler not in names:
            raise self.fail(
                _line(scheduler_node),
                f"dask: 'scheduler' must name a host of 'hosts', got {scheduler!r}"
                f"{_suggest(scheduler, tuple(names))}",
            )
        local = [host.name for host in hosts if host.is_local]
        if local:
            raise self.fail(
                _line(node),
                f"dask: host '{local[0]}' has 'address: local'; every host of a Dask pool "
                "is reached over SSH",
            )
        settings = DaskSettings(scheduler=scheduler)
        if "port" in entries:
            settings = dataclasses.replace(
                settings, port=self.read_port("dask", "port", entries["port"].value)
            )
        if "dashboard_port" in entries:
            dashboard_node = entries["dashboard_port"].value
            settings = dataclasses.replace(
                settings, dashboard_port=self.read_port("dask", "dashboard_port", dashboard_node)
            )
        if settings.port == settings.dashboard_port:
            raise self.fail(
                _line(node), f"dask: 'port' and 'dashboard_port' are both {settings.port}"
            )
        if "tls" in entries:
            value_node = entries["tls"].value
            tls = self.scalar(value_node) if isinstance(value_node, yaml.ScalarNode) else None
            if not isinstance(tls, bool):
                raise self.fail(
                    _line(value_node),
                    f"dask: 'tls' must be true or false, got {_describe(value_node, tls)}",
                )
            settings = dataclasses.replace(settings, tls=tls)
        return engine, settings

    def read_bytes(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise self.fail(None, f"cannot read the cluster file: {exc.strerror or exc}") from exc

    def decode(self, data: bytes) -> str:
        try:
            # utf-8-sig: editors on Windows prepend a BOM that is not part of the YAML.
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise self.fail(
                None, f"not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line})"
            ) from exc

    def compose(self, text: str) -> yaml.Node | None:
        try:
            return yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else None
            if isinstance(exc, yaml.composer.ComposerError) and "single document" in str(
                exc.context
            ):
                raise self.fail(line, "the cluster file must be one YAML document") from exc
            problem = exc.problem or exc.context or "unreadable"
            context = ""
            if exc.context and exc.problem and exc.context_mark is not None:
                context = f" ({exc.context} on line {exc.context_mark.line + 1})"
            raise self.fail(line, f"malformed YAML: {problem}{context}") from exc
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            raise self.fail(
                line, f"malformed YAML: character {exc.character!r} is not allowed"
            ) from exc
        except yaml.YAMLError as exc:
            raise self.fail(None, f"malformed YAML: {exc}") from exc
        except RecursionError as exc:
            # PyYAML composes nested collections recursively; absurd nesting exhausts the stack.
            raise self.fail(None, "malformed YAML: nested too deeply") from exc

    def show(self, node: yaml.Node) -> str:
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        return _describe(node, value)

    def scalar(self, node: yaml.Node) -> Any:
        """The Python value of a scalar node, as yaml.safe_load would give it."""
        try:
            return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
        except Exception as exc:
            # Explicit tags on bad text (`!!int x`, `!!timestamp x`, `!!bool maybe`) make
            # PyYAML's constructors raise ValueError, KeyError, IndexError, AttributeError...
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise self.fail(_line(node), f"cannot read {node.value!r} as {tag}") from exc

    def read_mapping(
        self, node: yaml.MappingNode, context: str, allowed: tuple[str, ...]
    ) -> dict[str, _Entry]:
        """The mapping's keys, with `<<` merges applied; rejects duplicate and unknown keys."""
        entries: dict[str, _Entry] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.key_name(key_node, context, allowed)
            if key in entries:
                raise self.fail(
                    _line(key_node),
                    f"{context}: duplicate key '{key}' (first on line {entries[key].key_line})",
                )
            entries[key] = _Entry(_line(key_node), value_node)
        # Keys written in the mapping win over merged ones, and earlier merges over later ones.
        for merged_key, merged_value in self.merged_pairs(node, context, {id(node)}):
            key = self.key_name(merged_key, context, allowed)
            if key not in entries:
                entries[key] = _Entry(_line(merged_key), merged_value)
        return entries

    def key_name(self, key_node: yaml.Node, context: str, allowed: tuple[str, ...]) -> str:
        """The key's text if it is one of `allowed`; else an error naming the nearest one."""
        if not isinstance(key_node, yaml.ScalarNode):
            kind = "a list" if isinstance(key_node, yaml.SequenceNode) else "a mapping"
            raise self.fail(_line(key_node), f"{context}: a key must be a name, not {kind}")
        text = str(key_node.value)
        if key_node.tag == _STR_TAG and text in allowed:
            return text
        if context == "defaults" and text == "name":
            raise self.fail(
                _line(key_node), "defaults: 'name' cannot have a default; every host needs its own"
            )
        raise self.fail(
            _line(key_node), f"{context}: unknown key '{text}'{_suggest(text, allowed)}"
        )

    def merged_pairs(
        self, node: yaml.MappingNode, context: str, visited: set[int]
    ) -> list[tuple[yaml.Node, yaml.Node]]:
        """Key/value pairs brought in by `<<: *anchor`, highest priority first."""
        pairs: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                continue
            sources = (
                value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            )
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    raise self.fail(
                        _line(key_node), f"{context}: '<<' must merge a mapping or a list of them"
                    )
                # A mapping met again can only add keys already present (the first wins), so
                # skipping it changes nothing, ends cycles, and stops aliases multiplying work.
                if id(source) in visited:
                    continue
                visited.add(id(source))
                pairs.extend((key, value) for key, value in source.value if key.tag != _MERGE_TAG)
                pairs.extend(self.merged_pairs(source, context, visited))
        return pairs

    def read_defaults(self, entry: _Entry) -> dict[str, _Setting]:
        node = entry.value
        if isinstance(node, yaml.ScalarNode) and self.scalar(node) is None:
            return {}  # `defaults:` with nothing under it
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(_line(node), f"'defaults' must be a mapping, got {self.show(node)}")
        entries = self.read_mapping(node, "defaults", _DEFAULT_KEYS)
        return {key: self.read_field("defaults", key, item) for key, item in entries.items()}

    def read_host(
        self, node: yaml.Node, index: int, defaults: Mapping[str, _Setting]
    ) -> tuple[Host, int]:
        """The host described by `node`, and the line its name is on."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(
                _line(node), f"host #{index} must be a mapping of keys, got {self.show(node)}"
            )
        context = f"host #{index}"
        # Name the host in later messages, but only once its name is known to be sound.
        name_node = _written_name(node)
        if name_node is not None:
            context = f"host '{self.read_name(context, 'name', name_node)}'"
        entries = self.read_mapping(node, context, _HOST_KEYS)
        settings = dict(defaults)
        for key, item in entries.items():
            settings[key] = self.read_field(context, key, item)
        for key in _REQUIRED_KEYS:
            if key not in settings:
                raise self.fail(_line(node), f"{context} has no '{key}'")
        values = {key: setting.value for key, setting in settings.items()}
        if values["address"] == LOCAL_ADDRESS and "python" not in entries:
            # The coordinator's own interpreter has wasmtime; a `python3` meant for remote
            # workers (the usual reason for a default) may not.
            values["python"] = sys.executable or values.get("python", "python3")
        values["labels"] = tuple(values.get("labels", ()))
        return Host(**values), settings["name"].line

    def read_name(self, context: str, key: str, node: yaml.Node) -> str:
        name = self.read_string(context, key, node)
        if not _NAME_PATTERN.fullmatch(name):
            raise self.fail(
                _line(node),
                f"{context}: name {name!r} may only use letters, digits, '.', '_' and '-'",
            )
        return name

    def read_field(self, context: str, key: str, entry: _Entry) -> _Setting:
        return _Setting(self.readers[key](context, key, entry.value), _line(entry.value))

    def read_int(self, context: str, key: str, node: yaml.Node) -> int:
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(
                _line(node), f"{context}: '{key}' must be an integer, got {_describe(node, value)}"
            )
        return value

    def read_persist(self, context: str, key: str, node: yaml.Node) -> float:
        return self.read_seconds(context, key, node, (0.0, MAX_CONNECTION_PERSIST_S), " (off)")

    def read_keepalive(self, context: str, key: str, node: yaml.Node) -> float:
        return self.read_seconds(context, key, node, KEEPALIVE_RANGE_S, "")

    def read_seconds(
        self,
        context: str,
        key: str,
        node: yaml.Node,
        bounds: tuple[float, float],
        low_means: str,
    ) -> float:
        """A number of seconds within `bounds`; `low_means` explains the lowest value."""
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(
                _line(node),
                f"{context}: '{key}' must be a number of seconds, got {_describe(node, value)}",
            )
        low, high = bounds
        if not low <= value <= high:
            raise self.fail(
                _line(node),
                f"{context}: '{key}' must be between {low:g}{low_means} and {high:g}, got {value}",
            )
        return float(value)

    def read_capacity(self, context: str, key: str, node: yaml.Node) -> int:
        value = self.read_int(context, key, node)
        if not 1 <= value <= _MAX_CAPACITY:
            raise self.fail(
                _line(node),
                f"{context}: '{key}' must be between 1 and {_MAX_CAPACITY}, got {value}",
            )
        return value

    def read_port(self, context: str, key: str, node: yaml.Node) -> int:
        value = self.read_int(context, key, node)
        if not 1 <= value <= 65535:
            raise self.fail(
                _line(node), f"{context}: '{key}' must be a port between 1 and 65535, got {value}"
            )
        return value

    def read_string(self, context: str, key: str, node: yaml.Node) -> str:
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if not isinstance(value, str):
            hint = " (quote it)" if isinstance(value, (int, float)) else ""
            raise self.fail(
                _line(node),
                f"{context}: '{key}' must be a string, got {_describe(node, value)}{hint}",
            )
        if not value.strip():
            raise self.fail(_line(node), f"{context}: '{key}' must not be empty")
        if _CONTROL_CHARS.search(value):
            raise self.fail(_line(node), f"{context}: '{key}' contains a control character")
        return value

    def read_local_path(self, context: str, key: str, node: yaml.Node) -> str:
        # '~' means the coordinator's home, and a relative path the cluster file's folder,
        # so the meaning does not change with the directory sshwasm is started from.
        path = os.path.expanduser(self.read_string(context, key, node))
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(os.path.abspath(self.path)), path)
        return path

    def read_labels(self, context: str, key: str, node: yaml.Node) -> tuple[str, ...]:
        if isinstance(node, yaml.ScalarNode):
            return (self.read_string(context, key, node),)
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(
                _line(node), f"{context}: '{key}' must be a list of strings, got a mapping"
            )
        labels: list[str] = []
        for item in node.value:
            label = self.read_string(context, "labels", item)
            if label not in labels:
                labels.append(label)
        return tuple(labels)
