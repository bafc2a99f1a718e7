"""The inventory: one YAML file, the single source of truth, validated into a model before anything else.

Validation walks the composed YAML node tree (not the constructed dict) so that every problem can name the
file, line, column and field path. All problems are collected and raised together as one InventoryError.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import yaml

from congressctl.errors import InventoryError, InventoryProblem, UnknownNodeError

ROLES = ("api-pe", "dsd", "bus")
SERVED_ROLES = ("api-pe", "dsd")   # the roles that run a congress process (`congressctl serve ROLE`)
CLUSTER_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
NODE_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
INTERFACE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SAFE_TEXT = re.compile(r"^[A-Za-z0-9_.,:/@%+=-]+$")
NO_QUORUM_POLICIES = ("stop", "freeze", "ignore", "demote", "suicide")
RESERVED_PORTS = {5404: "corosync", 5405: "corosync (knet)", 5406: "corosync", 2224: "pcsd"}
COROSYNC_MEMBER_LIMIT = 32
# Three bus nodes by default: the bus survives the loss of any one host, and a write waits for one replica.
DEFAULT_BUS_NODES = 3
FIRST_HOST_OCTET = 11   # generated inventories (and the lab) number hosts <subnet>.11, .12, ...
TOKEN_ROLES = ("admin", "reader")
TOKEN_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
GENERATED_TOKEN = "admin"    # the name of the admin token deploy generates (congressctl/auth.py)
# The host must be whole: "http://10.0.0.5" would also allow "http://10.0.0.55", and "http://h:80" "http://h:8080".
# So a prefix ends its host with "/" (a port may come before), or with ":" (any port of that host).
URL_PREFIX = re.compile(r"^https?://[^/:\s]+(:|(:\d+)?/\S*)$")
DEFAULT_MAX_BODY_MB = 16
DEFAULT_MAX_ROWS_PER_PUT = 2_000_000
API_KEYS = ("port", "max_body_mb", "max_rows_per_put", "tokens", "tls", "cert_file", "key_file", "ca_file")


@dataclass(frozen=True)
class SshSettings:
    user: str = "root"
    port: int = 22
    key: str | None = None
    known_hosts: str | None = None


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    roles: tuple[str, ...]
    ssh: SshSettings
    line: int = 0

    def has(self, role: str) -> bool:
        return role in self.roles


@dataclass(frozen=True)
class Vip:
    address: str
    cidr: int
    interface: str


@dataclass(frozen=True)
class ApiToken:
    """A token the inventory names: read from a file or an environment variable by deploy, never inline."""

    name: str
    role: str
    file: str | None = None
    env: str | None = None


@dataclass(frozen=True)
class ApiSettings:
    tokens: tuple[ApiToken, ...] = ()
    max_body_mb: int = DEFAULT_MAX_BODY_MB
    # None: the node config's own default (DEFAULT_MAX_ROWS_PER_PUT), and the rendered config stays as it was
    max_rows_per_put: int | None = None


@dataclass(frozen=True)
class DatasourceSettings:
    allowed_urls: tuple[str, ...] = ()   # URL prefixes an http datasource may reach; none by default


@dataclass(frozen=True)
class ApiTls:
    """HTTPS on the VIP and the api-pe nodes (tls.py); with cert_file the operator's certificate, else the
    cluster CA's."""

    enabled: bool = True
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None    # what clients verify cert_file with

    @property
    def scheme(self) -> str:
        return "https" if self.enabled else "http"


@dataclass(frozen=True)
class BusSettings:
    port: int = 6379
    password_file: str | None = None
    password_env: str | None = None
    vip: str | None = None
    tls: bool = False
    sync_replicas: int = 1      # replicas the promoted Redis needs in sync before it takes a write


@dataclass(frozen=True)
class MetricsPorts:
    """Where Prometheus scrapes each host, on the node's own address: its api-pe's and its DSD's /metrics, and
    HAProxy's exporter (where HAProxy runs). 9108-9109: free in Prometheus's port allocation list; 8405: the
    port HAProxy's documentation gives its exporter."""

    api_pe_port: int = 9108
    dsd_port: int = 9109
    haproxy_port: int = 8405


METRICS_PORT_KEYS = ("api_pe_port", "dsd_port", "haproxy_port")


@dataclass(frozen=True)
class Timings:
    heartbeat_interval_ms: int = 200
    peer_timeout_ms: int = 1000
    corosync_token_ms: int = 1000
    corosync_consensus_ms: int = 1200
    full_sync_interval_s: int = 30


