"""The DSD node: runs every datasource, publishes table diffs numbered (epoch, seq), executes actions.

Table publication. Each process start takes a new epoch (a cluster-wide counter in the store). Every table
starts the epoch with a full publication (seq 1) and each later change is a diff with seq + 1; snapshot,
(epoch, seq) and the published message change together in one Lua script. A DSD whose epoch is older than
the store's (it was paused and replaced) is refused by that script, or sees the newer epoch within about a
second (fence loop), and stops itself with exit code 1.

Actions, exactly once (docs/ARCHITECTURE.md section 3). Every PE sends a request for every action it derives, carrying a
deterministic action id. `Leadership` (pure, no I/O) decides: the DSD's leader is the first PE it hears
from; its requests run unless their id already ran; other PEs' requests are kept for `buffer_s` (>= 2 x
peer_timeout + 1 s). When the leader's heartbeats stop for peer_timeout, the longest-known live PE becomes
leader and its buffered requests whose ids have not run are run ("replayed"); so are the other PEs' when the
leader's heartbeat shows a new break (it missed diffs: see Leadership._caught_up). An id is marked executed in
memory before running (bounded, FIFO) and claimed in Redis (executed_ttl_s, 1 h by default) before the HTTP
POST, so a restarted DSD, or a stale one coming back from SIGSTOP, never runs it again (PEs send their last
30 s of requests again when a new DSD process appears; these claims make that safe). The claims of every
request ready when the ledger loop comes round go in one round trip, which also refuses a stale epoch; a POST
starting more than CLAIM_FRESH_S after its claim (the process was paused in between) reads the epoch again.
A claim reads "run:<epoch>" until the POST is answered, then "done". A newer DSD takes over a claim still
"run" by an older epoch: that DSD died or was cut off mid-POST, and its POST may never have arrived. The one
case left is a DSD lost between the sink's answer and the "done" mark (about a round trip): the action
then arrives twice, with the same action_id for the receiver to drop the second.
Two PEs may name one action two ways (SAME_ACTION_WINDOW_S): another PE's request for an action that ran
within that window under another id runs nothing. Only heartbeats of PEs that report themselves synced count as
"hearing from" a PE. A PE sends its requests
in messages {"pe", "inc", "reqs": [...]}; one that is not the leader sends them in batches (see pe.py).

Liveness (issue 12). Pacemaker sees only what the OCF agent reports, and a process that exists is not a DSD
that works: paused (SIGSTOP) or hung, it polls nothing and runs no action. So the DSD rewrites its liveness file
(`DsdLiveness`, atomically) at every heartbeat from its event loop, and the agent's monitor fails once the file
is older than `stale_after_s`. Cut off from its bus (a partition of the bus port only) the DSD can claim no
action, so it runs none; once that lasts past BUS_OUTAGE_GRACE_S, longer than a bus failover, the file names
the problem and the agent fails the monitor (and a start on such a host) so that Pacemaker moves the DSD.

Pushes (issue 15). A push replaces a table, and the store keeps it as the difference against the previous
push, numbered by the table's push version, in a bounded log (store.py). The DSD publishes every version, in
order, each as its own diff: from the notice (small diffs travel in it) or from the log. So when notices were
lost (the DSD's session was down, or the bus refused a publication: a full disk), the next notice, reconnect or
periodic sync publishes each push it missed, and an action derived from a push that a later one replaced
still runs. A DSD further behind than the log reaches reads the pushed rows whole. A notice or store read
older than what the table already publishes is skipped, so a full sync racing the notices never moves a table
back. Published versions are dropped from the log with the next publication (the DSD is its only reader).

Large tables. A diff too large for a pub/sub message goes through the store in chunks (store.publish_table); a
change of more than half a large table is published in full, staged in chunks as the next snapshot, which the
PEs then read in pieces.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import httpx
from redis.exceptions import ResponseError

from congressctl.bus import Bus, command
from congressctl.errors import ActionDeliveryError, BusError, DatasourceConfigError
from congressctl.node.config import NodeConfig
from congressctl.node.drivers import Driver, HttpPoster, Row, make_driver
from congressctl.node.metrics import DsdCollector, DsdMetrics
from congressctl.node.runtime import BUS_OUTAGE_GRACE_S, BusWorker
from congressctl.node.store import (
    CHUNK_ROWS,
    INLINE_BYTES,
    PUSH_LOG_MAX,
    Store,
    cannot_save,
    common,
    inline_size,
    minus,
    row_key,
    row_keys_of,
)
from congressctl.payloads import (
    DatasourceStatus,
    DsdCounts,
    DsdHeartbeat,
    DsdLiveness,
    Leader,
    PeHeartbeat,
    RefreshRequest,
)

log = logging.getLogger("congressctl.dsd")

PeerKey = tuple[str, str]   # (node id, incarnation)


@dataclass
class Request:
    id: str
    datasource: str
    action: str
    args: list
    pe: PeerKey
    direct: bool = False
    received: float = 0.0
    retried: bool = False   # its claim's round trip failed once (see ledger_loop)

    @classmethod
    def from_message(cls, data: dict, pe: PeerKey, now: float) -> Request:
        return cls(id=str(data["id"]), datasource=str(data["ds"]), action=str(data["action"]),
                   args=list(data.get("args", [])), pe=pe, direct=bool(data.get("direct", False)), received=now)


def requests_of(message: dict, now: float) -> list[Request]:
    """The requests of one action message; ValueError when it is malformed."""
    try:
        pe = (str(message["pe"]), str(message["inc"]))
        items = message["reqs"]
        if not isinstance(items, list):
            raise TypeError("reqs is not a list")
        return [Request.from_message(item, pe, now) for item in items]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed action message: {type(exc).__name__}: {exc}") from None


# PEs name an action by the change that made its row appear, and two PEs can see one appearance through different
# changes: one applied the old DSD's last diff, another saw the row only in the new DSD's full publication, or in a
# snapshot it resynced from. When the leader changes (replay) or a new DSD appears (every PE resends its last
# pe.RESEND_WINDOW_S of requests) both names reach this DSD: a request of another PE for the same datasource,
# action and args as one that ran within this window is taken for the same action. The cost: a row that truly
# appears twice within it, each time seen by only one PE, runs once.
SAME_ACTION_WINDOW_S = 30.0


class Leadership:
    """Sticky leader choice and the exactly-once bookkeeping. Methods return the requests to run now."""

    def __init__(self, peer_timeout_s: float, buffer_s: float, capacity: int = 200_000):
        self.peer_timeout_s = peer_timeout_s
        self.buffer_s = buffer_s
        self.capacity = capacity
        self.leader: PeerKey | None = None
        self.leader_since: float | None = None
        self.first_heard: dict[PeerKey, float] = {}
        self.last_heard: dict[PeerKey, float] = {}
        self.breaks: dict[PeerKey, int] = {}
        self.catch_up_until = 0.0   # other PEs' requests run, not wait, until then (see _caught_up)
        self.buffers: dict[PeerKey, OrderedDict[str, Request]] = {}
        self.executed: OrderedDict[str, None] = OrderedDict()
        # (datasource, action, args) -> (the PE whose request ran it, when), the last SAME_ACTION_WINDOW_S
        self.ran: OrderedDict[tuple[str, str, str], tuple[PeerKey, float]] = OrderedDict()
        self.counts = DsdCounts()
        self.history: list[tuple[float, PeerKey | None, PeerKey]] = []

    def is_executed(self, action_id: str) -> bool:
        return action_id in self.executed

    def _mark(self, action_id: str) -> None:
        self.executed[action_id] = None
        while len(self.executed) > self.capacity:
            self.executed.popitem(last=False)

    def heard(self, pe: PeerKey, now: float, breaks: int | None = None) -> list[Request]:
        """A heartbeat (with the PE's breaks) or request from a PE. With no leader, that PE becomes it."""
        self.first_heard.setdefault(pe, now)
        self.last_heard[pe] = now
        before = self.breaks.get(pe)
        if breaks is not None:
            self.breaks[pe] = breaks
        if self.leader is None:
            return self._take(pe, now)
        if pe != self.leader or breaks is None or before is None or breaks == before:
            return []
        return self._caught_up(pe, now)

    def _caught_up(self, pe: PeerKey, now: float) -> list[Request]:
        """The leader missed diffs (its breaks changed: it was off the bus, or diffs waited behind a resync and
        were dropped as old) and resynced from a snapshot: it never saw the rows that came and went meanwhile,
        and so never asked for their actions. Other PEs that saw them did: their buffered requests run now, and
        those that arrive for one peer timeout more (a follower holds its requests a heartbeat before sending),
        less those the leader ran under its own names (SAME_ACTION_WINDOW_S). Nothing else would run them: a
        DSD off the bus at the same time forgave the leader's silence (chaos seed 11: 6 rows never ran), and a
        leader that only skipped diffs never went silent (packet-delay on its host: 48 rows)."""
        waiting = []
        for other in [p for p in self.buffers if p != pe]:
            waiting += [r for r in self.buffers.pop(other).values() if not self.is_executed(r.id)]
        run = self._admit(sorted(waiting, key=lambda r: r.received), now)
        self.counts.replayed += len(run)
        self.catch_up_until = now + self.peer_timeout_s
        log.info("leader %s/%s missed diffs; running %d of the %d request(s) other PEs sent meanwhile",
                 pe[0], pe[1], len(run), len(waiting))
        return run

    def request(self, req: Request, now: float) -> list[Request]:
        run = self.heard(req.pe, now)
        if self.is_executed(req.id):
            self.counts.ignored += 1
            return run
        if req.direct or req.pe == self.leader or now < self.catch_up_until:
            return run + self._admit([req], now)
        self.buffers.setdefault(req.pe, OrderedDict())[req.id] = req
        return run

    def _admit(self, reqs: list[Request], now: float) -> list[Request]:
        """Those of `reqs` to run: each marked executed, less those another PE's request ran already under
        another name (SAME_ACTION_WINDOW_S)."""
        while self.ran and now - next(iter(self.ran.values()))[1] > SAME_ACTION_WINDOW_S:
            self.ran.popitem(last=False)
        admitted = []
        for r in reqs:
            self._mark(r.id)
            what = (r.datasource, r.action, json.dumps(r.args, separators=(",", ":")))
            earlier = self.ran.get(what)
            if earlier is not None and earlier[0] != r.pe:
                self.counts.ignored += 1
                continue
            self.ran[what] = (r.pe, now)
            self.ran.move_to_end(what)
            admitted.append(r)
        while len(self.ran) > self.capacity:
            self.ran.popitem(last=False)
        return admitted

    def forgive(self, now: float) -> None:
        """Count every known PE as heard now: this DSD could not hear them (it was off the bus)."""
        for pe in self.last_heard:
            self.last_heard[pe] = now

    def tick(self, now: float) -> list[Request]:
        """Expire old buffered requests and forgotten peers; replace a leader silent for peer_timeout."""
        for buf in self.buffers.values():
            while buf:
                first = next(iter(buf.values()))
                if now - first.received <= self.buffer_s:
                    break
                buf.popitem(last=False)
                self.counts.expired += 1
        for pe in [p for p, t in self.last_heard.items() if now - t > self.buffer_s and p != self.leader]:
            self.last_heard.pop(pe)
            self.first_heard.pop(pe, None)
            self.breaks.pop(pe, None)
            self.counts.expired += len(self.buffers.pop(pe, {}))
        if self.leader is None or now - self.last_heard.get(self.leader, now) <= self.peer_timeout_s:
            return []
        old, self.leader = self.leader, None
        alive = [p for p, t in self.last_heard.items() if p != old and now - t <= self.peer_timeout_s]
        if not alive:
            log.warning("leader %s/%s lost; no live PE yet", *old)
            return []
        return self._take(min(alive, key=lambda p: self.first_heard[p]), now, old)

    def _take(self, pe: PeerKey, now: float, old: PeerKey | None = None) -> list[Request]:
        self.leader = pe
        self.leader_since = now
        self.counts.leader_changes += 1
        self.history.append((time.time(), old, pe))
        del self.history[:-50]
        replay = self._admit([r for r in self.buffers.pop(pe, {}).values() if not self.is_executed(r.id)], now)
        self.counts.replayed += len(replay)
        log.info("leader is now %s/%s (was %s); replaying %d buffered request(s)", pe[0], pe[1],
                 "/".join(old) if old else "none", len(replay))
        return replay


@dataclass
class TableState:
    ds_id: str
    ds_name: str
    table: str
    seq: int = 0
    rows: set[str] = field(default_factory=set)
    push_version: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    passed: list[int] = field(default_factory=list)   # push versions published, to drop from the push log


# Push versions a DSD collects before a publication drops them from the push log (a DSD that read the pushed
# rows whole drops the last PUSH_LOG_MAX of those it skipped: older ones are gone by the log's own bound).
TRIM_BATCH = 16

# How long an action request waits for the bus to take its claim (a bus failover is a few seconds) before it
# counts as failed.
CLAIM_PATIENCE_S = 30.0
# A claim older than this when its POST is about to start may have waited out a pause (SIGSTOP) of this process,
# meanwhile a newer DSD may have taken the action over (it takes over claims of older epochs): the epoch is
# read again first. A claim's POST normally starts within milliseconds.
CLAIM_FRESH_S = 0.5


# The DSD counts as hung once its liveness file is older than 3 peer timeouts (PEs already take a node that
# silent for gone; three leave a loaded host's scheduling hiccups and a full garbage collection far behind),
# and never under 2 s, since the agent compares file times in whole seconds.
LIVENESS_PEER_TIMEOUTS = 3
LIVENESS_MIN_STALE_S = 2


def stale_after_s(peer_timeout_s: float) -> int:
    return max(LIVENESS_MIN_STALE_S, math.ceil(LIVENESS_PEER_TIMEOUTS * peer_timeout_s))


def write_liveness(path: str, record: DsdLiveness) -> None:
    """Replace the liveness file in one rename, so that its reader never sees half a record."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(record.to_dict(), separators=(",", ":")) + "\n")
    os.replace(tmp, path)


class StaleEpoch(Exception):
    """This DSD's epoch is older than the store's: another DSD took over."""


class DsdNode(BusWorker):
    def __init__(self, cfg: NodeConfig, live_file: str | None = None):
        super().__init__(cfg)
        self.live_file = live_file
        self.live_error: str | None = None     # the last failure to write the liveness file, logged once
        self.bus_answered = time.monotonic()   # when Redis last answered anything (bus_probe_loop)
        self.store = Store(self.redis, self.channels, sync_replicas=cfg.bus.sync_replicas)
        t = cfg.timings
        self.leadership = Leadership(t.peer_timeout_s, buffer_s=2 * t.peer_timeout_s + 1.0)
        self.bus = Bus(self.redis, self.channels, heartbeat_s=t.heartbeat_s, peer_timeout_s=t.peer_timeout_s,
                       subscribe=[self.channels.notice, self.channels.action, self.channels.push],
                       on_message=self.on_message, on_connect=self.on_connect,
                       heartbeat_payload=self.heartbeat_payload)
        self.store.busy = self.bus.busy
        self.epoch: int | None = None
        self.drivers: dict[str, Driver] = {}
        self.driver_tasks: dict[str, asyncio.Task] = {}
        self.tables: dict[tuple[str, str], TableState] = {}
        self.http: httpx.AsyncClient | None = None
        self.poster = HttpPoster(executor=f"{cfg.node_id}/{self.incarnation}")
        self.drop = set(cfg.test_hooks.drop_publish)
        self.exec_slots = asyncio.Semaphore(64)
        self.to_claim: list[Request] = []
        self.to_mark: list[str] = []          # ids whose POST was answered, to mark "done"
        self.ledger_due = asyncio.Event()
        self.stale = False
        self.touched: dict[str, float] = {}   # datasource id -> when a notice last started/stopped it
        self.metrics = DsdMetrics(cfg.metrics)
        self.metrics.watch(DsdCollector(self))

    # -- worker shape ---------------------------------------------------------------------------------
    async def startup(self) -> None:
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0))
        await self.metrics.start()
        log.info("dsd %s starting, incarnation %s", self.cfg.node_id, self.incarnation)

    def start_tasks(self) -> None:
        self.tasks.spawn(self.bus.run(), "bus-reader", critical=True)
        self.tasks.spawn(self.bus.heartbeat_loop(), "heartbeat", critical=True)
        self.tasks.spawn(self.leader_loop(), "leader-watch", critical=True)
        self.tasks.spawn(self.full_sync_loop(), "full-sync", critical=True)
        self.tasks.spawn(self.fence_loop(), "fence", critical=True)
        self.tasks.spawn(self.ledger_loop(), "ledger", critical=True)
        if self.live_file:
            self.tasks.spawn(self.bus_probe_loop(), "bus-probe", critical=True)
            self.tasks.spawn(self.liveness_loop(self.live_file), "liveness", critical=True)

    def stop_taking_work(self) -> None:
        self.bus.stop()

    async def shutdown(self) -> None:
        self.metrics.stop()
        await self.flush_marks()
        if self.http is not None:
            await self.http.aclose()
        await self.poster.aclose()
        await self.redis.aclose()

    # -- heartbeat ------------------------------------------------------------------------------------
    def heartbeat_payload(self) -> dict:
        lead = self.leadership
        return DsdHeartbeat(
            node=self.cfg.node_id, inc=self.incarnation, ts=time.time(), epoch=self.epoch,
            tables={f"{s.ds_id}/{s.table}": [self.epoch, s.seq] for s in self.tables.values()},
            leader=Leader(node=lead.leader[0], inc=lead.leader[1]) if lead.leader else None,
            leader_since=lead.history[-1][0] if lead.history else None, counts=lead.counts,
            buffered=sum(len(b) for b in lead.buffers.values()),
            datasources={d.id: DatasourceStatus(name=d.name, status=d.status) for d in self.drivers.values()},
        ).to_dict()

    # -- liveness -------------------------------------------------------------------------------------
    def liveness(self) -> DsdLiveness:
        """This DSD as its OCF agent judges it: see the module docstring."""
        silent = time.monotonic() - self.bus_answered
        problem = None
        if silent > BUS_OUTAGE_GRACE_S:
            # quotes and backslashes left out: the shell agent reads this JSON string with sed
            cause = (self.bus.last_error or "no message, not even its own heartbeat").translate(
                {ord('"'): "'", ord("\\"): "/"})
            problem = (f"control bus {self.cfg.bus.host}:{self.cfg.bus.port} unreachable from this host for "
                       f"{silent:.1f}s (over {BUS_OUTAGE_GRACE_S:.0f}s, longer than a bus failover): {cause}")
        return DsdLiveness(node=self.cfg.node_id, inc=self.incarnation, pid=os.getpid(), ts=time.time(),
                           stale_after_s=stale_after_s(self.cfg.timings.peer_timeout_s), epoch=self.epoch,
                           bus_silent_s=round(silent, 3), problem=problem)

    async def bus_probe_loop(self) -> None:
        """Whether Redis answers at all, apart from the subscription: a bus that refuses writes (its disk is
        full) breaks the subscription's resync again and again, yet is reachable, and no other host would do
        better, so the DSD must not move for it. Its own task, so that a hung bus never delays the file."""
        while not self.bus.stopping:
            try:
                await command(self.redis.ping(), "bus probe")
                self.bus_answered = time.monotonic()
            except BusError as exc:
                if isinstance(exc.__cause__, ResponseError):   # an answer, if a refusal
                    self.bus_answered = time.monotonic()
            await self.bus.wait_stop(self.cfg.timings.heartbeat_s)

    async def liveness_loop(self, path: str) -> None:
        while not self.bus.stopping:
            try:
                write_liveness(path, self.liveness())
                self.live_error = None
            except OSError as exc:
                if self.live_error != str(exc):
                    log.error("liveness file %s not written (the agent will take this DSD for hung): %s", path, exc)
                self.live_error = str(exc)
            await self.bus.wait_stop(self.cfg.timings.heartbeat_s)

    # -- bus ------------------------------------------------------------------------------------------
    async def on_connect(self) -> None:
        if self.epoch is None:
            self.epoch = await self.store.next_epoch()
            log.info("epoch %d", self.epoch)
        await self.sync_datasources(republish=True)

    async def on_message(self, channel: str, data: dict) -> None:
        ch = self.channels
        now = time.monotonic()
        if channel == ch.action and "refresh" in data:
            self.request_refresh(RefreshRequest.from_dict(data))
        elif channel == ch.action:
            try:
                requests = requests_of(data, now)
            except ValueError as exc:
                log.warning("%s; dropped", exc)
                return
            for req in requests:
                self._run(self.leadership.request(req, now))
        elif channel == ch.heartbeat:
            # a PE still loading (or resyncing after a reconnect) cannot be trusted to send every action
            beat = PeHeartbeat.from_dict(data) if data.get("role") == "api-pe" else None
            if beat is not None and isinstance(beat.inc, str) and beat.synced:
                breaks = beat.breaks if isinstance(beat.breaks, int) and beat.breaks > 0 else None
                self._run(self.leadership.heard((beat.node, beat.inc), now, breaks))
        elif channel == ch.push:
            await self.on_push(data)
        elif channel == ch.notice and data.get("kind") == "datasource":
            ds = data.get("datasource") or {}
            if data.get("op") == "create":
                await self.start_datasource(ds)
            elif data.get("op") == "delete":
                self.stop_datasource(ds.get("id"))

    def request_refresh(self, req: RefreshRequest) -> None:
        driver = self.drivers.get(req.refresh)
        if driver is None:
            log.info("refresh of datasource %s asked by %s: not running here", req.refresh, req.pe)
            return
        log.info("refresh of datasource %s asked by %s", driver.name, req.pe)
        driver.request_refresh()

    async def leader_loop(self) -> None:
        interval = min(self.cfg.timings.heartbeat_s, 0.1)
        while not self.bus.stopping:
            now = time.monotonic()
            # hearing nothing, not even its own heartbeat, the DSD is the one off the bus: the PEs' silence says
            # nothing about them, so the leader stays (a new one chosen over a bus outage would replay its buffer
            # beside the old leader's requests derived again after its resync: the same actions under other ids)
            if self.bus.connected and now - self.bus.last_message <= 2 * self.cfg.timings.heartbeat_s:
                self._run(self.leadership.tick(now))
            else:
                self.leadership.forgive(now)
            if self.stale:
                raise StaleEpoch(f"epoch {self.epoch} was superseded by a newer DSD")
            await asyncio.sleep(interval)

    async def full_sync_loop(self) -> None:
        while not self.bus.stopping:
            await self.bus.wait_stop(self.cfg.timings.full_sync_interval_s)
            if not self.bus.connected or self.bus.stopping:
                continue
            try:
                await self.sync_datasources(republish=False)
            except BusError as exc:
                log.warning("full sync failed: %s", exc)

    async def fence_loop(self) -> None:
        """A DSD that was paused (SIGSTOP) while another one started must notice and stop."""
        while not self.bus.stopping:
            await self.bus.wait_stop(max(1.0, self.cfg.timings.peer_timeout_s))
            if self.epoch is None or not self.bus.connected:
                continue
            try:
                current = await self.store.current_epoch()
            except BusError:
                continue
            if current > self.epoch:
                log.error("epoch %d superseded by %d: another DSD runs; stopping", self.epoch, current)
                self.stale = True

    # -- datasources ----------------------------------------------------------------------------------
    async def sync_datasources(self, republish: bool) -> None:
        """Make the running drivers match the store; with republish, send every table in full again."""
        started = time.monotonic()
        defined = {d["id"]: d for d in await self.store.datasources()}
        self.touched = {k: t for k, t in self.touched.items() if t >= started}
        for ds_id in [i for i in self.drivers if i not in defined and i not in self.touched]:
            self.stop_datasource(ds_id)
        for ds in defined.values():
            if ds["id"] in self.touched:
                continue   # a notice changed it after our read: that is newer
            if ds["id"] not in self.drivers:
                await self.start_datasource(ds)
            elif republish:
                await self._republish(self.drivers[ds["id"]])
            elif ds["driver"] == "push":
                for table in ds["config"]["tables"]:
                    await self.refresh_pushed(ds["id"], table)

    async def start_datasource(self, ds: dict) -> None:
        if not ds.get("id") or ds["id"] in self.drivers or self.epoch is None or not ds.get("enabled", True):
            return
        assert self.http is not None
        self.touched[ds["id"]] = time.monotonic()
        driver = make_driver(ds, self.http, self.poster)
        self.drivers[driver.id] = driver
        for table in driver.tables:
            self.tables[(driver.id, table)] = TableState(driver.id, driver.name, table)
        await self._republish(driver)
        driver.status.initialized = driver.ds["driver"] == "push"
        emit = lambda table, rows, d=driver: self.set_rows(d, table, rows)  # noqa: E731
        self.driver_tasks[driver.id] = self.tasks.spawn(driver.run(emit), f"driver-{driver.name}")
        log.info("datasource %s (%s) started", driver.name, ds["driver"])

    def stop_datasource(self, ds_id: str | None) -> None:
        driver = self.drivers.pop(ds_id or "", None)
        if driver is None:
            return
        self.touched[driver.id] = time.monotonic()
        task = self.driver_tasks.pop(driver.id, None)
        if task is not None:
            task.cancel()
        for key in [k for k in self.tables if k[0] == driver.id]:
            del self.tables[key]
        log.info("datasource %s stopped", driver.name)

    async def _republish(self, driver: Driver) -> None:
        """Publish each table in full with the next seq: at epoch start, and after a reconnect (after the pushes
        missed meanwhile, each as its diff: a full publication alone would skip the rows of every push but the
        last, and the actions derived from them)."""
        for table in driver.tables:
            state = self.tables[(driver.id, table)]
            version = None
            if driver.ds["driver"] == "push":
                pushed = await self._pushed_as_published(state)
                if pushed is None:
                    continue
                version, rows = pushed
            elif state.seq == 0:
                rows = {row_key(r) for r in (await self.store.snapshot(driver.id, table)).rows}
            else:
                rows = set(state.rows)
            await self._publish(state, rows, full=True, push_version=version)

    async def _pushed_as_published(self, state: TableState) -> tuple[int, set[str]] | None:
        """The pushed rows once every push before them is published (None: one waits, the bus cannot save).
        A push may come between publishing the missed ones and reading the rows: a full publication of rows
        newer than what was published would skip that push's own diff, and the actions derived from it."""
        while self.tables.get((state.ds_id, state.table)) is state:
            if state.seq > 0 and not await self.publish_pushes(state):
                return None
            version, rows = await self.store.pushed_keys(state.ds_id, state.table)
            if state.seq == 0 or version <= state.push_version:
                return version, rows
        return None   # the datasource went away meanwhile

    async def on_push(self, data: dict) -> None:
        """A push notice names the version, and carries its diff when small; every version the table has not
        published yet is published, in order."""
        ds_id, table, version = data.get("ds_id", ""), data.get("table", ""), data.get("v")
        state = self.tables.get((ds_id, table))
        if state is None:
            return
        if not isinstance(version, int) or "n_add" not in data:
            # from an older API node, whose push may bump no version: the stored rows, whatever their version
            _, stored = await self.store.pushed_keys(state.ds_id, state.table)
            await self._publish(state, stored, full=False)
            return
        inline = {}
        if isinstance(data.get("add"), list) and isinstance(data.get("del"), list):
            inline[version] = (row_keys_of(data["add"]), row_keys_of(data["del"]))
        await self.publish_pushes(state, latest=version, inline=inline)

    async def publish_pushes(self, state: TableState, *, latest: int | None = None,
                             inline: dict[int, tuple[list[str], list[str]]] | None = None) -> bool:
        """Publish every push version the table has not published, oldest first, each as its diff (from
        `inline` or the push log; the pushed rows whole once the log no longer has it); whether none waits any
        more. One the bus refuses while it cannot save waits, with those after it, for the next push or sync:
        the session goes on, since ending it would lose the notices published meanwhile. Any other failure
        raises (the session is made again, and its resync publishes what waits)."""
        inline = inline or {}
        try:
            if latest is None:
                latest = await self.store.pushed_version(state.ds_id, state.table)
            while state.push_version < latest:
                before = state.push_version
                version = before + 1
                diff = inline.get(version) or await self.store.push_diff(state.ds_id, state.table, version)
                if diff is None:
                    stored, rows = await self.store.pushed_keys(state.ds_id, state.table)
                    log.info("%s:%s: push %d not in the push log; publishing the pushed rows (version %d)",
                             state.ds_name, state.table, version, stored)
                    await self._publish(state, rows, full=False, push_version=stored)
                else:
                    await self._publish_diff(state, *diff, push_version=version)
                if state.push_version == before:
                    return True   # the table went away, or a newer publication took over
        except BusError as exc:
            if not cannot_save(exc):
                raise
            log.warning("push(es) %d-%s of %s:%s not published yet: %s", state.push_version + 1, latest,
                        state.ds_name, state.table, exc)
            return False
        return True

    async def refresh_pushed(self, ds_id: str, table: str) -> None:
        """Publish the pushes newer than what the table publishes (the version is read first, so that the
        periodic full sync reads no rows of a table already in step)."""
        state = self.tables.get((ds_id, table))
        if state is not None:
            await self.publish_pushes(state)

    async def set_rows(self, driver: Driver, table: str, rows: set[Row]) -> None:
        state = self.tables.get((driver.id, table))
        if state is not None:
            await self._publish(state, {row_key(r) for r in rows}, full=False)

    def _current(self, state: TableState, push_version: int | None, full: bool) -> bool:
        if self.tables.get((state.ds_id, state.table)) is not state:
            return False
        return push_version is None or push_version > state.push_version or (
            push_version == state.push_version and full)

    async def _publish(self, state: TableState, rows: set[str], full: bool, push_version: int | None = None) -> None:
        """Publish the table as `rows`: in full, or as the diff against what it publishes now."""
        async with state.lock:
            if not self._current(state, push_version, full):
                return
            if full:
                await self._send(state, rows, set(), full=True, rows=rows, push_version=push_version)
            else:
                added = await minus(rows, state.rows) if state.rows else rows
                await self._send(state, added, await minus(state.rows, rows), full=False, rows=rows,
                                 push_version=push_version)

    async def _publish_diff(self, state: TableState, add: list[str], delete: list[str], push_version: int) -> None:
        """Publish one push's difference (rows it added and deleted) against what the table publishes."""
        async with state.lock:
            if not self._current(state, push_version, False):
                return
            published = state.rows
            await self._send(state, await minus(add, published), await common(delete, published),
                             full=False, rows=None, push_version=push_version)

    async def _send(self, state: TableState, added: set[str], deleted: set[str], *, full: bool,
                    rows: set[str] | None, push_version: int | None) -> None:
        """One publication under the table's lock; `rows` is the table after it (None: the published rows with
        the diff applied)."""
        if not full and not added and not deleted:
            self._passed(state, push_version)
            return
        seq = state.seq + 1
        publish = f"{state.ds_name}:{state.table}:{seq}" not in self.drop
        assert self.epoch is not None
        # more than half of a large table changes: sent whole (staged as the next snapshot, which the PEs read in
        # pieces), since a diff as large costs Redis more than the table
        large = len(added) + len(deleted) > max(CHUNK_ROWS, len(state.rows) // 2)
        if large and not full:
            if rows is None:
                rows = await minus(state.rows, deleted)
                rows |= added
            full = True
        new_rows = None
        if full and (large or inline_size(added) > INLINE_BYTES):
            new_rows = rows
            added_list, deleted_list = [], []
        elif len(added) + len(deleted) > CHUNK_ROWS:
            added_list, deleted_list = list(added), list(deleted)   # unsorted: sorting them would stop the loop
        else:
            added_list, deleted_list = sorted(added), sorted(deleted)
        # the log bounds itself too: dropping a version at every publication would cost every push a round trip
        trim = list(state.passed) if len(state.passed) >= TRIM_BATCH or large else []
        ok = await self.store.publish_table(state.ds_id, state.ds_name, state.table, self.epoch, seq,
                                            added_list, deleted_list, full, publish, trim=trim, new_rows=new_rows)
        if not ok:
            self.stale = True
            raise BusError(f"epoch {self.epoch} superseded; not publishing {state.ds_name}:{state.table}")
        del state.passed[:len(trim)]
        state.seq = seq
        if rows is not None:
            state.rows = rows
        else:
            state.rows -= deleted
            state.rows |= added
        self._passed(state, push_version)
        driver = self.drivers.get(state.ds_id)
        if driver is not None:
            driver.status.last_updated = time.time()
            driver.status.number_of_updates += 1
        if not publish:
            log.warning("test hook: publication %s:%s:%d dropped", state.ds_name, state.table, seq)

    @staticmethod
    def _passed(state: TableState, push_version: int | None) -> None:
        if push_version is None or push_version <= state.push_version:
            return
        state.passed.extend(range(state.push_version + 1, push_version + 1)[-PUSH_LOG_MAX:])
        state.push_version = push_version

    # -- actions --------------------------------------------------------------------------------------
    def _run(self, requests: list[Request]) -> None:
        if requests:
            self.to_claim.extend(requests)
            self.ledger_due.set()

    async def ledger_loop(self) -> None:
        """One round trip at a time to the executed ids: mark the answered POSTs "done" and claim every request
        waiting to run, then start the POSTs of those claimed. Under load each trip carries many of both."""
        while True:
            await self.ledger_due.wait()
            self.ledger_due.clear()
            claims, self.to_claim = self.to_claim[:1000], self.to_claim[1000:]
            retried = {r.id for r in claims if r.retried}
            marks, self.to_mark = self.to_mark, []
            if self.to_claim:
                self.ledger_due.set()
            if not claims and not marks:
                continue
            assert self.epoch is not None
            started = time.perf_counter()
            try:
                claimed = await self.store.settle_actions([r.id for r in claims], marks, self.epoch,
                                                          self.cfg.timings.executed_ttl_s, retried=retried)
            except BusError as exc:
                # a bus failover takes seconds: the claims wait for the new master instead of failing (nothing
                # was POSTed, so claiming again later is still exactly-once; the claims may have been kept,
                # replicated, with the answer lost: the next try takes its own)
                now = time.monotonic()
                keep = [r for r in claims if now - r.received <= CLAIM_PATIENCE_S]
                for r in keep:
                    r.retried = True
                self._failed([r for r in claims if now - r.received > CLAIM_PATIENCE_S], exc)
                self.to_claim[:0] = keep
                self.to_mark[:0] = marks
                await asyncio.sleep(0.2)
                self.ledger_due.set()
                continue
            if claimed is None:
                log.error("epoch %d superseded: %d action(s) left to the newer DSD", self.epoch, len(claims))
                self.stale = True
                continue
            self.metrics.claim(time.perf_counter() - started)
            claimed_at = time.monotonic()
            for req, ok in zip(claims, claimed):
                if ok:
                    self.tasks.spawn(self._execute(req, claimed_at), f"action-{req.id[:12]}")
                else:
                    self.leadership.counts.ignored += 1

    async def flush_marks(self) -> None:
        if not self.to_mark or self.epoch is None:
            return
        try:
            await self.store.settle_actions([], self.to_mark, self.epoch, self.cfg.timings.executed_ttl_s)
        except BusError as exc:
            log.warning("%d answered action(s) not marked done: %s", len(self.to_mark), exc)

    def _failed(self, requests: list[Request], exc: Exception) -> None:
        for req in requests:
            self.leadership.counts.failed += 1
            driver = self._driver_named(req.datasource)
            if driver is not None:
                driver.status.actions_failed += 1
            log.error("action %s %s:%s%s failed: %s: %s", req.id[:12], req.datasource, req.action,
                      tuple(req.args), type(exc).__name__, exc)

    def _driver_named(self, name: str) -> Driver | None:
        return next((d for d in self.drivers.values() if d.name == name), None)

    async def _superseded(self) -> bool:
        """Whether a newer DSD took an epoch (False when the bus cannot say: the claim stands)."""
        assert self.epoch is not None
        try:
            current = await self.store.current_epoch()
        except BusError:
            return False
        if current > self.epoch:
            self.stale = True
        return current > self.epoch

    async def _execute(self, req: Request, claimed_at: float) -> None:
        driver = self._driver_named(req.datasource)
        async with self.exec_slots:
            if time.monotonic() - claimed_at > CLAIM_FRESH_S and await self._superseded():
                log.error("action %s not run: epoch %d superseded since its claim (this DSD was paused?); the "
                          "newer DSD runs it", req.id[:12], self.epoch)
                return
            started = time.perf_counter()
            try:
                if driver is None:
                    raise DatasourceConfigError(f"no running datasource named {req.datasource}")
                await driver.execute(req.id, req.action, req.args)
            except (DatasourceConfigError, ActionDeliveryError) as exc:
                self._failed([req], exc)
                return
            self.metrics.action_post(time.perf_counter() - started)
        self.to_mark.append(req.id)
        self.ledger_due.set()
        self.leadership.counts.executed += 1
        driver.status.actions_executed += 1
