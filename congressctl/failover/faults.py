"""The faults (Jepsen's nemesis), one class per scenario name, as crmsh's crash_test tasks.

A fault is made with the cluster, the pass marks and the history it records into; then `pick_target()` (before
the workload starts: the DSD's leader is sticky), `inject()`, and `heal()` once `heal_at` has come (a fault with
`heals_itself` has nothing to undo: its host comes back by itself, or Pacemaker restarts what it killed).
`recovery` says what recovery means, `detection` what shows the system noticed (`pacemaker_shows` for
"pacemaker"), `limits()` which result figures are judged against which threshold, `get_attempts` whether the
client retries its GETs (a fault every GET must ride out). A scheduler can drive inject/heal on its own timeline;
`overlaps` says whether a fault may be in force while another one is.

Defining a subclass with a `name` registers it (FAULTS keeps definition order: the default run order).
"""

from __future__ import annotations

import json
import shlex
import shutil
import threading
import time
import uuid
from typing import ClassVar

from congressctl import deploy, haproxy, lab, pacemaker, remote, render
from congressctl.errors import CongressctlError, FailoverError, LabError, RemoteError
from congressctl.failover import delay
from congressctl.failover.check import ScenarioResult, Thresholds
from congressctl.failover.cluster import Cluster
from congressctl.failover.history import History
from congressctl.failover.workload import local_address_towards
from congressctl.inventory import Inventory, Node
from congressctl.node.dsd import stale_after_s
from congressctl.render import render_template

# after the cut host of bus-failback is back: long enough for corosync to rejoin and its Redis to resync
FAILBACK_WATCH_S = 12.0
RECOVERIES = ("first-action", "api-back", "write-back", "pe-back", "deployed")
DETECTIONS = ("leader", "pacemaker", "restart", "refused", "none")

FAULTS: dict[str, type[Fault]] = {}


class Fault:
    name: ClassVar[str]
    description: ClassVar[str]
    recovery: ClassVar[str]                 # one of RECOVERIES
    detection: ClassVar[str] = "pacemaker"  # one of DETECTIONS
    heals_itself: ClassVar[bool] = True     # heal() has nothing to do
    overlaps: ClassVar[bool] = True         # may be in force while another fault is
    # first-action recovery counts only actions run by another DSD instance than before the fault
    new_dsd: ClassVar[bool] = False
    # while it lasts the DSD may be off the bus: only rows pushed once the api-pes hear it again are expected
    dsd_off_bus: ClassVar[bool] = False
    # a planned restart of every process (an upgrade): its pushes go through the VIP and count as requests,
    # its DSD gaps are expected, its first restart is its detection
    rolling: ClassVar[bool] = False
    # the resource whose process is killed: Pacemaker shows it stopped or failed on the target
    killed: ClassVar[str | None] = None
    # while it holds, writes are refused by design (a 503 saying why): a chaos run leaves its window out of the
    # write outage it judges
    refuses_writes: ClassVar[bool] = False
    # the client's tries per GET (a retry on a transport error or a 502/503/504): more than one for a fault that
    # every GET must ride out within the client's retries; writes are never retried (not idempotent)
    get_attempts: ClassVar[int] = 1
    # it takes a host away from the cluster, which fences the host before recovering what ran there
    loses_host: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            assert cls.recovery in RECOVERIES and cls.detection in DETECTIONS, cls.name
            FAULTS[cls.name] = cls

    def __init__(self, cluster: Cluster, thresholds: Thresholds, history: History):
        self.cluster, self.thresholds, self.history = cluster, thresholds, history
        self.target: Node | None = None
        self.limit_s = 0.0                  # the recovery limit, set by inject()
        self.heal_at: float | None = None   # when heal() is due, or a self-healing fault is over (history clock)
        self.hold_until: float | None = None   # the workload goes on at least until then
        self.wait_s: float | None = None    # how long to wait for recovery (default: Options.recovery_timeout_s)
        self.finished_at: float | None = None  # "deployed" recovery: when the fault's own work ended

    @property
    def target_name(self) -> str:
        return self.target.name if self.target else "every host"

    @property
    def survivor(self) -> Node | None:
        """A host to ask Pacemaker on while the fault is in force."""
        if self.detection != "pacemaker" or self.target is None:
            return None
        target = self.target
        return next(n for n in self.cluster.inv.nodes if n.name != target.name)

    def pick_target(self) -> Node | None:
        raise NotImplementedError

    def outage_limit_s(self) -> float:
        """The longest stretch of failed reads or writes through the VIP this fault may cause in a chaos run: a
        node-level fault's limit, plus the fence of a host it takes away (by then the host may hold the VIP, the
        promoted bus and the DSD at once: nothing rebalances them after earlier faults)."""
        fenced_s = self.thresholds.fence_slack_s if self.loses_host else 0.0
        return self.cluster.node_limit(self.thresholds.node_slack_s, fenced_s=fenced_s)

    def inject(self) -> None:
        raise NotImplementedError

    def heal(self) -> None:
        """Undo the fault (nothing to do when it heals itself)."""

    def observe(self) -> None:
        """After recovery, under the workload still: record what the checker needs beyond the workload."""

    def finish(self) -> list[str]:
        """After the scenario is judged: put the cluster back as it was; failures if that failed."""
        return []

    def limits(self, th: Thresholds, result: ScenarioResult) -> dict:
        raise NotImplementedError

    def pacemaker_shows(self, xml_text: str) -> str | None:
        """What Pacemaker shows of this fault (crm_mon's XML on a survivor), or None while it shows nothing."""
        assert self.target is not None
        target = self.target.name
        placement = pacemaker.parse_crm_mon(xml_text)
        if target in placement.offline:
            return f"{target} offline"
        killed = self.killed
        if killed is None:
            return None
        if target not in placement.on(killed):
            return f"{killed} on {target} not running"
        failures = pacemaker.failed_operations(xml_text)
        if any(node == target and op_key.startswith(f"{killed}_") for node, op_key in failures):
            return f"a failed {killed} operation on {target}"
        return None

    def _target(self) -> Node:
        assert self.target is not None   # pick_target() came first
        return self.target


