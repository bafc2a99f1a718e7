"""Rolling restarts: congress processes restarted a few hosts at a time, through Pacemaker, behind HAProxy.

deploy.py learns from every host which processes are stale (`congressctl-cluster stale`: running, but older
than the package or config they read) and hands them here as a `Plan`, carried out in this order:

1. api-pe, `serial` hosts at a time, the host whose PE leads the DSD last (its leadership moves once): the
   host's server is drained in HAProxy and its sessions waited out (bounded); the clone instance is banned
   from the host, so Pacemaker stops it (the node drains itself as well), and the ban is cleared, so Pacemaker
   starts it again; once its /v1/status is healthy and synced with a new incarnation, the server is put back
   (`state ready`) and HAProxy must see it UP before the next batch. Never more than `serial` hosts out.
2. the DSD, once: banned from its host, Pacemaker starts it on the next host of dsd.preference (a new process
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

from congressctl import haproxy, pacemaker, remote
from congressctl.errors import DeployError
from congressctl.inventory import Inventory, Node
from congressctl.payloads import ApiPeStatus, DsdView

API_CLONE = "api-pe-clone"
DSD = "dsd"
SESSIONS_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
HEALTHY_TIMEOUT_S = 60.0
UP_TIMEOUT_S = 20.0
POLL_S = 0.2

Progress = Callable[[str, str], None]


@dataclass
class Plan:
    """What must restart, in order: batches of api-pe hosts, then the DSD's host."""

    api_pe: list[list[str]] = field(default_factory=list)
    dsd: str | None = None

    @property
    def empty(self) -> bool:
        return not self.api_pe and self.dsd is None

    def steps(self) -> list[str]:
        lines = [f"restart api-pe on {', '.join(batch)}" for batch in self.api_pe]
        if self.dsd:
            lines.append(f"restart the DSD (now on {self.dsd}; it moves to the next host of dsd.preference)")
        return lines


def make_plan(stale: dict[str, list[str]], placement: pacemaker.Placement, *, leader: str | None,
              serial: int) -> Plan:
    """The plan for processes `stale` per host, where Pacemaker runs them now; `leader`: the DSD's leader PE."""
    api = [h for h in sorted(stale, key=lambda h: (h == leader, h)) if "api-pe" in stale[h]
           and h in placement.on("api-pe")]
    dsd = next((h for h in placement.on("dsd") if "dsd" in stale.get(h, [])), None)
    return Plan(api_pe=[api[i:i + serial] for i in range(0, len(api), serial)], dsd=dsd)


def clear_leftovers(conn: remote.Connection) -> None:
    """Clear the bans a deploy killed mid-roll left on our resources."""
    for resource, node in pacemaker.bans(conn):
        if resource in (API_CLONE, DSD):
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
    url = shlex.quote(f"http://{node.address}:{inv.api_port}/v1/status")
    proc = conn.run(f"curl -sf -m 2 {url}", timeout=10, check=False)
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
            self._stop_api_pe(batch)
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

    def _stop_api_pe(self, batch: list[str]) -> None:
        """Ban the instances (Pacemaker stops them), then clear the bans once they are stopped (it starts them)."""
        banned = []
        try:
            for host in batch:
                self._step(host, "restart api-pe: stop")
                pacemaker.ban(self.conn, API_CLONE, host)
                banned.append(host)
            self._wait(lambda: not set(batch) & set(self._placement().on("api-pe")), STOP_TIMEOUT_S, batch,
                       "stop api-pe", "Pacemaker did not stop it")
        finally:
            for host in banned:
                pacemaker.clear(self.conn, API_CLONE, host)

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
        pacemaker.ban(self.conn, DSD, host)
        try:
            self._wait(lambda: host not in self._placement().on(DSD), STOP_TIMEOUT_S, [host], "restart the DSD",
                       "Pacemaker did not stop it")
        finally:
            pacemaker.clear(self.conn, DSD, host)
        self._wait(lambda: _new_dsd(dsd_view(self.conn, self.inv), before), HEALTHY_TIMEOUT_S, [host],
                   "restart the DSD", "no api-pe hears a new DSD")
        now = self._placement().on(DSD)
        self.done.setdefault(host, []).append(f"restarted dsd (now on {pacemaker.node_list(now)})")

    # -- waiting ------------------------------------------------------------------------------------
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
