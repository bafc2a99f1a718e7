"""Rolling restarts: congress processes restarted a few hosts at a time, through Pacemaker, behind HAProxy.

deploy.py learns from every host which processes are stale (`congressctl-cluster stale`: running, but older
than the package or config they read) and hands them here as a `Plan`, carried out in this order:

1. the bus (its redis.conf changed), before what runs on it: each stale replica on its own, banned from its host
   (Pacemaker stops it) and cleared (it starts again as a replica), and waited for until it follows the promoted
   Redis at that one's own address (congress-bus's post-start notify; never through the bus VIP, which a
   switchover takes away first) and the promoted one counts its acknowledged offset close to its own; then,
   if the promoted one is stale, a switchover: the promotion is moved (`crm_resource --move --promoted`) to
   the replica the promoted Redis last heard acknowledge the most of the stream (its demote pauses writes until
   its replicas hold all of it),
   and once that replica is promoted and a write through the bus VIP is taken, the old one is restarted as a
   replica like the others; the move is cleared after that (the new one keeps the promotion by its score).
   With a single bus node there is no replica to hand over to: it is restarted, and takes no writes meanwhile.
2. api-pe, `serial` hosts at a time, the host whose PE leads the DSD last (its leadership moves once): the
   host's server is drained in HAProxy and its sessions waited out (bounded); the clone instance is banned
   from the host, so Pacemaker stops it (the node drains itself as well), and the ban is cleared, so Pacemaker
   starts it again; once its /v1/status is healthy and synced with a new incarnation, the server is put back
   (`state ready`) and HAProxy must see it UP before the next batch. Never more than `serial` hosts out.
3. the DSD, once: banned from its host, Pacemaker starts it on the next host of dsd.preference (a new process
   takes a new epoch, so its actions stay exactly-once), and the ban is cleared (stickiness keeps it there).

A step that fails stops the roll (DeployError naming the host and step): the ban is cleared and the server put
back (HAProxy's checks keep a sick node out), the hosts not reached go on serving with their old processes, and
a later deploy finds them still stale and goes on. Bans carry a lifetime (pacemaker.BAN_LIFETIME), and deploy
clears any a killed deploy left (`clear_leftovers`).
"""

from __future__ import annotations

import functools
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from congressctl import auth, haproxy, pacemaker, remote, status, tls
from congressctl.errors import DeployError
from congressctl.inventory import Inventory, Node
from congressctl.payloads import ApiPeStatus, DsdView

API_CLONE = "api-pe-clone"
DSD = "dsd"
BUS = "bus"                  # the primitive (one bus node), or each instance of BUS_CLONE as crm_mon names it
BUS_CLONE = "bus-clone"
BUS_VIP = "bus-vip"
# A replica whose last acknowledged offset is this close to the promoted one's is caught up: it acknowledges
# once a second, and the bus carries a few kB a second.
CAUGHT_UP_BYTES = 256 * 1024
SWITCHOVER_TIMEOUT_S = 30.0
BUS_CLI_TIMEOUT_S = 2.0
# Written (and expiring) through the bus VIP to see that the promoted Redis takes writes; outside the nodes' keys.
SWITCHOVER_KEY = "congressctl:deploy:switchover"
SESSIONS_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
HEALTHY_TIMEOUT_S = 60.0
UP_TIMEOUT_S = 20.0
POLL_S = 0.2

Progress = Callable[[str, str], None]


@dataclass
class Plan:
    """What must restart, in order: bus replicas one by one, the promoted bus (a switchover) or the only bus node,
    batches of api-pe hosts, then the DSD's host."""

    bus_replicas: list[str] = field(default_factory=list)
    bus_promoted: str | None = None
    bus_alone: str | None = None
    api_pe: list[list[str]] = field(default_factory=list)
    dsd: str | None = None

    @property
    def empty(self) -> bool:
        return not self.bus_replicas and not self.bus_promoted and not self.bus_alone and not self.api_pe \
            and self.dsd is None

    def steps(self) -> list[str]:
        lines = [f"restart the bus replica on {host}, wait until it is caught up" for host in self.bus_replicas]
        if self.bus_promoted:
            lines.append(f"switch the bus over from {self.bus_promoted} to its most current replica, then restart "
                         f"it on {self.bus_promoted} as a replica")
        if self.bus_alone:
            lines.append(f"restart the bus on {self.bus_alone} (the only bus node: no bus writes meanwhile)")
        lines += [f"restart api-pe on {', '.join(batch)}" for batch in self.api_pe]
        if self.dsd:
            lines.append(f"restart the DSD (now on {self.dsd}; it moves to the next host of dsd.preference)")
        return lines


