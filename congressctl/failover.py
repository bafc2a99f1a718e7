"""Failure scenarios against a deployed cluster while a workload runs; every figure is measured.

A workload pushes rows into a probe datasource through the VIP (each push makes exactly one new row appear;
a policy turns each new row into one action that the DSD POSTs to a sink run here) and GETs through the VIP.
Faults are ordinary commands over SSH (kill, ip link), so the same scenarios run on real hosts; the
rolling-upgrade "fault" is `congressctl deploy` itself, of this tree under a new local version label.
"""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import shlex
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from congressctl import deploy, pacemaker, remote, status, timeline
from congressctl.errors import CongressctlError, FailoverError, NoHostAnswered, RemoteError
from congressctl.inventory import Inventory, Node
from congressctl.payloads import ApiPeStatus, DsdView
from congressctl.timeline import Event

WINDOW = 5
PROBE_TABLE = "items"
QUIET_TABLE = "quiet"     # never pushed: the acknowledged writes' rules read it, so they cost the engine nothing
SCENARIO_SPAN = 1_000_000
Log = Callable[[str], None]

DESCRIPTIONS = {
    "pe-leader-kill": "kill -9 the api-pe process that leads the DSD",
    "pe-leader-pause": "SIGSTOP the api-pe that leads the DSD for 3 x peer_timeout, then SIGCONT",
    "dsd-node-fail": "cut the host running the DSD off the network, restore it afterwards",
    "api-node-fail": "kill -9 an api-pe host's congress processes while clients query through the VIP",
    "vip-node-fail": "cut the host holding the VIP off the network, restore it afterwards",
    "bus-node-fail": "cut the host of the promoted Redis (the bus) off the network, restore it afterwards",
    "bus-kill": "kill -9 the promoted redis-server",
    "bus-failback": "cut the promoted Redis's host, then bring it back under load: it must rejoin as a replica, "
                    "take no write, lose nothing and not take the promotion back",
    "rolling-upgrade": "deploy this tree as a new version (a new local label) under the workload, pushes through "
                       "the VIP too: every congress process restarts, host by host; deploy it back unlabelled after",
}
BUS_SCENARIOS = ("bus-node-fail", "bus-kill", "bus-failback")
# after the cut host of bus-failback is back: long enough for corosync to rejoin and its Redis to resync
FAILBACK_WATCH_S = 12.0
SCENARIOS = tuple(DESCRIPTIONS)


def scenarios_named(names: Sequence[str]) -> list[str]:
    """The scenarios to run, in the order named (every one when none is); an unknown name is refused."""
    unknown = [n for n in names if n not in DESCRIPTIONS]
    if unknown:
        raise FailoverError(f"unknown scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    return list(names) or list(SCENARIOS)


@dataclass
class Thresholds:
    """Pass marks; node-level recovery limits are corosync token + consensus + `node_slack_s`."""

    pe_recovery_s: float = 1.5
    node_slack_s: float = 2.0
    bus_slack_s: float = 1.5        # bus faults: writes answer again within token + consensus + this
    max_lost: int = 0
    max_duplicated: int = 0
    max_failed_gets: int = 0
    max_acked_writes_lost: int = 0


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


@dataclass
class ScenarioResult:
    name: str
    description: str
    target: str = ""
    pushed_to: str = ""
    passed: bool = False
    detect_s: float | None = None
    recover_s: float | None = None
    pushed: int = 0
    expected_actions: int = 0
    executed: int = 0
    lost: int = 0
    duplicated: int = 0
    requests: int = 0
    failed_requests: int = 0
    writes: int = 0
    failed_writes: int = 0
    acked_writes_lost: int = 0
    write_outage_s: float = 0.0
    bus_moved_back: bool | None = None
    dsd_replaced: bool = False      # another DSD instance ran actions after the fault (its host was hit too)
    tables_equal: bool = False
    limits: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    timeline: str | None = None
    events_file: str | None = None

    def row(self) -> dict:
        return {"scenario": self.name, "target": self.target, "ok": self.passed,
                "detect_s": _round(self.detect_s), "recover_s": _round(self.recover_s),
                "actions": f"{self.executed}/{self.expected_actions}", "lost": self.lost,
                "duplicated": self.duplicated, "failed_requests": f"{self.failed_requests}/{self.requests}",
                "writes_ok": f"{self.writes - self.failed_writes}/{self.writes}",
                "acked_writes_lost": self.acked_writes_lost, "write_outage_s": _round(self.write_outage_s),
                "tables_equal": self.tables_equal, "why": "; ".join(self.failures)}


@dataclass
class FailoverReport:
    scenarios: list[ScenarioResult]
    timings: dict
    report_dir: str | None
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.scenarios) and all(s.passed for s in self.scenarios)

    def rows(self) -> list[dict]:
        return [s.row() for s in self.scenarios]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "timings": self.timings, "report_dir": self.report_dir,
                "duration_s": round(self.duration_s, 1), "scenarios": [asdict(s) for s in self.scenarios]}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# ------------------------------------------------------------------------------------------- recording


