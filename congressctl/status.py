"""Cluster status: one parallel sample of every host, congress node, the DSD and the API through the VIP.

Per host, one SSH connection runs one shell command that starts three probes at once and prints their outputs
between markers: `crm_mon -1 --output-as=xml` (placement, membership, quorum, DC), HAProxy's `show stat` from
its stats socket (only where that socket exists) and the host's own api-pe `/v1/status`. Meanwhile this machine
asks `/healthz` through the VIP. Every connect, command and request is bounded, so a host that is down costs
at most its connect timeout and never holds up the others.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from congressctl import auth, haproxy, pacemaker, remote, tls
from congressctl.errors import RemoteError, StatusError, TlsError
from congressctl.haproxy import SOCKET as HAPROXY_SOCKET
from congressctl.haproxy import Backend, parse_stat
from congressctl.inventory import Inventory, Node
from congressctl.payloads import ApiPeStatus, PeerView

BUS_PASSWORD_FILE = "/etc/congressctl/bus.password"
# redis.conf's min-replicas-max-lag: a replica acknowledging less often is not in sync
REPLICA_MAX_LAG_S = 2
API_TIMEOUT_S = 2.0
PROBE_TIMEOUT_S = 3.0
MAX_WORKERS = 16
HEALTH_EXIT = {"healthy": 0, "degraded": 1, "unavailable": 2}
# A probe's exit status when the HAProxy stats socket is absent: HAProxy does not run on that host.
_NO_SOCKET = 100


@dataclass
class HostStatus:
    """One host. `member`, `online` and `resources` come from the cluster view status trusts (a quorate
    one); `quorum` and `dc` are what this host's own crm_mon says."""

    name: str
    address: str
    reachable: bool = False
    error: str | None = None
    member: bool | None = None
    online: bool | None = None
    quorum: bool | None = None
    dc: str | None = None
    resources: list[str] = field(default_factory=list)
    pacemaker_error: str | None = None
    haproxy: bool = False
    backends: list[Backend] = field(default_factory=list)
    haproxy_error: str | None = None
    api_error: str | None = None


@dataclass
class NodeStatus:
    """One congress node process. age_ms/alive: the freshest sighting of its heartbeat by any api-pe;
    synced/healthy/answered: its own /v1/status (api-pe only). `expected` is False for a process the cluster
    does not place there any more (a peer entry left over after the DSD moved)."""

    node: str
    role: str
    incarnation: str | None = None
    age_ms: float | None = None
    alive: bool = False
    synced: bool | None = None
    healthy: bool | None = None
    answered: bool | None = None
    expected: bool = True


@dataclass
class TableStatus:
    """One datasource table: the DSD's (epoch, seq) and each PE's lag behind it (None: not comparable)."""

    table: str
    datasource_id: str | None
    epoch: int | None
    seq: int | None
    lag: dict[str, int | None] = field(default_factory=dict)


@dataclass
class DsdStatus:
    """The DSD as its heartbeat says (node, incarnation, epoch, leader PE, request counts), where Pacemaker runs
    it, and its tables."""

    node: str | None
    incarnation: str | None
    epoch: int | None
    leader: dict | None
    leader_since: float | None
    counts: dict[str, int]
    buffered: int
    age_ms: float | None
    seen_by: str
    running_on: list[str] = field(default_factory=list)
    tables: list[TableStatus] = field(default_factory=list)


@dataclass
class ApiStatus:
    """GET /healthz through the VIP, from the machine running status."""

    url: str
    ok: bool = False
    status: int | None = None
    latency_ms: float | None = None
    node: str | None = None
    error: str | None = None


@dataclass
class BusNodeStatus:
    """One bus node's Redis as its own `INFO replication` says (asked on its host): role master or replica,
    a replica's link to its master, its replication offset and how far it is behind the master's."""

    node: str
    role: str | None = None
    link: str | None = None
    offset: int | None = None
    lag_bytes: int | None = None
    in_sync: int | None = None     # a master's: the replicas it counts as good
    replica_offsets: dict[str, int] = field(default_factory=dict)   # a master's: each replica's, by address
    error: str | None = None