def kill_command(role: str, sig: str) -> str:
    """Signal the congress process of `role` on a host; prints the pid (the bracket keeps pgrep off itself)."""
    pattern = shlex.quote(f"[c]ongressctl serve {role}")
    return f"pid=$(pgrep -f {pattern} | head -n1); test -n \"$pid\" && kill -{sig} $pid && echo $pid"


def bus_signal_command(sig: str) -> str:
    """Signal the host's redis-server (one per host); prints its pid."""
    return f'pid=$(pgrep -x redis-server | head -n1); test -n "$pid" && kill -{sig} $pid && echo $pid'


BUS_KILL = bus_signal_command("9")


def _running(fault: Fault, resource: str) -> Node:
    """The fault's target: the host Pacemaker runs `resource` on."""
    running = fault.cluster.placement().get(resource) or []
    if not running:
        raise FailoverError(f"{fault.name}: Pacemaker runs no {resource} anywhere")
    fault.target = fault.cluster.inv.node(running[0])
    return fault.target


def interface_command(address: str) -> str:
    """Print the name of the host's interface holding `address`."""
    return (f"ip -o -4 addr show | awk -v a={shlex.quote(address)} "
            "'{split($4,x,\"/\"); if (x[1]==a) print $2}' | head -n1")


def cut_command(address: str, seconds: float) -> str:
    """Take the interface holding `address` down for `seconds`, detached so it outlives the SSH session."""
    script = (f"sleep 0.3; i=$({interface_command(address)}); "
              f"ip link set \"$i\" down; sleep {seconds:.1f}; ip link set \"$i\" up")
    return f"setsid nohup sh -c {shlex.quote(script)} >/dev/null 2>&1 < /dev/null & echo started"


# ------------------------------------------------------------------------------------------- PE faults


class PeLeaderKill(Fault):
    name = "pe-leader-kill"
    description = "kill -9 the api-pe process that leads the DSD"
    recovery = "first-action"
    detection = "leader"
    signal = "KILL"

    def pick_target(self) -> Node:
        self.target = self.cluster.inv.node(self.cluster.dsd_leader())
        return self.target

    def inject(self) -> None:
        node = self._target()
        self.pid = self.cluster.ssh(node, kill_command("api-pe", self.signal)).strip()
        self.history.add("fault", f"kill -{self.signal} api-pe pid {self.pid} on {node.name}", host=node.name,
                         pid=self.pid)
        self.limit_s = self.thresholds.pe_recovery_s

    def limits(self, th: Thresholds, result: ScenarioResult) -> dict:
        return {"recover_s": th.pe_recovery_s, "lost": th.max_lost, "duplicated": th.max_duplicated}


class PeLeaderPause(PeLeaderKill):
    name = "pe-leader-pause"
    description = "SIGSTOP the api-pe that leads the DSD for 3 x peer_timeout, then SIGCONT"
    heals_itself = False
    signal = "STOP"

    def inject(self) -> None:
        super().inject()
        self.heal_at = self.history.now() + 3 * self.cluster.inv.timings.peer_timeout_ms / 1000

    def heal(self) -> None:
        node = self._target()
        self.cluster.ssh(node, f"kill -CONT {self.pid}")
        self.history.add("restore", f"kill -CONT {self.pid}", host=node.name, pid=self.pid)


# ------------------------------------------------------------------------------------------- host cuts


class HostCut(Fault):
    """The target host's interface down for the cut's length, then up again (a detached command on the host, so
    it heals itself even while nobody can reach it)."""

    overlaps = False     # two hosts cut of three is no quorum: nothing left to judge
    loses_host = True

    def inject(self) -> None:
        node = self._target()
        token, consensus = self.cluster.totem()
        seconds = self.cluster.options.cut_s or (token + consensus) / 1000 + 8.0
        self.cluster.ssh(node, cut_command(node.address, seconds))
        t = self.history.add("fault", f"{node.name} cut off the network for {seconds:.1f}s", t=self.history.now() + 0.3,
                             host=node.name)
        self.history.add("restore", f"{node.name} back on the network", t=t + seconds, host=node.name)
        self.limit_s = self.cluster.node_limit(self.slack_s(), fenced_s=self.thresholds.fence_slack_s)
        self.heal_at = t + seconds + 0.5

    def slack_s(self) -> float:
        """What the recovery limit adds to corosync's token + consensus."""
        return self.thresholds.node_slack_s


class DsdNodeFail(HostCut):
    name = "dsd-node-fail"
    description = "cut the host running the DSD off the network, restore it afterwards"
    recovery = "first-action"
    new_dsd = True

    def pick_target(self) -> Node:
        return _running(self, "dsd")

    def limits(self, th: Thresholds, result: ScenarioResult) -> dict:
        return {"recover_s": self.limit_s, "lost": th.max_lost}


class ApiNodeFail(Fault):
    name = "api-node-fail"
    description = "kill -9 an api-pe host's congress processes while clients query through the VIP"
    recovery = "pe-back"
    killed = "api-pe"

    def pick_target(self) -> Node:
        """An api-pe host that is not holding the VIP; one that does not lead the DSD when there is a choice."""
        running = self.cluster.placement()
        vip = set(running.get("vip", []))
        leader = self.cluster.dsd_leader()
        candidates = [n for n in self.cluster.inv.with_role("api-pe") if n.name not in vip]
        if not candidates:
            raise FailoverError("api-node-fail: every api-pe host holds the VIP; nothing to fail without the VIP")
        candidates.sort(key=lambda n: (n.name == leader, n.name in running.get("dsd", [])))
        self.target = candidates[0]
        return self.target

    def inject(self) -> None:
        node = self._target()
        killed = self.cluster.ssh(node, kill_command("api-pe", "KILL") + "; " + kill_command("dsd", "KILL") + "; true")
        pids = " ".join(killed.split())
        self.history.add("fault", f"kill -9 congress processes on {node.name} (pids {pids})", host=node.name,
                         pid=pids)
        self.limit_s = 60.0

    def limits(self, th: Thresholds, result: ScenarioResult) -> dict:
        return {"failed_requests": th.max_failed_gets, "lost": th.max_lost, "duplicated": th.max_duplicated}


