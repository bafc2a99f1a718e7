"""Benchmark of the running nodes: a real redis-server, one dsd and two api-pe processes, a local HTTP sink.

rows_per_s: row changes pushed in batches, published by the DSD and applied by BOTH PEs (the slower PE's
  applied count over the wall time until both hold the final (epoch, seq)).
action_latency_p50_ms / p99_ms: a change pushed through the API (PUT) at ~1000 changes/s -> the action
  it triggers received by the sink.
Prints one JSON object as its last line. Goals: rows_per_s >= 50k; action_latency_p99_ms <= 20.
Then the same measure on a replicated bus ("replicated": a master and one replica, min-replicas-to-write 1,
the nodes' sync_replicas 1: every write waits for the replica): its p99 stays within 20% of the one-node
figure of the same run (replicated_p99_over_single <= 1.2). Everything runs on 127.0.0.1 and stops by itself.
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
CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")


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
        async def main() -> None:
            server = await asyncio.start_server(self._connection, sock=self.sock.dup())
            await load()
            deadline = time.monotonic() + timeout
            while len(self.received) < expected:
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: {len(self.received)} of {expected} actions at the sink")
                await asyncio.sleep(0.02)
            server.close()
        uvloop.run(main())

    def close(self) -> None:
        self.sock.close()


class Putter:
    """PUTs over one kept-alive connection, reading only the status and Content-Length of each answer: the
    load generator stands for clients on other hosts, so it is kept cheap (http.client's header parsing
    cost about 0.1 ms of CPU per request)."""

    def __init__(self, url: str) -> None:
        u = urllib.parse.urlsplit(url)
        self.address = (u.hostname, u.port)
        self.host = u.netloc

    async def run(self, path: str, bodies: list[bytes], rate: float, sent: dict[int, float]) -> float:
        """PUT each body at `rate` per second, noting when each was sent; returns the rate achieved."""
        reader, writer = await asyncio.open_connection(*self.address)
        start = time.monotonic()
        for k, body in enumerate(bodies):
            pause = start + k / rate - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            sent[k] = time.monotonic()
            writer.write(f"PUT {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(int(CONTENT_LENGTH.search(head).group(1)))
            if head.split(None, 2)[1] != b"200":
                raise SystemExit(f"bench: PUT {path} answered {head.split(None, 2)[1].decode()}")
        rate = len(bodies) / (time.monotonic() - start)
        writer.close()
        return rate


class Cluster:
    def __init__(self, root: Path, *, replicated: bool = False):
        self.root = root
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

    def node(self, role: str, node_id: str) -> str | None:
        port = free_port()
        doc = {"cluster": "bench", "node_id": node_id, "roles": [role],
               "api": {"bind": "127.0.0.1", "port": port},
               "bus": {"host": "127.0.0.1", "port": self.redis_port, "password_file": str(self.root / "bus.password"),
                       "sync_replicas": self.sync_replicas},
               "timings": {"heartbeat_interval_ms": 100, "peer_timeout_ms": 500, "full_sync_interval_s": 30},
               "paths": {"log_dir": str(self.root / "logs" / node_id), "state_dir": str(self.root)}}
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
    tables = httpx.get(api + "/v1/status", timeout=5).json()["tables"]
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


def bench_latency(cluster: Cluster, client: httpx.Client, sink: Sink, rate: float,
                  name: str) -> tuple[float, float, float]:
    a, b = cluster.apis
    sink.received.clear()
    client.post(a + "/v1/data-sources", json={"name": name, "driver": "push", "config": {
        "tables": {"ev": ["id"]}, "action_url": sink.url}}).raise_for_status()
    client.post(a + "/v1/policies", json={"name": f"{name}p"}).raise_for_status()
    client.post(a + f"/v1/policies/{name}p/rules",
                json={"rule": f"execute[{name}:hit(x)] :- {name}:ev(id=x)"}).raise_for_status()
    wait_for(lambda: client.get(b + f"/v1/policies/{name}p/rules").json()["results"], 10, "rule on the second PE")
    time.sleep(0.5)
    sent: dict[int, float] = {}
    putter = Putter(a)
    path = f"/v1/data-sources/{name}/tables/ev/rows"
    bodies = [json.dumps([[i] for i in range(max(0, k - WINDOW), k + 1)]).encode() for k in range(LATENCY_CHANGES)]
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


def measure(*, replicated: bool) -> dict:
    """Every figure on a fresh cluster: one bus node, or a master with one replica every write waits for."""
    root = Path(tempfile.mkdtemp(prefix="congress-bench-"))
    cluster = Cluster(root, replicated=replicated)
    sink = Sink()
    try:
        cluster.node("dsd", "d1")
        cluster.node("api-pe", "n1")
        cluster.node("api-pe", "n2")
        with httpx.Client(timeout=30) as client:
            rows_per_s = bench_rows(cluster, client)
            p50, p99, rate = bench_latency(cluster, client, sink, RATE, "lat")
            cpu = cluster.cpu_ms_per_change
            low = bench_latency(cluster, client, sink, LOW_RATE, "low")
    finally:
        cluster.stop()
        sink.close()
        shutil.rmtree(root, ignore_errors=True)
    return {"rows_per_s": round(rows_per_s), "action_latency_p50_ms": round(p50, 2),
            "action_latency_p99_ms": round(p99, 2), "changes_per_s_sent": round(rate),
            "cpu_ms_per_change": cpu,
            f"action_latency_p50_ms_at_{LOW_RATE:g}_per_s": round(low[0], 2),
            f"action_latency_p99_ms_at_{LOW_RATE:g}_per_s": round(low[1], 2)}


def main() -> int:
    if shutil.which("redis-server") is None:
        raise SystemExit("bench: redis-server is not installed")
    single = measure(replicated=False)
    replicated = {} if os.environ.get("BENCH_BUS_SINGLE_ONLY") else measure(replicated=True)
    ratio = (round(replicated["action_latency_p99_ms"] / single["action_latency_p99_ms"], 2) if replicated
             else None)
    print(json.dumps({**single, "batch_rows": BATCH, "batches": BATCHES, "latency_changes": LATENCY_CHANGES,
                      "goal_rows_per_s": 50000, "goal_p99_ms": 20, "replicated": replicated,
                      "replicated_p99_over_single": ratio, "goal_replicated_p99_over_single": 1.2}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