@dataclass
class BusStatus:
    """The control bus: which Redis is promoted, and whether writes are replicated (`in_sync` replicas within
    the master's allowed lag, against the `sync_replicas` every write waits for)."""

    promoted: list[str]
    sync_replicas: int
    in_sync: int
    replicated: bool
    nodes: list[BusNodeStatus]


@dataclass
class StatusReport:
    """healthy (exit 0); degraded (1): something is down but the API through the VIP answers healthy;
    unavailable (2): it does not, or no host could be reached."""

    health: str
    exit_code: int
    problems: list[str]
    hosts: list[HostStatus]
    nodes: list[NodeStatus]
    dsd: DsdStatus | None
    api: ApiStatus
    placement: pacemaker.Placement | None
    duration_s: float
    bus: BusStatus | None = None

    def to_dict(self) -> dict:
        """JSON-able, with the same keys as the dataclasses' fields."""
        return asdict(self)


@dataclass
class HostProbe:
    """One probe's exit status and output, as `probe_command` printed them."""

    rc: int
    out: str
    err: str


@dataclass
class HostSample:
    """What one host's probes returned, before anything is judged."""

    host: HostStatus
    view: pacemaker.Placement | None = None
    api: ApiPeStatus | None = None
    bus: BusNodeStatus | None = None


# ---------------------------------------------------------------------------------------------- gather


def gather(inv: Inventory, *, accept_new: bool = False, timeout: float = 5.0) -> StatusReport:
    """Sample the whole cluster once. `timeout` bounds each SSH connect and each host's command."""
    if timeout <= 0:
        raise StatusError(f"timeout must be positive, got {timeout:g}")
    started = time.monotonic()
    nodes = {n.name: n for n in inv.nodes}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="status-api") as pool:
        api_future = pool.submit(check_api, inv)

        def sample(host: remote.Host) -> HostSample:
            return _sample_host(inv, nodes[host.name], accept_new, timeout)

        group = remote.run_on_hosts([remote.host_of(inv, n) for n in inv.nodes], sample,
                                    max_workers=MAX_WORKERS, timeout=2 * timeout + 1)
        api = api_future.result()
    samples = [_sample_of(nodes[name], outcome) for name, outcome in group.outcomes.items()]
    return assess(inv, samples, api, time.monotonic() - started)


def _sample_of(node: Node, outcome: remote.HostOutcome) -> HostSample:
    if outcome.ok:
        sample: HostSample = outcome.value   # what _sample_host returned on this host
        return sample
    return HostSample(HostStatus(name=node.name, address=node.address, error=_unprefixed(outcome.error, node)))


def _unprefixed(error: str | None, node: Node) -> str:
    """RemoteError text starts with 'host NAME: '; the report already says which host."""
    error = error or "unknown error"
    prefix = f"host {node.name}: "
    return error.removeprefix(prefix)


def _sample_host(inv: Inventory, node: Node, accept_new: bool, timeout: float) -> HostSample:
    token = secrets.token_hex(8)
    budget = min(PROBE_TIMEOUT_S, timeout)
    api_url = _api_url(inv, node)
    api_token = auth.admin_token(inv) if api_url else None
    command = probe_command(token, api_url, budget, bus=_bus_probe(inv, node, budget), api_header=bool(api_token),
                            cacert=tls.API_CA if inv.api_tls.enabled else None)
    with remote.Connection(remote.host_of(inv, node), remote.known_hosts_of(inv), accept_new=accept_new,
                           connect_timeout=timeout, io_timeout=timeout) as conn:
        try:
            result = conn.run(command, timeout=timeout, check=False,
                              input=auth.curl_header(api_token) if api_token else None)
        except RemoteError as exc:
            error = exc.message.replace(f"`{command}`", "the status probes")
            return HostSample(HostStatus(name=node.name, address=node.address, reachable=True, error=error))
    return read_sample(inv, node, result.stdout, token)


def _api_url(inv: Inventory, node: Node) -> str | None:
    return f"{inv.api_url(node.address)}/v1/status" if node.has("api-pe") else None


