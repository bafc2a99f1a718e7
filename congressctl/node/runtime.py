"""Worker plumbing shared by both node roles: logging, tracked tasks, SIGTERM handling.

The worker shape is arq-like: `startup()`, the long-lived tasks, `shutdown()`. SIGTERM (or SIGINT) means:
drain (a node with clients tells them to go elsewhere and answers what is in flight, bounded), stop taking
work, give running work a moment, cancel what is left; the process is gone within 2 s of the drain's end.
Every task is tracked and its result read, so an exception never vanishes: a failing long-lived task is
logged and stops the worker with a non-zero exit code (Pacemaker then restarts it).

Garbage collection. CPython's automatic full (generation 2) collection scans every live object: during
bench/bus.py it stopped the PE that takes the pushes 8 times in 15 s, for 12-49 ms each, and every change
arriving meanwhile queued behind it. So a worker freezes what exists after startup (modules and code, never
garbage), leaves the young generations automatic (they collect nearly all cyclic garbage, each in well under
a millisecond), and runs the full collection itself every FULL_GC_INTERVAL_S.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from congressctl.bus import Channels, make_redis, new_incarnation
from congressctl.node.config import NodeConfig

log = logging.getLogger("congressctl.node")

GRACE_S = 0.8
# A bus failover (promote a replica, move the bus address) takes a few seconds (4-5 s in the lab). A node whose
# bus stays away longer is cut off from it, not waiting out a failover: the api-pe leaves HAProxy's pool, the
# DSD reports it in its liveness file so that Pacemaker moves it. Any shorter, every bus failover would move them.
BUS_OUTAGE_GRACE_S = 10.0
FULL_GC_INTERVAL_S = 600.0
NO_AUTOMATIC_FULL_GC = 1 << 30


def setup_logging(node_id: str, role: str, log_dir: str, level: int = logging.INFO) -> Path | None:
    """Log to stderr and to <log_dir>/<role>.log, the node id in every line. Returns the file used."""
    fmt = logging.Formatter(f"%(asctime)s {node_id} {role} %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(level)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    for noisy in ("uvicorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    path = Path(log_dir) / f"{role}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(fmt)
        root.addHandler(handler)
    except OSError as exc:
        log.warning("cannot log to %s: %s (stderr only)", path, exc)
        return None
    return path


class Tasks:
    """Owns every background task: names them, reads their results, cancels them at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()
        self.failed = asyncio.Event()
        self.errors: list[str] = []

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str, critical: bool = False) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, critical))
        return task

    def _done(self, task: asyncio.Task, critical: bool) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task %s failed: %s", task.get_name(), exc, exc_info=exc)
            self.errors.append(f"{task.get_name()}: {exc}")
            if critical:
                self.failed.set()
        elif critical:
            self.failed.set()

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout: float) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def cancel_all(self, timeout: float = 0.5) -> None:
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


def keep_full_gc_manual() -> None:
    """Freeze the objects alive now and stop automatic full collections (see the module docstring)."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, NO_AUTOMATIC_FULL_GC)


async def full_gc_loop(interval_s: float = FULL_GC_INTERVAL_S) -> None:
    while True:
        await asyncio.sleep(interval_s)
        started = time.perf_counter()
        found = gc.collect()
        log.debug("full garbage collection: %d unreachable, %.1f ms", found, (time.perf_counter() - started) * 1000)


class Worker:
    """Base of a node process. Subclasses fill `startup`, `start_tasks`, `stop_taking_work`, `shutdown`."""

    def __init__(self) -> None:
        self.tasks = Tasks()
        self.stop_event = asyncio.Event()

    async def startup(self) -> None:
        """Open connections and bind sockets; raise to abort the start."""

    async def drain(self) -> None:
        """On a signal, before `stop_taking_work`: the node still works while its clients move away."""

    def start_tasks(self) -> None:
        """Spawn the long-lived tasks (critical=True: their end stops the worker)."""

    def stop_taking_work(self) -> None:
        """Stop accepting requests and messages; running work may finish within the grace period."""

    async def shutdown(self) -> None:
        """Close connections after the tasks are gone."""

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        try:
            await self.startup()
        except Exception as exc:  # noqa: BLE001 - reported and turned into an exit code
            log.error("startup failed: %s", exc)
            await self.shutdown()
            return 1
        keep_full_gc_manual()
        self.start_tasks()
        self.tasks.spawn(full_gc_loop(), "full-gc")
        stop = loop.create_task(self.stop_event.wait(), name="wait-stop")
        failed = loop.create_task(self.tasks.failed.wait(), name="wait-failed")
        await asyncio.wait({stop, failed}, return_when=asyncio.FIRST_COMPLETED)
        code = 0 if self.stop_event.is_set() else 1
        for t in (stop, failed):
            t.cancel()
        log.info("stopping (%s)", "signal" if code == 0 else "a task failed")
        if code == 0:
            await self.drain()
        self.stop_taking_work()
        await self.tasks.wait(GRACE_S)
        await self.tasks.cancel_all()
        try:
            async with asyncio.timeout(0.5):   # not wait_for: on 3.11 it can drop a cancellation (bus.py)
                await self.shutdown()
        except (TimeoutError, Exception) as exc:  # noqa: BLE001 - shutdown must not hang or raise
            log.warning("shutdown incomplete: %s", exc)
        log.info("stopped, exit code %d (pid %d)", code, os.getpid())
        return code


class BusWorker(Worker):
    """A node on the control bus: its config, a new incarnation, the cluster's channels and a Redis client."""

    def __init__(self, cfg: NodeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.incarnation = new_incarnation()
        self.channels = Channels(cfg.cluster)
        self.redis = make_redis(cfg.bus.host, cfg.bus.port, cfg.bus.password, cfg.bus.tls, cfg.bus.tls_ca_file)
