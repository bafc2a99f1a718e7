"""Benchmark of the running nodes: a real redis-server, one dsd and two api-pe processes, a local HTTP sink.

rows_per_s: row changes pushed in batches, published by the DSD and applied by BOTH PEs (the slower PE's
  applied count over the wall time until both hold the final (epoch, seq)).
action_latency_p50_ms / p99_ms: a change pushed through the API (PUT) at ~1000 changes/s -> the action
  it triggers received by the sink.
Prints one JSON object as its last line. Goals: rows_per_s >= 50k; action_latency_p99_ms <= 20.
auth_cpu_share: the API token check's share of the CPU the pushing api-pe spends per rows PUT (the check timed
  in this process on the headers the load generator sends, over that node's CPU per change; goal < 0.02).
Then the same measure on a replicated bus ("replicated": a master and one replica, min-replicas-to-write 1,
the nodes' sync_replicas 1: every write waits for the replica): its p99 stays within 20% of the one-node
figure of the same run (replicated_p99_over_single <= 1.2).
metrics_cpu_share: what recording metrics costs, in one run: the nodes' CPU per change of two fresh clusters,
one with the nodes' metrics recording on and one off (node config `metrics.record`), loaded side by side at
METRICS_RATE changes/s each, METRICS_PAIRS times; the median of (on - off) / on; goal < 0.03.
metrics_scrape_ms: one GET /metrics of each node.
Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Awaitable, Callable

import httpx
import redis
import uvloop
import yaml

from congressctl.auth import headers as auth_headers
from congressctl.auth import token_sha256
from congressctl.node.access import TokenCheck, refusal
from congressctl.payloads import TokenHash

REPO = Path(__file__).resolve().parent.parent
BATCH = int(os.environ.get("BENCH_BUS_BATCH", 5000))
BATCHES = int(os.environ.get("BENCH_BUS_BATCHES", 20))
LATENCY_CHANGES = int(os.environ.get("BENCH_BUS_CHANGES", 3000))
RATE = float(os.environ.get("BENCH_BUS_RATE", 1000))
# Each latency push replaces the table with a sliding window of rows ending at the new one: the DSD reads the
# latest pushed rows, so when it is behind it may merge pushes; the window keeps every row visible long enough.
WINDOW = 10
# The same measure at a lower rate, to tell queueing (CPU saturation of the 2-core box) from path latency.
LOW_RATE = float(os.environ.get("BENCH_BUS_LOW_RATE", 400))
# When set, each latency run writes "<seconds since start> <latency ms>" per change to TRACE.<run name>.
TRACE = os.environ.get("BENCH_BUS_TRACE")
METRICS_PAIRS = int(os.environ.get("BENCH_BUS_METRICS_PAIRS", 4))
# two clusters at once on the 2 shared cores: each at 1000/s would saturate them
METRICS_RATE = float(os.environ.get("BENCH_BUS_METRICS_RATE", 400))
NODES = ("d1", "n1", "n2")
CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
TOKEN = secrets.token_urlsafe(32)
HEADERS = auth_headers(TOKEN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # noqa: BLE001 - keep polling until the deadline
            pass
        time.sleep(0.02)
    raise SystemExit(f"bench: timed out waiting for {what}")


class Sink:
    """The actions' receiver: HTTP/1.1 keep-alive, reading only Content-Length and the body. It stands for a
    service on another host, so it is kept cheap: it shares one uvloop loop with the load generator in the
    bench's main thread (http.server, or a second thread with its own loop, cost the nodes' 2 shared cores
    0.05-0.1 ms of CPU per action). Its socket listens from the start; it answers while `drive` runs."""

    def __init__(self) -> None:
        self.received: dict[int, float] = {}
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/actions"

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(CONTENT_LENGTH.search(head).group(1))
                body = json.loads(await reader.readexactly(length))
                self.received.setdefault(body["args"][0], time.monotonic())
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def drive(self, load: Callable[[], Awaitable[None]], expected: int, timeout: float) -> None:
        """Serve while `load()` runs, then until `expected` actions have arrived."""
        drive_sinks([self], load, expected, timeout)

    def close(self) -> None:
        self.sock.close()


def drive_sinks(sinks: list[Sink], load: Callable[[], Awaitable[None]], expected: int, timeout: float) -> None:
    """Serve every sink while `load()` runs, then until each has `expected` actions."""
    async def main() -> None:
        servers = [await asyncio.start_server(s._connection, sock=s.sock.dup()) for s in sinks]
        await load()
        deadline = time.monotonic() + timeout
        while any(len(s.received) < expected for s in sinks):
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: {[len(s.received) for s in sinks]} of {expected} actions at the sinks")
            await asyncio.sleep(0.02)
        for server in servers:
            server.close()
    uvloop.run(main())


class Putter:
    """PUTs over one kept-alive connection, reading only the status and Content-Length of each answer: the
    load generator stands for clients on other hosts, so it is kept cheap (http.client's header parsing
    cost about 0.1 ms of CPU per request)."""

    def __init__(self, url: str) -> None:
        u = urllib.parse.urlsplit(url)
        self.head = f"Host: {u.netloc}\r\nContent-Type: application/json\r\nX-Auth-Token: {TOKEN}\r\n"
        self.address = (u.hostname, u.port)

    async def run(self, path: str, bodies: list[bytes], rate: float, sent: dict[int, float]) -> float:
        """PUT each body at `rate` per second, noting when each was sent; returns the rate achieved."""
        reader, writer = await asyncio.open_connection(*self.address)
        start = time.monotonic()
        for k, body in enumerate(bodies):
            pause = start + k / rate - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            sent[k] = time.monotonic()
            writer.write(f"PUT {path} HTTP/1.1\r\n{self.head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(int(CONTENT_LENGTH.search(head).group(1)))
            if head.split(None, 2)[1] != b"200":
                raise SystemExit(f"bench: PUT {path} answered {head.split(None, 2)[1].decode()}")
        rate = len(bodies) / (time.monotonic() - start)
        writer.close()
        return rate


class Cluster:
    def __init__(self, root: Path, *, replicated: bool = False, metrics: bool = True):
        self.root = root
        self.metrics = metrics
        self.metrics_urls: dict[str, str] = {}
        self.password = secrets.token_hex(16)
        self.redis_port = free_port()
        self.sync_replicas = 1 if replicated else 0
        self.procs: list[subprocess.Popen] = []
        self.named: dict[str, subprocess.Popen] = {}
        pw = root / "bus.password"
        pw.write_text(self.password)
        pw.chmod(0o600)
        self._redis("redis", self.redis_port,
                    "min-replicas-to-write 1\nmin-replicas-max-lag 2\n" if replicated else "")
        if replicated:
            port = free_port()
            self._redis("replica", port, f"replicaof 127.0.0.1 {self.redis_port}\nmasterauth {self.password}\n")
            replica = redis.Redis(port=port, password=self.password, socket_timeout=2, decode_responses=True)
            wait_for(lambda: replica.info("replication").get("master_link_status") == "up", 20, "the replica")
        self.apis: list[str] = []
        self.cpu_ms_per_change: dict[str, float] = {}

    def _redis(self, name: str, port: int, extra: str) -> None:
        conf = self.root / f"{name}.conf"
        conf.write_text(f"bind 127.0.0.1\nport {port}\ndir {self.root}\ndbfilename {name}.rdb\nsave ''\n"
                        f"appendonly no\nrequirepass {self.password}\n"
                        f"client-output-buffer-limit pubsub 512mb 128mb 60\n{extra}")
        self.procs.append(subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL))
        self.named[name] = self.procs[-1]
        r = redis.Redis(port=port, password=self.password, socket_timeout=2)
        wait_for(r.ping, 10, name)

    def node(self, role: str, node_id: str, *, extra: dict | None = None) -> str | None:
        port = free_port()
        metrics_port = free_port()
        self.metrics_urls[node_id] = f"http://127.0.0.1:{metrics_port}/metrics"
        doc = {"cluster": "bench", "node_id": node_id, "roles": [role],
               "metrics": {"bind": "127.0.0.1", "api_pe_port" if role == "api-pe" else "dsd_port": metrics_port,
                           "record": self.metrics},
               "api": {"bind": "127.0.0.1", "port": port},
               "bus": {"host": "127.0.0.1", "port": self.redis_port, "password_file": str(self.root / "bus.password"),
                       "sync_replicas": self.sync_replicas},
               "timings": {"heartbeat_interval_ms": 100, "peer_timeout_ms": 500, "full_sync_interval_s": 30},
               "paths": {"log_dir": str(self.root / "logs" / node_id), "state_dir": str(self.root)},
               "auth": {"tokens": [TokenHash(name="admin", role="admin", sha256=token_sha256(TOKEN)).to_dict()]},
               "datasources": {"allowed_urls": ["http://127.0.0.1:"]}, **(extra or {})}
        cfg = self.root / f"{node_id}.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        exe = REPO / ".venv" / "bin" / "congressctl"
        cmd = [str(exe), "serve"] if exe.exists() else [sys.executable, "-m", "congressctl.node", "serve"]
        log = open(self.root / f"{node_id}.out", "wb")
        self.procs.append(subprocess.Popen([*cmd, role, "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT))
        self.named[node_id] = self.procs[-1]
        if role != "api-pe":
            return None
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url + "/healthz", timeout=1).status_code == 200, 20, f"{node_id} healthy")
        self.apis.append(url)
        return url

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """utime + stime of each process (and of this one, "bench"), in seconds."""
    out = {}
    for name, pid in {**pids, "bench": os.getpid()}.items():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def table_of(api: str, name: str) -> dict:
    tables = httpx.get(api + "/v1/status", timeout=5, headers=HEADERS).json()["tables"]
    return next(t for t in tables if t["table"] == name)


def bench_rows(cluster: Cluster, client: httpx.Client) -> float:
    a, b = cluster.apis
    client.post(a + "/v1/data-sources", json={"name": "bulk", "driver": "push",
                                              "config": {"tables": {"rows": ["id", "v"]}}}).raise_for_status()
    wait_for(lambda: all(table_of(api, "bulk:rows")["seq"] >= 1 for api in (a, b)), 10, "bulk table")
    before = [table_of(api, "bulk:rows")["rows_applied"] for api in (a, b)]
    bodies = [json.dumps([[i * BATCH + j, f"v{j}"] for j in range(BATCH)]) for i in range(BATCHES)]
    started = time.monotonic()
    for body in bodies:
        client.put(a + "/v1/data-sources/bulk/tables/rows/rows", content=body,
                   headers={"Content-Type": "application/json"}).raise_for_status()
    final = set(range((BATCHES - 1) * BATCH, BATCHES * BATCH))

    def done():
        seqs = [(table_of(api, "bulk:rows")) for api in (a, b)]
        return all(t["dsd_seq"] == t["seq"] and t["lag"] == 0 for t in seqs) and seqs
    wait_for(lambda: done() and len(final) == BATCH, 120, "PEs to apply every batch")
    while True:
        rows = client.get(b + "/v1/data-sources/bulk/tables/rows/rows").json()["results"]
        if {r["data"][0] for r in rows} == final:
            break
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    applied = [table_of(api, "bulk:rows")["rows_applied"] - n for api, n in zip((a, b), before)]
    return min(applied) / elapsed


def prepare_latency(cluster: Cluster, client: httpx.Client, sink: Sink, name: str) -> str:
    """A push datasource whose every new row is one action to `sink`; returns the path its rows are PUT to."""
    a, b = cluster.apis
    sink.received.clear()
    client.post(a + "/v1/data-sources", json={"name": name, "driver": "push", "config": {
        "tables": {"ev": ["id"]}, "action_url": sink.url}}).raise_for_status()
    client.post(a + "/v1/policies", json={"name": f"{name}p"}).raise_for_status()
    client.post(a + f"/v1/policies/{name}p/rules",
                json={"rule": f"execute[{name}:hit(x)] :- {name}:ev(id=x)"}).raise_for_status()
    wait_for(lambda: client.get(b + f"/v1/policies/{name}p/rules").json()["results"], 10, "rule on the second PE")
    time.sleep(0.5)
    return f"/v1/data-sources/{name}/tables/ev/rows"


def latency_bodies() -> list[bytes]:
    return [json.dumps([[i] for i in range(max(0, k - WINDOW), k + 1)]).encode() for k in range(LATENCY_CHANGES)]


def bench_latency(cluster: Cluster, client: httpx.Client, sink: Sink, rate: float,
                  name: str) -> tuple[float, float, float]:
    path = prepare_latency(cluster, client, sink, name)
    sent: dict[int, float] = {}
    putter = Putter(cluster.apis[0])
    bodies = latency_bodies()
    pids = {name: p.pid for name, p in cluster.named.items()}
    cpu_before = cpu_seconds(pids)
    achieved: list[float] = []

    async def load() -> None:
        achieved.append(await putter.run(path, bodies, rate, sent))
    sink.drive(load, LATENCY_CHANGES, 30)
    rate = achieved[0]
    start = min(sent.values())
    cpu_after = cpu_seconds(pids)
    cluster.cpu_ms_per_change = {k: round((cpu_after[k] - cpu_before[k]) * 1000 / LATENCY_CHANGES, 3)
                                 for k in cpu_after}
    series = [(sent[k] - start, (sink.received[k] - sent[k]) * 1000) for k in range(LATENCY_CHANGES)]
    if TRACE:
        Path(f"{TRACE}.{name}.start").write_text(f"{time.time() - (time.monotonic() - start):.4f}\n")
        Path(f"{TRACE}.{name}").write_text("".join(f"{t:.4f} {ms:.2f}\n" for t, ms in series))
    lat = sorted(ms for _, ms in series)
    return statistics.median(lat), lat[int(0.99 * (len(lat) - 1))], rate


def start_nodes(cluster: Cluster) -> None:
    cluster.node("dsd", "d1")
    cluster.node("api-pe", "n1")
    cluster.node("api-pe", "n2")


def recordings(text: str) -> dict[str, float]:
    """How many times each kind of recording call ran in one node, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = {"observe": 0.0, "request": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "congress_api_request_duration_seconds_count":
                counts["request"] += sample.value
            elif sample.name.endswith("_seconds_count") and sample.name.startswith(("congress_dsd", "congress_pe")):
                counts["observe"] += sample.value
    return counts


def recording_cpu_us() -> dict[str, float]:
    """CPU (not wall) time of one recording call, timed here: a histogram observation with its two clock reads,
    and what the ASGI wrapper adds to a request."""
    from congressctl.node.config import MetricsConfig
    from congressctl.node.metrics import ApiPeMetrics, RequestMetrics

    metrics, calls = ApiPeMetrics(MetricsConfig()), 100_000
    started = time.process_time()
    for _ in range(calls):
        began = time.perf_counter()
        metrics.diff_eval(time.perf_counter() - began)
    observe = (time.process_time() - started) / calls

    async def app(scope: dict, receive: object, send: Callable) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b""})

    async def sent(message: dict) -> None:
        pass

    def endpoint() -> None:
        pass

    async def per_call(handler: Callable) -> float:
        scope = {"type": "http", "method": "PUT", "endpoint": endpoint}
        began = time.process_time()
        for _ in range(calls):
            await handler(scope, None, sent)
        return (time.process_time() - began) / calls
    wrapped = RequestMetrics(app, {endpoint: "/x"}, metrics)
    request = asyncio.run(per_call(wrapped)) - asyncio.run(per_call(app))
    return {"observe": observe * 1e6, "request": request * 1e6}