def _bus_probe(inv: Inventory, node: Node, budget: float) -> str | None:
    """`INFO replication` of the host's own Redis."""
    if not node.has("bus"):
        return None
    return bus_command(node.address, inv.bus.port, "INFO replication", budget=budget, tls_on=inv.bus.tls)


def bus_command(address: str, port: int, command: str, *, budget: float, tls_on: bool = False) -> str:
    """A shell command sending `command` to the Redis at `address`, with the password from the host's 0600 file
    (never on a command line, where `ps` would show it), over TLS verified by the cluster CA when `tls_on`."""
    secure = f"--tls --cacert {tls.BUS_CA} " if tls_on else ""
    return (f'REDISCLI_AUTH="$(cat {BUS_PASSWORD_FILE})" timeout {budget:g} redis-cli --no-auth-warning '
            f"{secure}-h {shlex.quote(address)} -p {port} {command}")


def read_sample(inv: Inventory, node: Node, stdout: str, token: str) -> HostSample:
    """What one host's `probe_command` printed, read into a sample of a reachable host."""
    probes = parse_probes(stdout, token)
    sample = HostSample(HostStatus(name=node.name, address=node.address, reachable=True))
    _read_crm_mon(sample, probes.get("crm_mon"))
    _read_haproxy(sample.host, probes.get("haproxy"))
    if _api_url(inv, node):
        _read_api(sample, probes.get("api"))
    if "bus" in probes:
        sample.bus = read_bus_node(node.name, probes["bus"])
    return sample


def probe_command(token: str, api_url: str | None, budget: float, *, bus: str | None = None,
                  api_header: bool = False, cacert: str | None = None) -> str:
    """One POSIX shell command: run the probes in parallel, then print each one's exit status, stdout and
    stderr between lines `@@TOKEN NAME rc=N` and `@@TOKEN NAME stderr`. With `api_header`, the command's stdin
    is the API request's auth header (auth.curl_header): kept in the probes' private folder and given to curl
    on its stdin, so the API token is on no command line."""
    probes = {
        "crm_mon": f"timeout {budget:g} {pacemaker.CRM_MON}",
        # a socket left by an HAProxy that moved away refuses connections: only ask a running one
        "haproxy": (f"test -S {HAPROXY_SOCKET} && pgrep -x haproxy >/dev/null || exit {_NO_SOCKET}; "
                    + haproxy.socket_command("show stat", budget)),
    }
    if api_url:
        header = "-H @- " if api_header else ""
        verify = f"--cacert {shlex.quote(cacert)} " if cacert else ""
        probes["api"] = f"curl -sS -m {min(API_TIMEOUT_S, budget):g} {verify}{header}{shlex.quote(api_url)}"
    if bus:
        probes["bus"] = bus
    lines = ['d=$(mktemp -d) || exit 1', "trap 'rm -rf \"$d\"' EXIT"]
    if api_url and api_header:
        lines.append('cat >"$d/auth"')
    for name, command in probes.items():
        stdin = ' <"$d/auth"' if name == "api" and api_header else ""
        lines.append(f'(sh -c {shlex.quote(command)}{stdin} >"$d/{name}.out" 2>"$d/{name}.err"; '
                     f'echo $? >"$d/{name}.rc") &')
    lines.append("wait")
    for name in probes:
        lines.append(f'printf "\\n@@{token} {name} rc=%s\\n" "$(cat "$d/{name}.rc")"; cat "$d/{name}.out"; '
                     f'printf "\\n@@{token} {name} stderr\\n"; cat "$d/{name}.err"')
    return "sh -c " + shlex.quote("\n".join(lines))


def parse_probes(stdout: str, token: str) -> dict[str, HostProbe]:
    """The sections `probe_command` printed, by probe name."""
    marker = re.compile(rf"\n@@{re.escape(token)} (\S+) (?:rc=(-?\d*)|(stderr))\n")
    parts = marker.split("\n" + stdout)
    probes: dict[str, HostProbe] = {}
    for i in range(1, len(parts) - 3, 4):
        name, rc, stderr, text = parts[i:i + 4]
        if stderr and name in probes:
            probes[name].err = text
        elif not stderr:
            probes[name] = HostProbe(rc=int(rc) if rc else -1, out=text, err="")
    return probes


