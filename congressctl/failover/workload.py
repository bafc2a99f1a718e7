"""The workload (Jepsen's client): sequential pushes, concurrent GETs and acknowledged writes through the VIP, the
sink that counts the actions they cause, and the watcher of the DSD's leader; all of it recorded in a History.

Each push makes exactly one new row appear in a probe datasource; a policy turns each new row into one action
that the DSD POSTs to the sink run here. The sink keeps the executor of each action (the DSD instance that ran
it, sent as X-Congress-Executor).
"""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx

from congressctl.errors import FailoverError
from congressctl.failover.check import WINDOW
from congressctl.failover.cluster import Cluster
from congressctl.failover.history import History
from congressctl.payloads import ApiPeStatus

PROBE_TABLE = "items"
QUIET_TABLE = "quiet"     # never pushed: the acknowledged writes' rules read it, so they cost the engine nothing
SCENARIO_SPAN = 1_000_000
RETRIED_STATUSES = (502, 503, 504)   # HAProxy's answers when no server answered in time: a GET may try again


def window(k: int, base: int = 0) -> list[list[int]]:
    """The rows push k replaces the table with: the last WINDOW row numbers, none below the scenario's base."""
    return [[i] for i in range(max(base, k - WINDOW + 1), k + 1)]


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
                body["sent"] = _sent_at(self.headers.get("X-Congress-Sent"))
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


def _sent_at(header: str | None) -> float | None:
    """The DSD's X-Congress-Sent (wall clock) as a number; None when missing or not one."""
    try:
        return float(header) if header else None
    except ValueError:
        return None


