"""HAProxy on a live host: its stats socket (read the servers, drain one and put it back) and `show stat`.

The socket is `stats socket /run/haproxy/admin.sock ... level admin` in templates/haproxy.cfg.j2; socat talks
to it. Server names in the backend are the inventory's node names.
"""

from __future__ import annotations

import csv
import io
import shlex
from dataclasses import dataclass

from congressctl import remote
from congressctl.errors import RemoteError

SOCKET = "/run/haproxy/admin.sock"
API_BACKEND = "congress_api_pe"
SOCKET_TIMEOUT_S = 3.0


@dataclass
class Backend:
    """One HAProxy server line of `show stat` (status as HAProxy says it: UP, DOWN, "UP 1/2", DRAIN, MAINT, ...;
    sessions: the streams it serves now)."""

    proxy: str
    server: str
    status: str
    check: str
    address: str
    sessions: int = 0

    @property
    def up(self) -> bool:
        return self.status.startswith("UP")


def parse_stat(text: str) -> list[Backend]:
    """Server lines of HAProxy's `show stat` CSV (its header line starts with '# ')."""
    lines = text.strip().splitlines()
    if not lines or not lines[0].startswith("# "):
        return []
    rows = csv.DictReader(io.StringIO("\n".join([lines[0][2:], *lines[1:]])))
    return [Backend(proxy=r["pxname"], server=r["svname"], status=r["status"], check=r.get("check_status") or "",
                    address=r.get("addr") or "", sessions=int(r.get("scur") or 0))
            for r in rows if r.get("svname") not in (None, "FRONTEND", "BACKEND")]


def socket_command(command: str, timeout: float = SOCKET_TIMEOUT_S) -> str:
    """A shell command sending one command to the stats socket (UNIX-CONNECT: a bare path would make socat
    create a regular file where the socket is missing)."""
    return (f"echo {shlex.quote(command)} | timeout {timeout:g} socat -t {timeout:g} stdio "
            f"UNIX-CONNECT:{SOCKET}")


def servers(conn: remote.Connection, proxy: str = API_BACKEND) -> dict[str, Backend]:
    """The servers of `proxy` on the connected host's HAProxy, by name."""
    out = conn.run(socket_command("show stat"), timeout=SOCKET_TIMEOUT_S + 5).stdout
    return {b.server: b for b in parse_stat(out) if b.proxy == proxy}


def set_state(conn: remote.Connection, server: str, state: str, proxy: str = API_BACKEND) -> None:
    """`state` is ready, drain (no new requests, the current ones go on) or maint."""
    out = conn.run(socket_command(f"set server {proxy}/{server} state {state}"), timeout=SOCKET_TIMEOUT_S + 5).stdout
    if out.strip():
        raise RemoteError(f"HAProxy refused `set server {proxy}/{server} state {state}`: {out.strip()}",
                                 host=conn.host.name)
