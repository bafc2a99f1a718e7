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

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from congressctl.errors import BusError, CongressctlError

log = logging.getLogger("congressctl.bus")

BUS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)
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
        kwargs["ssl"] = True
        kwargs["ssl_cert_reqs"] = ssl_mod.CERT_REQUIRED if tls_ca_file else ssl_mod.CERT_NONE
        if tls_ca_file:
            kwargs["ssl_ca_certs"] = tls_ca_file
    return aioredis.Redis(host=host, port=port, password=password, socket_timeout=None,
                          socket_connect_timeout=CONNECT_TIMEOUT_S, retry=Retry(NoBackoff(), 1),
                          decode_responses=True, protocol=2, **kwargs)


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
    a third of redis-py's work per message): a watchdog cuts the subscription when not even our own
    heartbeat has come back for a while, and `stop()` wakes it.
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
        self._waiting: asyncio.Timeout | None = None   # set while the reader waits for a message
        self._cut_reason: str | None = None

    def stop(self) -> None:
        self._stopping.set()
        self._cut(None)

    def _cut(self, reason: str | None) -> None:
        """Wake the reader waiting for a message: to stop (reason None), or because the bus went silent."""
        if self._waiting is not None:
            self._cut_reason = reason
            with contextlib.suppress(RuntimeError):   # no running loop: the reader is not waiting either
                self._waiting.reschedule(asyncio.get_running_loop().time())

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
        while not self.stopping:
            if self.connected:
                try:
                    await self.publish(self.channels.heartbeat, self.heartbeat_payload())
                except BusError as exc:
                    log.debug("heartbeat not sent: %s", exc)
            await self.wait_stop(self.heartbeat_s)

    async def wait_stop(self, seconds: float) -> None:
        """Sleep `seconds`, returning early when the bus is stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

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
            await asyncio.wait_for(pubsub.subscribe(*self.subscribe_to), COMMAND_TIMEOUT_S)
            self.connected = True
            self.reconnects += 1
            self.last_error = None
            log.info("bus connected (subscribed to %d channels)", len(self.subscribe_to))
            await self.on_connect()
            watchdog = asyncio.get_running_loop().create_task(self._watch(pubsub), name="bus-silence")
            try:
                await self._read(pubsub)
            finally:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
        finally:
            try:
                await asyncio.wait_for(pubsub.aclose(), 1.0)
                await asyncio.wait_for(subscriber.aclose(), 1.0)
            except BUS_ERRORS:
                pass

    async def _watch(self, pubsub: Any) -> None:
        """Cut the subscription when it goes silent. It also PINGs on the subscription (the PONG arrives as a
        message): a subscriber only reads, so after a bus failover moved the address away its connection would
        look fine until silent_limit; a PING draws the new host's refusal, and the reader fails at once."""
        while True:
            await asyncio.sleep(min(0.5, self.heartbeat_s))
            silent = time.monotonic() - self.last_message
            if silent > self.silent_limit:
                self._cut(f"no message (not even our own heartbeat) for {silent:.1f}s")
                continue
            try:
                await asyncio.wait_for(pubsub.ping(), self.heartbeat_s)
            except BUS_ERRORS as exc:
                self._cut(f"PING on the subscription failed: {type(exc).__name__}: {exc}")

    async def _read(self, pubsub: Any) -> None:
        self.last_message = time.monotonic()
        self._cut_reason = None
        try:
            async with asyncio.timeout(None) as deadline:
                while not self.stopping:
                    self._waiting = deadline
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    self._waiting = None
                    self.last_message = now = time.monotonic()
                    await self._handle(msg, now)
        except TimeoutError:
            if not deadline.expired():
                raise
            if self._cut_reason is not None:
                raise RedisConnectionError(self._cut_reason) from None
        finally:
            self._waiting = None

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