class VipNodeFail(HostCut):
    name = "vip-node-fail"
    description = "cut the host holding the VIP off the network, restore it afterwards"
    recovery = "api-back"

    def pick_target(self) -> Node:
        return _running(self, "vip")

    def limits(self, th: Thresholds, result: ScenarioResult) -> dict:
        return {"recover_s": self.limit_s}


# ------------------------------------------------------------------------------------------- bus faults


def bus_target(placement: pacemaker.Placement) -> str | None:
    """The host of the promoted Redis, the target of a bus fault; None unless exactly one has it."""
    promoted = placement.promoted.get("bus", [])
    return promoted[0] if len(promoted) == 1 else None


def _promoted_bus(fault: Fault) -> Node:
    placement = fault.cluster.crm_placement()
    target = bus_target(placement)
    if target is None:
        raise FailoverError(f"{fault.name}: the bus is promoted on {len(placement.promoted.get('bus', []))} nodes, "
                            "not one (one bus node has no replica to fail over to: give three nodes the bus role)")
    fault.target = fault.cluster.inv.node(target)
    return fault.target


def _bus_limits(fault: Fault, th: Thresholds, result: ScenarioResult) -> dict:
    limits = {"write_outage_s": fault.limit_s, "failed_requests": th.max_failed_gets, "lost": th.max_lost}
    if not result.dsd_replaced:
        # when the hit host ran the DSD too, its loss has the DSD's at-least-once window (as dsd-node-fail)
        limits["duplicated"] = th.max_duplicated
    return limits


class BusNodeFail(HostCut):
    name = "bus-node-fail"
    description = "cut the host of the promoted Redis (the bus) off the network, restore it afterwards"
    recovery = "write-back"
    dsd_off_bus = True

    def pick_target(self) -> Node:
        return _promoted_bus(self)

    def slack_s(self) -> float:
        return self.thresholds.bus_slack_s

    def limits(self, th: Thresholds, result: ScenarioResult) -> dict:
        return _bus_limits(self, th, result)


class BusKill(Fault):
    name = "bus-kill"
    description = "kill -9 the promoted redis-server"
    recovery = "write-back"
    dsd_off_bus = True
    killed = "bus"

    def pick_target(self) -> Node:
        return _promoted_bus(self)

    def inject(self) -> None:
        node = self._target()
        pid = self.cluster.ssh(node, BUS_KILL).strip()
        self.history.add("fault", f"kill -9 redis-server pid {pid} on {node.name}", host=node.name, pid=pid)
        self.limit_s = self.cluster.node_limit(self.thresholds.bus_slack_s)

    def limits(self, th: Thresholds, result: ScenarioResult) -> dict:
        return _bus_limits(self, th, result)

    def pacemaker_shows(self, xml_text: str) -> str | None:
        target = self._target().name
        placement = pacemaker.parse_crm_mon(xml_text)
        if target in placement.offline:
            return f"{target} offline"
        # the promotion always moves (migration-threshold 1); failures recorded before may still be listed
        return None if target in placement.promoted.get("bus", []) else f"the bus no longer promoted on {target}"


class BusFailback(BusNodeFail):
    name = "bus-failback"
    description = ("cut the promoted Redis's host, then bring it back under load: it must rejoin as a replica, "
                   "take no write, lose nothing and not take the promotion back")

    def inject(self) -> None:
        super().inject()
        assert self.heal_at is not None
        self.hold_until = self.heal_at - 0.5 + FAILBACK_WATCH_S

    def observe(self) -> None:
        target = self._target().name
        promoted = self.cluster.promoted_bus()
        self.history.add("bus-promoted", f"the bus is promoted on {', '.join(promoted) or 'no node'}",
                         ok=target not in promoted, host=target)


# ------------------------------------------------------------------------------------------- network faults

FAULT_TABLE = "inet congressctl_fault"   # the table each ruleset of templates/faults/ makes (and only it)
# a heal that never comes (the machine running the test died): the host undoes the fault by itself this long
# after it was due
SAFETY_MARGIN_S = 30.0
HEAL_TIMEOUT_S = 90.0    # an isolated host may be fenced: heal() waits for it to boot and answer SSH again
BUS_CUT_S = 25.0
# the DSD's monitor fails once its bus has been gone 10 s (2 s interval), the DSD stops, and a fresh one starts
# elsewhere and takes its epoch (19.5 s measured on a 3-host lab on a loaded 2-core machine: 11 s to the failed
# monitor, 1.5 s to stop, 7 s to start)
PARTITION_BUS_RECOVERY_S = 20.0
# healthz answers 503 once the bus has been gone 10 s; HAProxy takes the server out after 2 failed checks
# (500 ms apart, each up to its 1 s timeout)
POOL_EXIT_S = 13.0
POOL_POLL_S = 0.5
PACKET_FAULT_S = 20.0
LOSS_PERCENT = 20
DELAY_MS, JITTER_MS = 100, 20
DELAY_QUEUE = 7
GET_ATTEMPTS = 3


def ruleset(template: str, **context: object) -> str:
    """One nft ruleset of templates/faults/ (`nft -f -` loads it; its first lines replace an earlier one)."""
    return render_template(f"faults/{template}", **context)


def _flag(token: str) -> str:
    return f"/run/congressctl-fault-{shlex.quote(token)}"


def safety_timer(token: str, seconds: float, undo: str) -> str:
    """A detached timer that runs `undo` after `seconds` unless the heal came first: heal removes the flag file
    the timer needs (so a timer left over from one fault never undoes the next one's)."""
    script = f"sleep {seconds:.1f}; rm {_flag(token)} 2>/dev/null && {undo}"
    return f"touch {_flag(token)}; setsid nohup sh -c {shlex.quote(script)} >/dev/null 2>&1 < /dev/null &"


def nft_load_command(token: str, seconds: float) -> str:
    """Load the ruleset given on stdin, with a safety timer deleting its table `seconds` later."""
    return f"{safety_timer(token, seconds, f'nft delete table {FAULT_TABLE}')} nft -f -"


def nft_heal_command(token: str) -> str:
    """Delete the fault's table; prints "removed", or "absent" when it was gone already (the host rebooted)."""
    return (f"rm -f {_flag(token)}; if nft list table {FAULT_TABLE} >/dev/null 2>&1; then "
            f"nft delete table {FAULT_TABLE} && echo removed; else echo absent; fi")