def make_plan(stale: dict[str, list[str]], placement: pacemaker.Placement, *, leader: str | None,
              serial: int, multi_bus: bool = True) -> Plan:
    """The plan for processes `stale` per host, where Pacemaker runs them now; `leader`: the DSD's leader PE;
    `multi_bus`: the bus is a promotable clone (else one Redis)."""
    api = [h for h in sorted(stale, key=lambda h: (h == leader, h)) if "api-pe" in stale[h]
           and h in placement.on("api-pe")]
    dsd = next((h for h in placement.on("dsd") if "dsd" in stale.get(h, [])), None)
    bus = [h for h in sorted(stale) if "bus" in stale[h] and h in placement.on(BUS)]
    promoted = placement.promoted.get(BUS, [])
    return Plan(bus_replicas=[h for h in bus if h not in promoted] if multi_bus else [],
                bus_promoted=next((h for h in bus if h in promoted), None) if multi_bus else None,
                bus_alone=bus[0] if bus and not multi_bus else None,
                api_pe=[api[i:i + serial] for i in range(0, len(api), serial)], dsd=dsd)


def clear_leftovers(conn: remote.Connection) -> None:
    """Clear the bans a deploy killed mid-roll left on our resources."""
    for resource, node in pacemaker.bans(conn):
        if resource in (API_CLONE, DSD, BUS_CLONE, BUS):
            pacemaker.clear(conn, resource, node or None)


def dsd_view(conn: remote.Connection, inv: Inventory) -> DsdView | None:
    """The DSD as the first api-pe that answers sees it (None: none reports one)."""
    for node in inv.with_role("api-pe"):
        status = api_status(conn, inv, node)
        if status is not None and status.dsd is not None and status.dsd.node:
            return status.dsd
    return None


def api_status(conn: remote.Connection, inv: Inventory, node: Node) -> ApiPeStatus | None:
    """`node`'s /v1/status, asked from the connected host (None: no answer)."""
    url = shlex.quote(f"{inv.api_url(node.address)}/v1/status")
    # the token goes on curl's stdin, not its command line
    proc = conn.run(f"curl -sf -m 2 {tls.curl_args(inv)}-H @- {url}", timeout=10, check=False,
                    input=auth.curl_header(auth.require_admin_token(inv)))
    if proc.exit_code != 0:
        return None
    try:
        return ApiPeStatus.from_dict(json.loads(proc.stdout))
    except (ValueError, TypeError, KeyError):
        return None


