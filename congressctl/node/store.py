"""The durable store in Redis: policies, rules, datasource definitions, pushed data, table snapshots,
executed action ids. Every write that others must hear about publishes its notice inside the same Lua
script, so the store and the notice never disagree and a failed write leaves nothing half-done.

Keys (prefix congress:<cluster>:):
  policy-names  hash name -> id        policies  hash id -> policy JSON
  rules:<pid>   hash rule id -> rule JSON (with "n", a cluster-wide counter, for insertion order)
  ds-names      hash name -> id        datasources  hash id -> datasource JSON
  library-names hash name -> id        library  hash id -> library policy JSON (with its rules; not evaluated)
  pushed:<dsid>:<table>   set of canonical row JSON last pushed through the API
  pushver:<dsid>:<table>  counter: the version of those rows (one more for every push)
  pushlog:<dsid>:<table>  hash version -> the difference that push made: {"add": [...], "del": [...]} when it
                          fits a message, else "n_add,n_del" and the rows in the sets
                          pushlog:<dsid>:<table>:<v>:add and :del, or "whole" (a table's first rows: no copy).
                          A replace is published as a diff, and a DSD that missed notices reads every diff it
                          missed, in order. Trimmed by the DSD once it published a version, and to the last
                          PUSH_LOG_MAX by every push
  pushtmp:<dsid>:<table>[:<token>]  rows of a push being staged (chunks of a large one; expires)
  chunk:<dsid>:<table>:<epoch>:<seq>  list of a large diff's rows (added, then deleted; expires): its notice
                          names it instead of carrying rows
  snapnew:<dsid>:<table>  a large full publication's rows, staged in chunks, renamed to snap by the script
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

import asyncio
import contextlib
import itertools
import json
import secrets
import sys
from collections.abc import AsyncIterator, Callable, Container, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from congressctl.bus import Channels, command, dumps
from congressctl.errors import BusError, NotReplicatedError

# How long a write waits for its replicas: long enough for a replica on a loaded LAN, short enough that a client
# hears of a lost replica well before its own timeout (and the bus failover takes over).
REPLICA_WAIT_MS = 1000
# How Redis begins its answer to every write while its last save failed (append-only file or snapshot: a full
# disk, a failing one): the write did not happen, and writes are taken again once a save succeeds.
CANNOT_SAVE = "MISCONF"

Row = tuple
T = TypeVar("T")

# No pub/sub message may exceed this: Redis cuts a subscriber whose output buffer passes its limit (32 MB), and
# one large message to every subscriber takes the bus from all of them. Rows beyond INLINE_BYTES travel through
# the store in chunks, with a small notice naming them.
MESSAGE_MAX_BYTES = 512 * 1024
INLINE_BYTES = 256 * 1024
# Rows per command when rows move in pieces: each piece costs the event loop (and Redis) a few milliseconds,
# well under a heartbeat.
CHUNK_ROWS = 10_000
# Push versions whose diffs the store keeps for a DSD that missed their notices or is slow to publish them;
# further behind, it reads the pushed rows whole and the rows that came and went meanwhile are never acted on.
# A DSD whose bus round trips are slow (100 ms of packet delay on its host) publishes a few versions a second:
# at 50 pushes/s it fell 2-3 s behind, past the 64 versions this was (a chaos run lost 6 actions). 512 covers
# the DSD's bus grace (10 s) at 50 pushes/s; the DSD drops what it published, so it fills only while it lags.
PUSH_LOG_MAX = 512
# A large diff's rows stay this long for the PEs to read; a PE later than that resyncs from the snapshot.
CHUNK_TTL_S = 300
STAGE_TTL_S = 300
# A snapshot read in pieces starts again when a publication came meanwhile; after this many tries it is read in
# one MULTI/EXEC (which stops Redis for as long as it takes).
SNAPSHOT_TRIES = 3

# Every notice is passed open (its JSON without the closing brace) and closed here with its "nseq".
# KEYS: names, defs, notice-seq; ARGV: name, id, definition JSON, channel, notice
_CREATE_NAMED = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5] .. ',"nseq":' .. redis.call('INCR', KEYS[3]) .. '}')
return 1
"""

# KEYS: names, defs, notice-seq, then keys to delete with the object (UNLINK: a large table is freed off Redis's
# main thread); ARGV: name, id, channel, notice
_DELETE_NAMED = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[2])
for i = 4, #KEYS do redis.call('UNLINK', KEYS[i]) end
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