class Recorder:
    """Events on one clock: seconds since the scenario started (wall time kept to place the nodes' stamps)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.events: list[Event] = []
        self.lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def add(self, kind: str, detail: str = "", ok: bool = True, t: float | None = None) -> float:
        t = self.now() if t is None else t
        with self.lock:
            self.events.append(Event(round(t, 4), kind, detail, ok))
        return t

    def first(self, kind: str, after: float = 0.0) -> float | None:
        with self.lock:
            return next((e.t for e in sorted(self.events, key=lambda e: e.t) if e.kind == kind and e.t >= after),
                        None)


class Sink:
    """A real HTTP server that records every action the DSD POSTs to it (the workload's ground truth)."""

    def __init__(self, address: str = "127.0.0.1", port: int = 0) -> None:
        self.arrivals: list[tuple[float, dict]] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                body["executor"] = self.headers.get("X-Congress-Executor")
                with sink.lock:
                    sink.arrivals.append((time.monotonic(), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 256
            daemon_threads = True

        self.server = Server((address, port), Handler)
        self.address, self.port = self.server.socket.getsockname()[:2]   # server_address's type allows bytes
        self.thread = threading.Thread(target=self.server.serve_forever, name="sink", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/actions"

    def bodies(self) -> list[dict]:
        with self.lock:
            return [b for _, b in self.arrivals]

    def since(self, start: float) -> list[tuple[float, dict]]:
        with self.lock:
            return [(t, b) for t, b in self.arrivals if t >= start]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def local_address_towards(address: str) -> str:
    """The address of this machine that the cluster's hosts reach it by (the route towards a node)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((address, 9))
        return str(s.getsockname()[0])


# ------------------------------------------------------------------------------------------- workload


@dataclass
class Write:
    """One rule create through the VIP: acknowledged (201) or not; an acknowledged one must exist afterwards."""

    t: float
    name: str
    acked: bool


@dataclass
class Push:
    t: float
    k: int
    outcome: str      # ok, failed (refused before it was applied) or unknown (timeout: may have been applied)


class Workload:
    """Sequential pushes (order matters: each makes one row appear) and concurrent GETs through the VIP.

    Pushes go to one api-pe on a host the scenario leaves alone: a replace that timed out on a paused
    process and is applied when it resumes would bring old rows back (each a new action) and hide what the
    scenario measures."""

    def __init__(self, api: str, push_api: str, probe: ProbeSetup, base: int, options: Options, rec: Recorder):
        self.api, self.push_api, self.base = api, push_api, base
        self.datasource, self.policy, self.writes_policy = probe.datasource, probe.policy, probe.writes_policy
        self.options, self.rec = options, rec
        self.pushes: list[Push] = []
        self.gets: list[tuple[float, bool]] = []
        self.writes: list[Write] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._push_loop, name="push", daemon=True),
                        threading.Thread(target=self._get_loop, name="get", daemon=True),
                        threading.Thread(target=self._write_loop, name="write", daemon=True)]
        self.next_k = base
        self.errors: list[BaseException] = []

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=10)
        if self.errors:
            raise FailoverError(f"the workload failed: {self.errors[0]!r}")

    def window(self, k: int) -> list[list[int]]:
        return [[i] for i in range(max(self.base, k - WINDOW + 1), k + 1)]

    def push(self, client: httpx.Client, k: int) -> Push:
        started = self.rec.now()
        url = f"{self.push_api}/v1/data-sources/{self.datasource}/tables/{PROBE_TABLE}/rows"
        try:
            status_code = client.put(url, json=self.window(k)).status_code
            outcome = "ok" if status_code == 200 else "failed" if status_code in (502, 503, 504) else "unknown"
        except (httpx.ConnectError, httpx.ConnectTimeout):
            outcome = "failed"
        except httpx.HTTPError:
            outcome = "unknown"
        self.rec.add("push", f"k={k - self.base} {outcome}", ok=outcome == "ok", t=started)
        return Push(started, k, outcome)

    def _paced(self, rate: float, step: Callable[[], None]) -> None:
        interval = 1.0 / rate
        due = time.monotonic()
        try:
            while not self.stopping.is_set():
                step()
                due += interval
                delay = due - time.monotonic()
                if delay > 0:
                    self.stopping.wait(delay)
                else:
                    due = time.monotonic()
        except BaseException as exc:  # noqa: BLE001 - read in stop(), so no error vanishes
            self.errors.append(exc)

    def _push_loop(self) -> None:
        with httpx.Client(timeout=httpx.Timeout(2.0, connect=1.0)) as client:
            def step() -> None:
                self.pushes.append(self.push(client, self.next_k))
                self.next_k += 1
            self._paced(self.options.push_rate, step)

    def _get_loop(self) -> None:
        url = f"{self.api}/v1/policies/{self.policy}/rules"
        with httpx.Client(timeout=httpx.Timeout(2.0, connect=1.0),
                          limits=httpx.Limits(max_connections=16)) as client, \
                ThreadPoolExecutor(max_workers=16, thread_name_prefix="get") as pool:
            def one() -> None:
                started = self.rec.now()
                try:
                    code = client.get(url).status_code
                    ok, why = code == 200, f"HTTP {code}"
                except httpx.HTTPError as exc:
                    ok, why = False, type(exc).__name__
                with self.rec.lock:
                    self.gets.append((started, ok))
                if not ok:
                    self.rec.add("request", f"GET failed: {why}", ok=False, t=started)
            futures = []
            self._paced(self.options.get_rate, lambda: futures.append(pool.submit(one)))
            for f in futures:
                f.result()

    def _write_loop(self) -> None:
        url = f"{self.api}/v1/policies/{self.writes_policy}/rules"
        with httpx.Client(timeout=httpx.Timeout(2.0, connect=1.0)) as client:
            def step() -> None:
                n = self.base + len(self.writes)
                name = f"w{n}"
                started = self.rec.now()
                rule = f"acked(x) :- {self.datasource}:{QUIET_TABLE}(id=x), equal(x, {n})"
                try:
                    code = client.post(url, json={"rule": rule, "name": name}).status_code
                    why = f"HTTP {code}"
                except httpx.HTTPError as exc:
                    code, why = 0, type(exc).__name__
                self.writes.append(Write(started, name, code == 201))
                if code != 201:
                    self.rec.add("write", f"rule create {name} failed: {why}", ok=False, t=started)
            self._paced(self.options.write_rate, step)

    def finish(self, client: httpx.Client, deadline: float) -> int:
        """One last push retried until it is applied: its window is the source the PEs must converge to."""
        k = self.next_k
        while time.monotonic() < deadline:
            result = self.push(client, k)
            self.pushes.append(result)
            if result.outcome == "ok":
                return k
            time.sleep(0.5)
        raise FailoverError("the final push was never accepted through the VIP")


class Watcher:
    """Polls every api-pe's /v1/status: who leads the DSD, which DSD runs, which PEs answer."""

    def __init__(self, nodes: dict[str, str], rec: Recorder, interval: float = 0.1):
        self.nodes, self.rec, self.interval = nodes, rec, interval
        self.leader: tuple | None = None
        self.dsd: tuple | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="watch", daemon=True)
        self.leader_changes: list[tuple[float, tuple, float | None]] = []
        self.dsd_changes: list[tuple[float, tuple]] = []
        self.dsd_heard: list[tuple[float, bool]] = []   # (when, whether an api-pe heard the DSD within 1 s)
        self.errors: list[BaseException] = []

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)
        if self.errors:
            raise FailoverError(f"the leader watcher failed: {self.errors[0]!r}")

    def _loop(self) -> None:
        try:
            with httpx.Client(timeout=httpx.Timeout(0.5, connect=0.3)) as client:
                while not self.stopping.is_set():
                    for url in self.nodes.values():
                        self._sample(client, url)
                    self.stopping.wait(self.interval)
        except BaseException as exc:  # noqa: BLE001 - read in stop()
            self.errors.append(exc)

    def _sample(self, client: httpx.Client, url: str) -> None:
        try:
            dsd = ApiPeStatus.from_dict(client.get(f"{url}/v1/status").json()).dsd
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return
        fresh = dsd is not None and (dsd.age_ms or 0) <= 1000
        with self.rec.lock:
            self.dsd_heard.append((self.rec.now(), fresh))
        if dsd is None or not dsd.node or not dsd.leader or not fresh:
            return
        seen = self.rec.now()
        leader = (dsd.leader.node, dsd.leader.inc)
        if leader != self.leader:
            stamped = dsd.leader_since
            self.leader_changes.append((seen, leader, None if stamped is None else stamped - self.rec.wall0))
            if self.leader is not None:
                self.rec.add("leader", f"DSD leader -> {leader[0]}", t=seen)
            self.leader = leader
        instance = (dsd.node, dsd.incarnation)
        if instance != self.dsd:
            self.dsd_changes.append((seen, instance))
            if self.dsd is not None:
                self.rec.add("leader", f"DSD now runs on {instance[0]}", t=seen)
            self.dsd = instance


# ------------------------------------------------------------------------------------------- cluster access


class Cluster:
    """The deployed cluster as the scenarios see it: SSH to hosts, the API through the VIP and per node."""

    def __init__(self, inv: Inventory, options: Options, log: Log):
        self.inv, self.options, self.log = inv, options, log
        self.api = f"http://{inv.vip.address}:{inv.api_port}"
        self.node_apis = {n.name: f"http://{n.address}:{inv.api_port}" for n in inv.with_role("api-pe")}
        self.client = httpx.Client(timeout=httpx.Timeout(5.0, connect=2.0))
        self._totem: tuple[int, int] | None = None

    def close(self) -> None:
        self.client.close()

    def ssh(self, node: Node, command: str, timeout: float = 20.0) -> str:
        with remote.connect(self.inv, node, self.options.accept_new) as conn:
            return conn.run(command, timeout=timeout).stdout

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
        try:
            return remote.first_reachable(self.inv, self.inv.nodes, _promoted_bus, accept_new=self.options.accept_new)
        except NoHostAnswered as exc:
            raise FailoverError("no host answered crm_mon") from exc

    def acked_writes_lost(self, policy: str, writes: list[Write], timeout: float = 30.0) -> int:
        """How many acknowledged rule creates the policy does not have (asked through the VIP until it answers)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                resp = self.client.get(f"{self.api}/v1/policies/{policy}/rules")
                if resp.status_code == 200:
                    names = {r.get("name") for r in resp.json()["results"]}
                    return sum(1 for w in writes if w.acked and w.name not in names)
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise FailoverError(f"the rules of {policy} could not be read through the VIP")
            time.sleep(0.5)

    def placement(self) -> dict[str, list[str]]:
        try:
            return remote.first_reachable(self.inv, self.inv.nodes, _running, accept_new=self.options.accept_new)
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

    def cleanup(self) -> None:
        """Forget failures Pacemaker counted, so the next scenario starts from a clean slate."""
        with contextlib.suppress(NoHostAnswered):
            remote.first_reachable(self.inv, self.inv.nodes, pacemaker.cleanup, accept_new=self.options.accept_new)

    def rows_on(self, name: str, datasource: str) -> list | None:
        try:
            resp = self.client.get(f"{self.node_apis[name]}/v1/data-sources/{datasource}/tables/{PROBE_TABLE}/rows",
                                   timeout=2.0)
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            return None
        return sorted(r["data"] for r in resp.json()["results"])


def _running(conn: remote.Connection) -> dict[str, list[str]]:
    placement = pacemaker.cluster_placement(conn)
    if placement is None:
        raise RemoteError("crm_mon did not answer", host=conn.host.name)
    return placement.running


def _promoted_bus(conn: remote.Connection) -> list[str]:
    placement = pacemaker.cluster_placement(conn)
    if placement is None:
        raise RemoteError("crm_mon did not answer", host=conn.host.name)
    return placement.promoted.get("bus", [])


def _totem_in_force(conn: remote.Connection) -> tuple[int, int]:
    out = conn.run("corosync-cmapctl -g runtime.config.totem.token runtime.config.totem.consensus", timeout=20).stdout
    values = dict(line.split(" (u32) = ") for line in out.splitlines() if " (u32) = " in line)
    token = values.get("runtime.config.totem.token")
    consensus = values.get("runtime.config.totem.consensus")
    if not (token and consensus):
        raise RemoteError("corosync-cmapctl printed no totem token and consensus", host=conn.host.name)
    return int(token), int(consensus)


# kill -9 the host's redis-server (one per host); prints its pid
BUS_KILL = 'pid=$(pgrep -x redis-server | head -n1); test -n "$pid" && kill -9 $pid && echo $pid'


def kill_command(role: str, sig: str) -> str:
    """Signal the congress process of `role` on a host; prints the pid (the bracket keeps pgrep off itself)."""
    pattern = shlex.quote(f"[c]ongressctl serve {role}")
    return f"pid=$(pgrep -f {pattern} | head -n1); test -n \"$pid\" && kill -{sig} $pid && echo $pid"


def cut_command(address: str, seconds: float) -> str:
    """Take the interface holding `address` down for `seconds`, detached so it outlives the SSH session."""
    script = (f"sleep 0.3; i=$(ip -o -4 addr show | awk -v a={shlex.quote(address)} "
              "'{split($4,x,\"/\"); if (x[1]==a) print $2}' | head -n1); "
              f"ip link set \"$i\" down; sleep {seconds:.1f}; ip link set \"$i\" up")
    return f"setsid nohup sh -c {shlex.quote(script)} >/dev/null 2>&1 < /dev/null & echo started"


# ------------------------------------------------------------------------------------------- scenarios


@dataclass
class Fault:
    """What a scenario did: its target, when the fault began, and what tells that the service recovered."""

    target: str
    recovery: str             # first-action | api-back | write-back | pe-back
    limit_s: float
    restore_at: float | None = None
    restore: Callable[[], object] | None = None
    detected_at: float | None = None
    survivor: Node | None = None
    new_dsd: bool = False     # recovery counts only actions run by another DSD instance than before the fault
    killed: str | None = None  # the resource whose process was killed: Pacemaker detects it stopped or failed
    hold_until: float | None = None   # the workload goes on at least until then (a returning host under load)
    wait_s: float | None = None   # how long to wait for recovery (default: Options.recovery_timeout_s)
    upgrade: Upgrade | None = None


class Upgrade:
    """`congressctl deploy` of this tree as version 0.1.0+LABEL, in a thread while the workload runs; each step
    of its rolling restart is an event. `finished_at` is set however it ended."""

    DEPLOY_S = 900.0

    def __init__(self, cluster: Cluster, rec: Recorder):
        self.cluster, self.rec = cluster, rec
        self.label = f"upgrade.{int(time.time())}"
        self.result: deploy.DeployResult | None = None
        self.error: str | None = None
        self.finished_at: float | None = None
        self.first_restart: float | None = None
        self.thread = threading.Thread(target=self._run, name="upgrade", daemon=True)

    def start(self) -> None:
        self.rec.add("fault", f"congressctl deploy of 0.1.0+{self.label} started")
        self.thread.start()

    def _progress(self, host: str, step: str) -> None:
        if step.startswith("restart"):
            t = self.rec.add("restore", f"{host}: {step}")
            self.first_restart = self.first_restart if self.first_restart is not None else t

    def _run(self) -> None:
        try:
            self.result = deploy.deploy(self.cluster.inv, accept_new=self.cluster.options.accept_new,
                                        local_version=self.label, progress=self._progress)
        except CongressctlError as exc:
            self.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported as the scenario's failure
            self.error = repr(exc)
        finally:
            self.finished_at = self.rec.now()

    def problems(self) -> list[str]:
        if self.error or self.result is None:
            return [f"the deploy failed: {self.error or 'it did not finish'}"]
        return [f"the deploy failed: {p}" for p in self.result.problems + [
            f"host {h.host}: {h.error}" for h in self.result.hosts.values() if h.error]]


def host_versions(cluster: Cluster) -> dict[str, str]:
    """Per host: the congressctl version installed, and which congress processes still run an older one."""
    command = (f"{deploy.VENV}/bin/python -c 'import importlib.metadata as m; print(m.version(\"congressctl\"))'"
               f" && {deploy.CLUSTER_SCRIPT} stale")
    found = {}
    for node in cluster.inv.nodes:
        lines = cluster.ssh(node, command).split()
        found[node.name] = lines[0] + (f" (stale: {', '.join(lines[1:])})" if lines[1:] else "")
    return found


def _node_limit(cluster: Cluster, slack_s: float) -> float:
    token, consensus = cluster.totem()
    return (token + consensus) / 1000 + slack_s


def _cut_seconds(cluster: Cluster) -> float:
    token, consensus = cluster.totem()
    return cluster.options.cut_s or (token + consensus) / 1000 + 8.0


def target_of(name: str, cluster: Cluster) -> Node:
    """The host a scenario will hit, chosen before the workload starts (the DSD's leader is sticky)."""
    if name in ("pe-leader-kill", "pe-leader-pause"):
        return cluster.inv.node(cluster.dsd_leader())
    if name == "api-node-fail":
        return _api_victim(cluster)
    if name in BUS_SCENARIOS:
        promoted = cluster.promoted_bus()
        if len(promoted) != 1:
            raise FailoverError(f"{name}: the bus is promoted on {len(promoted)} nodes, not one (one bus node has "
                                "no replica to fail over to: give three nodes the bus role)")
        return cluster.inv.node(promoted[0])
    where = "dsd" if name == "dsd-node-fail" else "vip"
    running = cluster.placement().get(where) or []
    if not running:
        raise FailoverError(f"{name}: Pacemaker runs no {where} anywhere")
    return cluster.inv.node(running[0])


def inject(name: str, node: Node, cluster: Cluster, thresholds: Thresholds, rec: Recorder) -> Fault:
    inv = cluster.inv
    if name in ("pe-leader-kill", "pe-leader-pause"):
        sig = "KILL" if name == "pe-leader-kill" else "STOP"
        pid = cluster.ssh(node, kill_command("api-pe", sig)).strip()
        rec.add("fault", f"kill -{sig} api-pe pid {pid} on {node.name}")
        fault = Fault(node.name, "first-action", thresholds.pe_recovery_s)
        if sig == "STOP":
            fault.restore_at = rec.now() + 3 * inv.timings.peer_timeout_ms / 1000
            fault.restore = lambda: (cluster.ssh(node, f"kill -CONT {pid}"), rec.add("restore", f"kill -CONT {pid}"))
        return fault
    if name == "api-node-fail":
        killed = cluster.ssh(node, kill_command("api-pe", "KILL") + "; " + kill_command("dsd", "KILL") + "; true")
        rec.add("fault", f"kill -9 congress processes on {node.name} (pids {' '.join(killed.split())})")
        return Fault(node.name, "pe-back", 60.0, survivor=next(n for n in inv.nodes if n.name != node.name),
                     killed="api-pe")
    survivor = next(n for n in inv.nodes if n.name != node.name)
    if name == "bus-kill":
        pid = cluster.ssh(node, BUS_KILL).strip()
        rec.add("fault", f"kill -9 redis-server pid {pid} on {node.name}")
        return Fault(node.name, "write-back", _node_limit(cluster, thresholds.bus_slack_s), survivor=survivor,
                     killed="bus")
    seconds = _cut_seconds(cluster)
    cluster.ssh(node, cut_command(node.address, seconds))
    t = rec.add("fault", f"{node.name} cut off the network for {seconds:.1f}s", t=rec.now() + 0.3)
    rec.add("restore", f"{node.name} back on the network", t=t + seconds)
    recovery = {"dsd-node-fail": "first-action", "vip-node-fail": "api-back"}.get(name, "write-back")
    slack = thresholds.bus_slack_s if name in BUS_SCENARIOS else thresholds.node_slack_s
    return Fault(node.name, recovery, _node_limit(cluster, slack), restore_at=t + seconds + 0.5,
                 survivor=survivor, new_dsd=name == "dsd-node-fail",
                 hold_until=t + seconds + FAILBACK_WATCH_S if name == "bus-failback" else None)


def _api_victim(cluster: Cluster) -> Node:
    """An api-pe host that is not holding the VIP; one that does not lead the DSD when there is a choice."""
    running = cluster.placement()
    vip = set(running.get("vip", []))
    leader = cluster.dsd_leader()
    candidates = [n for n in cluster.inv.with_role("api-pe") if n.name not in vip]
    if not candidates:
        raise FailoverError("api-node-fail: every api-pe host holds the VIP; nothing to fail without the VIP")
    candidates.sort(key=lambda n: (n.name == leader, n.name in running.get("dsd", [])))
    return candidates[0]


# ------------------------------------------------------------------------------------------- one scenario


class ProbeSetup:
    """The probe datasource and the policy turning its rows into actions, made for a run, removed at the end."""

    def __init__(self, cluster: Cluster, sink: Sink):
        suffix = uuid.uuid4().hex[:8]
        self.datasource, self.policy = f"failover_source_{suffix}", f"failover_policy_{suffix}"
        self.writes_policy = f"failover_writes_{suffix}"
        self.cluster = cluster
        cluster.call("POST", "/v1/data-sources", {
            "name": self.datasource, "driver": "push",
            "config": {"tables": {PROBE_TABLE: {"columns": ["id"]}, QUIET_TABLE: {"columns": ["id"]}},
                       "action_url": sink.url}})
        cluster.call("POST", "/v1/policies", {"name": self.policy})
        cluster.call("POST", "/v1/policies", {"name": self.writes_policy})
        cluster.call("POST", f"/v1/policies/{self.policy}/rules",
                     {"rule": f"execute[{self.datasource}:notify(x)] :- {self.datasource}:{PROBE_TABLE}(id=x)"})

    def remove(self) -> None:
        self.cluster.call("DELETE", f"/v1/policies/{self.writes_policy}", expect=(200, 204, 404))
        self.cluster.call("DELETE", f"/v1/policies/{self.policy}", expect=(200, 204, 404))
        self.cluster.call("DELETE", f"/v1/data-sources/{self.datasource}", expect=(200, 204, 404))


@dataclass
class ScenarioRun:
    """One scenario under way, from its fault on: what driving it to recovery and judging it share."""

    cluster: Cluster
    workload: Workload
    watcher: Watcher
    sink: Sink
    sink_start: float     # monotonic; the sink's arrivals before it belong to earlier scenarios
    rec: Recorder
    fault: Fault
    t_fault: float


def run_scenario(name: str, index: int, cluster: Cluster, *, probe: ProbeSetup, sink: Sink,
                 thresholds: Thresholds, report_dir: Path | None = None) -> ScenarioResult:
    options = cluster.options
    result = ScenarioResult(name, DESCRIPTIONS[name])
    rec = Recorder()
    sink_start = time.monotonic()
    upgrade = name == "rolling-upgrade"
    target = None if upgrade else target_of(name, cluster)
    result.target = target.name if target else "every host"
    # every host restarts in an upgrade, so none is left alone to push to: pushes go through the VIP as well
    result.pushed_to = next(n for n in cluster.node_apis if n != target.name) if target else "the VIP"
    push_api = cluster.node_apis[result.pushed_to] if target else cluster.api
    workload = Workload(cluster.api, push_api, probe, (index + 1) * SCENARIO_SPAN, options, rec)
    watcher = Watcher(cluster.node_apis, rec)
    watcher.start()
    workload.start()
    try:
        time.sleep(options.warmup_s)
        fault = inject(name, target, cluster, thresholds, rec) if target else start_upgrade(cluster, rec)
        t_fault = rec.first("fault")
        assert t_fault is not None   # inject() recorded the fault
        scenario = ScenarioRun(cluster, workload, watcher, sink, sink_start, rec, fault, t_fault)
        recovered = _drive(scenario)
        if name == "bus-failback" and target is not None:
            result.bus_moved_back = target.name in cluster.promoted_bus()
    finally:
        workload.stop()
        watcher.stop()
    last = workload.finish(cluster.client, time.monotonic() + 30)
    _settle(result, cluster, probe, source=workload.window(last))
    result.acked_writes_lost = cluster.acked_writes_lost(probe.writes_policy, workload.writes)
    if fault.upgrade:
        result.failures += fault.upgrade.problems() + _not_upgraded(cluster, fault.upgrade)
    _figures(result, scenario, recovered=recovered, thresholds=thresholds)
    if report_dir:
        _write_report(report_dir, result, rec, timings_summary(timings_of(cluster, thresholds)))
    if fault.upgrade:
        _deploy_back(cluster, result, fault.upgrade)
    return result


def start_upgrade(cluster: Cluster, rec: Recorder) -> Fault:
    upgrade = Upgrade(cluster, rec)
    upgrade.start()
    return Fault("every host", "deployed", Upgrade.DEPLOY_S, wait_s=Upgrade.DEPLOY_S, upgrade=upgrade)


def _not_upgraded(cluster: Cluster, upgrade: Upgrade) -> list[str]:
    want = f"+{upgrade.label}"
    return [f"host {host} runs {version}, not ...{want}" for host, version in host_versions(cluster).items()
            if not version.endswith(want)]


def _deploy_back(cluster: Cluster, result: ScenarioResult, upgrade: Upgrade) -> None:
    """Put this tree's unlabelled package back (not measured), so that a plain deploy changes nothing again, and
    drop the labelled wheelhouse (18 MB)."""
    cluster.log("rolling-upgrade: deploying the package back without the label")
    try:
        back = deploy.deploy(cluster.inv, accept_new=cluster.options.accept_new)
    except CongressctlError as exc:
        result.failures.append(f"deploying the package back failed: {exc}")
    else:
        result.failures += [f"deploying the package back: {p}" for p in back.problems]
    for folder in (cluster.inv.state_dir / "wheelhouse").glob(f"*+{upgrade.label}-py*"):
        shutil.rmtree(folder, ignore_errors=True)
    result.passed = not result.failures


def _drive(scenario: ScenarioRun) -> float | None:
    """Until recovered (or timed out), restored, and `after_s` of workload after recovery: poll and restore."""
    watch = _PacemakerWatch(scenario.cluster, scenario.fault, scenario.rec) if scenario.fault.survivor else None
    try:
        return _drive_until_done(scenario, watch)
    finally:
        if watch:
            watch.close()


def _drive_until_done(scenario: ScenarioRun, watch: _PacemakerWatch | None) -> float | None:
    fault, rec, t_fault = scenario.fault, scenario.rec, scenario.t_fault
    options = scenario.cluster.options
    deadline = t_fault + (fault.wait_s or options.recovery_timeout_s)
    recovered = None
    while True:
        now = rec.now()
        if watch:
            watch.poll()
        if fault.restore and now >= (fault.restore_at or 0.0):
            fault.restore()
            fault.restore = None
        if recovered is None and now <= deadline:
            recovered = _recovered_at(scenario)
            if recovered is not None:
                rec.add("recovered", f"{fault.recovery} after {recovered - t_fault:.3f}s", t=recovered)
        settled = (recovered if recovered is not None else deadline) + options.after_s
        if fault.restore is None and now >= max(settled, fault.restore_at or 0.0, fault.hold_until or 0.0):
            return recovered
        time.sleep(0.05)


class _PacemakerWatch:
    """Asks Pacemaker on a surviving host, every 0.25 s over one SSH connection, whether it has seen the
    fault: the cut host offline, or the killed api-pe not running (or a failed operation recorded for it,
    when Pacemaker restarted it between two looks)."""

    def __init__(self, cluster: Cluster, fault: Fault, rec: Recorder):
        assert fault.survivor is not None   # _drive watches only a fault that leaves a survivor to ask
        self.cluster, self.fault, self.rec, self.survivor = cluster, fault, rec, fault.survivor
        self.next_poll = 0.0
        self.conn: remote.Connection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def poll(self) -> None:
        if self.fault.detected_at is not None or self.rec.now() < self.next_poll:
            return
        self.next_poll = self.rec.now() + 0.25
        asked = self.rec.now()
        try:
            if self.conn is None:
                self.conn = remote.connect(self.cluster.inv, self.survivor, self.cluster.options.accept_new)
            xml_text = pacemaker.crm_mon_xml(self.conn, timeout=5)
        except CongressctlError:
            self.close()
            return
        if xml_text is None:
            return
        seen = self._seen(xml_text)
        if seen:
            self.fault.detected_at = self.rec.add("detected", f"Pacemaker on {self.survivor.name} sees {seen}",
                                                 t=asked)

    def _seen(self, xml_text: str) -> str | None:
        target = self.fault.target
        placement = pacemaker.parse_crm_mon(xml_text)
        if target in placement.offline:
            return f"{target} offline"
        killed = self.fault.killed
        if killed is None:
            return None
        if killed == "bus":
            # the promotion always moves (migration-threshold 1); failures recorded before may still be listed
            return None if target in placement.promoted.get("bus", []) else f"the bus no longer promoted on {target}"
        if target not in placement.on(killed):
            return f"{killed} on {target} not running"
        failures = pacemaker.failed_operations(xml_text)
        if any(node == target and op_key.startswith(f"{killed}_") for node, op_key in failures):
            return f"a failed {killed} operation on {target}"
        return None


def _recovered_at(scenario: ScenarioRun) -> float | None:
    fault, rec, t_fault = scenario.fault, scenario.rec, scenario.t_fault
    if fault.upgrade:
        return fault.upgrade.finished_at   # done, however it ended: the judgement reads how
    if fault.recovery == "first-action":
        after_fault = {p.k for p in list(scenario.workload.pushes) if p.t > t_fault}
        received = scenario.sink.since(scenario.sink_start)
        before = [b.get("executor") for t, b in received if t - rec.t0 < t_fault]
        old_dsd = before[-1] if before and fault.new_dsd else None
        for t, body in received:
            if body["args"] and body["args"][0] in after_fault and body.get("executor") != old_dsd:
                return t - rec.t0
        return None
    if fault.recovery == "api-back":
        gets = sorted(scenario.workload.gets)
        failed = [t for t, ok in gets if not ok and t > t_fault]
        if not failed:
            return t_fault if rec.now() > t_fault + 2.0 and gets and gets[-1][1] else None
        return next((t for t, ok in gets if ok and t > failed[-1]), None)

        return back_at(sorted(scenario.workload.gets), t_fault=t_fault, now=rec.now())
    if fault.recovery == "write-back":
        return back_at(sorted((w.t, w.acked) for w in scenario.workload.writes), t_fault=t_fault, now=rec.now())
    answer = scenario.cluster.node_status(fault.target)
    return rec.now() if answer and answer.healthy else None


def back_at(samples: list[tuple[float, bool]], *, t_fault: float, now: float) -> float | None:
    """When requests (start time, succeeded) succeeded again after the last failure since the fault: the fault
    itself when none failed (once 2 s have shown it), None while the last one still failed."""
    failed = [t for t, ok in samples if not ok and t > t_fault]
    if not failed:
        return t_fault if now > t_fault + 2.0 and samples and samples[-1][1] else None
    return next((t for t, ok in samples if ok and t > failed[-1]), None)


def write_outage(writes: list[Write]) -> float:
    """The longest stretch of failed writes: from the first of a run of failures to the next acknowledged write
    (or to the last failure, when none followed)."""
    longest, since = 0.0, None
    for w in sorted(writes, key=lambda w: w.t):
        if not w.acked and since is None:
            since = w.t
        elif w.acked and since is not None:
            longest, since = max(longest, w.t - since), None
    if since is not None:
        longest = max(longest, max(w.t for w in writes) - since)
    return longest


def _settle(result: ScenarioResult, cluster: Cluster, probe: ProbeSetup, *, source: list[list[int]]) -> None:
    """Wait for duplicates to show (the DSD's buffer window) and for every PE's table to equal the source."""
    time.sleep(2 * cluster.inv.timings.peer_timeout_ms / 1000 + 1.0)
    deadline = time.monotonic() + 20
    want = sorted(source)
    while time.monotonic() < deadline:
        views = {name: cluster.rows_on(name, probe.datasource) for name in cluster.node_apis}
        if all(v == want for v in views.values()):
            result.tables_equal = True
            return
        time.sleep(0.5)
    result.failures.append("PE tables differ from the source: " +
                           ", ".join(f"{n} has {len(v) if v is not None else 'no answer'}" for n, v in views.items()
                                     if v != want))


def _figures(result: ScenarioResult, scenario: ScenarioRun, *, recovered: float | None, thresholds: Thresholds) -> None:
    workload, rec, t_fault, base = scenario.workload, scenario.rec, scenario.t_fault, scenario.workload.base
    received = scenario.sink.since(scenario.sink_start)
    first_push: dict[int, float] = {}
    expected: set[int] = set()
    for p in workload.pushes:
        first_push.setdefault(p.k, p.t)
        if p.outcome == "ok":
            expected.update(row[0] for row in workload.window(p.k))
    ks = [b["args"][0] for _, b in received if b["args"] and base <= b["args"][0] < base + SCENARIO_SPAN]
    seen: set[int] = set()
    for (t, body) in received:
        k = body["args"][0] if body["args"] else None
        if k is None or not base <= k < base + SCENARIO_SPAN:
            continue
        rec.add("action", f"k={k - base} id={body['action_id'][:12]}", ok=k not in seen, t=t - rec.t0)
        seen.add(k)
    dsd_back = None if scenario.fault.upgrade else _new_dsd_at(received, rec, t_fault)
    result.dsd_replaced = dsd_back is not None
    if dsd_back is None and result.name in BUS_SCENARIOS:
        # the DSD was off the bus as long as the api-pes did not hear it (back at the fault: it never was)
        heard_again = back_at(sorted(scenario.watcher.dsd_heard), t_fault=t_fault, now=float("inf"))
        dsd_back = heard_again if heard_again is not None and heard_again > t_fault else None
    if dsd_back is not None:
        # a push replaces the table: rows that came and went while no DSD ran, or while it was off the bus,
        # never reached one. Only changes after it is back count
        expected = {k for k in expected if first_push.get(k, 0.0) >= dsd_back}
    if scenario.fault.upgrade:
        # a planned DSD restart: only the rows pushed and replaced within its gap never reached a DSD
        gaps = _dsd_gaps(received, rec)
        expected = {k for k in expected if not any(_lived_within(first_push, k, gap) for gap in gaps)}
    result.pushed = len(workload.pushes)
    result.expected_actions = len(expected)
    result.executed = len(set(ks) & expected)
    result.lost = len(expected - set(ks))
    result.duplicated = len(ks) - len(set(ks))
    gets = list(workload.gets)
    result.requests = len(gets)
    result.failed_requests = sum(1 for _, ok in gets if not ok)
    result.writes = len(workload.writes)
    result.failed_writes = sum(1 for w in workload.writes if not w.acked)
    result.write_outage_s = write_outage(workload.writes)
    if scenario.fault.upgrade:   # its pushes go through the VIP too
        result.requests += len(workload.pushes)
        result.failed_requests += sum(1 for p in workload.pushes if p.outcome != "ok")
    if scenario.fault.upgrade and scenario.fault.upgrade.first_restart is not None:
        scenario.fault.detected_at = scenario.fault.upgrade.first_restart
    result.detect_s = _detected(result.name, scenario.watcher, scenario.fault.detected_at, t_fault)
    if result.detect_s is not None and scenario.fault.detected_at is None:
        rec.add("detected", f"DSD leader changed after {result.detect_s:.3f}s", t=t_fault + result.detect_s)
    recovered = _recovered_in(scenario, recovered)
    result.recover_s = None if recovered is None else recovered - t_fault
    _judge(result, scenario.fault, thresholds)


def _recovered_in(scenario: ScenarioRun, seen: float | None) -> float | None:
    """Recovery from the whole history: while the scenario ran, a request still in flight (it may fail at its
    timeout) was not known yet, so the moment seen then can be too early."""
    samples = {"api-back": lambda: sorted(scenario.workload.gets),
               "write-back": lambda: sorted((w.t, w.acked) for w in scenario.workload.writes)}
    history = samples.get(scenario.fault.recovery)
    if history is None or seen is None:
        return seen
    return back_at(history(), t_fault=scenario.t_fault, now=float("inf"))


def _dsd_gaps(received: list[tuple[float, dict]], rec: Recorder) -> list[tuple[float, float]]:
    """(last action of a DSD instance, first of the next one), for each change of executor at the sink."""
    gaps = []
    for (t0, a), (t1, b) in itertools.pairwise(received):
        if a.get("executor") != b.get("executor"):
            gaps.append((t0 - rec.t0, t1 - rec.t0))
    return gaps


def _lived_within(first_push: dict[int, float], k: int, gap: tuple[float, float]) -> bool:
    """Row k was pushed after `gap` began and replaced (WINDOW pushes later) before it ended."""
    gone = first_push.get(k + WINDOW)
    return gap[0] <= first_push.get(k, -1.0) and gone is not None and gone <= gap[1]


def _new_dsd_at(received: list[tuple[float, dict]], rec: Recorder, t_fault: float) -> float | None:
    """When the first action run by another DSD instance than before the fault arrived (None: same DSD)."""
    before = [b.get("executor") for t, b in received if t - rec.t0 < t_fault]
    if not before:
        return None
    return next((t - rec.t0 for t, b in received if t - rec.t0 >= t_fault and b.get("executor") != before[-1]),
                None)


def _detected(name: str, watcher: Watcher, detected_at: float | None, t_fault: float) -> float | None:
    """When the system noticed: the DSD changed leader (PE faults) or Pacemaker saw the fault (node faults).

    The DSD stamps its leader change with its own clock; that stamp is used when it falls between the fault
    and the moment it was seen (same clock in the lab, NTP on real hosts), else the observation time."""
    if name in ("dsd-node-fail", "vip-node-fail", "api-node-fail", "rolling-upgrade", *BUS_SCENARIOS):
        return None if detected_at is None else detected_at - t_fault
    for seen, _, stamped in watcher.leader_changes[1:]:
        if seen >= t_fault:
            return (stamped if stamped is not None and t_fault <= stamped <= seen else seen) - t_fault
    return None


def _judge(result: ScenarioResult, fault: Fault, thresholds: Thresholds) -> None:
    limits: dict = {}
    if result.name in ("pe-leader-kill", "pe-leader-pause"):
        limits = {"recover_s": thresholds.pe_recovery_s, "lost": thresholds.max_lost,
                  "duplicated": thresholds.max_duplicated}
    elif result.name == "dsd-node-fail":
        limits = {"recover_s": fault.limit_s, "lost": thresholds.max_lost}
    elif result.name == "api-node-fail":
        limits = {"failed_requests": thresholds.max_failed_gets, "lost": thresholds.max_lost,
                  "duplicated": thresholds.max_duplicated}
    elif result.name == "vip-node-fail":
        limits = {"recover_s": fault.limit_s}
    elif result.name in BUS_SCENARIOS:
        limits = {"write_outage_s": fault.limit_s, "failed_requests": thresholds.max_failed_gets,
                  "lost": thresholds.max_lost}
        if not result.dsd_replaced:
            # when the hit host ran the DSD too, its loss has the DSD's at-least-once window (as dsd-node-fail)
            limits["duplicated"] = thresholds.max_duplicated
    elif result.name == "rolling-upgrade":
        limits = {"failed_requests": thresholds.max_failed_gets, "lost": thresholds.max_lost,
                  "duplicated": thresholds.max_duplicated}
    limits["acked_writes_lost"] = thresholds.max_acked_writes_lost
    if result.bus_moved_back:
        result.failures.append(f"the bus promotion moved back to {result.target} when it returned")
    result.limits = limits
    for key, limit in limits.items():
        value = getattr(result, key)
        if value is None:
            result.failures.append(f"{key}: never happened (limit {limit})")
        elif value > limit:
            result.failures.append(f"{key} {value:.3g} > {limit}" if isinstance(value, float)
                                   else f"{key} {value} > {limit}")
    result.passed = not result.failures


def _write_report(report_dir: Path, result: ScenarioResult, rec: Recorder, timings: str) -> None:
    events = sorted(rec.events, key=lambda e: e.t)
    raw = report_dir / f"{result.name}.events.jsonl"
    report_dir.mkdir(parents=True, exist_ok=True)
    raw.write_text("".join(json.dumps(asdict(e)) + "\n" for e in events))
    figures = {k: v for k, v in result.row().items() if k not in ("scenario", "ok", "why")}
    html = timeline.render_html(result.name, result.description, result.passed, figures, events, timings)
    result.timeline = str(timeline.write_html(report_dir / f"{result.name}.html", html))
    result.events_file = str(raw)


def timings_of(cluster: Cluster, thresholds: Thresholds) -> dict:
    """The timings in force for a run (corosync's read from a host) and the pass marks derived from them."""
    token, consensus = cluster.totem()
    return asdict(cluster.inv.timings) | {
        "corosync_token_in_force_ms": token, "corosync_consensus_in_force_ms": consensus,
        "node_recovery_limit_s": (token + consensus) / 1000 + thresholds.node_slack_s,
        "bus_recovery_limit_s": (token + consensus) / 1000 + thresholds.bus_slack_s,
        "thresholds": asdict(thresholds), "push_rate": cluster.options.push_rate,
        "get_rate": cluster.options.get_rate, "write_rate": cluster.options.write_rate}


def timings_summary(t: dict) -> str:
    return (f"heartbeat {t['heartbeat_interval_ms']} ms, peer_timeout {t['peer_timeout_ms']} ms; corosync token "
            f"{t['corosync_token_in_force_ms']} ms + consensus {t['corosync_consensus_in_force_ms']} ms in force "
            f"(inventory: {t['corosync_token_ms']} + {t['corosync_consensus_ms']}); node faults must recover within "
            f"{t['node_recovery_limit_s']:.2f} s, PE faults within {t['thresholds']['pe_recovery_s']} s, bus writes "
            f"within {t['bus_recovery_limit_s']:.2f} s; workload {t['push_rate']:g} pushes/s, {t['get_rate']:g} "
            f"GETs/s, {t['write_rate']:g} acknowledged writes/s")


# ------------------------------------------------------------------------------------------- the run


def run(inv: Inventory, scenarios: list[str], *, options: Options | None = None,
        thresholds: Thresholds | None = None, report_dir: Path | None = None,
        log: Log = lambda _: None) -> FailoverReport:
    """Run each scenario (names as `scenarios_named` returns them) in turn; the cluster is restored and healthy
    again before the next one starts."""
    options, thresholds = options or Options(), thresholds or Thresholds()
    started = time.monotonic()
    cluster = Cluster(inv, options, log)
    sink_address = options.sink_address or local_address_towards(inv.nodes[0].address)
    sink = Sink(sink_address)
    results: list[ScenarioResult] = []
    try:
        log("checking the cluster is healthy before the first fault")
        cluster.wait_healthy(options.healthy_timeout_s)
        probe = ProbeSetup(cluster, sink)
        try:
            for index, name in enumerate(scenarios):
                log(f"{name}: {DESCRIPTIONS[name]}")
                result = run_scenario(name, index, cluster, probe=probe, sink=sink, thresholds=thresholds,
                                      report_dir=report_dir)
                results.append(result)
                log(f"{name}: {'passed' if result.passed else 'FAILED'}; restoring and waiting until healthy")
                cluster.cleanup()
                cluster.wait_healthy(options.healthy_timeout_s)
        finally:
            probe.remove()
        timings = timings_of(cluster, thresholds)
    finally:
        sink.close()
        cluster.close()
    report = FailoverReport(results, timings, str(report_dir) if report_dir else None,
                            duration_s=time.monotonic() - started)
    if report_dir:
        (report_dir / "summary.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
