"""The lab's power switch: a daemon on the machine that powers lab hosts off, on and through a reboot, as
fence_virtd does for VMs. Its client on the hosts is the fence agent templates/fence/fence_congresslab, which
Pacemaker calls like any other; `power` is the client for code on the machine (tests, faults).

Protocol: one JSON line each way over TCP (the bridge address, PORT). A request names an action, a plug (a host
name; empty for `list`), a time and a nonce, and carries an HMAC-SHA256 over them with the lab's shared key. A
request with a wrong MAC, a time more than MAX_SKEW_S away or a nonce seen before is refused: without the key
nobody on the bridge can power a host off, nor replay a request seen on the wire. The agent builds the same
message itself (it is self-contained); tests/test_powerswitch.py runs it against this switch.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from congressctl.errors import PowerSwitchError
from congressctl.files import atomic_write

PORT = 1229                 # fence_virtd's
MAX_SKEW_S = 30
MAX_LINE = 4096
POWER_ACTIONS = ("on", "off", "reboot")
ACTIONS = (*POWER_ACTIONS, "status", "list")
CLIENT_TIMEOUT_S = 60.0     # a reboot waits for the host's sshd
READ_TIMEOUT_S = 5.0

log = logging.getLogger("congressctl.powerswitch")


class Power(Protocol):
    """What the switch switches: the lab's hosts (lab.LabPower)."""

    def plugs(self) -> list[str]: ...
    def is_on(self, plug: str) -> bool: ...
    def off(self, plug: str) -> None: ...
    def on(self, plug: str) -> None: ...


def mac_of(key: bytes, *, action: str, plug: str, time: int, nonce: str) -> str:
    message = f"{action}\n{plug}\n{time}\n{nonce}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Request:
    action: str
    plug: str
    time: int
    nonce: str
    mac: str = ""

    @classmethod
    def signed(cls, key: bytes, *, action: str, plug: str = "", now: float | None = None) -> Request:
        stamp = int(time.time() if now is None else now)
        nonce = secrets.token_hex(16)
        return cls(action, plug, stamp, nonce, mac_of(key, action=action, plug=plug, time=stamp, nonce=nonce))

    def authentic(self, key: bytes) -> bool:
        expected = mac_of(key, action=self.action, plug=self.plug, time=self.time, nonce=self.nonce)
        return hmac.compare_digest(expected, self.mac)

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "plug": self.plug, "time": self.time, "nonce": self.nonce, "mac": self.mac}

    @classmethod
    def from_dict(cls, data: object) -> Request:
        """Raises PowerSwitchError naming the first field that is missing or of the wrong type."""
        if not isinstance(data, dict):
            raise PowerSwitchError("a request is a JSON object")
        types = {"action": str, "plug": str, "time": int, "nonce": str, "mac": str}
        for name, kind in types.items():
            if not isinstance(data.get(name), kind) or isinstance(data.get(name), bool):
                raise PowerSwitchError(f"field {name!r} missing or not a {kind.__name__}", field=name)
        return cls(data["action"], data["plug"], data["time"], data["nonce"], data["mac"])


@dataclass(frozen=True)
class Answer:
    ok: bool
    status: str = ""                                 # "on" or "off": the plug's state after the action
    plugs: tuple[str, ...] = ()                      # for list
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "status": self.status, "plugs": list(self.plugs), "error": self.error}

    @classmethod
    def from_dict(cls, data: object) -> Answer:
        if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
            raise PowerSwitchError(f"not an answer of the power switch: {str(data)[:200]}")
        return cls(ok=data["ok"], status=str(data.get("status") or ""),
                   plugs=tuple(str(p) for p in data.get("plugs") or ()), error=str(data.get("error") or ""))


def parse_request(line: bytes) -> Request:
    try:
        data = json.loads(line.decode())
    except (UnicodeDecodeError, ValueError):
        raise PowerSwitchError("a request is one line of JSON") from None
    return Request.from_dict(data)