class NftFault(Fault):
    """A ruleset of templates/faults/ on the target for `seconds()`, deleted by heal() over SSH (a host that was
    fenced and rebooted meanwhile may have lost it already), or by the safety timer when that heal never comes."""

    heals_itself = False
    template: ClassVar[str]
    what: ClassVar[str]     # the fault event's text after the host's name

    def context(self, node: Node) -> dict:
        """The template's variables beside `host`."""
        raise NotImplementedError

    def seconds(self) -> float:
        raise NotImplementedError

    def inject(self) -> None:
        node = self._target()
        seconds = self.seconds()
        self.token = uuid.uuid4().hex[:12]
        text = ruleset(self.template, host=node.name, **self.context(node))
        self.cluster.ssh(node, nft_load_command(self.token, seconds + SAFETY_MARGIN_S), input=text)
        t = self.history.add("fault", f"{node.name} {self.what} for {seconds:.1f}s", host=node.name)
        self.heal_at = t + seconds

    def heal(self) -> None:
        node = self._target()
        answer = _ssh_until_up(self, node, nft_heal_command(self.token))
        if answer is None:
            self.history.add("problem", f"{node.name} never answered SSH to heal {self.name} within "
                             f"{HEAL_TIMEOUT_S:.0f}s; its table {FAULT_TABLE} may still be there", ok=False,
                             host=node.name)
            return
        gone = "removed" if answer.strip() == "removed" else "already gone (the host rebooted)"
        self.history.add("restore", f"{node.name}: the fault's nftables table {gone}", host=node.name)


def _ssh_until_up(fault: Fault, node: Node, command: str) -> str | None:
    """Run `command` on `node`, trying again while it does not answer (a fenced host boots); None if it never did."""
    deadline = time.monotonic() + HEAL_TIMEOUT_S
    while True:
        try:
            return fault.cluster.ssh(node, command)
        except RemoteError as exc:
            if time.monotonic() > deadline:
                fault.cluster.log(f"{fault.name}: {node.name} does not answer: {exc}")
                return None
            time.sleep(1.0)


class PartitionOne(NftFault):
    name = "partition-one"
    description = ("isolate the DSD's host from every other host (nftables drops both ways, its links stay up; "
                   "only the machine running the test still reaches it), heal it afterwards")
    recovery = "first-action"
    new_dsd = True
    overlaps = False     # two hosts isolated of three is no quorum: nothing left to judge
    loses_host = True
    template = "isolate.nft.j2"
    what = "isolated from every other host"

    def pick_target(self) -> Node:
        return _running(self, "dsd")

    def context(self, node: Node) -> dict:
        return {"keep": local_address_towards(node.address)}

    def seconds(self) -> float:
        token, consensus = self.cluster.totem()
        return self.cluster.options.cut_s or (token + consensus) / 1000 + 8.0

    def inject(self) -> None:
        super().inject()
        self.limit_s = self.cluster.node_limit(self.thresholds.node_slack_s, fenced_s=self.thresholds.fence_slack_s)

    def limits(self, th: Thresholds, result: ScenarioResult) -> dict:
        return {"recover_s": self.limit_s, "lost": th.max_lost}


class PartitionBus(NftFault):
    """The DSD's host loses the bus and nothing else; HAProxy's view of its api-pe is watched while it lasts."""

    name = "partition-bus"
    description = (f"the DSD's host loses only the bus (TCP to the bus address and port dropped) for {BUS_CUT_S:g}s: "
                   "corosync sees nothing; the DSD must move and the api-pe there must leave HAProxy's pool")
    recovery = "first-action"
    new_dsd = True
    killed = "dsd"       # Pacemaker shows it once the DSD's monitor fails on its lost bus
    template = "bus-cut.nft.j2"
    what = "cut off the bus"

    def pick_target(self) -> Node:
        return _running(self, "dsd")

    def context(self, node: Node) -> dict:
        return {"bus_address": self.cluster.inv.bus_address, "bus_port": self.cluster.inv.bus.port}

    def seconds(self) -> float:
        return BUS_CUT_S

    def inject(self) -> None:
        self.pool = PoolWatch(self.cluster, self.history)
        super().inject()
        self.limit_s = PARTITION_BUS_RECOVERY_S

    def heal(self) -> None:
        super().heal()
        self.pool.stop()

    def limits(self, th: Thresholds, result: ScenarioResult) -> dict:
        return {"recover_s": self.limit_s, "pool_exit_s": POOL_EXIT_S, "lost": th.max_lost}

    def outage_limit_s(self) -> float:
        """Until the cut api-pe leaves HAProxy's pool (POOL_EXIT_S, this scenario's own promise) the writes sent
        there answer 503 by design: a node keeps its place through a bus outage shorter than its grace, since a
        bus failover is one (chaos seed 23: five writes in a row went there, 5.0 s against a node fault's 4.85)."""
        return max(super().outage_limit_s(), POOL_EXIT_S)


class PoolWatch:
    """HAProxy's view of the api-pe servers, asked every POOL_POLL_S on the VIP's host (found again when it does
    not answer) over one SSH connection, in a thread: a "pool" event for each server whenever its state changes."""

    def __init__(self, cluster: Cluster, history: History):
        self.cluster, self.history = cluster, history
        self.states: dict[str, str] = {}
        self.stopping = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._loop, name="pool", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        if self.errors:
            raise FailoverError(f"the HAProxy pool watcher failed: {self.errors[0]!r}")

    def _loop(self) -> None:
        conn: remote.Connection | None = None
        try:
            while not self.stopping.is_set():
                try:
                    conn = conn or self._connect()
                    self._sample(conn)
                except CongressctlError:
                    if conn is not None:
                        conn.close()
                    conn = None
                self.stopping.wait(POOL_POLL_S)
        except BaseException as exc:  # noqa: BLE001 - read in stop(), so no error vanishes
            self.errors.append(exc)
        finally:
            if conn is not None:
                conn.close()

    def _connect(self) -> remote.Connection:
        holders = self.cluster.placement().get("vip") or []
        if not holders:
            raise FailoverError("no host holds the VIP")
        return remote.connect(self.cluster.inv, self.cluster.inv.node(holders[0]), self.cluster.options.accept_new)

    def _sample(self, conn: remote.Connection) -> None:
        asked = self.history.now()
        for name, server in haproxy.servers(conn).items():
            if self.states.get(name) != server.status:
                self.states[name] = server.status
                self.history.add("pool", f"HAProxy on {conn.host.name}: {name} {server.status}", ok=server.up,
                                 t=asked, host=name)