# A push replaces a table's rows, stored and published as the difference against the previous push.
# KEYS: staged rows, pushed rows, datasources, push version, push log index, then (mode 2) the staged rows'
# difference: added, deleted. ARGV: ds id, channel, notice prefix, log key prefix, mode, PUSH_LOG_MAX,
# INLINE_BYTES, base version, then the rows.
# mode 0: the rows follow, and a small table's difference is computed here (a large table's would stop Redis:
# NEEDS_STAGING, nothing written); 1: KEYS[1] holds the rows, the difference is computed here with SDIFFSTORE
# (O(N) in one go: the last resort); 2: KEYS[1] holds the rows and KEYS[6], KEYS[7] their difference against
# the pushed rows of version ARGV[8] (computed in pieces by _DIFF_PIECE): they become the log entry in O(1), or
# BASE_CHANGED when another push came since (nothing written).
# A staged key expires (STAGE_TTL_S) and RENAME carries its TTL along: every key renamed into place is PERSISTed,
# or the pushed rows, their log entry or the snapshot would vanish minutes later.
# Returns the version (0: no such datasource, nothing written).
_PUSH = """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then
  redis.call('UNLINK', KEYS[1])
  return 0
end
if ARGV[5] == '2' and (redis.call('GET', KEYS[4]) or '0') ~= ARGV[8] then return -1 end
if redis.call('TYPE', KEYS[2]).ok == 'string' then redis.call('DEL', KEYS[2]) end
if ARGV[5] == '0' and redis.call('SCARD', KEYS[2]) > 10000 then return -2 end
local v = redis.call('INCR', KEYS[4])
local add_key = ARGV[4] .. v .. ':add'
local del_key = ARGV[4] .. v .. ':del'
local added, deleted, n_add, n_del
local logged = false
local function each(cmd, key, rows)
  for i = 1, #rows, 5000 do redis.call(cmd, key, unpack(rows, i, math.min(i + 4999, #rows))) end
end
if ARGV[5] == '0' then
  -- small: the difference computed here, and applied to the pushed rows in place
  local new, old = {}, {}
  for i = 9, #ARGV do new[ARGV[i]] = true end
  added, deleted = {}, {}
  for _, r in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    old[r] = true
    if not new[r] then deleted[#deleted + 1] = r end
  end
  for i = 9, #ARGV do
    if not old[ARGV[i]] then
      added[#added + 1] = ARGV[i]
      old[ARGV[i]] = true
    end
  end
  each('SREM', KEYS[2], deleted)
  each('SADD', KEYS[2], added)
  n_add, n_del = #added, #deleted
else
  local added_in = add_key
  if redis.call('EXISTS', KEYS[2]) == 0 then
    -- the first rows (or the first after an empty push): the log keeps no copy of them, in O(1) (the DSD
    -- reads the pushed rows whole for such a version)
    added_in = KEYS[2]
    n_add, n_del = redis.call('SCARD', KEYS[1]), 0
    if n_add > 0 then
      redis.call('RENAME', KEYS[1], KEYS[2])
      redis.call('PERSIST', KEYS[2])
    end
    redis.call('HSET', KEYS[5], v, 'whole')
  else
    if ARGV[5] == '2' then
      n_add, n_del = redis.call('SCARD', KEYS[6]), redis.call('SCARD', KEYS[7])
      if n_add > 0 then
        redis.call('RENAME', KEYS[6], add_key)
        redis.call('PERSIST', add_key)
      end
      if n_del > 0 then
        redis.call('RENAME', KEYS[7], del_key)
        redis.call('PERSIST', del_key)
      end
    else
      n_add = redis.call('SDIFFSTORE', add_key, KEYS[1], KEYS[2])
      n_del = redis.call('SDIFFSTORE', del_key, KEYS[2], KEYS[1])
    end
    redis.call('UNLINK', KEYS[2])
    if redis.call('EXISTS', KEYS[1]) == 1 then
      redis.call('RENAME', KEYS[1], KEYS[2])
      redis.call('PERSIST', KEYS[2])
    end
    redis.call('HSET', KEYS[5], v, n_add .. ',' .. n_del)
  end
  logged = true
  if n_add + n_del <= 5000 then
    added, deleted = redis.call('SMEMBERS', added_in), redis.call('SMEMBERS', del_key)
  end
end
local diff
if added then
  local size = 0
  for _, r in ipairs(added) do size = size + #r + 1 end
  for _, r in ipairs(deleted) do size = size + #r + 1 end
  if size <= tonumber(ARGV[7]) then
    diff = '"add":[' .. table.concat(added, ',') .. '],"del":[' .. table.concat(deleted, ',') .. ']'
  end
end
if not logged then
  -- the small path's log entry: in the index itself when it fits a message, else in sets
  if diff then
    redis.call('HSET', KEYS[5], v, '{' .. diff .. '}')
  else
    each('SADD', add_key, added)
    each('SADD', del_key, deleted)
    redis.call('HSET', KEYS[5], v, n_add .. ',' .. n_del)
  end
end
local old = v - tonumber(ARGV[6])
if old > 0 and redis.call('HDEL', KEYS[5], old) == 1 then
  redis.call('UNLINK', ARGV[4] .. old .. ':add', ARGV[4] .. old .. ':del')
end
local msg = ARGV[3] .. '"v":' .. v .. ',"n_add":' .. n_add .. ',"n_del":' .. n_del
if diff then msg = msg .. ',' .. diff end
redis.call('PUBLISH', ARGV[2], msg .. '}')
return v
"""
BASE_CHANGED = -1
NEEDS_STAGING = -2