@dataclass
class Switch:
    """Answers requests one at a time (power actions on one lab must not interleave); never raises."""

    key: bytes
    power: Power
    clock: Callable[[], float] = time.time
    seen: dict[str, int] = field(default_factory=dict)   # nonce -> its request's time, kept MAX_SKEW_S

    def handle(self, line: bytes) -> Answer:
        try:
            request = self._admit(parse_request(line))
            return self._act(request)
        except PowerSwitchError as exc:
            return Answer(ok=False, error=f"refused: {exc}")
        except Exception as exc:   # a failing power action is answered, never the end of the switch
            log.exception("request failed")
            return Answer(ok=False, error=f"failed: {type(exc).__name__}: {exc}")

    def _admit(self, request: Request) -> Request:
        now = int(self.clock())
        self.seen = {n: t for n, t in self.seen.items() if abs(now - t) <= MAX_SKEW_S}
        if not request.authentic(self.key):
            raise PowerSwitchError("bad MAC (wrong key, or a request altered on the way)")
        if abs(now - request.time) > MAX_SKEW_S:
            raise PowerSwitchError(f"request time {request.time} is more than {MAX_SKEW_S} s from the switch's {now}")
        if request.nonce in self.seen:
            raise PowerSwitchError("nonce seen before (a replayed request)")
        self.seen[request.nonce] = request.time
        if request.action not in ACTIONS:
            raise PowerSwitchError(f"unknown action {request.action!r} (one of {', '.join(ACTIONS)})")
        if request.action != "list" and request.plug not in self.power.plugs():
            raise PowerSwitchError(f"no plug {request.plug!r} (plugs: {', '.join(self.power.plugs())})")
        return request

    def _act(self, request: Request) -> Answer:
        plug = request.plug
        if request.action == "list":
            return Answer(ok=True, plugs=tuple(self.power.plugs()))
        if request.action in ("off", "reboot"):
            self.power.off(plug)
        if request.action in ("on", "reboot"):
            self.power.on(plug)
        return Answer(ok=True, status="on" if self.power.is_on(plug) else "off")


# ---------------------------------------------------------------------------------------------- daemon

def serve(*, address: str, key: bytes, power: Power, pid_file: Path, port: int = PORT) -> None:
    """Listen on address:port and answer until killed; writes pid_file once listening (lab up waits for it)."""
    switch = Switch(key=key, power=power)
    with socket.create_server((address, port), reuse_port=False) as server:
        atomic_write(pid_file, f"{os.getpid()}\n".encode(), 0o644)
        log.info("listening on %s:%d", address, port)
        while True:
            conn, peer = server.accept()
            with conn:
                _answer(switch, conn, peer)


def _answer(switch: Switch, conn: socket.socket, peer: tuple) -> None:
    conn.settimeout(READ_TIMEOUT_S)
    try:
        line = _read_line(conn)
    except (OSError, PowerSwitchError) as exc:
        log.info("%s: no request read (%s)", peer[0], exc)
        answer = Answer(ok=False, error=f"refused: {exc}")
    else:
        if not line:   # a connection that sent nothing: lab up's readiness probe, or a port scan
            return
        answer = switch.handle(line)
        log.info("%s: %s -> %s", peer[0], line[:300].decode(errors="replace"), answer.to_dict())
    conn.settimeout(READ_TIMEOUT_S)
    try:
        conn.sendall(json.dumps(answer.to_dict()).encode() + b"\n")
    except OSError as exc:
        log.info("%s: answer not sent (%s)", peer[0], exc)


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(MAX_LINE)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_LINE:
            raise PowerSwitchError(f"request longer than {MAX_LINE} bytes")
    return data.split(b"\n", 1)[0]


# ---------------------------------------------------------------------------------------------- client

def send(*, address: str, key: bytes, action: str, plug: str = "", port: int = PORT,
         timeout: float = CLIENT_TIMEOUT_S) -> Answer:
    """One signed request; raises PowerSwitchError when the switch cannot be reached or refuses it."""
    request = Request.signed(key, action=action, plug=plug)
    try:
        with socket.create_connection((address, port), timeout=timeout) as conn:
            conn.sendall(json.dumps(request.to_dict()).encode() + b"\n")
            reply = _read_line(conn)
    except OSError as exc:
        raise PowerSwitchError(f"power switch {address}:{port} did not answer: {exc}") from None
    try:
        answer = Answer.from_dict(json.loads(reply.decode() or "null"))
    except ValueError:
        raise PowerSwitchError(f"power switch {address}:{port} answered garbage: {reply[:200]!r}") from None
    if not answer.ok:
        raise PowerSwitchError(f"power switch {address}:{port}: {answer.error}", host=plug or None)
    return answer
