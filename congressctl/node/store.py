"""The durable store in Redis: policies, rules, datasource definitions, pushed data, table snapshots,
executed action ids. Every write that others must hear about publishes its notice inside the same Lua
script, so the store and the notice never disagree and a failed write leaves nothing half-done.

Keys (prefix congress:<cluster>:):
  policy-names  hash name -> id        policies  hash id -> policy JSON
  rules:<pid>   hash rule id -> rule JSON (with "n", a cluster-wide counter, for insertion order)
  ds-names      hash name -> id        datasources  hash id -> datasource JSON
  pushed:<dsid>:<table>   JSON list of rows last pushed through the API
  pushver:<dsid>:<table>  counter: the version of those rows (one more for every push)
  snap:<dsid>:<table>     set of canonical row JSON       snapmeta:<dsid>:<table>  hash epoch, seq
  notice-seq    counter: every change notice carries the next ("nseq"), so a node can tell it has applied
                every notice published before a given moment (PolicyNode.catch_up)
  epoch         counter: every DSD start takes the next
  executed:<action id>   "run:<epoch>" while that DSD's POST is unanswered, then "done"; with a TTL

With `sync_replicas` > 0 every write (each script above, the epoch counter) is sent with `WAIT sync_replicas
<ms>` on the same connection, and is acknowledged only when that many replicas have it: a write the master
refuses (too few replicas in sync: `min-replicas-to-write`) did not happen; a write no replica confirmed in
time raises NotReplicatedError and may or may not be kept by the next master, but is whole if it is (one
script each).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from congressctl.bus import Channels, command, dumps
from congressctl.errors import NotReplicatedError

# How long a write waits for its replicas: long enough for a replica on a loaded LAN, short enough that a client
# hears of a lost replica well before its own timeout (and the bus failover takes over).
REPLICA_WAIT_MS = 1000

Row = tuple

# Every notice is passed open (its JSON without the closing brace) and closed here with its "nseq".
# KEYS: names, defs, notice-seq; ARGV: name, id, definition JSON, channel, notice
_CREATE_NAMED = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5] .. ',"nseq":' .. redis.call('INCR', KEYS[3]) .. '}')
return 1
"""

# KEYS: names, defs, notice-seq, then keys to delete with the object; ARGV: name, id, channel, notice
_DELETE_NAMED = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[2])
for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('PUBLISH', ARGV[3], ARGV[4] .. ',"nseq":' .. redis.call('INCR', KEYS[3]) .. '}')
return 1
"""

# KEYS: policies, rules:<pid>, rule counter, notice-seq; ARGV: pid, rule id, rule JSON prefix (closed here with
# "n"), channel, notice prefix (the rule goes last)
_ADD_RULE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return -1 end
local n = redis.call('INCR', KEYS[3])
local rule = ARGV[3] .. ',"n":' .. n .. '}'
redis.call('HSET', KEYS[2], ARGV[2], rule)
redis.call('PUBLISH', ARGV[4], ARGV[5] .. rule .. ',"nseq":' .. redis.call('INCR', KEYS[4]) .. '}')
return n
"""

# KEYS: rules:<pid>, notice-seq; ARGV: rule id, channel, notice
_DELETE_RULE = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('PUBLISH', ARGV[2], ARGV[3] .. ',"nseq":' .. redis.call('INCR', KEYS[2]) .. '}')
return 1
"""

# KEYS: pushed rows key, datasources, push version; ARGV: ds id, rows JSON, channel, notice prefix (closed here
# with the version and the rows, so the DSD needs no read back)
_PUSH = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
local v = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[3], ARGV[4] .. '"v":' .. v .. ',"rows":' .. ARGV[2] .. '}')
return 1
"""

# A DSD publishes one table change. KEYS: snap set, snapmeta. ARGV: epoch, seq, n_add, n_del, channel,
# message prefix, publish (1/0), full (1/0), then n_add added rows, then n_del deleted rows.
# Refused (-1) when the store already holds a newer epoch: that DSD is stale (paused, replaced).
_PUBLISH_TABLE = """
local cur = tonumber(redis.call('HGET', KEYS[2], 'epoch') or '0')
local epoch = tonumber(ARGV[1])
if cur > epoch then return -1 end
local n_add = tonumber(ARGV[3])
local n_del = tonumber(ARGV[4])
local full = ARGV[8] == '1'
local added = {}
local deleted = {}
for i = 1, n_add do added[i] = ARGV[8 + i] end
for i = 1, n_del do deleted[i] = ARGV[8 + n_add + i] end
if full then redis.call('DEL', KEYS[1]) end
for i = 1, n_del, 5000 do
  redis.call('SREM', KEYS[1], unpack(deleted, i, math.min(i + 4999, n_del)))
end
for i = 1, n_add, 5000 do
  redis.call('SADD', KEYS[1], unpack(added, i, math.min(i + 4999, n_add)))
end
redis.call('HSET', KEYS[2], 'epoch', ARGV[1], 'seq', ARGV[2])
if ARGV[7] == '1' then
  local msg
  if full then
    msg = ARGV[6] .. '"full":true,"rows":[' .. table.concat(added, ',') .. ']}'
  else
    msg = ARGV[6] .. '"add":[' .. table.concat(added, ',') .. '],"del":[' .. table.concat(deleted, ',') .. ']}'
  end
  redis.call('PUBLISH', ARGV[5], msg)
end
return 1
"""


