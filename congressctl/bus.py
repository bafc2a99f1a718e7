"""The Redis control bus: connection, channels, heartbeats, peers, reconnection with backoff.

Pub/sub is at-most-once: a subscriber that is disconnected or slow loses messages. The Bus therefore calls
`on_connect` after every (re)subscription so its owner resyncs from the store, and reconnects by itself
(exponential backoff) when Redis goes away. Heartbeats double as a liveness check of our own subscription:
when not even our own heartbeat comes back for a while, the connection is dropped and remade.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl as ssl_mod
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, RedisError, ResponseError

from congressctl.errors import BusError, CongressctlError

log = logging.getLogger("congressctl.bus")

# RuntimeError: on uvloop a write to a connection closed under redis-py (a bus failover) raises "the handler is
# closed", which redis-py passes on after dropping that connection; it stopped every api-pe at its next publish
BUS_ERRORS = (RedisError, OSError, asyncio.TimeoutError, RuntimeError)
# A write waits up to store.REPLICA_WAIT_MS (1 s) for its replicas; past 2 s the bus is gone (a failover is under
# way) and the caller hears so while its own client still waits (2 s is a usual client timeout).
COMMAND_TIMEOUT_S = 2.0
# A LAN answers a connect in milliseconds; while the bus address moves, a node hears "not now" fast and its
# callers can try again as soon as the address answers.
CONNECT_TIMEOUT_S = 0.5


def new_incarnation() -> str:
    """A fresh id for this process start (sortable by start time, unique across hosts)."""
    return f"{int(time.time() * 1000):x}-{uuid.uuid4().hex[:8]}"


class Channels:
    """Names of every pub/sub channel and store key of one cluster, in one place."""

    def __init__(self, cluster: str):
        self.prefix = f"congress:{cluster}:"
        p = self.prefix
        self.heartbeat = p + "hb"
        self.notice = p + "notice"
        self.diff = p + "diff"
        self.action = p + "act"
        self.push = p + "push"

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class _CPacked:
    """Commands packed by hiredis, in C, as redis-py's synchronous client does: its asyncio one packs them in
    Python, argument by argument (0.7 s of CPU to stage a million rows, some 70% of the client's share)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from exc


class _CPackedConnection(_CPacked, aioredis.Connection):
    pass


class _CPackedSSLConnection(_CPacked, aioredis.SSLConnection):
    pass


def make_redis(host: str, port: int, password: str, tls: bool = False,
               tls_ca_file: str | None = None) -> aioredis.Redis:
    """An asyncio Redis client with AUTH, a connect timeout and one quick retry.

    No socket timeout (redis-py 8 sets 5 s unless told otherwise): each command is bounded by `command()`
    instead. With a socket timeout, redis-py sends every command through asyncio.wait_for, which on Python 3.11
    starts a task per command (about 10 us of CPU each, on the path of every change). RESP2: redis-py 8 speaks
    RESP3 by default, where each pub/sub message also goes through its push-notification handler (which formats
    the message for a debug log)."""
    kwargs: dict[str, Any] = {}
    if tls:
        # always verified: by the cluster CA deploy names (tls_ca_file), else by the system's CAs
        kwargs["ssl"] = True
        kwargs["ssl_cert_reqs"] = ssl_mod.CERT_REQUIRED
        if tls_ca_file:
            kwargs["ssl_ca_certs"] = tls_ca_file
    client = aioredis.Redis(host=host, port=port, password=password, socket_timeout=None,
                            socket_connect_timeout=CONNECT_TIMEOUT_S, retry=Retry(NoBackoff(), 1),
                            decode_responses=True, protocol=2, **kwargs)
    client.connection_pool.connection_class = _CPackedSSLConnection if tls else _CPackedConnection
    return client


def subscriber_of(client: aioredis.Redis) -> aioredis.Redis:
    """A client like `client` on a pool of its own whose connections never retry. With a retry, redis-py
    reconnects a lost subscription and subscribes again by itself: the messages published meanwhile are
    lost and the owner never hears of it, so it never resyncs."""
    pool = client.connection_pool
    return aioredis.Redis(connection_pool=aioredis.ConnectionPool(
        connection_class=pool.connection_class, **{**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)}))


async def command(coro: Awaitable[Any], what: str) -> Any:
    """Await one Redis command for at most COMMAND_TIMEOUT_S; BusError (naming `what`) when it fails."""
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            return await coro
    except BUS_ERRORS as exc:
        raise BusError(f"{what}: {type(exc).__name__}: {exc}") from exc