class Roll:
    """Carries out a Plan over one SSH connection to the host holding the VIP (HAProxy's stats socket is
    there; every Pacemaker tool works from any host). `done` collects, per host, what was restarted."""

    def __init__(self, conn: remote.Connection, inv: Inventory, *, deadline: float | None = None,
                 progress: Progress | None = None):
        """`deadline` (time.monotonic()) bounds every wait besides its own limit."""
        self.conn, self.inv, self.progress = conn, inv, progress
        self.deadline = deadline
        self.done: dict[str, list[str]] = {}
        self.haproxy = bool(haproxy_servers(conn))

    def run(self, plan: Plan) -> None:
        for host in plan.bus_replicas:
            self.restart_bus_replica(host)
        if plan.bus_promoted:
            self.switch_bus_over(plan.bus_promoted)
        if plan.bus_alone:
            self.restart_bus_alone(plan.bus_alone)
        for batch in plan.api_pe:
            self.restart_api_pe(batch)
        if plan.dsd:
            self.restart_dsd(plan.dsd)

    def _step(self, host: str, step: str) -> None:
        if self.progress:
            self.progress(host, step)

    # -- api-pe --------------------------------------------------------------------------------------
    def restart_api_pe(self, batch: list[str]) -> None:
        before = {h: _incarnation(api_status(self.conn, self.inv, self.inv.node(h))) for h in batch}
        try:
            if self.haproxy:
                self._drain(batch)
            for host in batch:
                self._step(host, "restart api-pe: stop")
            self._stop(API_CLONE, batch, placed_as="api-pe", step="stop api-pe")
            for host in batch:
                self._step(host, "restart api-pe: start, wait until healthy and synced")
                self._wait(functools.partial(self._fresh, host, before[host]), HEALTHY_TIMEOUT_S, [host],
                           "start api-pe", "it did not come back healthy and synced")
        finally:
            if self.haproxy:
                for host in batch:
                    haproxy.set_state(self.conn, host, "ready")
        if self.haproxy:
            self._wait(lambda: all(self._server(h).up for h in batch), UP_TIMEOUT_S, batch, "back in HAProxy",
                       "HAProxy does not see it UP")
        for host in batch:
            self.done.setdefault(host, []).append("restarted api-pe")

    def _drain(self, batch: list[str]) -> None:
        for host in batch:
            self._step(host, "restart api-pe: drain in HAProxy")
            haproxy.set_state(self.conn, host, "drain")
        deadline = time.monotonic() + SESSIONS_TIMEOUT_S
        # past the bound the node's own drain (it answers what is in flight before it exits) takes over
        while time.monotonic() < deadline and any(self._server(h).sessions for h in batch):
            time.sleep(POLL_S)

    def _fresh(self, host: str, before: str | None) -> bool:
        """A new process on `host` answers healthy and synced."""
        status = api_status(self.conn, self.inv, self.inv.node(host))
        return status is not None and status.healthy and status.synced and status.incarnation != before

    def _server(self, host: str) -> haproxy.Backend:
        found = haproxy.servers(self.conn).get(host)
        return found or haproxy.Backend(proxy=haproxy.API_BACKEND, server=host, status="absent", check="", address="")

    # -- dsd ----------------------------------------------------------------------------------------
    def restart_dsd(self, host: str) -> None:
        """Ban the DSD from its host and clear the ban once it stopped there: Pacemaker starts a new one, on the
        next host of dsd.preference or (the ban gone by then) on this one."""
        before = dsd_view(self.conn, self.inv)
        self._step(host, "restart the DSD")
        self._stop(DSD, [host], placed_as=DSD, step="restart the DSD")
        self._wait(lambda: _new_dsd(dsd_view(self.conn, self.inv), before), HEALTHY_TIMEOUT_S, [host],
                   "restart the DSD", "no api-pe hears a new DSD")
        now = self._placement().on(DSD)
        self.done.setdefault(host, []).append(f"restarted dsd (now on {pacemaker.node_list(now)})")

    # -- bus ----------------------------------------------------------------------------------------
    def restart_bus_replica(self, host: str, *, done: str = "restarted bus (replica)") -> None:
        self._step(host, "restart bus replica: stop")
        self._stop(BUS_CLONE, [host], placed_as=BUS, step="restart bus replica")
        self._step(host, "restart bus replica: start, wait until it is a caught-up replica")
        self._wait(functools.partial(self._caught_up, host), HEALTHY_TIMEOUT_S, [host], "restart bus replica",
                   "it did not come back as a caught-up replica")
        self.done.setdefault(host, []).append(done)

    def switch_bus_over(self, old: str) -> None:
        """Promote the most current replica instead of `old`, then restart `old` as a replica."""
        target = self._most_current_replica(old)
        self._step(old, f"bus switchover: promote {target}")
        pacemaker.move_promoted(self.conn, BUS_CLONE, target)
        try:
            self._wait(functools.partial(self._takes_writes, target), SWITCHOVER_TIMEOUT_S, [target],
                       "bus switchover", "it was not promoted with writes taken through the bus VIP")
            self.restart_bus_replica(old, done=f"restarted bus (switchover to {target})")
        finally:
            # after the restart: until then the move keeps the promotion from going back to `old`
            pacemaker.clear(self.conn, BUS_CLONE)

    def restart_bus_alone(self, host: str) -> None:
        self._step(host, "restart the bus (the only bus node)")
        self._stop(BUS, [host], placed_as=BUS, step="restart the bus")
        self._wait(lambda: host in self._placement().on(BUS) and self._bus_node(host)[0].role == "master",
                   HEALTHY_TIMEOUT_S, [host], "restart the bus", "it did not come back")
        self.done.setdefault(host, []).append("restarted bus (the only bus node)")

    def _most_current_replica(self, promoted: str) -> str:
        """The replica that `promoted`'s Redis last heard acknowledge the most of the stream."""
        master, _ = self._bus_node(promoted)
        by_address = {self.inv.node(n).address: n for n in self._placement().on(BUS) if n != promoted}
        offsets = {by_address[a]: o for a, o in master.replica_offsets.items() if a in by_address}
        if master.role != "master" or not offsets:
            raise DeployError(f"bus switchover: the Redis on {promoted} is not a master with replicas to hand the "
                              f"promotion to ({master.error or master.role})", host=promoted, step="bus switchover")
        return max(sorted(offsets), key=lambda n: offsets[n])

    def _caught_up(self, host: str) -> bool:
        """`host`'s Redis is a replica of the promoted one at its own address (not through the bus VIP, which a
        switchover takes away before the last of the stream: congress-bus's post-start notify), its link up, and
        the promoted one counts it with an acknowledged offset close to its own."""
        promoted = self._placement().promoted.get(BUS, [])
        if len(promoted) != 1 or promoted == [host]:
            return False
        (replica, info), (master, _) = self._bus_node(host), self._bus_node(promoted[0])
        acked = master.replica_offsets.get(self.inv.node(host).address)
        return (replica.role == "replica" and replica.link == "up" and master.role == "master"
                and info.get("master_host") == self.inv.node(promoted[0]).address
                and acked is not None and master.offset is not None and master.offset - acked <= CAUGHT_UP_BYTES)

    def _takes_writes(self, target: str) -> bool:
        """`target` is promoted, holds the bus VIP and a write through the VIP is taken."""
        placement = self._placement()
        if placement.promoted.get(BUS) != [target] or placement.on(BUS_VIP) != [target]:
            return False
        command = status.bus_command(self.inv.bus_address, self.inv.bus.port, f"SET {SWITCHOVER_KEY} {target} EX 60",
                                     budget=BUS_CLI_TIMEOUT_S, tls_on=self.inv.bus.tls)
        return self.conn.run(command, timeout=10, check=False).stdout.strip() == "OK"

    def _bus_node(self, name: str) -> tuple[status.BusNodeStatus, dict[str, str]]:
        """`name`'s Redis as status reads it, and its whole `INFO replication`."""
        command = status.bus_command(self.inv.node(name).address, self.inv.bus.port, "INFO replication",
                                     budget=BUS_CLI_TIMEOUT_S, tls_on=self.inv.bus.tls)
        proc = self.conn.run(command, timeout=10, check=False)
        probe = status.HostProbe(rc=proc.exit_code, out=proc.stdout, err=proc.stderr)
        return status.read_bus_node(name, probe), status.parse_info(proc.stdout)

    # -- stopping and waiting -----------------------------------------------------------------------
    def _stop(self, resource: str, hosts: list[str], *, placed_as: str, step: str) -> None:
        """Ban `resource` from `hosts` (Pacemaker stops it there), then clear the bans once crm_mon shows no
        `placed_as` there (Pacemaker starts it again where it may run)."""
        banned = []
        try:
            for host in hosts:
                pacemaker.ban(self.conn, resource, host)
                banned.append(host)
            self._wait(lambda: not set(hosts) & set(self._placement().on(placed_as)), STOP_TIMEOUT_S, hosts,
                       step, "Pacemaker did not stop it")
        finally:
            for host in banned:
                pacemaker.clear(self.conn, resource, host)

    def _placement(self) -> pacemaker.Placement:
        placement = pacemaker.cluster_placement(self.conn)
        if placement is None:
            raise DeployError("crm_mon did not answer", host=self.conn.host.name, step="rolling restart")
        return placement

    def _wait(self, done: Callable[[], bool], timeout: float, hosts: list[str], step: str, why: str) -> None:
        deadline = time.monotonic() + timeout
        if self.deadline is not None and self.deadline < deadline:
            deadline, timeout = self.deadline, max(0.0, self.deadline - time.monotonic())
        while not done():
            if time.monotonic() > deadline:
                raise DeployError(f"rolling restart stopped at {', '.join(hosts)}: {why} within {timeout:.0f} s; "
                                  "the hosts not reached yet still run their old processes",
                                  host=hosts[0], step=step)
            time.sleep(POLL_S)


def haproxy_servers(conn: remote.Connection) -> dict[str, haproxy.Backend]:
    """The api-pe servers of HAProxy on the connected host; empty when it runs none."""
    proc = conn.run(f"test -S {haproxy.SOCKET} && pgrep -x haproxy >/dev/null", timeout=10, check=False)
    return haproxy.servers(conn) if proc.exit_code == 0 else {}


def _incarnation(status: ApiPeStatus | None) -> str | None:
    return status.incarnation if status else None


def _new_dsd(view: DsdView | None, before: DsdView | None) -> bool:
    return (view is not None and view.incarnation is not None and (view.age_ms or 0) < 1000
            and (before is None or view.incarnation != before.incarnation))