# knet's default port; corosync.conf.j2 sets none
COROSYNC_PORT = 5405


class PacketLoss(NftFault):
    name = "packet-loss"
    description = (f"the VIP's host drops {LOSS_PERCENT}% of the packets it sends, at random, for "
                   f"{PACKET_FAULT_S:g}s (corosync's packets spared: membership has a link of its own in production): "
                   "every GET still succeeds within the client's retries")
    recovery = "api-back"
    detection = "none"
    get_attempts = GET_ATTEMPTS
    template = "loss.nft.j2"
    what = f"drops {LOSS_PERCENT}% of what it sends"

    def pick_target(self) -> Node:
        return _running(self, "vip")

    def context(self, node: Node) -> dict:
        return {"percent": LOSS_PERCENT, "corosync_port": COROSYNC_PORT}

    def seconds(self) -> float:
        return PACKET_FAULT_S

    def limits(self, th: Thresholds, result: ScenarioResult) -> dict:
        return _packet_limits(th)


def _packet_limits(th: Thresholds) -> dict:
    return {"failed_requests": th.max_failed_gets, "lost": th.max_lost, "duplicated": th.max_duplicated}


# how long the delayer may take to start and bind its queue: a Python start on a loaded CI machine took over 5 s
DELAYER_START_S = 30


def delay_inject_command(token: str, *, interface: str, seconds: float) -> str:
    """Start the delayer (its report to a file), wait until it has bound its queue, then send what leaves
    `interface` to it; a safety timer deletes the rule if the heal never comes."""
    # -W: runpy warns that the package (which imports delay for its commands) came first; harmless
    delayer = shlex.join([f"{deploy.VENV}/bin/python", "-W", "ignore::RuntimeWarning", "-m",
                          "congressctl.failover.delay", "--queue",
                          str(DELAY_QUEUE), "--delay-ms", str(DELAY_MS), "--jitter-ms", str(JITTER_MS),
                          "--seconds", f"{seconds:.1f}"])
    out = f"/run/congressctl-delay-{shlex.quote(token)}"
    bound = f"awk '$1=={DELAY_QUEUE}' {delay.QUEUE_PROC} 2>/dev/null | grep -q ."
    return (f"{safety_timer(token, seconds + SAFETY_MARGIN_S, delay.delete_rule(DELAY_QUEUE, interface))} "
            f"setsid nohup {delayer} >{out}.json 2>{out}.err < /dev/null & echo $! >{out}.pid; "
            f"for i in $(seq {DELAYER_START_S * 10}); do {bound} && break; sleep 0.1; done; "
            f"{bound} || {{ cat {out}.err >&2; exit 1; }}; {delay.insert_rule(DELAY_QUEUE, interface)}")


def delay_heal_command(token: str, interface: str) -> str:
    """Delete the rule, stop the delayer (a heal may come before its own time is up: a chaos run's holds are
    shorter), then print its report (and its errors) once it has ended."""
    out = f"/run/congressctl-delay-{shlex.quote(token)}"
    return (f"rm -f {_flag(token)}; {delay.delete_rule(DELAY_QUEUE, interface)}; "
            f"kill -TERM \"$(cat {out}.pid 2>/dev/null)\" 2>/dev/null; "
            f"for i in $(seq 50); do test -s {out}.json && break; sleep 0.1; done; "
            f"cat {out}.json {out}.err 2>/dev/null; rm -f {out}.json {out}.err {out}.pid")


class PacketDelay(Fault):
    """Without sch_netem (tc netem is missing on some kernels) the delay is an NFQUEUE rule and the delayer
    (congressctl.failover.delay) run on the host from the deployed package."""

    name = "packet-delay"
    description = (f"the VIP's host delays every packet it sends by {DELAY_MS}±{JITTER_MS} ms for "
                   f"{PACKET_FAULT_S:g}s: "
                   "every GET still succeeds within the client's retries")
    recovery = "api-back"
    detection = "none"
    heals_itself = False
    get_attempts = GET_ATTEMPTS

    def pick_target(self) -> Node:
        return _running(self, "vip")

    def inject(self) -> None:
        node = self._target()
        self.token = uuid.uuid4().hex[:12]
        self.interface = self.cluster.ssh(node, interface_command(node.address)).strip()
        if not self.interface:
            raise FailoverError(f"{self.name}: no interface of {node.name} holds {node.address}")
        self.cluster.ssh(node, delay_inject_command(self.token, interface=self.interface, seconds=PACKET_FAULT_S),
                         timeout=DELAYER_START_S + 10.0)
        t = self.history.add("fault", f"{node.name} delays what it sends on {self.interface} by "
                             f"{DELAY_MS}±{JITTER_MS} ms for {PACKET_FAULT_S:g}s", host=node.name)
        self.heal_at = t + PACKET_FAULT_S

    def heal(self) -> None:
        node = self._target()
        answer = self.cluster.ssh(node, delay_heal_command(self.token, self.interface)).strip()
        try:
            report = delay.DelayReport.from_dict(json.loads(answer.splitlines()[0]))
        except (ValueError, KeyError, IndexError):
            self.history.add("problem", f"the delayer on {node.name} left no report: {answer[-300:]!r}", ok=False,
                             host=node.name)
            return
        self.history.add("restore", f"{node.name}: rule removed; the delayer held {report.packets} packets "
                         f"{report.mean_delay_ms:g} ms on average ({report.overflows} overflows)", host=node.name)

    def limits(self, th: Thresholds, result: ScenarioResult) -> dict:
        return _packet_limits(th)


# ------------------------------------------------------------------------------------------- upgrade