@dataclass
class Peer:
    node: str
    role: str
    incarnation: str
    first_seen: float
    last_seen: float
    payload: dict = field(default_factory=dict)

    def age(self, now: float | None = None) -> float:
        return (now if now is not None else time.monotonic()) - self.last_seen


MessageHandler = Callable[[str, dict], Awaitable[None]]


class Bus:
    """One node's connection to the control bus.

    `run()` is the long-lived reader: it subscribes, calls `on_connect()` (the owner resyncs), then hands
    every message to `on_message(channel, data)` in arrival order. `heartbeat_loop()` publishes
    `heartbeat_payload()` (the owner's whole heartbeat, see payloads.py) every heartbeat interval. Both stop
    when `stop()` is called.

    The reader waits for each message without a timeout of its own (one per message costs a timer, about
    a third of redis-py's work per message): a watchdog ends the session when not even our own heartbeat
    has come back for a while, cancelling the reader wherever it is (a handler that never returns included),
    and `stop()` wakes it.
    """

    def __init__(self, client: aioredis.Redis, channels: Channels, *, heartbeat_s: float, peer_timeout_s: float,
                 subscribe: list[str], on_message: MessageHandler, on_connect: Callable[[], Awaitable[None]],
                 heartbeat_payload: Callable[[], dict]):
        self.redis = client
        self.channels = channels
        self.heartbeat_s = heartbeat_s
        self.peer_timeout_s = peer_timeout_s
        self.subscribe_to = [channels.heartbeat, *[c for c in subscribe if c != channels.heartbeat]]
        self.on_message = on_message
        self.on_connect = on_connect
        self.heartbeat_payload = heartbeat_payload
        self.peers: dict[tuple[str, str], Peer] = {}
        self.connected = False
        self.reconnects = 0
        self.last_error: str | None = None
        self._stopping = asyncio.Event()
        self.silent_limit = max(3 * peer_timeout_s, 3 * heartbeat_s)
        self.last_message = time.monotonic()
        self.last_progress = 0.0   # when a handler last said it is busy, not stuck (busy())
        self._reader: asyncio.Task | None = None   # the session's reader, while a session runs
        self._waiting = False                      # the reader waits for a message (it is not in a handler)

    def busy(self) -> None:
        """A handler still making progress (reading a large table in pieces) keeps its session: the silence
        watchdog is for a subscription gone quiet and a handler that is stuck, and this one is neither. Only the
        watchdog takes it into account: what a node last heard stays last_message."""
        self.last_progress = time.monotonic()

    def stop(self) -> None:
        self._stopping.set()
        if self._reader is not None and self._waiting:
            # a reader inside a handler finishes it first, then sees `stopping`
            self._reader.cancel()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def publish(self, channel: str, payload: dict | str) -> int:
        """Publish one message; how many subscribers received it. BusError when Redis is unreachable."""
        data = payload if isinstance(payload, str) else dumps(payload)
        return int(await command(self.redis.publish(channel, data), f"publish to {channel} failed"))

    def _note_heartbeat(self, data: dict, now: float) -> Peer | None:
        node, role, inc = data.get("node"), data.get("role"), data.get("inc")
        if not (isinstance(node, str) and isinstance(role, str) and isinstance(inc, str)):
            return None
        key = (node, role)
        peer = self.peers.get(key)
        if peer is None or peer.incarnation != inc:
            peer = Peer(node=node, role=role, incarnation=inc, first_seen=now, last_seen=now)
            self.peers[key] = peer
        peer.last_seen = now
        peer.payload = data
        return peer

    async def heartbeat_loop(self) -> None:
        # on a fixed cadence, not a fixed pause: a publish that waited on a busy Redis, or a loop that was busy,
        # would otherwise push every later beat back by as much
        due = time.monotonic()
        while not self.stopping:
            if self.connected:
                try:
                    await self.publish(self.channels.heartbeat, self.heartbeat_payload())
                except BusError as exc:
                    log.debug("heartbeat not sent: %s", exc)
            due = max(due + self.heartbeat_s, time.monotonic())
            await self.wait_stop(due - time.monotonic())

    async def wait_stop(self, seconds: float) -> None:
        """Sleep `seconds`, returning early when the bus is stopped."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    async def run(self) -> None:
        backoff = 0.05
        while not self.stopping:
            try:
                await self._session()
                backoff = 0.05
            except BUS_ERRORS as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                if self.connected:
                    log.warning("bus connection lost: %s", self.last_error)
                else:
                    log.debug("bus connect failed: %s", self.last_error)
            except BusError as exc:
                self.last_error = str(exc)
                log.warning("bus error during resync: %s", exc)
            self.connected = False
            if self.stopping:
                break
            await self.wait_stop(backoff * (0.5 + random.random()))
            # capped at a heartbeat: after a bus failover the nodes are back within one of the address answering
            backoff = min(backoff * 2, self.heartbeat_s)

    async def _session(self) -> None:
        subscriber = subscriber_of(self.redis)
        pubsub = subscriber.pubsub(ignore_subscribe_messages=True)
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                await pubsub.subscribe(*self.subscribe_to)
            self.connected = True
            self.reconnects += 1
            self.last_error = None
            log.info("bus connected (subscribed to %d channels)", len(self.subscribe_to))
            await self.on_connect()
            await self._read_watched(pubsub)
        finally:
            try:
                async with asyncio.timeout(1.0):
                    await pubsub.aclose()
                    await subscriber.aclose()
            except BUS_ERRORS:
                pass

    async def _read_watched(self, pubsub: Any) -> None:
        """Read until the reader fails, the bus stops or the watchdog ends the session (its exception says why).
        The reader is a task of its own so that the watchdog can cancel it wherever it is stuck, in a handler as
        well as waiting for a message."""
        loop = asyncio.get_running_loop()
        self.last_message = time.monotonic()
        reader = self._reader = loop.create_task(self._read(pubsub), name="bus-session-reader")
        watchdog = loop.create_task(self._watch(pubsub, reader), name="bus-silence")
        try:
            await asyncio.wait({reader, watchdog}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._reader = None
            reader.cancel()
            watchdog.cancel()
            # a bounded wait: a task that swallowed its cancellation must not hold the session (one did, and
            # wedged every node for good: see _watch)
            _, stuck = await asyncio.wait({reader, watchdog}, timeout=1.0)
            for task in stuck:
                log.error("bus task %s did not stop when cancelled; abandoned", task.get_name())
        if watchdog.done() and not watchdog.cancelled():
            watchdog.result()   # raises: why the watchdog ended the session
        if not reader.cancelled():
            reader.result()   # raises what failed the reader

    async def _watch(self, pubsub: Any, reader: asyncio.Task) -> None:
        """End the session when the subscription goes silent: cancel the reader (waiting for a message or stuck in
        a handler), and raise why. It also PINGs on the subscription (the PONG arrives as a message): a
        subscriber only reads, so after a bus failover moved the address away its connection would look fine
        until silent_limit; a PING draws the new host's refusal, and the reader fails at once.

        asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the result when its operation completes as
        it is cancelled, dropping the cancellation. The reader then failed on the PING's own answer when Redis
        refused it (MISCONF: its disk is full; see _read), so the session cancelled this watchdog just as that
        PING completed: it lived on, and the session waiting for it never ended (every node's reader stopped
        for good)."""
        while True:
            await asyncio.sleep(min(0.5, self.heartbeat_s))
            silent = time.monotonic() - max(self.last_message, self.last_progress)
            if silent > self.silent_limit:
                reader.cancel()
                raise RedisConnectionError(f"no message (not even our own heartbeat) for {silent:.1f}s")
            try:
                async with asyncio.timeout(self.heartbeat_s):
                    await pubsub.ping()
            except BUS_ERRORS as exc:
                reader.cancel()
                raise RedisConnectionError(f"PING on the subscription failed: {type(exc).__name__}: {exc}") from exc

    async def _read(self, pubsub: Any) -> None:
        while not self.stopping:
            self._waiting = True
            try:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            except ResponseError as exc:
                # the answer to the watchdog's PING, the only command sent here, refused (Redis refuses PING
                # like a write while it cannot save: MISCONF). The subscription still works: ending the session
                # for it lost every message published until the next one was up, some of them acknowledged
                # pushes and action requests nobody sent again (failover-test disk-full)
                log.debug("PING on the subscription refused: %s", exc)
                msg = None
            finally:
                self._waiting = False
            self.last_message = now = time.monotonic()
            await self._handle(msg, now)

    async def _handle(self, msg: dict | None, now: float) -> None:
        if msg is None or msg.get("type") != "message":
            return
        try:
            data = json.loads(msg["data"])
        except (ValueError, TypeError):
            log.warning("undecodable message on %s dropped", msg.get("channel"))
            return
        if not isinstance(data, dict):
            return
        channel = msg["channel"]
        if channel == self.channels.heartbeat:
            self._note_heartbeat(data, now)
        try:
            await self.on_message(channel, data)
        except BusError:
            raise
        except (KeyError, TypeError, ValueError, CongressctlError) as exc:
            log.error("message on %s not handled: %s: %s", channel, type(exc).__name__, exc, exc_info=exc)