def cpu_side_by_side(*, first: bool) -> tuple[dict[bool, float], dict[str, float], dict[str, dict[str, float]]]:
    """The nodes' CPU per change of two fresh clusters, metrics recording on (True) and off (False), loaded at
    the same time by one load generator at METRICS_RATE each: whatever else the shared machine does then
    weighs on both alike (clusters run one after the other differed by up to 40% on a loaded machine). Also
    one GET /metrics of each node of the recording cluster (ms), and the recording calls each node made. `first`:
    the side started and loaded first (alternated: the first one's push of each tick goes out first)."""
    sides = (first, not first)
    roots = {on: Path(tempfile.mkdtemp(prefix="congress-bench-")) for on in sides}
    clusters = {on: Cluster(roots[on], metrics=on) for on in sides}
    sinks = {on: Sink() for on in sides}
    try:
        for cluster in clusters.values():
            start_nodes(cluster)
        with httpx.Client(timeout=30, headers=HEADERS) as client:
            paths = {on: prepare_latency(clusters[on], client, sinks[on], "lat") for on in sides}
        bodies = latency_bodies()
        pids = {on: {n: clusters[on].named[n].pid for n in NODES} for on in sides}
        before = {on: cpu_seconds(pids[on]) for on in sides}

        async def load() -> None:
            await asyncio.gather(*(Putter(clusters[on].apis[0]).run(paths[on], bodies, METRICS_RATE, {})
                                   for on in sides))
        drive_sinks(list(sinks.values()), load, LATENCY_CHANGES, 60)
        after = {on: cpu_seconds(pids[on]) for on in sides}
        scrape_ms, recorded = {}, {}
        with httpx.Client(timeout=30) as client:
            for node, url in clusters[True].metrics_urls.items():
                started = time.perf_counter()
                text = client.get(url).raise_for_status().text
                scrape_ms[node] = round((time.perf_counter() - started) * 1000, 2)
                recorded[node] = recordings(text)
    finally:
        for on in sides:
            clusters[on].stop()
            sinks[on].close()
            shutil.rmtree(roots[on], ignore_errors=True)
    return ({on: sum(after[on][n] - before[on][n] for n in NODES) * 1000 / LATENCY_CHANGES for on in sides},
            scrape_ms, recorded)