def local_address_towards(address: str) -> str:
    """The address of this machine that the cluster's hosts reach it by (the route towards a node)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((address, 9))
        return str(s.getsockname()[0])


def record_actions(history: History, arrivals: list[tuple[float, dict]], base: int) -> None:
    """The sink's arrivals (monotonic time, body) into the history: an action of one of this scenario's rows
    (k counted from `base`; not ok when that row had run already) or a stray one."""
    seen: set[int] = set()
    for t, body in arrivals:
        k = body["args"][0] if body["args"] else None
        action_id, executor = body.get("action_id"), body.get("executor")
        sent = body.get("sent")
        stamped = None if sent is None else sent - history.wall0
        if k is None or not base <= k < base + SCENARIO_SPAN:
            history.add("stray", f"id={str(action_id)[:12]}", t=t - history.t0, action_id=action_id,
                        executor=executor)
            continue
        history.add("action", f"k={k - base} id={body['action_id'][:12]}", ok=k not in seen, t=t - history.t0,
                    k=k - base, action_id=action_id, executor=executor, stamped=stamped)
        seen.add(k)


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


def get(client: httpx.Client, url: str, *, attempts: int, history: History) -> bool:
    """One GET as a client sees it: tried again on a transport error or a 502/503/504, up to `attempts` tries
    (each an "attempt" event when there can be more than one), then one "request" event for the whole."""
    started = history.now()
    for attempt in range(1, attempts + 1):
        tried = history.now()
        ok, why, again = _try_get(client, url)
        if attempts > 1:
            history.add("attempt", f"GET try {attempt}: {why}", ok=ok, t=tried, attempt=attempt,
                        duration=history.now() - tried)
        if ok or not again:
            break
    tries = f" after {attempt} tries" if attempt > 1 else ""
    history.add("request", f"GET {why}{tries}" if ok else f"GET failed: {why}{tries}", ok=ok, t=started,
                duration=history.now() - started, attempt=attempt if attempts > 1 else None)
    return ok


def _try_get(client: httpx.Client, url: str) -> tuple[bool, str, bool]:
    """(succeeded, what happened, worth another try)."""
    try:
        code = client.get(url).status_code
    except httpx.TransportError as exc:
        return False, type(exc).__name__, True
    except httpx.HTTPError as exc:
        return False, type(exc).__name__, False
    return code == 200, f"HTTP {code}", code in RETRIED_STATUSES


class Workload:
    """Sequential pushes (order matters: each makes one row appear) and concurrent GETs through the VIP.

    Pushes go to one api-pe on a host the scenario leaves alone: a replace that timed out on a paused
    process and is applied when it resumes would bring old rows back (each a new action) and hide what the
    scenario measures. Every request is a history event (push, request, write) with its start and duration."""

    def __init__(self, api: str, push_api: str, probe: ProbeSetup, base: int, *, push_rate: float,
                 get_rate: float, write_rate: float, history: History, headers: dict[str, str],
                 get_attempts: int = 1, verify: ssl.SSLContext | bool = True):
        self.api, self.push_api, self.base = api, push_api, base
        self.headers = headers   # the API token
        self.verify = verify
        self.datasource, self.policy, self.writes_policy = probe.datasource, probe.policy, probe.writes_policy
        self.push_rate, self.get_rate, self.write_rate = push_rate, get_rate, write_rate
        self.history = history
        self.get_attempts = get_attempts
        self.writes = 0
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

    def push(self, client: httpx.Client, k: int) -> str:
        started = self.history.now()
        url = f"{self.push_api}/v1/data-sources/{self.datasource}/tables/{PROBE_TABLE}/rows"
        try:
            status_code = client.put(url, json=window(k, self.base)).status_code
            outcome = "ok" if status_code == 200 else "failed" if status_code in (502, 503, 504) else "unknown"
        except (httpx.ConnectError, httpx.ConnectTimeout):
            outcome = "failed"
        except httpx.HTTPError:
            outcome = "unknown"
        self.history.add("push", f"k={k - self.base} {outcome}", ok=outcome == "ok", t=started, k=k - self.base,
                         outcome=outcome, duration=self.history.now() - started)
        return outcome

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
        with httpx.Client(timeout=httpx.Timeout(2.0, connect=1.0), headers=self.headers, verify=self.verify) as client:
            def step() -> None:
                self.push(client, self.next_k)
                self.next_k += 1
            self._paced(self.push_rate, step)

    def _get_loop(self) -> None:
        url = f"{self.api}/v1/policies/{self.policy}/rules"
        with httpx.Client(timeout=httpx.Timeout(2.0, connect=1.0), headers=self.headers, verify=self.verify,
                          limits=httpx.Limits(max_connections=16)) as client, \
                ThreadPoolExecutor(max_workers=16, thread_name_prefix="get") as pool:
            def one() -> None:
                get(client, url, attempts=self.get_attempts, history=self.history)
            futures = []
            self._paced(self.get_rate, lambda: futures.append(pool.submit(one)))
            for f in futures:
                f.result()

    def _write_loop(self) -> None:
        url = f"{self.api}/v1/policies/{self.writes_policy}/rules"
        with httpx.Client(timeout=httpx.Timeout(2.0, connect=1.0), headers=self.headers, verify=self.verify) as client:
            def step() -> None:
                n = self.base + self.writes
                name = f"w{n}"
                started = self.history.now()
                rule = f"acked(x) :- {self.datasource}:{QUIET_TABLE}(id=x), equal(x, {n})"
                code, message = None, None
                try:
                    resp = client.post(url, json={"rule": rule, "name": name})
                    code, why = resp.status_code, f"HTTP {resp.status_code}"
                    message = None if code == 201 else error_message(resp)
                except httpx.HTTPError as exc:
                    why = type(exc).__name__
                self.writes += 1
                self.history.add("write", f"rule create {name}" + ("" if code == 201 else f" failed: {why}"),
                                 ok=code == 201, t=started, name=name, duration=self.history.now() - started,
                                 status=code, message=message)
            self._paced(self.write_rate, step)

    def finish(self, client: httpx.Client, deadline: float) -> int:
        """One last push retried until it is applied: its window is the source the PEs must converge to."""
        k = self.next_k
        while time.monotonic() < deadline:
            if self.push(client, k) == "ok":
                return k
            time.sleep(0.5)
        raise FailoverError("the final push was never accepted through the VIP")


def error_message(resp: httpx.Response) -> str:
    """The error message of an API answer ({"error": {"message": ...}}), else the start of its body."""
    try:
        return str(resp.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return resp.text[:300]


class Watcher:
    """Polls every api-pe's /v1/status: who leads the DSD, which DSD runs, which PEs hear it; all of it events."""

    def __init__(self, nodes: dict[str, str], history: History, *, headers: dict[str, str], interval: float = 0.1,
                 verify: ssl.SSLContext | bool = True):
        self.nodes, self.history, self.interval = nodes, history, interval
        self.headers = headers
        self.verify = verify
        self.leader: tuple | None = None
        self.dsd: tuple | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="watch", daemon=True)
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
            with httpx.Client(timeout=httpx.Timeout(0.5, connect=0.3), headers=self.headers,
                              verify=self.verify) as client:
                while not self.stopping.is_set():
                    for name, url in self.nodes.items():
                        self._sample(client, name, url)
                    self.stopping.wait(self.interval)
        except BaseException as exc:  # noqa: BLE001 - read in stop()
            self.errors.append(exc)

    def _sample(self, client: httpx.Client, name: str, url: str) -> None:
        try:
            dsd = ApiPeStatus.from_dict(client.get(f"{url}/v1/status").json()).dsd
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return
        fresh = dsd is not None and (dsd.age_ms or 0) <= 1000
        self.history.add("status", f"{name} {'hears' if fresh else 'does not hear'} the DSD", ok=fresh, host=name)
        if dsd is None or not dsd.node or not dsd.leader or not fresh:
            return
        seen = self.history.now()
        leader = (dsd.leader.node, dsd.leader.inc)
        if leader != self.leader:
            # the first leader seen is where the scenario starts from, not a change
            if self.leader is not None:
                stamped = None if dsd.leader_since is None else dsd.leader_since - self.history.wall0
                self.history.add("leader", f"DSD leader -> {leader[0]}", t=seen, host=leader[0], stamped=stamped)
            self.leader = leader
        instance = (dsd.node, dsd.incarnation)
        if instance != self.dsd:
            if self.dsd is not None:
                self.history.add("dsd", f"DSD now runs on {instance[0]}", t=seen, host=instance[0])
            self.dsd = instance