class RollingUpgrade(Fault):
    """`congressctl deploy` of this tree as version 0.1.0+LABEL, in a thread while the workload runs; each step
    of its rolling restart is an event. `finished_at` is set however it ended."""

    name = "rolling-upgrade"
    description = ("deploy this tree as a new version (a new local label) under the workload, pushes through "
                   "the VIP too: every congress process restarts, host by host; deploy it back unlabelled after")
    recovery = "deployed"
    detection = "restart"
    rolling = True
    overlaps = False
    DEPLOY_S = 900.0

    def pick_target(self) -> None:
        return None

    def inject(self) -> None:
        self.label = f"upgrade.{int(time.time())}"
        self.result: deploy.DeployResult | None = None
        self.error: str | None = None
        self.limit_s = self.wait_s = self.DEPLOY_S
        self.history.add("fault", f"congressctl deploy of 0.1.0+{self.label} started")
        self.thread = threading.Thread(target=self._run, name="upgrade", daemon=True)
        self.thread.start()

    def _progress(self, host: str, step: str) -> None:
        if step.startswith("restart"):
            self.history.add("restore", f"{host}: {step}", host=host)

    def _run(self) -> None:
        try:
            self.result = deploy.deploy(self.cluster.inv, accept_new=self.cluster.options.accept_new,
                                        local_version=self.label, progress=self._progress)
        except CongressctlError as exc:
            self.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported as the scenario's failure
            self.error = repr(exc)
        finally:
            self.finished_at = self.history.now()

    def limits(self, th: Thresholds, result: ScenarioResult) -> dict:
        return {"failed_requests": th.max_failed_gets, "lost": th.max_lost, "duplicated": th.max_duplicated}

    def observe(self) -> None:
        for problem in self._problems() + self._not_upgraded():
            self.history.add("problem", problem, ok=False)

    def _problems(self) -> list[str]:
        if self.error or self.result is None:
            return [f"the deploy failed: {self.error or 'it did not finish'}"]
        return [f"the deploy failed: {p}" for p in self.result.problems + [
            f"host {h.host}: {h.error}" for h in self.result.hosts.values() if h.error]]

    def _not_upgraded(self) -> list[str]:
        want = f"+{self.label}"
        return [f"host {host} runs {version}, not ...{want}" for host, version in host_versions(self.cluster).items()
                if not version.endswith(want)]

    def finish(self) -> list[str]:
        """Put this tree's unlabelled package back (not measured), so that a plain deploy changes nothing again,
        and drop the labelled wheelhouse (18 MB)."""
        self.cluster.log("rolling-upgrade: deploying the package back without the label")
        try:
            back = deploy.deploy(self.cluster.inv, accept_new=self.cluster.options.accept_new)
        except CongressctlError as exc:
            failures = [f"deploying the package back failed: {exc}"]
        else:
            failures = [f"deploying the package back: {p}" for p in back.problems]
        for folder in (self.cluster.inv.state_dir / "wheelhouse").glob(f"*+{self.label}-py*"):
            shutil.rmtree(folder, ignore_errors=True)
        return failures


def host_versions(cluster: Cluster) -> dict[str, str]:
    """Per host: the congressctl version installed, and which congress processes still run an older one."""
    command = (f"{deploy.VENV}/bin/python -c 'import importlib.metadata as m; print(m.version(\"congressctl\"))'"
               f" && {render.CLUSTER_SCRIPT} stale")
    found = {}
    for node in cluster.inv.nodes:
        lines = cluster.ssh(node, command).split()
        found[node.name] = lines[0] + (f" (stale: {', '.join(lines[1:])})" if lines[1:] else "")
    return found


# ------------------------------------------------------------------------------------------- process and host faults
# (issue 12) A process that stops without dying, a disk that fills, a host that loses its power.

# after a paused process is resumed: long enough for it to run whatever it had claimed, were it not fenced
RESUME_WATCH_S = 5.0
# how long a frozen Redis is left for Pacemaker to stop it or promote another (a demote waits for replicas)
FAILOVER_WAIT_S = 30.0
# a stop and a start of the DSD on top of the pause: about 3 s on an idle lab host, 10 s seen on a loaded one
DSD_RESTART_S = 10.0
# how long a bus host's rejoining as a replica may take: its failure expires (failure-timeout 10s), it starts
REJOIN_WATCH_S = 60.0
REDIS_DATA_DIR = "/var/lib/redis"      # templates/redis.conf.j2's dir
FILL_FILE = f"{REDIS_DATA_DIR}/congressctl-disk-full"
MAX_FILL_MB = 1024                     # a data dir on a bigger filesystem is never filled (not a test)
FULL_S = 10.0
# Redis takes writes again once it has written its append-only file again (it retries every second) or a
# snapshot succeeded (a failed one is retried after 5 s)
WRITES_BACK_S = 8.0


def dsd_pause_s(monitor: pacemaker.OpTiming, peer_timeout_s: float) -> float:
    """How long to pause the DSD so that its monitor has surely failed: its liveness file goes stale, plus a
    second (the agent compares whole seconds), plus a monitor interval for the next monitor to come and its
    timeout for it to answer."""
    return stale_after_s(peer_timeout_s) + 1.0 + monitor.interval_s + monitor.timeout_s


def bus_pause_s(monitor: pacemaker.OpTiming) -> float:
    """How long to pause the promoted Redis: past its next monitor's timeout, which a frozen Redis runs into."""
    return monitor.interval_s + monitor.timeout_s + 1.0


def disk_refusal(df_line: str, data_dir: str = REDIS_DATA_DIR) -> str | None:
    """Why a data dir must not be filled, from its line of `df -P -k DIR`; None when it is a small filesystem
    of its own (a lab host's tmpfs): filling a disk the system shares is not a test."""
    fields = df_line.split()
    if len(fields) < 6 or not fields[1].isdigit():
        return f"df printed no filesystem for {data_dir}: {df_line.strip()!r}"
    size_mb, mount = int(fields[1]) // 1024, fields[5]
    if mount != data_dir:
        return f"{data_dir} is on the filesystem mounted at {mount}, not a filesystem of its own"
    if size_mb > MAX_FILL_MB:
        return f"{data_dir} is {size_mb} MB, more than the {MAX_FILL_MB} MB this fault fills"
    return None