# ---------------------------------------------------------------------------------------------- probes


def _read_crm_mon(sample: HostSample, probe: HostProbe | None) -> None:
    host = sample.host
    if probe is None:
        host.pacemaker_error = "crm_mon printed nothing"
        return
    if probe.rc == 124:
        host.pacemaker_error = "crm_mon timed out"
        return
    view = pacemaker.read_host_view(probe.out, probe.rc)
    if view is None:
        host.pacemaker_error = _last_line(probe.err or probe.out) or f"crm_mon exited {probe.rc}"
        return
    if view.error:
        host.pacemaker_error = view.error
        return
    assert view.placement is not None   # read_host_view gives a placement whenever there is no error
    sample.view = view.placement
    host.quorum = sample.view.quorum
    host.dc = view.dc


def _read_haproxy(host: HostStatus, probe: HostProbe | None) -> None:
    if probe is None or probe.rc == _NO_SOCKET:
        return
    if probe.rc != 0:
        host.haproxy_error = _last_line(probe.err) or f"socat exited {probe.rc}"
        return
    host.haproxy = True
    host.backends = parse_stat(probe.out)


def _read_api(sample: HostSample, probe: HostProbe | None) -> None:
    host = sample.host
    if probe is None:
        host.api_error = "curl printed nothing"
        return
    if probe.rc != 0:
        host.api_error = _last_line(probe.err) or f"curl exited {probe.rc}"
        return
    try:
        data = json.loads(probe.out)
    except json.JSONDecodeError:
        host.api_error = f"/v1/status did not answer JSON: {probe.out.strip()[:120]!r}"
        return
    if not isinstance(data, dict):
        host.api_error = "/v1/status did not answer a JSON object"
        return
    try:
        sample.api = ApiPeStatus.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        host.api_error = f"/v1/status answer not understood: {exc}"


def read_bus_node(name: str, probe: HostProbe) -> BusNodeStatus:
    """One bus node from its `INFO replication` text."""
    status = BusNodeStatus(node=name)
    if probe.rc != 0 or "role:" not in probe.out:
        status.error = _last_line(probe.err or probe.out) or f"redis-cli exited {probe.rc}"
        return status
    info = parse_info(probe.out)
    status.role = "master" if info.get("role") == "master" else "replica"
    status.link = info.get("master_link_status")
    offset = info.get("master_repl_offset" if status.role == "master" else "slave_repl_offset")
    status.offset = int(offset) if offset and offset.lstrip("-").isdigit() else None
    if status.role == "master":
        status.in_sync = _replicas_in_sync(info)
        status.replica_offsets = {f["ip"]: int(f["offset"]) for f in _replica_lines(info)
                                  if "ip" in f and f.get("offset", "").isdigit()}
    return status


def _replica_lines(info: dict[str, str]) -> list[dict[str, str]]:
    """A master's `slaveN:ip=...,port=...,state=online,offset=...,lag=...` lines, as fields."""
    return [dict(kv.split("=", 1) for kv in value.split(",") if "=" in kv)
            for key, value in info.items() if re.fullmatch(r"slave\d+", key)]


def parse_info(text: str) -> dict[str, str]:
    """`key:value` lines of a Redis INFO answer."""
    return dict(line.split(":", 1) for line in text.replace("\r", "").splitlines() if ":" in line
                and not line.startswith("#"))