# A DSD's one round trip for its executed ids. KEYS: epoch counter, executed:<id> of each action to claim,
# then of each action whose POST was answered. ARGV: the DSD's epoch, TTL, number of claims.
# The answered ones become "done". Then -1 when a newer epoch exists (this DSD is stale), else per claim
# 1 (run it) or 0 (done, or running on this DSD). A claim still "run:<older epoch>" belongs to a DSD that
# died or was cut off before its POST was answered: it is taken over, since that POST may never have arrived.
_SETTLE = """
local epoch = tonumber(ARGV[1])
local n_claim = tonumber(ARGV[3])
for i = n_claim + 2, #KEYS do redis.call('SET', KEYS[i], 'done', 'XX', 'KEEPTTL') end
if tonumber(redis.call('GET', KEYS[1]) or '0') > epoch then return -1 end
local out = {}
for i = 2, n_claim + 1 do
  local v = redis.call('GET', KEYS[i])
  if not v or (string.sub(v, 1, 4) == 'run:' and tonumber(string.sub(v, 5)) < epoch) then
    redis.call('SET', KEYS[i], 'run:' .. ARGV[1], 'EX', ARGV[2])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""


def open_json(obj: dict) -> str:
    """A JSON object without its closing brace, for a script to add a last member to."""
    return dumps(obj)[:-1]


def row_key(row: Iterable[Any]) -> str:
    """Canonical JSON of a row: the member stored in a snapshot set and sent in diffs."""
    return dumps(list(row))


def row_from_key(text: str) -> Row:
    return tuple(json.loads(text))


@dataclass
class Snapshot:
    epoch: int
    seq: int
    rows: set[Row]


class Store:
    """Typed access to the store; every method raises BusError when Redis cannot be reached."""

    def __init__(self, client: aioredis.Redis, channels: Channels, origin: str = "", *, sync_replicas: int = 0):
        self.redis = client
        self.ch = channels
        self.origin = origin   # written into change notices, so a node can skip its own
        self.sync_replicas = sync_replicas
        self._loaded: set[str] = set()    # scripts this store loaded (a new master after a failover may lack them)
        k = channels.key
        self.k_policy_names = k("policy-names")
        self.k_policies = k("policies")
        self.k_ds_names = k("ds-names")
        self.k_datasources = k("datasources")
        self.k_rule_counter = k("rule-counter")
        self.k_epoch = k("epoch")
        self.k_notice_seq = k("notice-seq")
        self._create_named = client.register_script(_CREATE_NAMED)
        self._delete_named = client.register_script(_DELETE_NAMED)
        self._add_rule = client.register_script(_ADD_RULE)
        self._delete_rule = client.register_script(_DELETE_RULE)
        self._push = client.register_script(_PUSH)
        self._publish_table = client.register_script(_PUBLISH_TABLE)
        self._settle = client.register_script(_SETTLE)

    def k_rules(self, policy_id: str) -> str:
        return self.ch.key("rules", policy_id)

    def k_pushed(self, ds_id: str, table: str) -> str:
        return self.ch.key("pushed", ds_id, table)

    def k_pushver(self, ds_id: str, table: str) -> str:
        return self.ch.key("pushver", ds_id, table)

    def k_snap(self, ds_id: str, table: str) -> str:
        return self.ch.key("snap", ds_id, table)

    def k_snapmeta(self, ds_id: str, table: str) -> str:
        return self.ch.key("snapmeta", ds_id, table)

    async def _call(self, coro: Any) -> Any:
        return await command(coro, "store unreachable")

    async def _write(self, script: AsyncScript, keys: list, args: list) -> Any:
        """Run a write script; with sync_replicas, acknowledged only once that many replicas have it."""
        if not self.sync_replicas:
            return await self._call(script(keys=keys, args=args))
        if script.sha not in self._loaded:
            # loaded once ahead: a NOSCRIPT answer would cost the WAIT sent with it (its whole timeout, when
            # replicas are missing)
            await self._call(self.redis.script_load(script.script))
            self._loaded.add(script.sha)
        return await self._call(self._replicated("EVALSHA", script.sha, len(keys), *keys, *args, script=script))

    async def _replicated(self, *command_args: Any, script: AsyncScript | None = None) -> Any:
        """One command and its WAIT in one round trip on one connection (WAIT counts the replicas that
        have every write of that connection so far). A script Redis does not know yet is loaded and sent again:
        NOSCRIPT means it did not run."""
        for _ in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.execute_command(*command_args)
                pipe.execute_command("WAIT", self.sync_replicas, REPLICA_WAIT_MS)
                result, acked = await pipe.execute(raise_on_error=False)
            if isinstance(result, NoScriptError) and script is not None:
                await self.redis.script_load(script.script)
                continue
            if isinstance(result, ResponseError) and str(result).startswith("NOREPLICAS"):
                raise NotReplicatedError(f"refused by the bus, nothing written: fewer than {self.sync_replicas} "
                                         "replica(s) in sync")
            if isinstance(result, Exception):
                raise result
            if isinstance(acked, Exception):
                raise acked
            if acked < self.sync_replicas:
                raise NotReplicatedError(f"not confirmed by {self.sync_replicas} replica(s) within "
                                         f"{REPLICA_WAIT_MS} ms (confirmed by {acked}): it may or may not have "
                                         "been kept; read it back before retrying")
            return result
        raise NotReplicatedError("the bus lost its scripts twice in a row; nothing written")

    # -- policies -------------------------------------------------------------------------------------
    async def create_policy(self, policy: dict) -> bool:
        """False when the name is taken (nothing written)."""
        notice = open_json({"origin": self.origin, "kind": "policy", "op": "create", "policy": policy})
        done = await self._write(self._create_named, [self.k_policy_names, self.k_policies, self.k_notice_seq],
                                 [policy["name"], policy["id"], dumps(policy), self.ch.notice, notice])
        return bool(done)

    async def delete_policy(self, policy: dict) -> bool:
        notice = open_json({"origin": self.origin, "kind": "policy", "op": "delete", "policy": policy})
        done = await self._write(
            self._delete_named, [self.k_policy_names, self.k_policies, self.k_notice_seq, self.k_rules(policy["id"])],
            [policy["name"], policy["id"], self.ch.notice, notice])
        return bool(done)

    async def policies(self) -> list[dict]:
        raw = await self._call(self.redis.hgetall(self.k_policies))
        return sorted((json.loads(v) for v in raw.values()), key=lambda p: p["name"])

    async def add_rule(self, policy: dict, rule: dict) -> dict | None:
        """Store a rule (None when its policy is gone); returns the stored rule with its order number."""
        body = open_json(rule)
        notice_prefix = open_json({"origin": self.origin, "kind": "rule", "op": "create", "policy": policy["name"],
                                   "policy_id": policy["id"]}) + ',"rule":'
        n = await self._write(
            self._add_rule, [self.k_policies, self.k_rules(policy["id"]), self.k_rule_counter, self.k_notice_seq],
            [policy["id"], rule["id"], body, self.ch.notice, notice_prefix])
        if n < 0:
            return None
        return {**rule, "n": n}

    async def delete_rule(self, policy: dict, rule_id: str) -> bool:
        notice = open_json({"origin": self.origin, "kind": "rule", "op": "delete", "policy": policy["name"],
                            "policy_id": policy["id"], "rule_id": rule_id})
        done = await self._write(self._delete_rule, [self.k_rules(policy["id"]), self.k_notice_seq],
                                 [rule_id, self.ch.notice, notice])
        return bool(done)

    async def rules(self, policy_id: str) -> list[dict]:
        raw = await self._call(self.redis.hgetall(self.k_rules(policy_id)))
        return sorted((json.loads(v) for v in raw.values()), key=lambda r: r.get("n", 0))

    # -- datasources ----------------------------------------------------------------------------------
    async def create_datasource(self, ds: dict) -> bool:
        notice = open_json({"origin": self.origin, "kind": "datasource", "op": "create", "datasource": ds})
        done = await self._write(self._create_named, [self.k_ds_names, self.k_datasources, self.k_notice_seq],
                                 [ds["name"], ds["id"], dumps(ds), self.ch.notice, notice])
        return bool(done)

    async def delete_datasource(self, ds: dict) -> bool:
        notice = open_json({"origin": self.origin, "kind": "datasource", "op": "delete", "datasource": ds})
        extra = []
        for table in ds["config"].get("tables", {}):
            extra += [self.k_pushed(ds["id"], table), self.k_pushver(ds["id"], table), self.k_snap(ds["id"], table),
                      self.k_snapmeta(ds["id"], table)]
        done = await self._write(self._delete_named, [self.k_ds_names, self.k_datasources, self.k_notice_seq, *extra],
                                 [ds["name"], ds["id"], self.ch.notice, notice])
        return bool(done)

    async def datasources(self) -> list[dict]:
        raw = await self._call(self.redis.hgetall(self.k_datasources))
        return sorted((json.loads(v) for v in raw.values()), key=lambda d: d["name"])

    async def datasource(self, ds_id: str) -> dict | None:
        raw = await self._call(self.redis.hget(self.k_datasources, ds_id))
        return json.loads(raw) if raw else None

    # -- pushed data ----------------------------------------------------------------------------------
    async def push_rows(self, ds: dict, table: str, rows: list[list]) -> bool:
        """Keep the rows pushed through the API and tell the DSD (the notice carries them and their version);
        False when the datasource is gone."""
        prefix = open_json({"ds_id": ds["id"], "table": table}) + ","
        done = await self._write(
            self._push, [self.k_pushed(ds["id"], table), self.k_datasources, self.k_pushver(ds["id"], table)],
            [ds["id"], dumps(rows), self.ch.push, prefix])
        return bool(done)

    async def pushed_rows(self, ds_id: str, table: str) -> tuple[int, list[Row]]:
        """The rows last pushed and their version (0: never pushed), read together."""
        raw, version = await self._call(self.redis.mget(self.k_pushed(ds_id, table), self.k_pushver(ds_id, table)))
        return int(version or 0), [tuple(r) for r in json.loads(raw)] if raw else []

    async def pushed_version(self, ds_id: str, table: str) -> int:
        return int(await self._call(self.redis.get(self.k_pushver(ds_id, table))) or 0)

    # -- snapshots ------------------------------------------------------------------------------------
    async def publish_table(self, ds_id: str, ds_name: str, table: str, epoch: int, seq: int,
                            added: list[str], deleted: list[str], full: bool, publish: bool = True) -> bool:
        """Atomically update the snapshot and (epoch, seq) and publish the diff. False: a newer epoch owns it."""
        prefix = open_json({"ds_id": ds_id, "ds": ds_name, "table": table, "epoch": epoch, "seq": seq}) + ","
        done: int = await self._write(
            self._publish_table, [self.k_snap(ds_id, table), self.k_snapmeta(ds_id, table)],
            [epoch, seq, len(added), len(deleted), self.ch.diff, prefix, int(publish), int(full),
             *added, *deleted])
        return done == 1

    async def snapshot(self, ds_id: str, table: str) -> Snapshot:
        """(epoch, seq) and rows read in one MULTI/EXEC, so they always agree."""
        async def read() -> Any:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.k_snapmeta(ds_id, table))
                pipe.smembers(self.k_snap(ds_id, table))
                return await pipe.execute()
        meta, members = await self._call(read())
        return Snapshot(epoch=int(meta.get("epoch", 0)), seq=int(meta.get("seq", 0)),
                        rows={row_from_key(m) for m in members})

    async def snapshot_meta(self, ds_id: str, table: str) -> tuple[int, int]:
        meta = await self._call(self.redis.hgetall(self.k_snapmeta(ds_id, table)))
        return int(meta.get("epoch", 0)), int(meta.get("seq", 0))

    # -- DSD bookkeeping ------------------------------------------------------------------------------
    async def next_epoch(self) -> int:
        if self.sync_replicas:
            return int(await self._call(self._replicated("INCR", self.k_epoch)))
        return int(await self._call(self.redis.incr(self.k_epoch)))

    async def notice_seq(self) -> int:
        """The "nseq" of the last change notice published."""
        return int(await self._call(self.redis.get(self.k_notice_seq)) or 0)

    async def current_epoch(self) -> int:
        return int(await self._call(self.redis.get(self.k_epoch)) or 0)

    def k_executed(self, action_id: str) -> str:
        return self.ch.key("executed", action_id)

    async def settle_actions(self, claim: list[str], answered: list[str], epoch: int, ttl_s: int) -> list[bool] | None:
        """Mark `answered` done, then say for each id of `claim` whether this DSD may POST it now: once per id
        and epoch, and again by a newer epoch while no DSD has seen its POST answered. None when a newer epoch
        exists (this DSD is stale). One round trip."""
        keys = [self.k_epoch, *map(self.k_executed, claim), *map(self.k_executed, answered)]
        done = await self._write(self._settle, keys, [epoch, ttl_s, len(claim)])
        return None if done == -1 else [bool(d) for d in done]
