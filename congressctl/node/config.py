"""The node config file that `congressctl serve` reads (rendered per node by `congressctl render`)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from congressctl.errors import NodeConfigError
from congressctl.inventory import ROLES


@dataclass
class ApiConfig:
    bind: str = "0.0.0.0"
    port: int = 1789


@dataclass
class BusConfig:
    host: str
    port: int = 6379
    password_file: str = "/etc/congressctl/bus.password"
    password: str = field(default="", repr=False)
    tls: bool = False
    tls_ca_file: str | None = None
    sync_replicas: int = 0     # replicas that must confirm a write before it is acknowledged (0: asynchronous)


@dataclass
class NodeTimings:
    heartbeat_interval_ms: int = 200
    peer_timeout_ms: int = 1000
    full_sync_interval_s: float = 30.0
    executed_ttl_s: int = 3600

    @property
    def heartbeat_s(self) -> float:
        return self.heartbeat_interval_ms / 1000.0

    @property
    def peer_timeout_s(self) -> float:
        return self.peer_timeout_ms / 1000.0


@dataclass
class Paths:
    log_dir: str = "/var/log/congressctl"
    state_dir: str = "/var/lib/congressctl"


@dataclass
class TestHooks:
    """Fault injection read only by tests: publications to drop, as "ds:table:seq" (any epoch)."""

    drop_publish: list[str] = field(default_factory=list)


@dataclass
class NodeConfig:
    cluster: str
    node_id: str
    roles: list[str]
    api: ApiConfig
    bus: BusConfig
    timings: NodeTimings
    paths: Paths
    test_hooks: TestHooks
    file: str = ""


def _fail(path: str, field_name: str, message: str) -> NodeConfigError:
    return NodeConfigError(message, file=path, field=field_name)


def _section(doc: dict, name: str, path: str, required: bool = False) -> dict:
    value = doc.get(name)
    if value is None:
        if required:
            raise _fail(path, name, "missing section")
        return {}
    if not isinstance(value, dict):
        raise _fail(path, name, "must be a mapping")
    return value


def _typed(section: dict, key: str, kind: type, default: Any, path: str, prefix: str) -> Any:
    value = section.get(key, default)
    if value is None and default is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise _fail(path, f"{prefix}.{key}", f"must be {kind.__name__}, got {value!r}")
    return value


def _positive(value: float, path: str, name: str) -> float:
    if value <= 0:
        raise _fail(path, name, f"must be > 0, got {value}")
    return value


def _read_password(password_file: str, path: str) -> str:
    try:
        st = os.stat(password_file)
        password = Path(password_file).read_text().strip()
    except OSError as exc:
        raise _fail(path, "bus.password_file", f"cannot read {password_file}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise _fail(path, "bus.password_file", f"{password_file} must be mode 0600 (is {oct(st.st_mode & 0o777)})")
    if not password:
        raise _fail(path, "bus.password_file", f"{password_file} is empty")
    return password


def load_node_config(path: str | os.PathLike) -> NodeConfig:
    """Read and check a node config; the bus password is read from its 0600 file (never logged)."""
    path = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise _fail(path, "", f"cannot read config: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise NodeConfigError(f"not valid YAML: {getattr(exc, 'problem', exc)}", file=path,
                              line=mark.line + 1 if mark else None) from None
    if not isinstance(doc, dict):
        raise _fail(path, "", "must be a YAML mapping")
    for key in ("cluster", "node_id"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise _fail(path, key, "required string")
    roles = doc.get("roles", [])
    if not isinstance(roles, list) or any(r not in ROLES for r in roles):
        raise _fail(path, "roles", f"must be a list of {', '.join(ROLES)}")

    api_s = _section(doc, "api", path)
    api = ApiConfig(bind=str(_typed(api_s, "bind", str, "0.0.0.0", path, "api")),
                    port=_typed(api_s, "port", int, 1789, path, "api"))
    bus_s = _section(doc, "bus", path, required=True)
    if "host" not in bus_s:
        raise _fail(path, "bus.host", "required")
    bus = BusConfig(host=str(bus_s["host"]), port=_typed(bus_s, "port", int, 6379, path, "bus"),
                    password_file=_typed(bus_s, "password_file", str, "/etc/congressctl/bus.password", path, "bus"),
                    tls=_typed(bus_s, "tls", bool, False, path, "bus"),
                    tls_ca_file=_typed(bus_s, "tls_ca_file", str, None, path, "bus"),
                    sync_replicas=_typed(bus_s, "sync_replicas", int, 0, path, "bus"))
    if bus.sync_replicas < 0:
        raise _fail(path, "bus.sync_replicas", "must be 0 or more")
    bus.password = _read_password(bus.password_file, path)
    t_s = _section(doc, "timings", path)
    timings = NodeTimings(
        heartbeat_interval_ms=_typed(t_s, "heartbeat_interval_ms", int, 200, path, "timings"),
        peer_timeout_ms=_typed(t_s, "peer_timeout_ms", int, 1000, path, "timings"),
        full_sync_interval_s=_typed(t_s, "full_sync_interval_s", float, 30.0, path, "timings"),
        executed_ttl_s=_typed(t_s, "executed_ttl_s", int, 3600, path, "timings"))
    for name in ("heartbeat_interval_ms", "peer_timeout_ms", "full_sync_interval_s", "executed_ttl_s"):
        _positive(getattr(timings, name), path, f"timings.{name}")
    if timings.peer_timeout_ms <= timings.heartbeat_interval_ms:
        raise _fail(path, "timings.peer_timeout_ms", "must be greater than heartbeat_interval_ms")
    p_s = _section(doc, "paths", path)
    paths = Paths(log_dir=_typed(p_s, "log_dir", str, Paths.log_dir, path, "paths"),
                  state_dir=_typed(p_s, "state_dir", str, Paths.state_dir, path, "paths"))
    h_s = _section(doc, "test_hooks", path)
    drops = h_s.get("drop_publish", [])
    if not isinstance(drops, list) or not all(isinstance(d, str) for d in drops):
        raise _fail(path, "test_hooks.drop_publish", "must be a list of 'ds:table:seq' strings")
    return NodeConfig(cluster=doc["cluster"], node_id=doc["node_id"], roles=list(roles), api=api, bus=bus,
                      timings=timings, paths=paths, test_hooks=TestHooks(drop_publish=drops), file=path)