def _replicas_in_sync(info: dict[str, str]) -> int:
    """Replicas a master counts as good (online, acknowledged within min-replicas-max-lag): its own
    min_slaves_good_slaves when min-replicas-to-write is set, else those online with lag within REPLICA_MAX_LAG_S."""
    if "min_slaves_good_slaves" in info:
        return int(info["min_slaves_good_slaves"])
    return sum(1 for f in _replica_lines(info)
               if f.get("state") == "online" and int(f.get("lag", "99")) <= REPLICA_MAX_LAG_S)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def check_api(inv: Inventory) -> ApiStatus:
    """GET /healthz through the VIP from this machine. Proxy variables are ignored on purpose: the VIP is on
    the cluster's own network, and a proxy's answer would say nothing about it."""
    api = ApiStatus(url=f"{inv.api_url()}/healthz")
    started = time.monotonic()
    try:
        response = httpx.get(api.url, timeout=API_TIMEOUT_S, trust_env=False, verify=tls.client_verify(inv))
    except TlsError as exc:
        api.error = exc.message
        return api
    except httpx.ConnectError as exc:
        api.error = f"cannot connect: {exc}"
        return api
    except httpx.TimeoutException:
        api.error = f"no answer within {API_TIMEOUT_S:g}s"
        return api
    except httpx.HTTPError as exc:
        api.error = f"{type(exc).__name__}: {exc}"
        return api
    api.latency_ms = round((time.monotonic() - started) * 1000, 1)
    api.status = response.status_code
    body = _json_or_none(response)
    api.node = body.get("node") if isinstance(body, dict) else None
    api.ok = response.status_code == 200
    if not api.ok:
        reason = body.get("reason") if isinstance(body, dict) else None
        api.error = f"HTTP {response.status_code}: {reason or response.text.strip()[:200]}"
    return api


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------- judge


def assess(inv: Inventory, samples: list[HostSample], api: ApiStatus, duration_s: float) -> StatusReport:
    """Turn the raw samples into a report: who is where, what is wrong, and how bad it is."""
    view = _trusted_view(samples)
    hosts = [s.host for s in samples]
    for host in hosts:
        _place_host(host, view)
    statuses = {s.host.name: s.api for s in samples if s.api is not None}
    nodes = _node_statuses(inv, statuses, view)
    dsd = _dsd_status(statuses, view)
    bus_nodes = [s.bus for s in samples if s.bus is not None]
    bus = bus_status(inv, bus_nodes) if bus_nodes else None     # None: no bus host could be asked
    problems = (_host_problems(hosts, view) + _placement_problems(inv, view) + _haproxy_problems(hosts, view)
                + _api_pe_problems(inv, samples) + _node_problems(nodes, statuses) + _dsd_problems(dsd, statuses)
                + (bus_problems(bus) if bus else []))
    if not api.ok:
        problems.append(f"API through the VIP {api.url}: {api.error}")
    if not api.ok or not any(h.reachable for h in hosts):
        health = "unavailable"
    else:
        health = "degraded" if problems else "healthy"
    return StatusReport(health=health, exit_code=HEALTH_EXIT[health], problems=problems, hosts=hosts, nodes=nodes,
                        dsd=dsd, api=api, placement=view, duration_s=round(duration_s, 3), bus=bus)


def bus_status(inv: Inventory, nodes: list[BusNodeStatus]) -> BusStatus:
    """The bus from its nodes' own answers: a replica's lag is the promoted one's offset less the replica's, as
    the promoted one last heard it (else as the replica says, asked a moment apart)."""
    masters = [n for n in nodes if n.role == "master"]
    top = masters[0] if len(masters) == 1 else None
    for node in nodes:
        if top is None or top.offset is None:
            continue
        offset = top.replica_offsets.get(inv.node(node.node).address, node.offset)
        if offset is not None:
            node.lag_bytes = max(0, top.offset - offset)
    in_sync = (masters[0].in_sync or 0) if len(masters) == 1 else 0
    return BusStatus(promoted=[m.node for m in masters], sync_replicas=inv.bus.sync_replicas, in_sync=in_sync,
                     replicated=len(masters) == 1 and in_sync >= inv.bus.sync_replicas, nodes=nodes)


def bus_problems(bus: BusStatus) -> list[str]:
    problems = [f"bus on {n.node}: {n.error}" for n in bus.nodes if n.error]
    if not bus.promoted:
        problems.append("no bus node is promoted: the bus takes no writes")
    elif len(bus.promoted) > 1:
        problems.append(f"more than one bus master ({', '.join(bus.promoted)}): split brain")
    elif not bus.replicated:
        problems.append(f"bus writes are not replicated: {bus.in_sync} replica(s) in sync on {bus.promoted[0]}, "
                        f"every write waits for {bus.sync_replicas} (they answer 503 meanwhile)")
    problems += [f"bus replica on {n.node}: link to its master is {n.link}" for n in bus.nodes
                 if n.role == "replica" and n.link != "up"]
    return problems