def measure_metrics_cost() -> dict:
    """METRICS_PAIRS side-by-side runs; the share is the median of theirs."""
    on, off, shares, scrape_ms, recorded = [], [], [], {}, {}
    for i in range(METRICS_PAIRS):
        cpu, scrape_ms, recorded = cpu_side_by_side(first=i % 2 == 0)
        on.append(round(cpu[True], 3))
        off.append(round(cpu[False], 3))
        shares.append((cpu[True] - cpu[False]) / cpu[True])
    # the same cost counted instead of measured, free of the machine's noise: calls per change x CPU per call
    cost_us = recording_cpu_us()
    per_change_us = sum(counts[kind] * cost_us[kind] for counts in recorded.values() for kind in cost_us) / (
        LATENCY_CHANGES)
    return {"nodes_cpu_ms_per_change_metrics_on": on, "nodes_cpu_ms_per_change_metrics_off": off,
            "metrics_changes_per_s": METRICS_RATE, "metrics_cpu_share": round(statistics.median(shares), 4),
            "metrics_cpu_shares": [round(x, 4) for x in shares], "goal_metrics_cpu_share": 0.03,
            "recording_cpu_us_per_call": {k: round(v, 2) for k, v in cost_us.items()},
            "recording_cpu_us_per_change": round(per_change_us, 2),
            "metrics_cpu_share_counted": round(per_change_us / 1000 / statistics.median(on), 4),
            "metrics_scrape_ms": scrape_ms}