# One bounded step of a large push's difference: the members of KEYS[1] from one SSCAN step (ARGV[1] the
# cursor, ARGV[2] the COUNT) that KEYS[2] lacks, added to KEYS[3] (expiring after ARGV[3] s). Returns the next
# cursor ("0": done). Each step takes Redis a few milliseconds, so heartbeats and other commands go on between.
# A snapshot of at most ARGV[1] rows, with its (epoch, seq), in one round trip; no rows (nil) when larger (those are
# read in pieces). KEYS: snapmeta, snap.
_SMALL_SNAPSHOT = """
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
if redis.call('SCARD', KEYS[2]) > tonumber(ARGV[1]) then return {meta[1], meta[2], false} end
return {meta[1], meta[2], redis.call('SMEMBERS', KEYS[2])}
"""

_DIFF_PIECE = """
local scan = redis.call('SSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local members = scan[2]
for i = 1, #members, 5000 do
  local last = math.min(i + 4999, #members)
  local known = redis.call('SMISMEMBER', KEYS[2], unpack(members, i, last))
  local missing = {}
  for j = 1, #known do
    if known[j] == 0 then missing[#missing + 1] = members[i + j - 1] end
  end
  if #missing > 0 then
    redis.call('SADD', KEYS[3], unpack(missing))
    redis.call('EXPIRE', KEYS[3], ARGV[3])
  end
end
return scan[1]
"""

# A DSD publishes one table change. KEYS: snap set, snapmeta, push log index, then the push log sets to drop.
# ARGV: epoch, seq, n_add, n_del, channel, message prefix, publish (1/0), full (1/0), mode, n_trim, then
# n_trim push versions the DSD has published (dropped from the log: it is their only reader), then the rows.
# mode "inline": n_add added rows, then n_del deleted rows follow, and travel in the message; "chunk": they are
# in the list ARGV[11 + n_trim] (added first), whose name the message carries; "staged" (full only): the new
# rows are in the set ARGV[11 + n_trim], which becomes the snapshot (in O(1), however large).
# Refused (-1) when the store already holds a newer epoch: that DSD is stale (paused, replaced).
_PUBLISH_TABLE = """
local cur = tonumber(redis.call('HGET', KEYS[2], 'epoch') or '0')
local epoch = tonumber(ARGV[1])
if cur > epoch then return -1 end
local n_add = tonumber(ARGV[3])
local n_del = tonumber(ARGV[4])
local full = ARGV[8] == '1'
local mode = ARGV[9]
local n_trim = tonumber(ARGV[10])
if n_trim > 0 then redis.call('HDEL', KEYS[3], unpack(ARGV, 11, 10 + n_trim)) end
for i = 4, #KEYS do redis.call('UNLINK', KEYS[i]) end
local base = 10 + n_trim
local added = {}
local deleted = {}
if mode == 'inline' then
  for i = 1, n_add do added[i] = ARGV[base + i] end
  for i = 1, n_del do deleted[i] = ARGV[base + n_add + i] end
end
local function apply(cmd, rows, n)
  for i = 1, n, 5000 do redis.call(cmd, KEYS[1], unpack(rows, i, math.min(i + 4999, n))) end
end
if mode == 'staged' then
  redis.call('UNLINK', KEYS[1])
  if redis.call('EXISTS', ARGV[base + 1]) == 1 then
    redis.call('RENAME', ARGV[base + 1], KEYS[1])
    redis.call('PERSIST', KEYS[1])
  end
elseif mode == 'chunk' then
  for i = 0, n_add + n_del - 1, 5000 do
    local last = math.min(i + 4999, n_add + n_del - 1)
    local piece = redis.call('LRANGE', ARGV[base + 1], i, last)
    local split = math.max(0, math.min(#piece, n_add - i))
    if split > 0 then apply('SADD', piece, split) end
    if split < #piece then redis.call('SREM', KEYS[1], unpack(piece, split + 1, #piece)) end
  end
  redis.call('EXPIRE', ARGV[base + 1], ARGV[base + 2])
else
  if full then redis.call('DEL', KEYS[1]) end
  apply('SREM', deleted, n_del)
  apply('SADD', added, n_add)
end
redis.call('HSET', KEYS[2], 'epoch', ARGV[1], 'seq', ARGV[2])
if ARGV[7] == '1' then
  local msg
  if mode == 'staged' then
    msg = ARGV[6] .. '"full":true,"staged":true,"n_add":' .. n_add .. '}'
  elseif mode == 'chunk' then
    msg = ARGV[6] .. '"chunk":"' .. ARGV[base + 1] .. '","n_add":' .. n_add ..
      ',"n_del":' .. n_del .. '}'
  elseif full then
    msg = ARGV[6] .. '"full":true,"rows":[' .. table.concat(added, ',') .. ']}'
  else
    msg = ARGV[6] .. '"add":[' .. table.concat(added, ',') .. '],"del":[' .. table.concat(deleted, ',') .. ']}'
  end
  redis.call('PUBLISH', ARGV[5], msg)
end
return 1
"""