def _trusted_view(samples: list[HostSample]) -> pacemaker.Placement | None:
    """The cluster as a quorate host sees it, the DC's own view first; a host cut off from the rest may
    still believe it runs resources the others have already moved."""
    ranked = sorted((s for s in samples if s.view is not None),
                    key=lambda s: (s.view is None or not s.view.quorum, s.host.dc != s.host.name))
    return ranked[0].view if ranked else None


def _place_host(host: HostStatus, view: pacemaker.Placement | None) -> None:
    if view is None:
        return
    host.member = host.name in view.online or host.name in view.offline
    host.online = host.name in view.online
    host.resources = sorted(f"{rid} (promoted)" if host.name in view.promoted.get(rid, []) else rid
                            for rid, where in view.running.items() if host.name in where)


def _host_problems(hosts: list[HostStatus], view: pacemaker.Placement | None) -> list[str]:
    problems = []
    for host in hosts:
        if not host.reachable:
            problems.append(f"{host.name}: unreachable ({host.error})")
        elif host.error:
            problems.append(f"{host.name}: {host.error}")
        elif host.pacemaker_error:
            problems.append(f"{host.name}: pacemaker not answering ({host.pacemaker_error})")
        elif host.quorum is False:
            problems.append(f"{host.name}: no quorum (DC seen from there: {host.dc or 'none'})")
        if view is not None and host.member is False:
            problems.append(f"{host.name}: not a member of the cluster")
    return problems


def _placement_problems(inv: Inventory, view: pacemaker.Placement | None) -> list[str]:
    if view is None:
        return ["no host's crm_mon answered: resource placement unknown"]
    problems = pacemaker.placement_problems(inv, view)
    if view.stopped:
        problems.append(f"not running: {', '.join(sorted(set(view.stopped)))}")
    return problems


def _haproxy_problems(hosts: list[HostStatus], view: pacemaker.Placement | None) -> list[str]:
    where = set(view.on("haproxy")) if view is not None else {h.name for h in hosts if h.haproxy}
    problems = []
    for host in hosts:
        if host.name not in where or not host.reachable or host.error:
            continue
        if not host.haproxy:
            problems.append(f"haproxy on {host.name}: stats socket did not answer "
                            f"({host.haproxy_error or 'no socket at ' + HAPROXY_SOCKET})")
        problems += [f"haproxy backend {b.server} is {b.status}" for b in host.backends if not b.up]
    return problems


def _api_pe_problems(inv: Inventory, samples: list[HostSample]) -> list[str]:
    problems = []
    for sample in samples:
        host = sample.host
        if not host.reachable or host.error or not inv.node(host.name).has("api-pe"):
            continue
        if sample.api is None:
            problems.append(f"api-pe on {host.name} does not answer /v1/status ({host.api_error})")
            continue
        bus = sample.api.bus
        if not bus.connected:
            problems.append(f"api-pe on {host.name}: control bus {bus.host}:{bus.port} not connected "
                            f"({bus.last_error or 'connecting'})")
        elif not sample.api.synced:
            problems.append(f"api-pe on {host.name} is not synced yet")
        elif not sample.api.healthy:
            problems.append(f"api-pe on {host.name} reports itself unhealthy")
    return problems


def _node_statuses(inv: Inventory, statuses: dict[str, ApiPeStatus],
                   view: pacemaker.Placement | None) -> list[NodeStatus]:
    """Every congress process: the api-pe nodes of the inventory plus every peer any api-pe hears."""
    sightings: dict[tuple[str, str], list[PeerView]] = {}
    for status in statuses.values():
        for peer in status.peers:
            sightings.setdefault((peer.node, peer.role), []).append(peer)
    api_nodes = {n.name for n in inv.with_role("api-pe")}
    dsd_nodes = set(view.on("dsd")) if view is not None else {
        k[0] for k, seen in sightings.items() if k[1] == "dsd" and any(p.alive for p in seen)}
    keys = set(sightings) | {(name, "api-pe") for name in api_nodes}
    nodes = []
    for name, role in sorted(keys, key=lambda k: (k[1] != "api-pe", k[1], k[0])):
        seen = sorted(sightings.get((name, role), []), key=lambda p: _age(p.age_ms))
        freshest = seen[0] if seen else PeerView(node=name, role=role)
        node = NodeStatus(node=name, role=role, incarnation=freshest.incarnation,
                          age_ms=freshest.age_ms, alive=any(p.alive for p in seen),
                          expected=name in (api_nodes if role == "api-pe" else dsd_nodes))
        own = statuses.get(name) if role == "api-pe" else None
        if role == "api-pe":
            node.answered = own is not None
        if own is not None:
            node.incarnation = own.incarnation or node.incarnation
            node.synced = own.synced
            node.healthy = own.healthy
        nodes.append(node)
    return nodes