def auth_check_us(rounds: int = 200_000) -> float:
    """Microseconds of CPU per request that the node's token check takes (what PushFastPath runs before the
    rows PUT), with the node's token list and the headers the Putter sends, in ASGI's form: the time of the
    loop with the check less the time of the same loop without it."""
    check = TokenCheck([TokenHash(name="admin", role="admin", sha256=token_sha256(TOKEN)),
                        TokenHash(name="reader", role="reader", sha256=token_sha256(secrets.token_urlsafe(32)))])
    headers = [(b"host", b"127.0.0.1:1789"), (b"content-type", b"application/json"),
               (b"x-auth-token", TOKEN.encode()), (b"content-length", b"40")]

    def timed(with_check: bool) -> float:
        started = time.process_time()
        for _ in range(rounds):
            if with_check:
                refusal("PUT", check.role_of(check.presented(headers)))
        return time.process_time() - started
    without = timed(False)
    return (timed(True) - without) / rounds * 1e6


def measure(*, replicated: bool) -> dict:
    """Every figure on a fresh cluster: one bus node, or a master with one replica every write waits for."""
    root = Path(tempfile.mkdtemp(prefix="congress-bench-"))
    cluster = Cluster(root, replicated=replicated)
    sink = Sink()
    try:
        start_nodes(cluster)
        with httpx.Client(timeout=30, headers=HEADERS) as client:
            rows_per_s = bench_rows(cluster, client)
            p50, p99, rate = bench_latency(cluster, client, sink, RATE, "lat")
            cpu = cluster.cpu_ms_per_change
            low = bench_latency(cluster, client, sink, LOW_RATE, "low")
    finally:
        cluster.stop()
        sink.close()
        shutil.rmtree(root, ignore_errors=True)
    check_us = auth_check_us()
    return {"rows_per_s": round(rows_per_s), "action_latency_p50_ms": round(p50, 2),
            "auth_check_us": round(check_us, 2), "auth_cpu_share": round(check_us / 1000 / cpu["n1"], 4),
            "action_latency_p99_ms": round(p99, 2), "changes_per_s_sent": round(rate),
            "cpu_ms_per_change": cpu,
            f"action_latency_p50_ms_at_{LOW_RATE:g}_per_s": round(low[0], 2),
            f"action_latency_p99_ms_at_{LOW_RATE:g}_per_s": round(low[1], 2)}


def main() -> int:
    if shutil.which("redis-server") is None:
        raise SystemExit("bench: redis-server is not installed")
    if os.environ.get("BENCH_BUS_METRICS_ONLY"):
        print(json.dumps(measure_metrics_cost()))
        return 0
    single = measure(replicated=False)
    replicated = {} if os.environ.get("BENCH_BUS_SINGLE_ONLY") else measure(replicated=True)
    cost = measure_metrics_cost()
    ratio = (round(replicated["action_latency_p99_ms"] / single["action_latency_p99_ms"], 2) if replicated
             else None)
    print(json.dumps({**single, "batch_rows": BATCH, "batches": BATCHES, "latency_changes": LATENCY_CHANGES,
                      "goal_rows_per_s": 50000, "goal_p99_ms": 20, "goal_auth_cpu_share": 0.02,
                      "replicated": replicated,
                      "replicated_p99_over_single": ratio, "goal_replicated_p99_over_single": 1.2, **cost}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
