"""Benchmark of big tables and many datasources (issue 15): a real redis-server with the production pub/sub
output buffer limit (32 MB), one dsd and two api-pe processes (started as bench/bus.py starts them).

put_1m_s: one PUT of 1M two-column rows, until both PEs hold it (their seq is the DSD's and no lag).
diff_1pct_ms: the same table replaced with 1% of its rows changed, from the PUT's answer until both PEs have
  it; diff_1pct_put_ms is the PUT itself (the API parses 1M rows and the store computes the difference).
join_1m_s: a new api-pe process, from its start until it answers /healthz 200 (synced, 1M rows loaded).
rss_mb_per_1m_rows: growth of a PE's RSS (VmRSS) with the 1M rows loaded, in MB.
bus_cuts: subscriptions Redis cut (INFO client_output_buffer_limit_disconnections) plus "bus connection lost"
  lines in the nodes' logs.
datasources_100x10k_s: 100 push datasources of 10k rows each, pushed one after the other, until every PE has
  every table.
heartbeat_late: heartbeats (of every node, heard on the bus by this benchmark) that came more than one interval
  late (a gap over twice the interval), and the largest gap in ms; heartbeat_late_by_node says whose.
Prints one JSON object as its last line, with goals_met. Takes a few minutes; the load average is in the JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bus import HEADERS, Cluster, table_of, wait_for

ROWS = int(os.environ.get("BENCH_SCALE_ROWS", "1000000"))
DATASOURCES = int(os.environ.get("BENCH_SCALE_DATASOURCES", "100"))
DS_ROWS = int(os.environ.get("BENCH_SCALE_DS_ROWS", "10000"))
HEARTBEAT_MS = 100   # bench/bus.py's node timings
# a PUT of 1M rows is some 30 MB, over the API's default body limit
NODE_EXTRA = {"limits": {"max_body_mb": 256}}
GOALS = {"put_1m_s": 10, "diff_1pct_ms": 300, "join_1m_s": 10, "rss_mb_per_1m_rows": 300, "bus_cuts": 0,
         "datasources_100x10k_s": 15, "heartbeat_late": 0}


class Heartbeats:
    """Every node's heartbeat arrival times, heard on the bus from a thread of this process."""

    def __init__(self, client: redis.Redis) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe("congress:bench:hb")
        self.last: dict[str, float] = {}
        self.late = 0
        self.late_by: dict[str, int] = {}
        self.max_gap_s = 0.0
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for msg in self.pubsub.listen():
            if not self.running:
                return
            if msg["type"] != "message":
                continue
            now = time.monotonic()
            beat = json.loads(msg["data"])
            key = f"{beat.get('node')}/{beat.get('inc')}"
            if key in self.last:
                gap = now - self.last[key]
                self.max_gap_s = max(self.max_gap_s, gap)
                if gap > 2 * HEARTBEAT_MS / 1000:
                    self.late += 1
                    self.late_by[str(beat.get("node"))] = self.late_by.get(str(beat.get("node")), 0) + 1
            self.last[key] = now

    def stop(self) -> None:
        self.running = False   # the reader ends at the next heartbeat


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def synced(apis: list[str], table: str, seq: int) -> bool:
    return synced_all(apis, {table: seq})


def synced_all(apis: list[str], seqs: dict[str, int]) -> bool:
    """Every table at least at its seq on every PE: one GET /v1/status per PE (one per table and PE loaded the
    PEs being measured with hundreds of requests per poll)."""
    for api in apis:
        views = {t["table"]: t for t in httpx.get(api + "/v1/status", timeout=5, headers=HEADERS).json()["tables"]}
        if not all(t in views and views[t]["seq"] >= seq and views[t]["lag"] == 0 for t, seq in seqs.items()):
            return False
    return True


def dsd_seq(api: str, table: str) -> int:
    return table_of(api, table)["dsd_seq"] or 0


def put(client: httpx.Client, url: str, body: bytes) -> None:
    client.put(url, content=body, headers={"Content-Type": "application/json"}).raise_for_status()


def big_body(n: int, changed_every: int = 0) -> bytes:
    """Made in pieces: one json.dumps of 1M rows holds the GIL for a second, and the heartbeat reader with it."""
    pieces = [json.dumps([[f"host-{i:07d}", f"v-{i % 1000}" if not changed_every or i % changed_every
                           else f"changed-{i}"] for i in range(start, min(start + 10_000, n))])[1:-1]
              for start in range(0, n, 10_000)]
    return ("[" + ",".join(pieces) + "]").encode()