def _age(age_ms: float | None) -> float:
    return float("inf") if age_ms is None else age_ms


def _node_problems(nodes: list[NodeStatus], statuses: dict[str, ApiPeStatus]) -> list[str]:
    if not statuses:
        return []
    problems = []
    for node in nodes:
        if not node.expected or node.alive:
            continue
        if node.age_ms is None:
            problems.append(f"{node.role} on {node.node} is not heard on the bus")
        else:
            problems.append(f"{node.role} on {node.node}: last heartbeat {node.age_ms / 1000:.1f}s ago")
    return problems


def _dsd_status(statuses: dict[str, ApiPeStatus], view: pacemaker.Placement | None) -> DsdStatus | None:
    """The DSD as the api-pe that heard it most recently reports it, with every PE's table positions."""
    heard = sorted(((name, s.dsd) for name, s in statuses.items() if s.dsd is not None),
                   key=lambda item: _age(item[1].age_ms))
    if not heard:
        return None
    seen_by, d = heard[0]
    return DsdStatus(node=d.node, incarnation=d.incarnation, epoch=d.epoch,
                     leader=d.leader.to_dict() if d.leader else None, leader_since=d.leader_since,
                     counts=d.counts.to_dict(), buffered=d.buffered, age_ms=d.age_ms, seen_by=seen_by,
                     running_on=view.on("dsd") if view is not None else [], tables=_tables(statuses))


def _tables(statuses: dict[str, ApiPeStatus]) -> list[TableStatus]:
    tables: dict[str, TableStatus] = {}
    for pe, status in sorted(statuses.items()):
        for t in status.tables:
            table = tables.setdefault(t.table, TableStatus(table=t.table, datasource_id=t.datasource_id,
                                                           epoch=None, seq=None))
            reported = (t.dsd_epoch, t.dsd_seq or 0)
            if reported[0] is not None and (table.epoch is None or (table.epoch, table.seq or 0) < reported):
                table.epoch, table.seq = reported
            table.lag[pe] = t.lag
    for table in tables.values():
        for pe in statuses:
            table.lag.setdefault(pe, None)
    return sorted(tables.values(), key=lambda t: t.table)


def _dsd_problems(dsd: DsdStatus | None, statuses: dict[str, ApiPeStatus]) -> list[str]:
    if not statuses:
        return []
    if dsd is None:
        return ["no api-pe hears the DSD on the bus"]
    problems = []
    if dsd.running_on and dsd.node not in dsd.running_on:
        problems.append(f"the DSD heard on the bus is on {dsd.node}; Pacemaker runs it on {', '.join(dsd.running_on)}")
    if not dsd.leader:
        problems.append(f"the DSD on {dsd.node} has no leader PE")
    for table in dsd.tables:
        for pe, lag in sorted(table.lag.items()):
            problems += _lag_problem(pe, table, lag, statuses[pe])
    return problems


def _lag_problem(pe: str, table: TableStatus, lag: int | None, status: ApiPeStatus) -> list[str]:
    if lag:
        return [f"PE {pe} is {lag} updates behind on {table.table}"]
    if lag == 0 or table.epoch is None:
        return []
    mine = status.table(table.table)
    if mine is None:
        return [f"PE {pe} has no copy of {table.table}"]
    if mine.epoch != table.epoch:
        return [f"PE {pe} holds {table.table} at epoch {mine.epoch}, the DSD at epoch {table.epoch}"]
    return []