def resume_command(pid: str) -> str:
    """SIGCONT `pid` if it still exists; prints what happened."""
    pid = shlex.quote(pid)
    return f"if kill -0 {pid} 2>/dev/null; then kill -CONT {pid} && echo resumed; else echo gone; fi"


class DsdPause(Fault):
    name = "dsd-pause"
    description = ("SIGSTOP the DSD past the time its monitor takes to notice, SIGCONT it after if it still exists: "
                   "a new DSD takes over, the resumed one runs nothing")
    recovery = "first-action"
    heals_itself = False
    new_dsd = True
    killed = "dsd"

    def pick_target(self) -> Node:
        return _running(self, "dsd")

    def inject(self) -> None:
        node = self._target()
        pause_s = dsd_pause_s(self.cluster.op_timing("dsd-monitor"), self.cluster.inv.timings.peer_timeout_ms / 1000)
        self.pid = self.cluster.ssh(node, kill_command("dsd", "STOP")).strip()
        t = self.history.add("fault", f"kill -STOP DSD pid {self.pid} on {node.name} for {pause_s:.1f}s",
                             host=node.name, pid=self.pid)
        # the pause is as long as the monitor may take to notice; Pacemaker then stops and starts the DSD
        self.limit_s = pause_s + DSD_RESTART_S
        self.heal_at = t + pause_s
        self.hold_until = self.heal_at + RESUME_WATCH_S

    def heal(self) -> None:
        node = self._target()
        done = self.cluster.ssh(node, resume_command(self.pid)).strip()
        self.history.add("restore", f"kill -CONT {self.pid}: {done}", host=node.name, pid=self.pid)

    def limits(self, th: Thresholds, result: ScenarioResult) -> dict:
        return {"recover_s": self.limit_s, "lost": th.max_lost, "duplicated": th.max_duplicated}


class BusPause(BusKill):
    name = "bus-pause"
    description = ("SIGSTOP the promoted redis-server past its monitor timeout, SIGCONT it after if it still exists: "
                   "writes come back on another, it rejoins as a replica")
    heals_itself = False

    def inject(self) -> None:
        node = self._target()
        monitor = self.cluster.op_timing("bus-monitor-promoted")
        pause_s = bus_pause_s(monitor)
        self.pid = self.cluster.ssh(node, bus_signal_command("STOP")).strip()
        t = self.history.add("fault", f"kill -STOP redis-server pid {self.pid} on {node.name} for {pause_s:.1f}s",
                             host=node.name, pid=self.pid)
        # as bus-kill, once the monitor has run into its timeout
        self.limit_s = self.cluster.node_limit(self.thresholds.bus_slack_s) + monitor.interval_s + monitor.timeout_s
        self.heal_at = t + pause_s

    def outage_limit_s(self) -> float:
        return max(super().outage_limit_s(), self.limit_s)

    def heal(self) -> None:
        """Once Pacemaker has dealt with the frozen Redis (stopped it, or promoted another): resumed earlier, in
        the middle of its recovery, it would be an old primary coming back on its own, not this fault."""
        node = self._target()
        deadline = self.history.now() + FAILOVER_WAIT_S
        while self.history.now() < deadline and not self._dealt_with(node):
            time.sleep(1.0)
        done = self.cluster.ssh(node, resume_command(self.pid)).strip()
        self.history.add("restore", f"kill -CONT {self.pid}: {done}", host=node.name, pid=self.pid)

    def _dealt_with(self, node: Node) -> bool:
        gone = self.cluster.ssh(node, f"kill -0 {shlex.quote(self.pid)} 2>/dev/null || echo gone").strip() == "gone"
        return gone or bus_target(self.cluster.crm_placement()) not in (None, node.name)

    def observe(self) -> None:
        """Until the paused Redis's host runs the bus again as a replica: never two promoted."""
        target = self._target().name
        deadline = self.history.now() + REJOIN_WATCH_S
        while True:
            placement = self.cluster.crm_placement()
            promoted = placement.promoted.get("bus", [])
            if len(promoted) > 1:
                self.history.add("problem", f"the bus is promoted on {', '.join(promoted)} at once", ok=False)
                return
            if target in placement.on("bus") or self.history.now() > deadline:
                break
            time.sleep(1.0)
        self.history.add("bus-promoted", f"the bus is promoted on {', '.join(promoted) or 'no node'}",
                         ok=target not in promoted, host=target)
        if target not in placement.on("bus"):
            self.history.add("problem", f"{target} did not rejoin the bus within {REJOIN_WATCH_S:.0f}s", ok=False)
        elif target not in promoted:
            self.history.add("restore", f"{target} runs the bus again as a replica", host=target)


class DiskFull(Fault):
    name = "disk-full"
    description = (f"fill the promoted Redis's data dir for {FULL_S:.0f}s: writes answer 503 saying why, reads "
                   "answer, writes come back once it is freed")
    recovery = "write-back"
    detection = "refused"
    heals_itself = False
    refuses_writes = True

    def __init__(self, cluster: Cluster, thresholds: Thresholds, history: History):
        super().__init__(cluster, thresholds, history)
        # its own window: in a chaos run the history's first fault and restore are other faults'
        self.filling_from: float | None = None
        self.freed_at: float | None = None

    def pick_target(self) -> Node:
        node = _promoted_bus(self)
        why = disk_refusal(self.cluster.ssh(node, f"df -P -k {REDIS_DATA_DIR} | tail -n1"))
        if why is not None:
            raise FailoverError(f"disk-full refused: {why}; filling a disk the host shares is not a test (the lab "
                                "gives each host's Redis a small tmpfs)", host=node.name)
        return node

    def inject(self) -> None:
        node = self._target()
        # Redis may refuse writes while dd is still filling (the fault event is added once dd has stopped)
        self.filling_from = self.history.now()
        out = self.cluster.ssh(node, f"dd if=/dev/zero of={FILL_FILE} bs=1M 2>&1; df -P -k {REDIS_DATA_DIR} | "
                                     "tail -n1", timeout=120)
        t = self.history.add("fault", f"{REDIS_DATA_DIR} on {node.name} filled ({FILL_FILE})", host=node.name)
        if "No space left on device" not in out:
            self.history.add("problem", f"filling {REDIS_DATA_DIR} on {node.name} never hit ENOSPC: {out.strip()}",
                             ok=False)
        self.limit_s = FULL_S + WRITES_BACK_S
        self.heal_at = t + FULL_S
        self.hold_until = self.heal_at + WRITES_BACK_S

    def heal(self) -> None:
        node = self._target()
        self.cluster.ssh(node, f"rm -f {FILL_FILE}")
        self.freed_at = self.history.add("restore", f"{FILL_FILE} removed on {node.name}", host=node.name)

    def observe(self) -> None:
        filled, freed = self.filling_from, self.freed_at
        assert filled is not None and freed is not None   # inject() and heal() came first
        if not any(e.status == 503 for e in self.history.of("write") if filled <= e.t < freed):
            self.history.add("problem", "no write was answered 503 while the disk was full", ok=False)

    def finish(self) -> list[str]:
        """The filler removed, whatever happened in between (heal() may never have come)."""
        try:
            self.cluster.ssh(self._target(), f"rm -f {FILL_FILE}")
        except CongressctlError as exc:
            return [f"{FILL_FILE} on {self._target().name} not removed: {exc}"]
        return []

    def limits(self, th: Thresholds, result: ScenarioResult) -> dict:
        return {"recover_s": self.limit_s, "failed_requests": th.max_failed_gets, "lost": th.max_lost,
                "duplicated": th.max_duplicated, "bad_write_answers": 0}