def measure(cluster: Cluster, client: httpx.Client, admin: redis.Redis) -> dict:
    a, b = cluster.apis
    out: dict = {}
    client.post(a + "/v1/data-sources", json={"name": "big", "driver": "push",
                                              "config": {"tables": {"rows": ["id", "v"]}}}).raise_for_status()
    wait_for(lambda: synced([a, b], "big:rows", 1), 20, "big table on both PEs")
    pe_pids = [cluster.named["n1"].pid, cluster.named["n2"].pid]
    rss_before = [rss_mb(p) for p in pe_pids]

    body = big_body(ROWS)
    seq = dsd_seq(a, "big:rows")
    started = time.monotonic()
    put(client, a + "/v1/data-sources/big/tables/rows/rows", body)
    out["put_1m_put_s"] = round(time.monotonic() - started, 2)
    wait_for(lambda: synced([a, b], "big:rows", seq + 1), 300, "1M rows on both PEs")
    out["put_1m_s"] = round(time.monotonic() - started, 2)
    time.sleep(2)
    out["rss_mb_per_1m_rows"] = round(max(rss_mb(p) - r for p, r in zip(pe_pids, rss_before)) * 1e6 / ROWS, 1)
    out["rss_mb_pe_total"] = round(max(rss_mb(p) for p in pe_pids), 1)

    body = big_body(ROWS, changed_every=100)
    seq = dsd_seq(a, "big:rows")
    started = time.monotonic()
    put(client, a + "/v1/data-sources/big/tables/rows/rows", body)
    answered = time.monotonic()
    wait_for(lambda: synced([a, b], "big:rows", seq + 1), 120, "the 1% change on both PEs")
    done = time.monotonic()
    out["diff_1pct_ms"] = round((done - answered) * 1000)
    out["diff_1pct_put_ms"] = round((answered - started) * 1000)
    del body

    started = time.monotonic()
    join = cluster.node("api-pe", "n3", extra=NODE_EXTRA)
    out["join_1m_s"] = round(time.monotonic() - started, 2)
    assert join is not None
    out["join_1m_rows_synced"] = synced([join], "big:rows", dsd_seq(a, "big:rows"))

    apis = cluster.apis
    names = [f"ds{k:03d}" for k in range(DATASOURCES)]
    for name in names:
        client.post(a + "/v1/data-sources", json={"name": name, "driver": "push",
                                                  "config": {"tables": {"t": ["id", "v"]}}}).raise_for_status()
    wait_for(lambda: synced_all(apis, {f"{n}:t": 1 for n in names}), 60, "100 datasources on every PE")
    bodies = {n: json.dumps([[f"{n}-{i}", i] for i in range(DS_ROWS)]).encode() for n in names}
    seqs = {n: dsd_seq(a, f"{n}:t") for n in names}
    started = time.monotonic()
    for n in names:
        put(client, a + f"/v1/data-sources/{n}/tables/t/rows", bodies[n])
    wait_for(lambda: synced_all(apis, {f"{n}:t": seqs[n] + 1 for n in names}), 300, "every datasource on every PE")
    out["datasources_100x10k_s"] = round(time.monotonic() - started, 2)
    return out


def main() -> int:
    if shutil.which("redis-server") is None:
        raise SystemExit("bench: redis-server is not installed")
    root = Path(tempfile.mkdtemp(prefix="congress-scale-"))
    load_before = os.getloadavg()
    cluster = Cluster(root)
    admin = redis.Redis(port=cluster.redis_port, password=cluster.password, socket_timeout=30)
    admin.config_set("client-output-buffer-limit", "pubsub 32mb 8mb 60")   # templates/redis.conf.j2's
    beats = Heartbeats(redis.Redis(port=cluster.redis_port, password=cluster.password))
    try:
        cluster.node("dsd", "d1")
        cluster.node("api-pe", "n1", extra=NODE_EXTRA)
        cluster.node("api-pe", "n2", extra=NODE_EXTRA)
        time.sleep(1)
        beats.late = 0
        beats.late_by = {}
        beats.max_gap_s = 0.0
        with httpx.Client(timeout=300, headers=HEADERS) as client:
            out = measure(cluster, client, admin)
        cuts = int(admin.info("stats").get("client_output_buffer_limit_disconnections", 0))
        lost = sum((root / f"{n}.out").read_text(errors="replace").count("bus connection lost")
                   for n in ("d1", "n1", "n2", "n3") if (root / f"{n}.out").exists())
        out["bus_cuts"] = cuts + lost
        out["bus_cuts_redis"], out["bus_cuts_logged"] = cuts, lost
        beats.stop()
        out["heartbeat_late"] = beats.late
        out["heartbeat_late_by_node"] = beats.late_by
        out["heartbeat_max_gap_ms"] = round(beats.max_gap_s * 1000)
    finally:
        beats.stop()
        cluster.stop()
        if os.environ.get("BENCH_SCALE_KEEP"):
            print(f"bench: kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    out["goals_met"] = {k: out[k] <= v for k, v in GOALS.items()} | {"join_1m_rows_synced": out["join_1m_rows_synced"]}
    out["goals"] = GOALS
    out["rows"], out["load_avg_before"], out["load_avg_after"] = ROWS, load_before, os.getloadavg()
    out["cpus"] = os.cpu_count()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
