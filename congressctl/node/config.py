"""The node config file that `congressctl serve` reads (rendered per node by `congressctl render`)."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from congressctl.errors import NodeConfigError
from congressctl.inventory import DEFAULT_MAX_BODY_MB, DEFAULT_MAX_ROWS_PER_PUT, ROLES, TOKEN_ROLES
from congressctl.payloads import TokenHash

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class ApiConfig:
    bind: str = "0.0.0.0"
    port: int = 1789
    # a rows PUT with more rows is refused (413) before anything is written
    max_rows_per_put: int = DEFAULT_MAX_ROWS_PER_PUT


@dataclass
class AuthConfig:
    tokens: list[TokenHash] = field(default_factory=list)   # none: every request but / and /healthz is 401


@dataclass
class LimitsConfig:
    max_body_mb: int = DEFAULT_MAX_BODY_MB


@dataclass
class ApiTlsConfig:
    """The certificate the api-pe serves HTTPS with (the `api_tls` section; without it, plain HTTP)."""

    cert_file: str
    key_file: str


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
class MetricsConfig:
    """Where each role serves /metrics (0: nowhere; a config without the section serves none), and whether
    the node records its request and latency histograms at all (`record: false` is the benchmark's baseline)."""

    bind: str = "127.0.0.1"
    api_pe_port: int = 0
    dsd_port: int = 0
    record: bool = True

    def port(self, role: str) -> int:
        return self.api_pe_port if role == "api-pe" else self.dsd_port


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
class DatasourceRules:
    """URL prefixes an http datasource's url and action_url must start with (none: no http datasource, and no
    action_url, is allowed)."""

    allowed_urls: list[str] = field(default_factory=list)

    def refused(self, url: str) -> bool:
        return not any(url.startswith(prefix) for prefix in self.allowed_urls)


@dataclass
class TestHooks:
    """Fault injection read only by tests, each as "ds:table:seq" (any epoch): publications the DSD drops, and
    diffs an api-pe drops on arrival (as diffs that waited behind a resync are)."""

    drop_publish: list[str] = field(default_factory=list)
    skip_diffs: list[str] = field(default_factory=list)


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
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    datasources: DatasourceRules = field(default_factory=DatasourceRules)
    file: str = ""
    api_tls: ApiTlsConfig | None = None


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
    max_rows = _typed(api_s, "max_rows_per_put", int, DEFAULT_MAX_ROWS_PER_PUT, path, "api")
    api = ApiConfig(bind=str(_typed(api_s, "bind", str, "0.0.0.0", path, "api")),
                    port=_typed(api_s, "port", int, 1789, path, "api"),
                    max_rows_per_put=int(_positive(max_rows, path, "api.max_rows_per_put")))
    auth = AuthConfig(tokens=_tokens(_section(doc, "auth", path).get("tokens", []), path))
    limits = LimitsConfig(max_body_mb=_typed(_section(doc, "limits", path), "max_body_mb", int, DEFAULT_MAX_BODY_MB,
                                             path, "limits"))
    _positive(limits.max_body_mb, path, "limits.max_body_mb")
    tls_s = _section(doc, "api_tls", path)
    api_tls = ApiTlsConfig(cert_file=_typed(tls_s, "cert_file", str, "", path, "api_tls"),
                           key_file=_typed(tls_s, "key_file", str, "", path, "api_tls")) if tls_s else None
    if api_tls and not (api_tls.cert_file and api_tls.key_file):
        raise _fail(path, "api_tls", "needs cert_file and key_file")
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
    m_s = _section(doc, "metrics", path)
    metrics = MetricsConfig(bind=_typed(m_s, "bind", str, api.bind, path, "metrics"),
                            api_pe_port=_typed(m_s, "api_pe_port", int, 0, path, "metrics"),
                            dsd_port=_typed(m_s, "dsd_port", int, 0, path, "metrics"),
                            record=_typed(m_s, "record", bool, True, path, "metrics"))
    for name in ("api_pe_port", "dsd_port"):
        if not 0 <= getattr(metrics, name) <= 65535:
            raise _fail(path, f"metrics.{name}", "must be 0 (no /metrics) or a port")
    h_s = _section(doc, "test_hooks", path)
    hooks = {name: h_s.get(name, []) for name in ("drop_publish", "skip_diffs")}
    for name, value in hooks.items():
        if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
            raise _fail(path, f"test_hooks.{name}", "must be a list of 'ds:table:seq' strings")
    return NodeConfig(cluster=doc["cluster"], node_id=doc["node_id"], roles=list(roles), api=api, bus=bus,
                      timings=timings, paths=paths, test_hooks=TestHooks(**hooks), metrics=metrics,
                      auth=auth, limits=limits,
                      datasources=_datasource_rules(_section(doc, "datasources", path), path), file=path,
                      api_tls=api_tls)


def _tokens(items: Any, path: str) -> list[TokenHash]:
    if not isinstance(items, list):
        raise _fail(path, "auth.tokens", "must be a list of {name, role, sha256}")
    tokens = []
    for i, item in enumerate(items):
        where = f"auth.tokens[{i}]"
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("name", "role", "sha256")):
            raise _fail(path, where, "must be {name, role, sha256} strings")
        if item["role"] not in TOKEN_ROLES:
            raise _fail(path, f"{where}.role", f"must be one of {', '.join(TOKEN_ROLES)}")
        if not SHA256_HEX.match(item["sha256"]):
            raise _fail(path, f"{where}.sha256", "must be 64 lowercase hex digits (the sha256 of the token)")
        tokens.append(TokenHash.from_dict(item))
    return tokens


def _datasource_rules(section: dict, path: str) -> DatasourceRules:
    allowed = section.get("allowed_urls", [])
    if not isinstance(allowed, list) or not all(isinstance(u, str) and u for u in allowed):
        raise _fail(path, "datasources.allowed_urls", "must be a list of URL prefixes")
    return DatasourceRules(allowed_urls=list(allowed))
