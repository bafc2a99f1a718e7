"""Packet delay without sch_netem: hold each packet an iptables NFQUEUE rule hands us, then accept it.

Kernels built without sch_netem (CONFIG_NET_SCH_NETEM unset) cannot `tc qdisc add ... netem delay`, but an
iptables NFQUEUE rule can give every outgoing packet to a process, which decides when it goes on. This module is
that process, in the standard library only (no libnetfilter_queue to build on every host): it speaks the
nfnetlink_queue protocol (linux/netfilter/nfnetlink_queue.h) on a NETLINK_NETFILTER socket itself.

    python3 -m congressctl.failover.delay --queue 7 --delay-ms 100 --jitter-ms 20 --seconds 20

binds queue 7, holds each packet max(0, gauss(delay, jitter)) ms, and when the time is up or on SIGTERM accepts
what it holds, unbinds and prints one JSON line (a DelayReport). The rule goes in with --queue-bypass, so packets
pass undelayed whenever no delayer is bound.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import random
import select
import shlex
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from types import FrameType

from congressctl.errors import DelayError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFNETLINK_V0 = 0
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLA_TYPE_MASK = 0x3FFF   # the attribute type without its NESTED and NET_BYTEORDER flags
SO_RCVBUFFORCE = 33      # not in the socket module; lets root pass net.core.rmem_max
RCVBUF = 4 << 20         # a burst the loop cannot read at once waits here rather than overflowing (ENOBUFS)
RECV_SIZE = 65536

NLMSGHDR = struct.Struct("=IHHII")    # len, type, flags, seq, portid: host order
NFGENMSG = struct.Struct(">BBH")      # family, version, res_id (the queue number, big-endian)
NLATTR = struct.Struct("=HH")         # len, type
NLMSGERR = struct.Struct("=i")        # negative errno, 0 for an ack
QUEUE_PROC = "/proc/net/netfilter/nfnetlink_queue"
ANSWER_SECONDS = 5.0


@dataclass(frozen=True)
class DelayReport:
    """What one delayer run did: the JSON line it prints at its end, read back by the fault that ran it."""

    queue: int
    packets: int
    mean_delay_ms: float
    overflows: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DelayReport:
        return cls(queue=int(data["queue"]), packets=int(data["packets"]),
                   mean_delay_ms=float(data["mean_delay_ms"]), overflows=int(data["overflows"]))


def insert_rule(queue: int, interface: str) -> str:
    """The shell command that sends every packet leaving `interface` to `queue` (passing it when none listens)."""
    return shlex.join(["iptables", "-w", "-I", "OUTPUT", *_rule(queue, interface)])


def delete_rule(queue: int, interface: str) -> str:
    """The shell command that removes what insert_rule added (exit 1 when it is not there)."""
    return shlex.join(["iptables", "-w", "-D", "OUTPUT", *_rule(queue, interface)])


def _rule(queue: int, interface: str) -> list[str]:
    return ["-o", interface, "-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"]


def bound_queues() -> set[int]:
    """The queue numbers some process has bound in this network namespace (the kernel's own list; root only)."""
    try:
        with open(QUEUE_PROC) as f:
            return {int(line.split()[0]) for line in f if line.strip()}
    except OSError:   # not root: nothing to tell
        return set()


def _attr(kind: int, payload: bytes) -> bytes:
    length = NLATTR.size + len(payload)
    return NLATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + NLATTR.size <= len(data):
        length, kind = NLATTR.unpack_from(data, offset)
        if length < NLATTR.size:
            return
        yield kind & NLA_TYPE_MASK, data[offset + NLATTR.size:offset + length]
        offset += (length + 3) & ~3


class Queue:
    """One bound nfnetlink queue: packet ids in, verdicts out."""

    def __init__(self, number: int):
        self.number = number
        self.overflows = 0
        self._seq = 0
        self._sock = _open_socket()

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def bind(self) -> list[int]:
        """Bind, asking for packet metadata only; returns the ids of packets that came before the kernel's ack."""
        params = struct.pack(">IB", 0, NFQNL_COPY_META)
        return self._configure(_attr(NFQA_CFG_CMD, struct.pack(">BBH", NFQNL_CFG_CMD_BIND, 0, 0))
                               + _attr(NFQA_CFG_PARAMS, params))

    def fail_open(self) -> list[int]:
        """Let the kernel accept new packets itself (a queue of length 0 that fails open), so none waits on us."""
        flags = struct.pack(">I", NFQA_CFG_F_FAIL_OPEN)
        return self._configure(_attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", 0))
                               + _attr(NFQA_CFG_MASK, flags) + _attr(NFQA_CFG_FLAGS, flags))

    def unbind(self) -> list[int]:
        return self._configure(_attr(NFQA_CFG_CMD, struct.pack(">BBH", NFQNL_CFG_CMD_UNBIND, 0, 0)))

    def accept(self, packet_id: int) -> None:
        verdict = _attr(NFQA_VERDICT_HDR, struct.pack(">II", NF_ACCEPT, packet_id))
        self._send(NFQNL_MSG_VERDICT, verdict, flags=NLM_F_REQUEST)

    def receive(self) -> list[int]:
        """The ids of the packets in one read (none when nothing waits or the socket overflowed)."""
        return [value for kind, value in self._read() or [] if kind == "packet"]

    def drain(self) -> list[int]:
        """The ids of every packet waiting on the socket."""
        ids: list[int] = []
        while (messages := self._read()) is not None:
            ids += [value for kind, value in messages if kind == "packet"]
        return ids

    def _configure(self, attrs: bytes) -> list[int]:
        seq = self._send(NFQNL_MSG_CONFIG, attrs, flags=NLM_F_REQUEST | NLM_F_ACK)
        early: list[int] = []
        deadline = time.monotonic() + ANSWER_SECONDS
        while select.select([self._sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
            for kind, value in self._read(seq) or []:
                if kind == "packet":
                    early.append(value)
                elif value:
                    raise DelayError(_refusal(self.number, -value))
                else:
                    return early
        raise DelayError(f"queue {self.number}: the kernel did not answer a configuration in {ANSWER_SECONDS} s")

    def _send(self, msg_type: int, attrs: bytes, *, flags: int) -> int:
        self._seq += 1
        body = NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, self.number) + attrs
        header = NLMSGHDR.pack(NLMSGHDR.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, self._seq, 0)
        self._sock.send(header + body)
        return self._seq

    def _read(self, seq: int | None = None) -> list[tuple[str, int]] | None:
        """("packet", id) per packet and ("ack", -errno or 0) for request `seq`; None when nothing is waiting.

        ENOBUFS (the socket overflowed: the kernel dropped those packets, none of them waits on us) is counted
        and reads as no message.
        """
        try:
            data = self._sock.recv(RECV_SIZE)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise DelayError(f"queue {self.number}: netlink receive failed: {e}") from e
            self.overflows += 1
            return []
        return list(_messages(data, seq))


def _messages(data: bytes, seq: int | None) -> Iterator[tuple[str, int]]:
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, msg_type, _flags, msg_seq, _portid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size:
            return
        body = data[offset + NLMSGHDR.size:offset + length]
        if msg_type == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            yield from _packet_id(body)
        elif msg_type == NLMSG_ERROR and msg_seq == seq:
            yield "ack", NLMSGERR.unpack_from(body)[0]
        offset += (length + 3) & ~3


def _packet_id(body: bytes) -> Iterator[tuple[str, int]]:
    for kind, payload in _attrs(body[NFGENMSG.size:]):
        if kind == NFQA_PACKET_HDR:
            yield "packet", struct.unpack_from(">I", payload)[0]


def _open_socket() -> socket.socket:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as e:
        raise DelayError(f"no netfilter netlink socket on this kernel: {e}") from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.bind((0, 0))
    sock.setblocking(False)
    return sock


def _refusal(queue: int, code: int) -> str:
    if code == errno.EPERM and queue in bound_queues():
        return f"queue {queue} is already bound by another process (see {QUEUE_PROC})"
    if code == errno.EPERM:
        return f"binding queue {queue} was refused: it needs root (CAP_NET_ADMIN in this network namespace)"
    return f"queue {queue} refused its configuration: {os.strerror(code)}"


class Held:
    """The packets held, each for max(0, gauss(delay, jitter)) ms, in the order they are due."""

    def __init__(self, *, delay_ms: float, jitter_ms: float, rng: random.Random) -> None:
        self._delay = delay_ms / 1000
        self._jitter = jitter_ms / 1000
        self._rng = rng
        self._heap: list[tuple[float, int, float]] = []   # due, packet id, arrival
        self.released = 0
        self.held_seconds = 0.0

    def add_all(self, ids: list[int], *, hold: float | None = None) -> None:
        """Hold packets that arrived now, for `hold` seconds or else for a fresh random delay each."""
        now = time.monotonic()
        for packet_id in ids:
            seconds = max(0.0, self._rng.gauss(self._delay, self._jitter)) if hold is None else hold
            heapq.heappush(self._heap, (now + seconds, packet_id, now))

    def next_due(self) -> float:
        return self._heap[0][0] if self._heap else float("inf")

    def pop_due(self, now: float) -> Iterator[int]:
        """Take out every packet due by `now` (all of them when now is inf), earliest first."""
        while self._heap and self._heap[0][0] <= now:
            _due, packet_id, arrival = heapq.heappop(self._heap)
            self.released += 1
            self.held_seconds += time.monotonic() - arrival
            yield packet_id


@contextmanager
def _stop_signals() -> Iterator[socket.socket]:
    """A socket that turns readable on SIGTERM or SIGINT (select would otherwise sleep through them)."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writer.fileno())
    previous = {s: signal.signal(s, _ignore) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield reader
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_fd)
        reader.close()
        writer.close()


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    return None


def run(queue: int, *, delay_ms: float, jitter_ms: float, seconds: float, rng: random.Random) -> DelayReport:
    """Delay what `queue` receives for `seconds` or until SIGTERM/SIGINT; every packet held is accepted at the end."""
    q = Queue(queue)
    held = Held(delay_ms=delay_ms, jitter_ms=jitter_ms, rng=rng)
    try:
        with _stop_signals() as stop:
            held.add_all(q.bind())
            _loop(q, held, stop, deadline=time.monotonic() + seconds)
            _release_all(q, held)
    finally:
        q.close()
    mean = held.held_seconds / held.released * 1000 if held.released else 0.0
    return DelayReport(queue=queue, packets=held.released, mean_delay_ms=round(mean, 1), overflows=q.overflows)


def _loop(q: Queue, held: Held, stop: socket.socket, *, deadline: float) -> None:
    while (now := time.monotonic()) < deadline:
        wait = max(0.0, min(deadline, held.next_due()) - now)
        readable, _, _ = select.select([q.fileno(), stop.fileno()], [], [], wait)
        if stop.fileno() in readable:
            return
        if q.fileno() in readable:
            held.add_all(q.receive())
        for packet_id in held.pop_due(time.monotonic()):
            q.accept(packet_id)


def _release_all(q: Queue, held: Held) -> None:
    """Accept everything held, the kernel passing new packets meanwhile: an unbind drops what is still queued."""
    held.add_all([*q.fail_open(), *q.drain()], hold=0.0)
    for packet_id in held.pop_due(float("inf")):
        q.accept(packet_id)
    q.unbind()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m congressctl.failover.delay",
                                     description="Delay the packets an iptables NFQUEUE rule sends to a queue.")
    parser.add_argument("--queue", type=int, required=True, help="NFQUEUE number (the rule's --queue-num)")
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="standard deviation of the delay")
    parser.add_argument("--seconds", type=float, required=True, help="stop by then even without SIGTERM")
    parser.add_argument("--seed", type=int, default=None)
    ns = parser.parse_args(argv)
    try:
        report = run(ns.queue, delay_ms=ns.delay_ms, jitter_ms=ns.jitter_ms, seconds=ns.seconds,
                     rng=random.Random(ns.seed))
    except DelayError as e:
        sys.stderr.write(f"congressctl delay: {e}\n")
        return e.exit_code
    sys.stdout.write(json.dumps(report.to_dict()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
