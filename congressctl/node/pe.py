"""The policy engine side of an api-pe node: mirrors the store, follows table publications, sends actions.

Tables. For every datasource table the PE keeps the (epoch, seq) it holds. A diff with seq n+1 of the same
epoch is applied; an older epoch or seq is ignored; a gap, a new epoch without a full publication, or a DSD
heartbeat showing a newer (epoch, seq) than ours (the lost last update) makes the PE replace the table from
the stored snapshot, which is read with its (epoch, seq) in one MULTI/EXEC. A new epoch's rows therefore
always replace the old epoch's table, never merge into it.

Actions. Every execute[...] row that appears becomes a request with a deterministic id: sha256 of
(datasource, action, args, cause), where cause is ("table", "<ds id>/<table>", epoch, seq) for the diff or
snapshot that made the row appear, or ("rule", rule id) for a rule added at run time. All PEs that see the
same change therefore name the same action the same way. Rows present when the PE first loads (process
start) are state that existed before this PE, not new actions: that first load sends no requests.
When a new DSD process shows up (its heartbeat carries a new incarnation), the requests of the last
RESEND_WINDOW_S are sent again, so an action whose request the old DSD never ran is not lost. They go as
"direct" requests, which the DSD runs whoever its leader is (its executed ids make each run once): the new
DSD may pick as leader a PE that has none of them to send (seen in CI: the leader never resent, the other
PE's copies were only kept for a replay that never came, and the action was lost).
Requests go out as one message per batch, {"pe", "inc", "reqs": [...]}. A PE that the DSD's last heartbeat
does not name as its leader holds its requests for `hold_s` (one heartbeat interval) first: the DSD only
keeps them for a replay should the leader fail, which it notices only after peer_timeout (> hold_s), so
holding them loses nothing and saves the bus, the DSD and this PE a message per action.

Large tables (issue 15). A large diff is read from the store in pieces (its notice names it), a large full
publication or snapshot likewise, and rows go into the engine in pieces of APPLY_ROWS, yielding between them,
so that heartbeats and API answers go on while a large table loads (the table's lock keeps the next change of
the same table waiting, and the bus's silence watchdog is told the reader is busy, not stuck). The actions of
all the pieces are sent together, under the one cause. Rows are tuples that share repeated strings (compact_rows).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from congressctl.bus import Bus, dumps
from congressctl.errors import BusError, PolicyError
from congressctl.node.config import MetricsConfig
from congressctl.node.drivers import table_columns
from congressctl.node.metrics import ApiPeMetrics
from congressctl.node.store import Store, compact_rows, minus
from congressctl.payloads import DsdHeartbeat, TableView
from congressctl.policy import Engine, Result
from congressctl.policy.parser import parse_statement
from congressctl.policy.simulate import check_action_rule, simulate
from congressctl.policy.topdown import trace_query

Row = tuple

log = logging.getLogger("congressctl.pe")

MAX_PENDING_ACTIONS = 100_000
# Requests sent in the last RESEND_WINDOW_S are sent again when a new DSD process appears: one that died
# may not have run them, and requests sent while no DSD ran reached nobody. The DSD's executed ids (kept in
# Redis) make the repeats harmless.
RESEND_WINDOW_S = 30.0
RESEND_MAX = 20_000
# Rows given to the engine at once: a piece takes it some 25-50 ms, well under a heartbeat interval (20k took
# 100-240 ms on a loaded 2-core box, and heartbeats came late).
APPLY_ROWS = 10_000


@dataclass
class TableSync:
    ds_id: str
    ds_name: str
    table: str
    epoch: int = 0
    seq: int = 0
    resyncs: int = 0
    diffs: int = 0
    rows_applied: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)   # one change of the table at a time

    @property
    def key(self) -> str:
        return f"{self.ds_id}/{self.table}"

    @property
    def engine_table(self) -> str:
        return f"{self.ds_name}:{self.table}"


def action_id(datasource: str, action: str, args: tuple, cause: tuple) -> str:
    return hashlib.sha256(dumps([datasource, action, list(args), *cause]).encode()).hexdigest()[:32]


class PolicyNode:
    """The PE: an Engine plus a mirror of the store's definitions, kept in step by notices and full syncs."""

    def __init__(self, store: Store, node_id: str, incarnation: str, peer_timeout_s: float, hold_s: float, *,
                 metrics: ApiPeMetrics | None = None, skip_diffs: frozenset[str] = frozenset()):
        self.store = store
        self.metrics = metrics or ApiPeMetrics(MetricsConfig(record=False))
        self.peer_timeout_s = peer_timeout_s
        self.hold_s = hold_s
        self.node_id = node_id
        self.incarnation = incarnation
        self.engine = Engine()
        self.policies: dict[str, dict] = {}          # id -> policy
        self.rules: dict[str, dict[str, dict]] = {}  # policy id -> rule id -> rule
        self.datasources: dict[str, dict] = {}       # id -> datasource
        self.library: dict[str, dict] = {}           # id -> library policy (with its rules; not evaluated)
        self.tables: dict[tuple[str, str], TableSync] = {}
        self.dsd: DsdHeartbeat | None = None         # last DSD heartbeat
        self.dsd_received = 0.0                      # when it came (monotonic)
        self.outbox: asyncio.Queue[dict] = asyncio.Queue()
        self.loaded = False
        self.actions_sent = 0
        self.actions_dropped = 0
        self.touched: dict[str, float] = {}          # id -> when a notice or API write last changed it
        self.recent: deque[tuple[float, dict]] = deque(maxlen=RESEND_MAX)
        self.resending: set[str] = set()    # ids put in the outbox again by resend_recent, not yet sent
        self.notice_seq = 0                          # "nseq" of the last change notice applied (or synced past)
        self.notice_seen = asyncio.Event()
        self.catch_up_lock = asyncio.Lock()         # one full sync for all the requests that waited in vain
        self.resent = 0
        # table resyncs that jumped over diffs (a snapshot newer than the next seq): the diffs waiting behind the
        # resync are dropped as old, and a row that came and went among them derives no action on this PE; the
        # heartbeat reports it (PeHeartbeat.breaks) so that the DSD runs the other PEs' requests for them when
        # this PE is its leader (packet-delay: a resync over a delayed link held the reader 1.3 s, 48 rows lost)
        self.skips = 0
        self.skip_diffs = skip_diffs   # test hook: "ds:table:seq" of diffs to drop on arrival

    # -- lookups --------------------------------------------------------------------------------------
    def policy(self, ref: str) -> dict | None:
        return self.policies.get(ref) or next((p for p in self.policies.values() if p["name"] == ref), None)

    def datasource(self, ref: str) -> dict | None:
        return self.datasources.get(ref) or next((d for d in self.datasources.values() if d["name"] == ref), None)

    def library_policy(self, ref: str) -> dict | None:
        return self.library.get(ref) or next((p for p in self.library.values() if p["name"] == ref), None)

    def rule_list(self, policy_id: str) -> list[dict]:
        return sorted(self.rules.get(policy_id, {}).values(), key=lambda r: r.get("n", 0))

    # -- actions --------------------------------------------------------------------------------------
    def emit(self, result: Result, cause: tuple) -> None:
        if not self.loaded or not result.actions:
            return
        for a in result.actions:
            if self.outbox.qsize() >= MAX_PENDING_ACTIONS:
                self.actions_dropped += 1
                continue
            self.outbox.put_nowait({"id": action_id(a.datasource, a.name, a.args, cause), "ds": a.datasource,
                                    "action": a.name, "args": list(a.args)})

    def is_leader(self) -> bool:
        """Whether the DSD's last heartbeat names this PE its leader (also while no DSD or leader is known)."""
        leader = self.dsd.leader if self.dsd else None
        return not leader or (leader.node, leader.inc) == (self.node_id, self.incarnation)

    async def send_actions(self, bus: Bus) -> None:
        """Long-lived: publish queued requests, one message per batch; keep them while the bus is down."""
        batch: list[dict] = []
        while not bus.stopping:
            if not batch:
                batch.append(await self.outbox.get())
                if not self.is_leader():
                    await asyncio.sleep(self.hold_s)
            while not self.outbox.empty() and len(batch) < 1000:
                batch.append(self.outbox.get_nowait())
            try:
                heard = await bus.publish(bus.channels.action, {"pe": self.node_id, "inc": self.incarnation,
                                                                "reqs": batch})
            except BusError as exc:
                log.debug("action requests not sent yet: %s", exc)
                await asyncio.sleep(0.2)
                continue
            if not heard:
                # no DSD subscribed (it is starting, or not yet back on the bus after a failover): pub/sub would
                # drop them, so they wait; a claim keeps each action once when a copy arrives twice
                await asyncio.sleep(0.1)
                continue
            self.actions_sent += len(batch)
            now = time.monotonic()
            # a resent request keeps the time it was first sent: each reconnect would otherwise send the window
            # again and again, and refresh it for ever
            self.recent.extend((now, req) for req in batch if req["id"] not in self.resending)
            self.resending.difference_update(req["id"] for req in batch)
            batch = []

    def resend_recent(self, *, direct: bool) -> None:
        """Send the requests of the last RESEND_WINDOW_S again. `direct`: the DSD runs them whoever it takes as
        leader (a new DSD, which has heard none of them); else as they were sent, so a follower's stay buffered
        (one derived from a resync has another id than the leader's for the same row)."""
        horizon = time.monotonic() - RESEND_WINDOW_S
        again = list({req["id"]: req for sent, req in self.recent if sent >= horizon}.values())
        self.resending.update(req["id"] for req in again)
        for req in again:
            self.outbox.put_nowait({**req, "direct": True} if direct else req)
        self.resent += len(again)
        log.info("sending the last %d action request(s) again", len(again))

    # -- definitions ----------------------------------------------------------------------------------
    def _touch(self, object_id: str) -> None:
        self.touched[object_id] = time.monotonic()

    def apply_datasource(self, ds: dict, strict: bool = False) -> None:
        """Declare a datasource's tables. strict (an API create): a refused schema undoes it and raises."""
        if ds["id"] in self.datasources:
            return
        self._touch(ds["id"])
        self.datasources[ds["id"]] = ds
        for table, columns in table_columns(ds).items():
            try:
                self.emit(self.engine.declare_table(ds["name"], table, columns), ("schema", ds["id"], table))
            except PolicyError as exc:
                if strict:
                    self.drop_datasource(ds["id"])
                    raise
                log.error("datasource %s table %s not declared: %s", ds["name"], table, exc)
            self.tables[(ds["id"], table)] = TableSync(ds["id"], ds["name"], table)

    def drop_datasource(self, ds_id: str) -> None:
        ds = self.datasources.pop(ds_id, None)
        if ds is None:
            return
        self._touch(ds_id)
        for key in [k for k in self.tables if k[0] == ds_id]:
            del self.tables[key]
        self.engine.drop_datasource(ds["name"])

    def apply_policy(self, policy: dict) -> None:
        if policy["id"] in self.policies:
            return
        try:
            self.engine.create_policy(policy["name"])
        except PolicyError as exc:
            if exc.kind != "exists":
                raise
        self._touch(policy["id"])
        self.policies[policy["id"]] = policy
        self.rules.setdefault(policy["id"], {})

    def drop_policy(self, policy_id: str) -> None:
        policy = self.policies.pop(policy_id, None)
        self.rules.pop(policy_id, None)
        self._touch(policy_id)
        if policy is not None and policy["name"] in self.engine.policies():
            self.engine.delete_policy(policy["name"])

    def check_rule(self, policy: dict, text: str) -> None:
        """Check a rule as Congress checks one for the policy's kind (PolicyError): an action policy's rules
        (update heads t+/t-, action("name") facts) are checked here and never evaluated; a database policy
        holds facts only; the other kinds are evaluated by the engine."""
        if policy.get("kind") == "action":
            check_action_rule(self.engine, policy["name"], text)
            return
        if policy.get("kind") == "database" and parse_statement(text).body:
            raise PolicyError(f"a database policy holds facts only, not rules: {' '.join(text.split())}",
                              kind="invalid", rule=text, position=0)
        self.engine.check_rule(policy["name"], text)

    def apply_rule(self, policy_id: str, rule: dict) -> None:
        policy = self.policies.get(policy_id)
        if policy is None or rule["id"] in self.rules.get(policy_id, {}):
            return
        if policy.get("kind") == "action":
            check_action_rule(self.engine, policy["name"], rule["rule"])
            result = Result()
        else:
            _, result = self.engine.add_rule(policy["name"], rule["rule"], rule_id=rule["id"])
        self._touch(rule["id"])
        self.rules[policy_id][rule["id"]] = rule
        self.emit(result, ("rule", rule["id"]))

    def drop_rule(self, policy_id: str, rule_id: str) -> None:
        policy = self.policies.get(policy_id)
        if policy is None or self.rules.get(policy_id, {}).pop(rule_id, None) is None:
            return
        self._touch(rule_id)
        if policy.get("kind") != "action":
            self.engine.delete_rule(policy["name"], rule_id)

    def apply_library_policy(self, policy: dict) -> None:
        self._touch(policy["id"])
        self.library[policy["id"]] = policy

    def drop_library_policy(self, policy_id: str) -> None:
        self._touch(policy_id)
        self.library.pop(policy_id, None)

    # -- trace and simulate ---------------------------------------------------------------------------
    def abbreviations(self) -> dict[str, str]:
        return {p["name"]: p.get("abbreviation") or p["name"][:5] for p in self.policies.values()}

    def trace_rows(self, policy: dict, table: str) -> tuple[list[tuple], str]:
        """The rows of a policy table and the trace of their derivation (topdown.py)."""
        found = self.engine.table(f"{policy['name']}:{table}")
        arity = found.arity if found is not None else 0
        pattern = f"{table}({', '.join(f'x{i}' for i in range(arity))})" if arity else table
        return trace_query(self.engine, pattern, policy["name"], self.abbreviations())

    def simulate(self, policy: dict, *, query: str, sequence: str, action_policy: dict | None, delta: bool,
                 trace: bool) -> tuple[list[str], str | None]:
        """Congress's simulate on the engine's current state; changes nothing (simulate.py)."""
        rules = [r["rule"] for r in self.rule_list(action_policy["id"])] if action_policy else []
        return simulate(self.engine, policy=policy["name"], query=query, sequence=sequence,
                        action_policy=action_policy["name"] if action_policy else None, action_rules=rules,
                        delta=delta, trace=trace, abbreviations=self.abbreviations())

    def on_notice(self, data: dict) -> None:
        """Apply another node's change (this node's API handlers apply their own writes themselves)."""
        self._saw_notices_up_to(data.get("nseq"))
        if data.get("origin") == self.store.origin:
            return
        kind, op = data.get("kind"), data.get("op")
        try:
            if kind == "datasource" and op == "create":
                self.apply_datasource(data["datasource"])
            elif kind == "datasource" and op == "delete":
                self.drop_datasource(data["datasource"]["id"])
            elif kind == "policy" and op == "create":
                self.apply_policy(data["policy"])
            elif kind == "policy" and op == "delete":
                self.drop_policy(data["policy"]["id"])
            elif kind == "rule" and op == "create":
                self.apply_rule(data["policy_id"], data["rule"])
            elif kind == "rule" and op == "delete":
                self.drop_rule(data["policy_id"], data["rule_id"])
            elif kind == "library" and op == "create":
                self.apply_library_policy(data["policy"])
            elif kind == "library" and op == "delete":
                self.drop_library_policy(data["policy"]["id"])
        except (PolicyError, KeyError, TypeError) as exc:
            log.error("notice %s %s not applied: %s (the full sync will retry)", kind, op, exc)

    def _saw_notices_up_to(self, nseq: Any) -> None:
        if isinstance(nseq, int) and nseq > self.notice_seq:
            self.notice_seq = nseq
            self.notice_seen.set()

    async def catch_up(self, timeout_s: float = 1.0) -> None:
        """Return once every change notice published before the call is applied here (a full sync when one
        does not come within timeout_s: it was lost). So a client that creates a policy through one API node
        and adds a rule through another, as a load balancer sends them, finds its policy. Requests whose wait
        ends at the same moment share one full sync."""
        target = await self.store.notice_seq()
        deadline = time.monotonic() + timeout_s
        while True:
            self.notice_seen.clear()
            if self.notice_seq >= target:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                async with self.catch_up_lock:
                    if self.notice_seq < target:   # else a full sync while we waited for the lock did it
                        log.warning("notices up to %d not seen within %.1fs (have %d): full sync", target,
                                    timeout_s, self.notice_seq)
                        await self.full_sync()
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):   # not wait_for: on 3.11 it can drop a cancellation
                    await self.notice_seen.wait()

    async def full_sync(self) -> None:
        """Make the mirror equal the store (safety net after reconnects and missed notices).

        The store is read with several commands; an object changed by a notice or an API write after the
        read began is newer than what was read and is left alone.
        """
        started = time.monotonic()
        self.metrics.full_syncs.inc()
        nseq = await self.store.notice_seq()   # read first: every later change comes as a notice
        datasources = {d["id"]: d for d in await self.store.datasources()}
        policies = {p["id"]: p for p in await self.store.policies()}
        rules = {pid: await self.store.rules(pid) for pid in policies}
        library = {p["id"]: p for p in await self.store.library_policies()}
        self.touched = {k: t for k, t in self.touched.items() if t >= started}
        # frozen before applying: what this sync applies touches objects too, and must not hide their rules
        stale = set(self.touched).__contains__
        for pid in [p for p in self.policies if p not in policies and not stale(p)]:
            self.drop_policy(pid)
        for pid, policy_rules in rules.items():
            wanted = {r["id"] for r in policy_rules}
            for rid in [r for r in self.rules.get(pid, {}) if r not in wanted and not stale(r)]:
                self.drop_rule(pid, rid)
        for lib_id in [p for p in self.library if p not in library and not stale(p)]:
            self.drop_library_policy(lib_id)
        for lib in library.values():
            if not stale(lib["id"]):
                self.apply_library_policy(lib)
        for ds_id in [d for d in self.datasources if d not in datasources and not stale(d)]:
            self.drop_datasource(ds_id)
        for ds in datasources.values():
            if not stale(ds["id"]):
                self.apply_datasource(ds)
        for policy in policies.values():
            if not stale(policy["id"]):
                try:
                    self.apply_policy(policy)
                except PolicyError as exc:
                    # stored by a node whose answer was lost before it could take it back (a 503 mid-write)
                    log.error("policy %s refused by the engine: %s", policy["name"], exc)
        for pid, policy_rules in rules.items():
            for rule in [r for r in policy_rules if not stale(r["id"]) and not stale(pid)]:
                try:
                    self.apply_rule(pid, rule)
                except PolicyError as exc:
                    log.error("rule %s of policy %s refused by the engine: %s", rule["id"],
                              policies[pid]["name"], exc)
        for state in list(self.tables.values()):
            await self.resync(state)
        self._saw_notices_up_to(nseq)
        self.loaded = True

    # -- tables ---------------------------------------------------------------------------------------
    async def resync(self, state: TableSync) -> None:
        async with state.lock:
            await self._resync(state)

    async def _resync(self, state: TableSync) -> None:
        """Replace the table from the stored snapshot when that is newer than what we hold. Its (epoch, seq)
        is read first, so the periodic full sync reads no rows of a table already in step (reading and
        parsing 100k rows takes the loop away for about half a second)."""
        if await self.store.snapshot_meta(state.ds_id, state.table) <= (state.epoch, state.seq):
            return
        snap = await self.store.snapshot(state.ds_id, state.table)
        if self.tables.get((state.ds_id, state.table)) is not state:
            return
        if (snap.epoch, snap.seq) <= (state.epoch, state.seq):
            return
        result = await self._replace(state, snap.rows)
        if self.loaded and (snap.epoch, snap.seq) != (state.epoch, state.seq + 1):
            # diffs skipped: rows that came and went meanwhile derive no action here (see skips)
            self.skips += 1
        state.epoch, state.seq = snap.epoch, snap.seq
        state.resyncs += 1
        state.rows_applied += len(snap.rows)
        log.info("table %s replaced from snapshot (epoch %d, seq %d, %d rows)", state.engine_table,
                 snap.epoch, snap.seq, len(snap.rows))
        self.emit(result, ("table", state.key, snap.epoch, snap.seq))

    async def on_diff(self, msg: dict) -> None:
        state = self.tables.get((msg.get("ds_id", ""), msg.get("table", "")))
        if state is None:
            return
        async with state.lock:
            await self._on_diff(state, msg)

    async def _on_diff(self, state: TableSync, msg: dict) -> None:
        epoch, seq = int(msg["epoch"]), int(msg["seq"])
        if epoch < state.epoch or (epoch == state.epoch and seq <= state.seq):
            return
        if f"{state.engine_table}:{seq}" in self.skip_diffs:
            log.warning("test hook: diff %s:%d dropped", state.engine_table, seq)
            return
        cause = ("table", state.key, epoch, seq)
        if msg.get("staged"):
            # a large full publication: its rows are the snapshot, read in pieces
            await self._resync(state)
            return
        started = time.perf_counter()
        if msg.get("full"):
            rows = compact_rows(msg["rows"])
            result = await self._replace(state, rows)
            state.rows_applied += len(rows)
        elif epoch == state.epoch and seq == state.seq + 1:
            if "chunk" in msg:
                read = await self.store.chunk_rows(str(msg["chunk"]), int(msg["n_add"]), int(msg["n_del"]))
                if read is None or self.tables.get((state.ds_id, state.table)) is not state:
                    log.info("table %s: diff (%d, %d) gone from the store: resync", state.engine_table, epoch, seq)
                    await self._resync(state)
                    return
                added, deleted = read
            else:
                added, deleted = compact_rows(msg["add"]), compact_rows(msg["del"])
            result = await self._update(state, added, deleted)
            state.rows_applied += len(added) + len(deleted)
        else:
            log.info("table %s: have (%d, %d), got (%d, %d): resync", state.engine_table, state.epoch,
                     state.seq, epoch, seq)
            await self._resync(state)
            return
        self.metrics.diff_eval(time.perf_counter() - started)
        state.epoch, state.seq = epoch, seq
        state.diffs += 1
        self.emit(result, cause)

    async def _replace(self, state: TableSync, rows: Any) -> Result:
        """The engine's table becomes `rows`: at once when small, else as a diff applied in pieces."""
        table = state.engine_table
        if len(rows) <= APPLY_ROWS:
            return self.engine.replace_table(table, rows)
        try:
            current = self.engine.rows(table)
        except PolicyError:
            current = set()
        new = rows if isinstance(rows, set) else set(rows)
        added = await minus(new, current) if current else new
        return await self._update(state, list(added), list(await minus(current, new)))

    async def _update(self, state: TableSync, added: list[Row], deleted: list[Row]) -> Result:
        """Apply a diff to the engine: at once when small, else in pieces (deletions first, as the engine
        does), yielding between them; the pieces' actions in one Result."""
        table = state.engine_table
        if len(added) + len(deleted) <= APPLY_ROWS:
            return self.engine.update({table: (added, deleted)})
        result = Result()
        pieces: list[tuple[list[Row], list[Row]]] = [([], deleted[i:i + APPLY_ROWS])
                                                     for i in range(0, len(deleted), APPLY_ROWS)]
        pieces += [(added[i:i + APPLY_ROWS], []) for i in range(0, len(added), APPLY_ROWS)]
        for piece in pieces:
            result.actions.extend(self.engine.update({table: piece}).actions)
            self.store.busy()
            await asyncio.sleep(0)
        return result

    async def on_dsd_heartbeat(self, beat: DsdHeartbeat) -> None:
        epoch = beat.epoch or 0
        now = time.monotonic()
        if (self.dsd is not None and epoch < (self.dsd.epoch or 0)
                and now - self.dsd_received < self.peer_timeout_s):
            return   # a stale DSD (paused, replaced) still beating until it notices
        previous = self.dsd
        self.dsd, self.dsd_received = beat, now
        if previous is None or previous.inc != beat.inc:
            log.info("DSD %s incarnation %s heard (epoch %s)", beat.node, beat.inc, beat.epoch)
            if previous is not None:
                self.resend_recent(direct=True)
        for state in list(self.tables.values()):
            seen = beat.tables.get(state.key)
            if not seen or seen[0] is None:
                continue
            if (int(seen[0]), int(seen[1])) > (state.epoch, state.seq):
                log.info("table %s: DSD heartbeat shows (%s, %s), have (%d, %d): resync",
                         state.engine_table, seen[0], seen[1], state.epoch, state.seq)
                await self.resync(state)

    # -- status ---------------------------------------------------------------------------------------
    def table_status(self) -> list[TableView]:
        dsd_tables = self.dsd.tables if self.dsd else {}
        out = []
        for state in sorted(self.tables.values(), key=lambda s: s.engine_table):
            seen = dsd_tables.get(state.key) or [None, None]
            lag = None
            if seen[0] is not None:
                lag = 0 if seen[0] == state.epoch and seen[1] <= state.seq else (
                    seen[1] - state.seq if seen[0] == state.epoch else None)
            out.append(TableView(table=state.engine_table, datasource_id=state.ds_id, epoch=state.epoch,
                                 seq=state.seq, dsd_epoch=seen[0], dsd_seq=seen[1], lag=lag,
                                 diffs_applied=state.diffs, rows_applied=state.rows_applied,
                                 resyncs=state.resyncs))
        return out


def rows_of(engine: Engine, table: str) -> list[tuple]:
    return sorted(engine.rows(table), key=lambda r: tuple(map(str, r)))

