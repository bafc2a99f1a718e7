"""A scenario's history: every event on one clock, with structured fields the checker reads (never its text).

The text `detail` is for people (the timeline); every figure comes from the typed fields. Kinds:
  fault, restore, detected, recovered   the fault's course (host, pid where one was signalled)
  push                                  a sequential push: k (row number within the scenario), outcome, duration
  request                               a GET through the VIP: ok, duration (every attempt's), attempt (how many)
  attempt                               one try of a GET, when the fault turns the client's retries on: attempt
                                        (its number), ok, duration
  write                                 an acknowledged-write attempt: name, ok (acknowledged), duration, status
                                        (the HTTP answer's; none: no answer), message (a refusal's error message)
  read-back                             after the run, one per acknowledged write: name, ok (found)
  action                                an action of this scenario's rows at the sink: k, action_id, executor,
                                        stamped (when the DSD sent it: its X-Congress-Sent, on the scenario clock)
  stray                                 an action at the sink of no row of this scenario (executor only counts)
  leader, dsd                           the DSD's leader / instance changed (host; stamped: the DSD's own clock)
  status                                an api-pe's status answer: ok when it heard the DSD within 1 s (host)
  tables                                whether every PE's table converged to the source (detail says how not)
  bus-promoted                          after a returning bus host: ok when the promotion did not move back
  problem                               a failure the fault itself found (a deploy that failed), detail says it
  slot, skip                            chaos: a fault held (name, host, from t for duration, limit_s: the
                                        outage it may cause) / not started
  pool                                  HAProxy's view of one server (host) on the VIP's host: ok while it is UP
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Event:
    t: float                      # seconds since the scenario started
    kind: str
    detail: str = ""
    ok: bool = True
    host: str | None = None
    pid: str | None = None
    k: int | None = None
    action_id: str | None = None
    executor: str | None = None
    name: str | None = None
    outcome: str | None = None    # push: ok, failed (refused before it was applied) or unknown (may have been)
    duration: float | None = None
    stamped: float | None = None  # leader, action: when the DSD says it changed / sent it, on the scenario clock
    status: int | None = None     # write: the HTTP status it was answered with
    message: str | None = None    # write: the error message of an answer that refused it
    attempt: int | None = None    # attempt: its number (1 first); request: its last attempt's, when retried
    limit_s: float | None = None  # slot: the longest stretch of failed reads or writes the fault may cause

    def to_dict(self) -> dict:
        return {key: _rounded(value) for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, d: dict) -> Event:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in d.items() if key in known})


def _rounded(value: object) -> object:
    return round(value, 4) if isinstance(value, float) else value


class History:
    """Events on one clock: seconds since the scenario started (wall time kept to place the nodes' stamps)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self._events: list[Event] = []
        self.lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def add(self, kind: str, detail: str = "", *, ok: bool = True, t: float | None = None, **fields: Any) -> float:
        t = self.now() if t is None else t
        # kept as it is saved, so that a verdict recomputed from the events file is the command's own to the digit
        event = Event.from_dict(Event(t, kind, detail, ok, **fields).to_dict())
        with self.lock:
            self._events.append(event)
        return event.t

    def events(self) -> list[Event]:
        """Every event so far in time order (events recorded at one time keep the order they were added in)."""
        with self.lock:
            return sorted(self._events, key=lambda e: e.t)

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events() if e.kind == kind]

    def first(self, kind: str, after: float = 0.0) -> float | None:
        return next((e.t for e in self.events() if e.kind == kind and e.t >= after), None)