@dataclass(frozen=True)
class FenceDevice:
    name: str
    agent: str
    hosts: tuple[str, ...]
    params: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Pacemaker:
    fencing: str = "disabled"
    devices: tuple[FenceDevice, ...] = ()
    no_quorum_policy: str = "stop"
    resource_stickiness: int = 100


@dataclass(frozen=True)
class Corosync:
    # corosync's own default (realtime round-robin, top priority), right on a real host; lab.corosync_realtime
    # says when a lab, whose hosts share one machine's cores, turns it off.
    sched_rr: bool = True


@dataclass
class Inventory:
    path: Path
    cluster: str
    nodes: list[Node]
    vip: Vip
    api_port: int
    bus: BusSettings
    timings: Timings
    pacemaker: Pacemaker
    corosync: Corosync
    dsd_preference: list[str]
    ssh: SshSettings
    state_dir: Path
    metrics: MetricsPorts = field(default_factory=MetricsPorts)
    api_tls: ApiTls = field(default_factory=ApiTls)
    warnings: list[str] = field(default_factory=list)
    api: ApiSettings = ApiSettings()
    datasources: DatasourceSettings = DatasourceSettings()

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise UnknownNodeError(f"no node named {name!r}; the inventory has {', '.join(n.name for n in self.nodes)}",
                               file=str(self.path))

    def with_role(self, role: str) -> list[Node]:
        return [n for n in self.nodes if n.has(role)]

    def api_url(self, address: str | None = None) -> str:
        """The API's base URL on `address` (default: the VIP), with the scheme api.tls says."""
        return f"{self.api_tls.scheme}://{address or self.vip.address}:{self.api_port}"

    @property
    def two_node(self) -> bool:
        return len(self.nodes) == 2

    @property
    def bus_address(self) -> str:
        """Where nodes reach Redis: the bus node, or the bus VIP that follows the promoted instance."""
        bus_nodes = self.with_role("bus")
        if len(bus_nodes) > 1:
            assert self.bus.vip is not None   # _check_bus refuses several bus nodes without bus.vip
            return self.bus.vip
        return bus_nodes[0].address

    @overload
    def resolve(self, relative: str) -> Path: ...
    @overload
    def resolve(self, relative: None) -> None: ...
    def resolve(self, relative: str | None) -> Path | None:
        """A path from the inventory, relative to the inventory file's folder."""
        if relative is None:
            return None
        return (self.path.parent / os.path.expanduser(relative)).resolve()


class _Problems:
    def __init__(self, file: str):
        self.file = file
        self.items: list[InventoryProblem] = []

    def add(self, node: yaml.Node | None, path: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else None
        col = node.start_mark.column + 1 if node is not None else None
        self.items.append(InventoryProblem(message, file=self.file, line=line, column=col, field=path or None))


_MISSING = object()


class _Map:
    """A YAML mapping being read: typed field access with line-aware problems and unknown-key detection."""

    def __init__(self, node: yaml.Node, path: str, problems: _Problems):
        self.node = node
        self.path = path
        self.problems = problems
        self.entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        self.used: set[str] = set()
        if not isinstance(node, yaml.MappingNode):
            problems.add(node, path or "(top level)", f"expected a mapping, got {_kind(node)}")
            return
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None:
                problems.add(key_node, path, "keys must be plain strings")
            elif key in self.entries:
                problems.add(key_node, self.sub(key), f"duplicate key '{key}'")
            else:
                self.entries[key] = (key_node, value_node)

    def sub(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str) -> yaml.Node | None:
        self.used.add(key)
        entry = self.entries.get(key)
        return entry[1] if entry else None

    def get(self, key: str, kind: type, default: Any = _MISSING,
            check: Callable[[Any], str | None] | None = None) -> Any:
        node = self.raw(key)
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            if default is _MISSING:
                self.problems.add(self.node, self.sub(key), f"required field '{key}' is missing")
                return None
            return default
        value = _scalar(node, kind)
        if value is _MISSING:
            self.problems.add(node, self.sub(key), f"expected {kind.__name__}, got {_kind(node)} {_show(node)}")
            return None
        error = check(value) if check else None
        if error:
            self.problems.add(node, self.sub(key), error)
            return None
        return value

    def mapping(self, key: str, required: bool = False) -> _Map | None:
        node = self.raw(key)
        if node is None:
            if required:
                self.problems.add(self.node, self.sub(key), f"required section '{key}' is missing")
            return None
        return _Map(node, self.sub(key), self.problems)

    def sequence(self, key: str, required: bool = False) -> list[tuple[yaml.Node, str]] | None:
        node = self.raw(key)
        if node is None:
            if required:
                self.problems.add(self.node, self.sub(key), f"required list '{key}' is missing")
            return None
        if not isinstance(node, yaml.SequenceNode):
            self.problems.add(node, self.sub(key), f"expected a list, got {_kind(node)}")
            return None
        return [(item, f"{self.sub(key)}[{i}]") for i, item in enumerate(node.value)]

    def finish(self, known: tuple[str, ...]) -> None:
        for key, (key_node, _) in self.entries.items():
            if key in known:
                continue
            hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            fix = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(known)}"
            self.problems.add(key_node, self.sub(key), f"unknown key '{key}'{fix}")


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return node.tag.rsplit(":", 1)[-1]