# a host that is off is on again at most this long after it was due: Pacemaker's fencing reboots it meanwhile
FENCE_WAIT_S = 60.0
# a powered-on host boots, rejoins, and its api-pe starts and syncs (a lab host took about 20 s)
BOOT_WATCH_S = 120.0


def lab_of(inv: Inventory) -> lab.Lab:
    """The lab whose power switch fences the inventory's hosts (lab up writes the inventory into the lab's
    folder and names the cluster after the lab); FailoverError when the hosts have no such switch."""
    device = next((d for d in inv.pacemaker.devices if d.agent == lab.FENCE_AGENT), None)
    if device is None:
        raise FailoverError(f"host-crash refused: no fence device of the inventory uses {lab.FENCE_AGENT}, and "
                            "only a lab's power switch can cut a host's power (on real hosts, pull the plug)")
    try:
        found = (lab.lab_load(inv.cluster, inv.path.parent) if (inv.path.parent / "lab.json").exists()
                 else lab.lab_load(inv.cluster))
    except LabError as exc:
        raise FailoverError(f"host-crash refused: the fence device {device.name} uses {lab.FENCE_AGENT}, but "
                            f"{exc.message}") from None
    if dict(device.params).get("ipaddr") != found.gateway:
        raise FailoverError(f"host-crash refused: the fence device {device.name} reaches a power switch at "
                            f"{dict(device.params).get('ipaddr')}, not lab {found.name}'s at {found.gateway}")
    return found


class HostCrash(Fault):
    """The DSD's host powered off through the lab's power switch (the path fencing takes), then on after the
    hold if Pacemaker has not fenced (rebooted) it meanwhile; the switch queues requests, so none is sent while
    Pacemaker is fencing the host."""

    name = "host-crash"
    description = ("power the DSD's host off at once (every process killed, as a power loss), on again after the "
                   "hold unless fencing rebooted it: a new DSD takes over, the host rejoins")
    recovery = "first-action"
    heals_itself = False
    overlaps = False     # two hosts down of three is no quorum: nothing left to judge
    loses_host = True
    new_dsd = True

    def pick_target(self) -> Node:
        self.lab = lab_of(self.cluster.inv)
        return _running(self, "dsd")

    def inject(self) -> None:
        node = self._target()
        if self.cluster.fencing_under_way(node.name):
            raise FailoverError(f"host-crash: Pacemaker is fencing {node.name}; not powering it off as well",
                                host=node.name)
        token, consensus = self.cluster.totem()
        hold_s = self.cluster.options.cut_s or (token + consensus) / 1000 + 8.0
        t = self.history.now()
        lab.power(self.lab, "off", node.name)
        self.history.add("fault", f"{node.name} powered off for {hold_s:.1f}s", t=t, host=node.name)
        self.limit_s = self.cluster.node_limit(self.thresholds.node_slack_s, fenced_s=self.thresholds.fence_slack_s)
        self.heal_at = t + hold_s

    def heal(self) -> None:
        node = self._target()
        deadline = self.history.now() + FENCE_WAIT_S
        while self.cluster.fencing_under_way(node.name) and self.history.now() < deadline:
            time.sleep(1.0)
        if lab.power(self.lab, "status", node.name).status == "on":
            self.history.add("restore", f"{node.name} already on: Pacemaker fenced it (a reboot)", host=node.name)
            return
        lab.power(self.lab, "on", node.name)
        self.history.add("restore", f"{node.name} powered on", host=node.name)

    def observe(self) -> None:
        """Until the host is back: Pacemaker has it online and its api-pe answers healthy."""
        name = self._target().name
        deadline = self.history.now() + BOOT_WATCH_S
        while self.history.now() < deadline:
            online = name in self.cluster.crm_placement().online
            answer = self.cluster.node_status(name) if online else None
            if answer and answer.healthy:
                self.history.add("restore", f"{name} back: online in Pacemaker, its api-pe healthy", host=name)
                return
            time.sleep(1.0)
        self.history.add("problem", f"{name} not back (online, its api-pe healthy) within {BOOT_WATCH_S:.0f}s",
                         ok=False, host=name)

    def finish(self) -> list[str]:
        """The host on again, whatever happened in between (heal() may never have come)."""
        name = self._target().name
        try:
            lab.power(self.lab, "on", name)
        except CongressctlError as exc:
            return [f"{name} not powered on again: {exc}"]
        return []

    def limits(self, th: Thresholds, result: ScenarioResult) -> dict:
        # the DSD's at-least-once window (dsd-node-fail's): duplicates are not judged
        return {"recover_s": self.limit_s, "lost": th.max_lost}


# the default run order: definition order, the upgrade last (it is the longest, and redeploys every host)
SCENARIOS = tuple(sorted(FAULTS, key=lambda name: FAULTS[name].rolling))
BUS_SCENARIOS = tuple(name for name, cls in FAULTS.items() if cls.dsd_off_bus)