# A DSD's one round trip for its executed ids. KEYS: epoch counter, executed:<id> of each action to claim,
# then of each action whose POST was answered. ARGV: the DSD's epoch, TTL, number of claims, then per claim
# "1" when this DSD claimed it before without hearing the answer (a bus failover cut the round trip), else "0".
# The answered ones become "done". Then -1 when a newer epoch exists (this DSD is stale), else per claim
# 1 (run it) or 0 (done, or running on this DSD). A claim still "run:<older epoch>" belongs to a DSD that
# died or was cut off before its POST was answered: it is taken over, since that POST may never have arrived.
# One "run:<own epoch>" on a claim tried again is this DSD's own lost answer: nothing was POSTed, so it runs
# (without that, an action claimed just before a failover, and replicated, ran nowhere: chaos seed 11).
_SETTLE = """
local epoch = tonumber(ARGV[1])
local n_claim = tonumber(ARGV[3])
local mine = 'run:' .. ARGV[1]
for i = n_claim + 2, #KEYS do redis.call('SET', KEYS[i], 'done', 'XX', 'KEEPTTL') end
if tonumber(redis.call('GET', KEYS[1]) or '0') > epoch then return -1 end
local out = {}
for i = 2, n_claim + 1 do
  local v = redis.call('GET', KEYS[i])
  if not v or (string.sub(v, 1, 4) == 'run:' and tonumber(string.sub(v, 5)) < epoch)
      or (v == mine and ARGV[i + 2] == '1') then
    redis.call('SET', KEYS[i], 'run:' .. ARGV[1], 'EX', ARGV[2])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""


def cannot_save(exc: BaseException) -> bool:
    """Whether `exc` is Redis refusing a write while it cannot save (CANNOT_SAVE): it answers, and takes writes
    again on its own once a save succeeds."""
    cause = exc.__cause__ if isinstance(exc, BusError) else exc
    return isinstance(cause, ResponseError) and str(cause).startswith(CANNOT_SAVE)


def open_json(obj: dict) -> str:
    """A JSON object without its closing brace, for a script to add a last member to."""
    return dumps(obj)[:-1]


def row_key(row: Iterable[Any]) -> str:
    """Canonical JSON of a row: the member stored in a snapshot set and sent in diffs."""
    return dumps(list(row))


def row_from_key(text: str) -> Row:
    return compact_row(json.loads(text))


def compact_row(values: Iterable[Any]) -> Row:
    """A row as a PE holds it: a tuple, its strings interned (a column's repeated values then cost once)."""
    # a list made first: tuple() of a generator costs three times as much, a million rows at a time
    return tuple([sys.intern(v) if type(v) is str else v for v in values])


# Rows beyond this many in one list share their repeated strings through a cache of that list only: interning a
# million rows' strings took twice as long and kept every unique value in the interpreter's table for good
# (more memory, not less, for a column of unique names). Smaller lists, a diff's, are interned, so that values
# repeated across many small diffs still cost once.
INTERN_ROWS = 1000


def compact_rows(rows: list[Any]) -> list[Row]:
    """compact_row of many rows."""
    if len(rows) <= INTERN_ROWS:
        return [compact_row(r) for r in rows]
    seen: dict[str, str] = {}
    keep = seen.setdefault
    return [tuple([keep(v, v) if type(v) is str else v for v in r]) for r in rows]


def rows_from_keys(keys: list[str]) -> list[Row]:
    """Parse many row keys in one call (one json.loads of them all is several times faster than one each)."""
    return compact_rows(json.loads("[" + ",".join(keys) + "]")) if keys else []


def row_keys_of(rows: list[Row]) -> list[str]:
    """row_key of many flat rows (cells int, float or str: coerced ones) with one json.dumps, several times
    faster than one each; one each when a cell's text holds the separator "],[" (it then splits too often)."""
    if not rows:
        return []
    parts = dumps(rows)[2:-2].split("],[")
    if len(parts) != len(rows):
        return [row_key(r) for r in rows]
    return ["[" + p + "]" for p in parts]


async def row_keys(rows: list[Row]) -> list[str]:
    """Row keys of many coerced rows, CHUNK_ROWS at a time, yielding between them (a million take the loop away
    for a second)."""
    keys: list[str] = []
    for i in range(0, len(rows), CHUNK_ROWS):
        keys += row_keys_of(rows[i:i + CHUNK_ROWS])
        await asyncio.sleep(0)
    return keys


# Members a set operation walks between two yields (some 10-20 ms of the loop).
SET_STEP = 50_000


async def minus(a: Iterable[T], b: Container[T]) -> set[T]:
    """The members of `a` not in `b`, SET_STEP at a time, yielding between them (a million at once took the loop
    away for 100-300 ms). Neither may change meanwhile: the caller holds what guards them."""
    return await _pick(a, b, False)


async def common(a: Iterable[T], b: Container[T]) -> set[T]:
    """The members of `a` also in `b`, as minus() walks them."""
    return await _pick(a, b, True)


async def _pick(a: Iterable[T], b: Container[T], inside: bool) -> set[T]:
    out: set[T] = set()
    it = iter(a)
    while piece := list(itertools.islice(it, SET_STEP)):
        out.update([r for r in piece if (r in b) is inside])
        if len(piece) < SET_STEP:
            break   # no yield for a small one: every push goes through here
        await asyncio.sleep(0)
    return out


def inline_size(*row_lists: Iterable[str]) -> int:
    return sum(len(r) + 1 for rows in row_lists for r in rows)


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
        # called between the pieces of a long read: the bus reader waiting on it is busy, not stuck (Bus.busy)
        self.busy: Callable[[], None] = lambda: None
        self._loaded: set[str] = set()    # scripts this store loaded (a new master after a failover may lack them)
        k = channels.key
        self.k_policy_names = k("policy-names")
        self.k_policies = k("policies")
        self.k_ds_names = k("ds-names")
        self.k_datasources = k("datasources")
        self.k_library_names = k("library-names")
        self.k_library = k("library")
        self.k_rule_counter = k("rule-counter")
        self.k_epoch = k("epoch")
        self.k_notice_seq = k("notice-seq")
        self._create_named = client.register_script(_CREATE_NAMED)
        self._delete_named = client.register_script(_DELETE_NAMED)
        self._add_rule = client.register_script(_ADD_RULE)
        self._delete_rule = client.register_script(_DELETE_RULE)
        self._push = client.register_script(_PUSH)
        self._diff_piece = client.register_script(_DIFF_PIECE)
        self._small_snapshot = client.register_script(_SMALL_SNAPSHOT)
        self._publish_table = client.register_script(_PUBLISH_TABLE)
        self._settle = client.register_script(_SETTLE)

    def k_rules(self, policy_id: str) -> str:
        return self.ch.key("rules", policy_id)

    def k_pushed(self, ds_id: str, table: str) -> str:
        return self.ch.key("pushed", ds_id, table)

    def k_pushver(self, ds_id: str, table: str) -> str:
        return self.ch.key("pushver", ds_id, table)

    def k_pushlog(self, ds_id: str, table: str) -> str:
        return self.ch.key("pushlog", ds_id, table)

    def k_pushlog_entry(self, ds_id: str, table: str, version: int, part: str) -> str:
        return self.ch.key("pushlog", ds_id, table, str(version), part)

    def k_snap(self, ds_id: str, table: str) -> str:
        return self.ch.key("snap", ds_id, table)

    def k_snapmeta(self, ds_id: str, table: str) -> str:
        return self.ch.key("snapmeta", ds_id, table)

    async def _call(self, coro: Any) -> Any:
        try:
            return await command(coro, "store unreachable")
        except BusError as exc:
            if cannot_save(exc):
                raise BusError(f"it refuses writes while it cannot save them (Redis: {exc.__cause__}); nothing "
                               "was written, reads still answer") from exc.__cause__
            raise

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

    # -- library policies -----------------------------------------------------------------------------
    async def create_library_policy(self, policy: dict) -> bool:
        """False when the name is taken (nothing written)."""
        notice = open_json({"origin": self.origin, "kind": "library", "op": "create", "policy": policy})
        done = await self._write(self._create_named, [self.k_library_names, self.k_library, self.k_notice_seq],
                                 [policy["name"], policy["id"], dumps(policy), self.ch.notice, notice])
        return bool(done)

    async def delete_library_policy(self, policy: dict) -> bool:
        notice = open_json({"origin": self.origin, "kind": "library", "op": "delete", "policy": policy})
        done = await self._write(self._delete_named, [self.k_library_names, self.k_library, self.k_notice_seq],
                                 [policy["name"], policy["id"], self.ch.notice, notice])
        return bool(done)

    async def library_policies(self) -> list[dict]:
        raw = await self._call(self.redis.hgetall(self.k_library))
        return sorted((json.loads(v) for v in raw.values()), key=lambda p: p["name"])

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
                      self.k_snapmeta(ds["id"], table), self.k_pushlog(ds["id"], table)]
            # a push between this read and the delete leaves its log entry behind, until the next push trims it
            for v in await self._call(self.redis.hkeys(self.k_pushlog(ds["id"], table))):
                extra += [self.k_pushlog_entry(ds["id"], table, int(v), p) for p in ("add", "del")]
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
    async def push_rows(self, ds: dict, table: str, rows: list[Any]) -> int:
        """Replace the rows pushed through the API, and tell the DSD the difference against the previous push
        (in the notice when small, else in the push log); the version, 0 when the datasource is gone (nothing
        written)."""
        return await self.push_keys(ds, table, await row_keys(rows) if len(rows) > CHUNK_ROWS else row_keys_of(rows))

    async def push_keys(self, ds: dict, table: str, keys: list[str]) -> int:
        """push_rows of rows given as their row keys. A large push (or one replacing a large table) is staged in
        pieces and its difference computed in pieces; then one script makes it the table: whole or not."""
        if len(keys) <= CHUNK_ROWS:
            version: int = await self._write(self._push, self._push_keys(ds["id"], table, ""),
                                             [*self._push_args(ds["id"], table, 0, ""), *keys])
            if version != NEEDS_STAGING:
                return version
        return await self._push_staged(ds["id"], table, keys)

    def _push_keys(self, ds_id: str, table: str, stage: str) -> list[str]:
        return [stage, self.k_pushed(ds_id, table), self.k_datasources, self.k_pushver(ds_id, table),
                self.k_pushlog(ds_id, table), stage + ":add", stage + ":del"]

    def _push_args(self, ds_id: str, table: str, mode: int, base: str) -> list[Any]:
        prefix = open_json({"ds_id": ds_id, "table": table}) + ","
        return [ds_id, self.ch.push, prefix, self.k_pushlog(ds_id, table) + ":", mode, PUSH_LOG_MAX, INLINE_BYTES,
                base]

    async def _push_staged(self, ds_id: str, table: str, keys: list[str]) -> int:
        """Stage the rows, compute their difference against the pushed rows in bounded steps, and switch in one
        O(1) script; when another push came meanwhile, the difference is computed again (after SNAPSHOT_TRIES,
        in the script itself: Redis stops for as long as that takes)."""
        stage = self.ch.key("pushtmp", ds_id, table, secrets.token_hex(8))
        script_keys = self._push_keys(ds_id, table, stage)
        await self._stage_set(stage, keys)
        try:
            for _ in range(SNAPSHOT_TRIES):
                base = await self._call(self.redis.get(self.k_pushver(ds_id, table))) or "0"
                await self._call(self.redis.unlink(*script_keys[5:]))
                if await self._call(self.redis.type(self.k_pushed(ds_id, table))) == "set":
                    await self._diff_in_pieces(stage, self.k_pushed(ds_id, table), script_keys[5])
                    await self._diff_in_pieces(self.k_pushed(ds_id, table), stage, script_keys[6])
                version: int = await self._write(self._push, script_keys, self._push_args(ds_id, table, 2, base))
                if version != BASE_CHANGED:
                    return version
            last: int = await self._write(self._push, script_keys, self._push_args(ds_id, table, 1, ""))
            return last
        finally:
            # what a script did not rename away (a refused or failed push); they expire otherwise
            with contextlib.suppress(BusError):
                await self._call(self.redis.unlink(*script_keys[:1], *script_keys[5:]))

    async def _diff_in_pieces(self, source: str, against: str, out: str) -> None:
        cursor = "0"
        while True:
            cursor = await self._call(self._diff_piece(keys=[source, against, out],
                                                       args=[cursor, CHUNK_ROWS, STAGE_TTL_S]))
            if str(cursor) == "0":
                return
            await asyncio.sleep(0)

    async def pushed_rows(self, ds_id: str, table: str) -> tuple[int, list[Row]]:
        """The rows last pushed and their version (0: never pushed), read together."""
        version, keys = await self.pushed_keys(ds_id, table)
        return version, sorted(row_from_key(k) for k in keys)

    async def pushed_keys(self, ds_id: str, table: str) -> tuple[int, set[str]]:
        """The pushed rows' keys and their version, in agreement: read in pieces between two reads of the
        version (every push changes it), again when they differ, after SNAPSHOT_TRIES in one MULTI/EXEC."""
        try:
            for _ in range(SNAPSHOT_TRIES):
                version = await self.pushed_version(ds_id, table)
                found: set[str] = set()
                async for piece in self._scan_pieces(self.k_pushed(ds_id, table)):
                    found.update(piece)
                if await self.pushed_version(ds_id, table) == version:
                    return version, found

            async def read() -> Any:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.get(self.k_pushver(ds_id, table))
                    pipe.smembers(self.k_pushed(ds_id, table))
                    return await pipe.execute()
            raw_version, members = await self._call(read())
            return int(raw_version or 0), set(members)
        except BusError as exc:
            if not str(exc.__cause__).startswith("WRONGTYPE"):
                raise
        # written by an older API node: a JSON list
        raw, raw_version = await self._call(self.redis.mget(self.k_pushed(ds_id, table), self.k_pushver(ds_id, table)))
        return int(raw_version or 0), {row_key(r) for r in json.loads(raw)} if raw else set()

    async def pushed_version(self, ds_id: str, table: str) -> int:
        return int(await self._call(self.redis.get(self.k_pushver(ds_id, table))) or 0)

    async def push_diff(self, ds_id: str, table: str, version: int) -> tuple[list[str], list[str]] | None:
        """The rows push `version` added and deleted, from the push log; None once the log dropped it, or when
        it holds no copy (the table's first rows: read them whole)."""
        idx = self.k_pushlog(ds_id, table)
        entry = await self._call(self.redis.hget(idx, str(version)))
        if entry in (None, "whole"):
            return None
        if entry.startswith("{"):   # a small diff, kept in the index itself
            diff = json.loads(entry)
            return row_keys_of(diff["add"]), row_keys_of(diff["del"])
        parts = [await self._scan(self.k_pushlog_entry(ds_id, table, version, p)) for p in ("add", "del")]
        if not await self._call(self.redis.hexists(idx, str(version))):
            return None   # dropped while we read it: what we read may lack rows
        return parts[0], parts[1]

    async def _scan(self, key: str) -> list[str]:
        """A set's members in pieces of about CHUNK_ROWS, yielding between them."""
        out: list[str] = []
        async for members in self._scan_pieces(key):
            out.extend(members)
        return out

    async def _scan_pieces(self, key: str) -> AsyncIterator[list[str]]:
        cursor = 0
        while True:
            cursor, members = await self._call(self.redis.sscan(key, cursor, count=CHUNK_ROWS))
            yield members
            if cursor == 0:
                return
            self.busy()
            await asyncio.sleep(0)

    # -- snapshots ------------------------------------------------------------------------------------
    async def publish_table(self, ds_id: str, ds_name: str, table: str, epoch: int, seq: int,
                            added: list[str], deleted: list[str], full: bool, publish: bool = True,
                            *, trim: Iterable[int] = (), new_rows: Iterable[str] | None = None) -> bool:
        """Atomically update the snapshot and (epoch, seq) and publish the diff. False: a newer epoch owns it.
        Rows over INLINE_BYTES go to the store in chunks first; the message names them. A large full
        publication passes all its rows as `new_rows` (then `added` is not read), staged as the next snapshot.
        `trim`: push versions this DSD has published, dropped from the push log."""
        trim = list(trim)
        prefix = open_json({"ds_id": ds_id, "ds": ds_name, "table": table, "epoch": epoch, "seq": seq}) + ","
        trim_keys = [self.k_pushlog_entry(ds_id, table, v, p) for v in trim for p in ("add", "del")]
        keys = [self.k_snap(ds_id, table), self.k_snapmeta(ds_id, table), self.k_pushlog(ds_id, table), *trim_keys]
        if new_rows is not None:
            staged = self.ch.key("snapnew", ds_id, table)
            count = await self._stage_set(staged, new_rows)
            mode, n_add, n_del, rows = "staged", count, 0, [staged]
        elif inline_size(added, deleted) > INLINE_BYTES:
            chunk = self.ch.key("chunk", ds_id, table, str(epoch), str(seq))
            await self._stage_list(chunk, added + deleted)
            mode, n_add, n_del, rows = "chunk", len(added), len(deleted), [chunk, str(CHUNK_TTL_S)]
        else:
            mode, n_add, n_del, rows = "inline", len(added), len(deleted), [*added, *deleted]
        done: int = await self._write(
            self._publish_table, keys,
            [epoch, seq, n_add, n_del, self.ch.diff, prefix, int(publish), int(full), mode, len(trim), *trim, *rows])
        return done == 1

    async def _stage_set(self, key: str, rows: Iterable[str]) -> int:
        await self._call(self.redis.unlink(key))
        batch = list(rows)
        for i in range(0, len(batch), CHUNK_ROWS):
            await self._call(self.redis.sadd(key, *batch[i:i + CHUNK_ROWS]))
            self.busy()
        await self._call(self.redis.expire(key, STAGE_TTL_S))
        return len(batch)

    async def _stage_list(self, key: str, rows: list[str]) -> None:
        await self._call(self.redis.unlink(key))
        for i in range(0, len(rows), CHUNK_ROWS):
            await self._call(self.redis.rpush(key, *rows[i:i + CHUNK_ROWS]))
            self.busy()
        await self._call(self.redis.expire(key, CHUNK_TTL_S))

    async def chunk_rows(self, key: str, n_add: int, n_del: int) -> tuple[list[Row], list[Row]] | None:
        """A chunked diff's added and deleted rows, read in pieces; None when it expired (resync instead)."""
        keys: list[str] = []
        for i in range(0, n_add + n_del, CHUNK_ROWS):
            keys.extend(await self._call(self.redis.lrange(key, i, i + CHUNK_ROWS - 1)))
            self.busy()
            await asyncio.sleep(0)
        if len(keys) != n_add + n_del:
            return None
        added: list[Row] = []
        for i in range(0, n_add, CHUNK_ROWS):
            added.extend(rows_from_keys(keys[i:min(i + CHUNK_ROWS, n_add)]))
            await asyncio.sleep(0)
        deleted: list[Row] = []
        for i in range(n_add, n_add + n_del, CHUNK_ROWS):
            deleted.extend(rows_from_keys(keys[i:i + CHUNK_ROWS]))
            await asyncio.sleep(0)
        return added, deleted

    async def snapshot(self, ds_id: str, table: str) -> Snapshot:
        """Rows and their (epoch, seq), in agreement. A table of up to CHUNK_ROWS rows is read in one round trip
        (a resync holds the table's diffs waiting, and a piecewise read took 11 round trips when publications
        kept coming: 1.3 s on a link 100 ms slow). A larger one is read in pieces (yielding between them, so it
        does not stop the reader's loop), between two reads of (epoch, seq): when those differ a publication
        came in between, and the read starts again; after SNAPSHOT_TRIES in one MULTI/EXEC."""
        epoch, seq, members = await self._call(self._small_snapshot(
            keys=[self.k_snapmeta(ds_id, table), self.k_snap(ds_id, table)], args=[CHUNK_ROWS]))
        if members is not None:
            return Snapshot(epoch=int(epoch or 0), seq=int(seq or 0), rows=set(rows_from_keys(list(members))))
        for _ in range(SNAPSHOT_TRIES):
            before = await self.snapshot_meta(ds_id, table)
            rows: set[Row] = set()
            async for members in self._scan_pieces(self.k_snap(ds_id, table)):
                rows.update(rows_from_keys(members))
            if await self.snapshot_meta(ds_id, table) == before:
                return Snapshot(epoch=before[0], seq=before[1], rows=rows)

        async def read() -> Any:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.k_snapmeta(ds_id, table))
                pipe.smembers(self.k_snap(ds_id, table))
                return await pipe.execute()
        meta, members = await self._call(read())
        return Snapshot(epoch=int(meta.get("epoch", 0)), seq=int(meta.get("seq", 0)),
                        rows=set(rows_from_keys(list(members))))

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

    async def settle_actions(self, claim: list[str], answered: list[str], epoch: int, ttl_s: int, *,
                             retried: set[str] | frozenset[str] = frozenset()) -> list[bool] | None:
        """Mark `answered` done, then say for each id of `claim` whether this DSD may POST it now: once per id
        and epoch, and again by a newer epoch while no DSD has seen its POST answered. `retried`: ids whose
        earlier claim by this DSD got no answer (they run if that claim was kept). None when a newer epoch
        exists (this DSD is stale). One round trip."""
        keys = [self.k_epoch, *map(self.k_executed, claim), *map(self.k_executed, answered)]
        flags = ["1" if i in retried else "0" for i in claim]
        done = await self._write(self._settle, keys, [epoch, ttl_s, len(claim), *flags])
        return None if done == -1 else [bool(d) for d in done]