def _show(node: yaml.Node) -> str:
    return repr(node.value) if isinstance(node, yaml.ScalarNode) else ""


def _scalar(node: yaml.Node, kind: type) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        return _MISSING
    tag = node.tag.rsplit(":", 1)[-1]
    if kind is bool:
        return {"true": True, "false": False}.get(node.value.lower(), _MISSING) if tag == "bool" else _MISSING
    if kind is int:
        return int(node.value, 0) if tag == "int" else _MISSING
    if kind is str:
        return node.value if tag in ("str", "int", "float") else _MISSING
    return _MISSING


def _matches(pattern: re.Pattern, what: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if pattern.match(value):
            return None
        return f"{value!r} is not a valid {what} (allowed: {pattern.pattern})"
    return check


def _port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else f"port {value} is outside 1..65535"


def _positive(value: int) -> str | None:
    return None if value > 0 else f"{value} must be a positive number"


def _ipv4(value: str) -> str | None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return f"{value!r} is not a valid IPv4 address"
    if value in ("0.0.0.0", "255.255.255.255"):
        return f"{value!r} cannot be a host address"
    return None


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if value in choices:
            return None
        hint = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        return f"{value!r} is not one of {', '.join(choices)}" + (f"; did you mean '{hint[0]}'?" if hint else "")
    return check


def _safe_text(value: str) -> str | None:
    return None if SAFE_TEXT.match(value) else f"{value!r} contains characters unsafe in generated files"


def _read_ssh(m: _Map | None, base: SshSettings) -> SshSettings:
    if m is None:
        return base
    user = m.get("user", str, base.user, _matches(NODE_NAME, "user name"))
    port = m.get("port", int, base.port, _port)
    key = m.get("key", str, base.key, _safe_text)
    known_hosts = m.get("known_hosts", str, base.known_hosts, _safe_text)
    m.finish(("user", "port", "key", "known_hosts"))
    return SshSettings(user=user or base.user, port=port or base.port, key=key, known_hosts=known_hosts)


def _read_roles(m: _Map, path: str) -> tuple[str, ...]:
    items = m.sequence("roles", required=True) or []
    roles: list[str] = []
    for item, item_path in items:
        value = _scalar(item, str)
        if value is _MISSING:
            m.problems.add(item, item_path, f"expected a role name, got {_kind(item)}")
            continue
        error = _one_of(ROLES)(value)
        if error:
            m.problems.add(item, item_path, error)
        elif value in roles:
            m.problems.add(item, item_path, f"role '{value}' listed twice")
        else:
            roles.append(value)
    if m.entries.get("roles") and not items:
        m.problems.add(m.entries["roles"][1], f"{path}.roles", "a node needs at least one role")
    return tuple(roles)


def _read_nodes(top: _Map, ssh: SshSettings) -> list[Node]:
    nodes: list[Node] = []
    for item, path in top.sequence("nodes", required=True) or []:
        m = _Map(item, path, top.problems)
        if not isinstance(item, yaml.MappingNode):
            continue
        name = m.get("name", str, check=_matches(NODE_NAME, "node name"))
        address = m.get("address", str, check=_ipv4)
        roles = _read_roles(m, path)
        node_ssh = _read_ssh(m.mapping("ssh"), ssh)
        m.finish(("name", "address", "roles", "ssh"))
        if name and address:
            nodes.append(Node(name=name, address=address, roles=roles, ssh=node_ssh, line=item.start_mark.line + 1))
    return nodes


def _read_fencing(m: _Map | None) -> Pacemaker:
    if m is None:
        return Pacemaker()
    fencing_node = m.raw("fencing")
    fencing = "disabled"
    devices: tuple[FenceDevice, ...] = ()
    if isinstance(fencing_node, yaml.ScalarNode):
        fencing = m.get("fencing", str, "disabled", _one_of(("disabled",)))
    elif fencing_node is not None:
        devices = _read_fence_devices(_Map(fencing_node, m.sub("fencing"), m.problems))
        fencing = "enabled"
    policy = m.get("no_quorum_policy", str, "stop", _one_of(NO_QUORUM_POLICIES))
    stickiness = m.get("resource_stickiness", int, 100)
    m.finish(("fencing", "no_quorum_policy", "resource_stickiness"))
    return Pacemaker(fencing=fencing or "disabled", devices=devices, no_quorum_policy=policy or "stop",
                     resource_stickiness=100 if stickiness is None else stickiness)


def _read_fence_devices(m: _Map) -> tuple[FenceDevice, ...]:
    devices = []
    for item, path in m.sequence("devices", required=True) or []:
        d = _Map(item, path, m.problems)
        name = d.get("name", str, check=_matches(NODE_NAME, "device name"))
        agent = d.get("agent", str, check=_matches(re.compile(r"^fence_[a-z0-9_]+$"), "fence agent"))
        hosts = tuple(_scalar(h, str) for h, _ in d.sequence("hosts", required=True) or [])
        params_map = d.mapping("params")
        params = []
        if params_map is not None:
            for key in params_map.entries:
                value = params_map.get(key, str, check=_safe_text)
                if not re.match(r"^[a-z_][a-z0-9_]*$", key):
                    m.problems.add(params_map.entries[key][0], params_map.sub(key), f"unsafe parameter name {key!r}")
                elif value is not None:
                    params.append((key, value))
        d.finish(("name", "agent", "hosts", "params"))
        if name and agent:
            devices.append(FenceDevice(name=name, agent=agent, hosts=hosts, params=tuple(sorted(params))))
    m.finish(("devices",))
    if not devices:
        m.problems.add(m.node, m.path, "fencing needs at least one device, or 'fencing: disabled'")
    return tuple(devices)


TOP_KEYS = ("cluster", "nodes", "vip", "api", "bus", "timings", "corosync", "pacemaker", "dsd", "ssh", "state_dir",
            "metrics", "datasources")


def load_inventory(path: str | Path) -> Inventory:
    """Read and validate an inventory file; raise InventoryError listing every problem found."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InventoryError(message=f"cannot read inventory: {exc.strerror}", file=str(path)) from None
    return parse_inventory(text, path)


def parse_inventory(text: str, path: Path) -> Inventory:
    problems = _Problems(str(path))
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise InventoryError([InventoryProblem(
            f"YAML syntax error: {problem}", file=str(path),
            line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None)]) from None
    if root is None:
        raise InventoryError([InventoryProblem("the inventory is empty", file=str(path))])
    top = _Map(root, "", problems)
    if problems.items:
        raise InventoryError(problems.items)
    inventory = _read_top(top, path)
    top.finish(TOP_KEYS)
    if not problems.items:
        _cross_checks(inventory, top, problems)
    if problems.items:
        raise InventoryError(problems.items)
    _add_warnings(inventory)
    return inventory


def _read_top(top: _Map, path: Path) -> Inventory:
    cluster = top.get("cluster", str, check=_matches(CLUSTER_NAME, "cluster name"))
    ssh = _read_ssh(top.mapping("ssh"), SshSettings())
    nodes = _read_nodes(top, ssh)
    vip = _read_vip(top.mapping("vip", required=True))
    api = top.mapping("api")
    api_port = api.get("port", int, 1789, _port) if api else 1789
    api_settings = _read_api(api)
    api_tls = _read_api_tls(api)
    if api:
        api.finish(API_KEYS)
    bus = _read_bus(top.mapping("bus"), bus_nodes=sum(n.has("bus") for n in nodes))
    timings = _read_timings(top.mapping("timings"))
    pacemaker = _read_fencing(top.mapping("pacemaker"))
    corosync = _read_corosync(top.mapping("corosync"))
    dsd = top.mapping("dsd")
    preference = _read_preference(dsd, nodes)
    state_dir = top.get("state_dir", str, ".congressctl-state", _safe_text)
    metrics = _read_metrics(top.mapping("metrics"))
    return Inventory(path=path.resolve(), cluster=cluster or "", nodes=nodes, vip=vip, api_port=api_port or 1789,
                     bus=bus, timings=timings, pacemaker=pacemaker, corosync=corosync,
                     dsd_preference=preference, ssh=ssh, api_tls=api_tls,
                     state_dir=(path.resolve().parent / (state_dir or ".congressctl-state")), metrics=metrics,
                     api=api_settings, datasources=_read_datasources(top.mapping("datasources")))


def _read_metrics(m: _Map | None) -> MetricsPorts:
    if m is None:
        return MetricsPorts()
    base = MetricsPorts()
    ports = {key: m.get(key, int, getattr(base, key), _port) for key in METRICS_PORT_KEYS}
    m.finish(tuple(ports))
    return MetricsPorts(**{key: value or getattr(base, key) for key, value in ports.items()})


def _read_api(m: _Map | None) -> ApiSettings:
    if m is None:
        return ApiSettings()
    max_body_mb = m.get("max_body_mb", int, DEFAULT_MAX_BODY_MB, _positive)
    max_rows = m.get("max_rows_per_put", int, None, _positive)
    tokens = _read_tokens(m)
    return ApiSettings(tokens=tokens, max_body_mb=max_body_mb or DEFAULT_MAX_BODY_MB, max_rows_per_put=max_rows)


def _read_tokens(api: _Map) -> tuple[ApiToken, ...]:
    tokens: list[ApiToken] = []
    for item, path in api.sequence("tokens") or []:
        m = _Map(item, path, api.problems)
        if not isinstance(item, yaml.MappingNode):
            continue
        for inline in ("token", "value", "secret"):
            if inline in m.entries:
                m.used.add(inline)
                m.problems.add(m.entries[inline][0], m.sub(inline),
                               "never put an API token inline; give its file or env (the environment variable)")
        name = m.get("name", str, check=_matches(TOKEN_NAME, "token name"))
        role = m.get("role", str, check=_one_of(TOKEN_ROLES))
        file = m.get("file", str, None, _safe_text)
        env = m.get("env", str, None, _matches(ENV_VAR, "environment variable name"))
        m.finish(("name", "role", "file", "env", "token", "value", "secret"))
        if (file is None) == (env is None):
            m.problems.add(item, path, "give the token's file or its env (environment variable), one of them")
        if name == GENERATED_TOKEN:
            m.problems.add(m.raw("name"), m.sub("name"),
                           f"'{GENERATED_TOKEN}' is the token deploy generates in state_dir; pick another name")
        elif name in {t.name for t in tokens}:
            m.problems.add(m.raw("name"), m.sub("name"), f"token name '{name}' listed twice")
        if name and role:
            tokens.append(ApiToken(name=name, role=role, file=file, env=env))
    return tuple(tokens)


def _url_prefix(value: str) -> str | None:
    if URL_PREFIX.match(value):
        return None
    return (f"{value!r} is not a URL prefix that ends its host (such as 'http://10.0.0.5:8080/' or "
            "'http://10.0.0.5:' for any port): a prefix ending inside the host or port would allow others too")


def _read_datasources(m: _Map | None) -> DatasourceSettings:
    if m is None:
        return DatasourceSettings()
    allowed: list[str] = []
    for item, path in m.sequence("allowed_urls") or []:
        value = _scalar(item, str)
        error = f"expected a URL prefix, got {_kind(item)}" if value is _MISSING else _url_prefix(value)
        if error:
            m.problems.add(item, path, error)
        else:
            allowed.append(value)
    m.finish(("allowed_urls",))
    return DatasourceSettings(allowed_urls=tuple(allowed))


def _read_api_tls(m: _Map | None) -> ApiTls:
    if m is None:
        return ApiTls()
    enabled = m.get("tls", bool, True)
    files = {key: m.get(key, str, None, _safe_text) for key in ("cert_file", "key_file", "ca_file")}
    given = [key for key, value in files.items() if value]
    if given and len(given) < 3:
        m.problems.add(m.node, m.sub(given[0]), "give cert_file, key_file and ca_file together (the CA "
                       "clients verify the certificate with), or none: deploy then makes a cluster CA")
    if given and enabled is False:
        m.problems.add(m.node, m.sub(given[0]), "cert_file/key_file/ca_file need api.tls on")
    return ApiTls(enabled=enabled is not False, cert_file=files["cert_file"], key_file=files["key_file"],
                  ca_file=files["ca_file"])


def _read_vip(m: _Map | None) -> Vip:
    if m is None:
        return Vip("", 24, "eth0")
    address = m.get("address", str, check=_ipv4)
    cidr = m.get("cidr", int, 24, lambda v: None if 8 <= v <= 32 else f"cidr {v} is outside 8..32")
    interface = m.get("interface", str, "eth0", _matches(INTERFACE, "interface name"))
    m.finish(("address", "cidr", "interface"))
    return Vip(address=address or "", cidr=cidr or 24, interface=interface or "eth0")


def _read_bus(m: _Map | None, bus_nodes: int) -> BusSettings:
    most = max(bus_nodes - 1, 0)
    if m is None:
        return BusSettings(sync_replicas=min(1, most))
    port = m.get("port", int, 6379, _port)
    password_file = m.get("password_file", str, None, _safe_text)
    password_env = m.get("password_env", str, None, _matches(ENV_VAR, "environment variable name"))
    if "password" in m.entries:
        m.used.add("password")
        m.problems.add(m.entries["password"][0], m.sub("password"),
                       "never put the bus password inline; use password_file or password_env "
                       "(or neither: deploy generates one in state_dir)")
    if password_file and password_env:
        m.problems.add(m.node, m.sub("password_file"), "give password_file or password_env, not both")
    vip = m.get("vip", str, None, _ipv4)
    tls = m.get("tls", bool, False)
    sync_replicas = m.get("sync_replicas", int, min(1, most), lambda v: None if 0 <= v <= most else (
        f"sync_replicas {v} is outside 0..{most}: the promoted Redis can wait for at most the other "
        f"{most} bus node(s) ({bus_nodes} have the bus role); 0 means asynchronous replication"))
    m.finish(("port", "password_file", "password_env", "vip", "tls", "password", "sync_replicas"))
    return BusSettings(port=port or 6379, password_file=password_file, password_env=password_env, vip=vip,
                       tls=bool(tls), sync_replicas=min(1, most) if sync_replicas is None else sync_replicas)


def _read_corosync(m: _Map | None) -> Corosync:
    if m is None:
        return Corosync()
    sched_rr = m.get("sched_rr", bool, True)
    m.finish(("sched_rr",))
    return Corosync(sched_rr=sched_rr is not False)


def _read_timings(m: _Map | None) -> Timings:
    if m is None:
        return Timings()
    names = ("heartbeat_interval_ms", "peer_timeout_ms", "corosync_token_ms", "corosync_consensus_ms",
             "full_sync_interval_s")
    defaults = Timings()
    values = {n: m.get(n, int, getattr(defaults, n), _positive) for n in names}
    m.finish(names)
    timings = Timings(**{n: v if v is not None else getattr(defaults, n) for n, v in values.items()})
    if timings.peer_timeout_ms < 2 * timings.heartbeat_interval_ms:
        m.problems.add(m.raw("peer_timeout_ms") or m.node, m.sub("peer_timeout_ms"),
                       f"peer_timeout_ms ({timings.peer_timeout_ms}) must be at least twice "
                       f"heartbeat_interval_ms ({timings.heartbeat_interval_ms})")
    if timings.corosync_consensus_ms < timings.corosync_token_ms:
        m.problems.add(m.raw("corosync_consensus_ms") or m.node, m.sub("corosync_consensus_ms"),
                       "corosync_consensus_ms must be at least corosync_token_ms (corosync recommends 1.2x)")
    return timings


def _read_preference(m: _Map | None, nodes: list[Node]) -> list[str]:
    dsd_nodes = [n.name for n in nodes if n.has("dsd")]
    if m is None:
        return dsd_nodes
    items = m.sequence("preference") or []
    m.finish(("preference",))
    preference: list[str] = []
    names = {n.name for n in nodes}
    for item, path in items:
        value = _scalar(item, str)
        if value is _MISSING or value not in names:
            hint = difflib.get_close_matches(str(getattr(item, "value", "")), sorted(names), n=1)
            m.problems.add(item, path, f"{_show(item)} is not a node of this inventory"
                           + (f"; did you mean '{hint[0]}'?" if hint else ""))
        elif value not in dsd_nodes:
            m.problems.add(item, path, f"node '{value}' does not have the dsd role; add 'dsd' to its roles")
        elif value in preference:
            m.problems.add(item, path, f"node '{value}' listed twice")
        else:
            preference.append(value)
    return preference + [n for n in dsd_nodes if n not in preference]


def _cross_checks(inv: Inventory, top: _Map, problems: _Problems) -> None:
    nodes_node = top.raw("nodes")
    node_items = {n.name: item for n, item in zip(inv.nodes, nodes_node.value)} if nodes_node else {}
    seen_names: dict[str, Node] = {}
    seen_addresses: dict[str, Node] = {}
    for node in inv.nodes:
        item = node_items.get(node.name)
        path = f"nodes[{inv.nodes.index(node)}]"
        if node.name in seen_names:
            problems.add(_value_node(item, "name"), f"{path}.name", f"duplicate node name '{node.name}' "
                         f"(first at line {seen_names[node.name].line})")
        if node.address in seen_addresses:
            problems.add(_value_node(item, "address"), f"{path}.address", f"duplicate address {node.address} "
                         f"(also node '{seen_addresses[node.address].name}')")
        seen_names.setdefault(node.name, node)
        seen_addresses.setdefault(node.address, node)
    if not inv.nodes:
        problems.add(nodes_node, "nodes", "the inventory needs at least one node")
        return
    for role, fix in (("api-pe", "give at least one node the 'api-pe' role"),
                      ("dsd", "give at least one node the 'dsd' role (the DSD's warm-standby hosts)"),
                      ("bus", "give one node (or several, with bus.vip) the 'bus' role")):
        if not inv.with_role(role):
            problems.add(nodes_node, "nodes", f"no node has the '{role}' role; {fix}")
    _check_vip(inv, top, problems)
    _check_bus(inv, top, problems)
    _check_ports(inv, top, problems)
    _check_fence_hosts(inv, top, problems)


def _network(inv: Inventory) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"{inv.vip.address}/{inv.vip.cidr}", strict=False)


def _check_vip(inv: Inventory, top: _Map, problems: _Problems) -> None:
    vip_map = top.raw("vip")
    vip_node = _value_node(vip_map, "address")
    if not inv.vip.address:
        return
    owner = next((n for n in inv.nodes if n.address == inv.vip.address), None)
    if owner:
        problems.add(vip_node, "vip.address", f"the VIP {inv.vip.address} is node '{owner.name}''s own address; "
                     "pick a free address in the nodes' subnet")
        return
    network = _network(inv)
    if not any(ipaddress.IPv4Address(n.address) in network for n in inv.nodes):
        problems.add(vip_node, "vip.address", f"the VIP {inv.vip.address}/{inv.vip.cidr} is outside every node's "
                     f"subnet ({network}); it must be on the nodes' network")
    if inv.vip.address in (str(network.network_address), str(network.broadcast_address)):
        problems.add(vip_node, "vip.address", f"the VIP {inv.vip.address} is the network or broadcast address "
                     f"of {network}")


def _check_bus(inv: Inventory, top: _Map, problems: _Problems) -> None:
    bus_nodes = inv.with_role("bus")
    bus_map = top.raw("bus")
    if len(bus_nodes) > 1 and not inv.bus.vip:
        problems.add(bus_map or top.node, "bus.vip", f"{len(bus_nodes)} nodes have the bus role: set bus.vip, the "
                     "address that follows the promoted Redis")
    if not inv.bus.vip:
        return
    vip_node = _value_node(bus_map, "vip")
    if inv.bus.vip == inv.vip.address or any(n.address == inv.bus.vip for n in inv.nodes):
        problems.add(vip_node, "bus.vip", f"bus.vip {inv.bus.vip} is already used by the API VIP or a node")
    elif inv.vip.address and ipaddress.IPv4Address(inv.bus.vip) not in _network(inv):
        problems.add(vip_node, "bus.vip", f"bus.vip {inv.bus.vip} is outside the nodes' subnet {_network(inv)}")


def _check_ports(inv: Inventory, top: _Map, problems: _Problems) -> None:
    metrics = {f"metrics.{key}": getattr(inv.metrics, key) for key in METRICS_PORT_KEYS}
    used = {"api.port": inv.api_port, "bus.port": inv.bus.port, **metrics}
    for field_path, port in used.items():
        section, key = field_path.split(".")
        node = _value_node(top.raw(section), key) or top.node
        if port in RESERVED_PORTS:
            problems.add(node, field_path, f"port {port} is used by {RESERVED_PORTS[port]}; pick another")
        ssh_ports = {n.ssh.port for n in inv.nodes}
        if port in ssh_ports:
            problems.add(node, field_path, f"port {port} clashes with the SSH port of a node")
    if inv.api_port == inv.bus.port:
        problems.add(_value_node(top.raw("bus"), "port") or top.node, "bus.port",
                     f"bus.port {inv.bus.port} clashes with api.port")
    taken = {"api.port": inv.api_port, "bus.port": inv.bus.port}
    for field_path, port in metrics.items():
        other = next((name for name, p in taken.items() if p == port), None)
        if other:
            problems.add(_value_node(top.raw("metrics"), field_path.split(".")[1]) or top.node, field_path,
                         f"{field_path} {port} clashes with {other}")
        taken[field_path] = port


def _check_fence_hosts(inv: Inventory, top: _Map, problems: _Problems) -> None:
    names = {n.name for n in inv.nodes}
    for i, device in enumerate(inv.pacemaker.devices):
        for host in device.hosts:
            if host not in names:
                problems.add(top.raw("pacemaker"), f"pacemaker.fencing.devices[{i}].hosts",
                             f"{host!r} is not a node of this inventory")


def _value_node(mapping: yaml.Node | None, key: str) -> yaml.Node | None:
    if not isinstance(mapping, yaml.MappingNode):
        return None
    return next((v for k, v in mapping.value if getattr(k, "value", None) == key), mapping)


def _add_warnings(inv: Inventory) -> None:
    count = len(inv.nodes)
    if inv.pacemaker.fencing == "disabled":
        inv.warnings.append("fencing is disabled: a hung node cannot be fenced, so split-brain is possible; "
                            "configure pacemaker.fencing.devices for production")
    if count > 2 and count % 2 == 0:
        inv.warnings.append(f"{count} nodes: an even node count can lose quorum in a clean split; "
                            "add or remove one node")
    if count > COROSYNC_MEMBER_LIMIT:
        inv.warnings.append(f"{count} nodes: vendors support at most {COROSYNC_MEMBER_LIMIT} corosync members")
    if count == 1:
        inv.warnings.append("a single node gives no high availability")
    bus_nodes = len(inv.with_role("bus"))
    if bus_nodes == 1:
        inv.warnings.append("only one node has the bus role: a single point of failure (its loss stops the "
                            "control bus); give the role to 3 nodes and set bus.vip")
    elif inv.bus.sync_replicas and inv.bus.sync_replicas == bus_nodes - 1:
        inv.warnings.append(f"bus.sync_replicas {inv.bus.sync_replicas} needs every other bus node in sync: the "
                            "loss of any one bus node stops writes to the bus; lower it or add a bus node")


def generate(nodes: int, *, cluster: str = "gen", subnet: str = "10.213.0", dsd: int = 3, bus: int | None = None,
             api_pe: int | None = None, sched_rr: bool = True, vip: str | None = None,
             dsd_preference: list[str] | None = None, ssh: dict | None = None) -> dict:
    """A valid inventory as plain data: `nodes` hosts at <subnet>.11.., the first `dsd` allowed to run the
    DSD (preferred in that order unless `dsd_preference` says otherwise), the first `bus` carrying the bus
    (default three, or both of two: a replicated bus behind its own VIP at <subnet>.251), the last `api_pe`
    (default all) running api-pe, the VIP at <subnet>.250 unless given. For tests, the benchmark and the lab."""
    api_pe = nodes if api_pe is None else api_pe
    bus = min(DEFAULT_BUS_NODES, nodes) if bus is None else bus
    names = [f"n{i + 1}" for i in range(nodes)]
    hosts = []
    for i, name in enumerate(names):
        roles = [r for r, on in (("api-pe", i >= nodes - api_pe), ("dsd", i < dsd), ("bus", i < bus)) if on]
        hosts.append({"name": name, "address": f"{subnet}.{FIRST_HOST_OCTET + i}", "roles": roles})
    data: dict[str, Any] = {
        "cluster": cluster,
        "nodes": hosts,
        "vip": {"address": vip or f"{subnet}.250", "cidr": 24 if nodes < 230 else 16, "interface": "eth0"},
        "api": {"port": 1789},
        "bus": {"port": 6379},
        "corosync": {"sched_rr": sched_rr},
        "pacemaker": {"fencing": "disabled"},
        "dsd": {"preference": names[:dsd] if dsd_preference is None else dsd_preference},
    }
    if bus > 1:
        data["bus"]["vip"] = f"{subnet}.251"
    if ssh is not None:
        data["ssh"] = ssh
    return data
