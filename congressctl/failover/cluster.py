"""The deployed cluster as the scenarios see it: SSH to hosts, the API through the VIP and per node, Pacemaker."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from congressctl import auth, pacemaker, remote, status, tls
from congressctl.errors import FailoverError, NoHostAnswered, RemoteError
from congressctl.inventory import Inventory, Node
from congressctl.payloads import ApiPeStatus, DsdView

Log = Callable[[str], None]


@dataclass
class Options:
    push_rate: float = 50.0
    get_rate: float = 50.0
    write_rate: float = 5.0
    warmup_s: float = 2.0
    after_s: float = 3.0
    cut_s: float | None = None
    recovery_timeout_s: float = 30.0
    healthy_timeout_s: float = 180.0
    sink_address: str | None = None
    accept_new: bool = False


class Cluster:
    """The deployed cluster as the scenarios see it: SSH to hosts, the API through the VIP and per node."""

    def __init__(self, inv: Inventory, options: Options, log: Log):
        self.inv, self.options, self.log = inv, options, log
        self.api = inv.api_url()
        self.node_apis = {n.name: inv.api_url(n.address) for n in inv.with_role("api-pe")}
        self.headers = auth.headers(auth.require_admin_token(inv))   # every request to the API sends it
        self.verify = tls.client_verify(inv)   # what every client of the scenarios verifies the API with
        self.client = httpx.Client(timeout=httpx.Timeout(5.0, connect=2.0), headers=self.headers, verify=self.verify)
        self._totem: tuple[int, int] | None = None

    def close(self) -> None:
        self.client.close()

    def ssh(self, node: Node, command: str, timeout: float = 20.0, input: str | None = None) -> str:
        with remote.connect(self.inv, node, self.options.accept_new) as conn:
            return conn.run(command, timeout=timeout, input=input).stdout

    def call(self, method: str, path: str, body: object = None, expect: tuple[int, ...] = (200, 201)) -> dict:
        resp = self.client.request(method, f"{self.api}{path}", json=body)
        if resp.status_code not in expect:
            raise FailoverError(f"{method} {path} through the VIP answered {resp.status_code}: {resp.text[:300]}")
        return resp.json() if resp.content else {}

    def node_status(self, name: str) -> ApiPeStatus | None:
        try:
            resp = self.client.get(f"{self.node_apis[name]}/v1/status", timeout=2.0)
            return ApiPeStatus.from_dict(resp.json()) if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    def dsd_view(self) -> DsdView:
        """The DSD as the api-pe nodes see it: where it runs and which PE leads it."""
        for name in self.node_apis:
            body = self.node_status(name)
            if body and body.dsd and body.dsd.leader:
                return body.dsd
        raise FailoverError("no api-pe reports a DSD with a leader")

    def dsd_leader(self) -> str:
        """The api-pe node that leads the DSD."""
        leader = self.dsd_view().leader
        assert leader is not None   # dsd_view answers only with a DSD that has a leader
        return leader.node

    def promoted_bus(self) -> list[str]:
        """Where Pacemaker has the bus promoted (one node; none while it fails over)."""
        return self.crm_placement().promoted.get("bus", [])

    def rule_names(self, policy: str, timeout: float = 30.0) -> set[str]:
        """The names of the policy's rules (asked through the VIP until it answers)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                resp = self.client.get(f"{self.api}/v1/policies/{policy}/rules")
                if resp.status_code == 200:
                    return {r.get("name") for r in resp.json()["results"]}
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise FailoverError(f"the rules of {policy} could not be read through the VIP")
            time.sleep(0.5)

    def placement(self) -> dict[str, list[str]]:
        return self.crm_placement().running

    def crm_placement(self) -> pacemaker.Placement:
        """The cluster as crm_mon shows it on the first host that answers."""
        try:
            return remote.first_reachable(self.inv, self.inv.nodes, _placement, accept_new=self.options.accept_new)
        except NoHostAnswered as exc:
            raise FailoverError("no host answered crm_mon") from exc

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        report = None
        while time.monotonic() < deadline:
            report = status.gather(self.inv, accept_new=self.options.accept_new)
            if report.exit_code == 0:
                return
            time.sleep(1.0)
        problems = "; ".join(report.problems) if report else "no status"
        raise FailoverError(f"the cluster did not become healthy within {timeout:.0f}s: {problems}")

    def op_timing(self, op_id: str) -> pacemaker.OpTiming:
        """The interval and timeout of a recurring operation as the live CIB has them (a fault that must last
        longer than a monitor takes to notice it reads them here)."""
        try:
            timing = remote.first_reachable(self.inv, self.inv.nodes, lambda conn: pacemaker.live_op_timing(
                conn, op_id), accept_new=self.options.accept_new)
        except NoHostAnswered as exc:
            raise FailoverError("no host answered cibadmin") from exc
        if timing is None:
            raise FailoverError(f"the live CIB has no operation {op_id} with an interval and timeout read as "
                                "durations (deploy this version's CIB)")
        return timing

    def fencing_under_way(self, name: str) -> bool:
        """Whether Pacemaker is fencing host `name` right now, as another host's fencer knows it."""
        others = [n for n in self.inv.nodes if n.name != name]
        try:
            return remote.first_reachable(self.inv, others, lambda conn: pacemaker.fencing_under_way(conn, name),
                                          accept_new=self.options.accept_new)
        except NoHostAnswered as exc:
            raise FailoverError("no host answered stonith_admin") from exc

    def totem(self) -> tuple[int, int]:
        """Corosync's token and consensus timeouts in force (ms), read from a host's cmap.

        They can exceed the inventory's: corosync adds token_coefficient per node beyond two."""
        if self._totem is None:
            self._totem = self._read_totem()
        return self._totem

    def _read_totem(self) -> tuple[int, int]:
        try:
            return remote.first_reachable(self.inv, self.inv.nodes, _totem_in_force, accept_new=self.options.accept_new)
        except NoHostAnswered:
            self.log("could not read corosync's timeouts in force; using the inventory's")
            return self.inv.timings.corosync_token_ms, self.inv.timings.corosync_consensus_ms

    def node_limit(self, slack_s: float, *, fenced_s: float = 0.0) -> float:
        """Corosync token + consensus in force, plus `slack_s`: how long a node-level fault may take; plus
        `fenced_s` when the fault loses a host and the cluster fences (it fences before it recovers)."""
        token, consensus = self.totem()
        return (token + consensus) / 1000 + slack_s + (fenced_s if self.fences else 0.0)

    @property
    def fences(self) -> bool:
        return self.inv.pacemaker.fencing != "disabled"

    def cleanup(self) -> None:
        """Forget failures Pacemaker counted, so the next scenario starts from a clean slate."""
        with contextlib.suppress(NoHostAnswered):
            remote.first_reachable(self.inv, self.inv.nodes, pacemaker.cleanup, accept_new=self.options.accept_new)

    def rows_on(self, name: str, datasource: str, table: str) -> list | None:
        try:
            resp = self.client.get(f"{self.node_apis[name]}/v1/data-sources/{datasource}/tables/{table}/rows",
                                   timeout=2.0)
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            return None
        return sorted(r["data"] for r in resp.json()["results"])


def _placement(conn: remote.Connection) -> pacemaker.Placement:
    placement = pacemaker.cluster_placement(conn)
    if placement is None:
        raise RemoteError("crm_mon did not answer", host=conn.host.name)
    return placement


def _totem_in_force(conn: remote.Connection) -> tuple[int, int]:
    out = conn.run("corosync-cmapctl -g runtime.config.totem.token runtime.config.totem.consensus", timeout=20).stdout
    values = dict(line.split(" (u32) = ") for line in out.splitlines() if " (u32) = " in line)
    token = values.get("runtime.config.totem.token")
    consensus = values.get("runtime.config.totem.consensus")
    if not (token and consensus):
        raise RemoteError("corosync-cmapctl printed no totem token and consensus", host=conn.host.name)
    return int(token), int(consensus)
