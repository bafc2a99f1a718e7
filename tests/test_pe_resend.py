"""PolicyNode.resend_recent: a reconnect storm sends the recent window again without making it grow."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

from congressctl.node.pe import PolicyNode


class Published:
    """Stands in for the bus session: every PUBLISH is heard by one DSD and kept for the test to read."""

    def __init__(self) -> None:
        self.stopping = False
        self.channels = SimpleNamespace(action="act")
        self.batches: list[list[dict]] = []

    async def publish(self, channel: str, payload: dict) -> int:
        self.batches.append(payload["reqs"])
        return 1


async def _sent_through(pe: PolicyNode, bus: Published, *, until: int) -> None:
    task = asyncio.get_running_loop().create_task(pe.send_actions(bus))   # type: ignore[arg-type]
    while sum(len(b) for b in bus.batches) < until:
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_resending_after_each_of_many_reconnects_sends_the_window_once_each_and_it_does_not_grow():
    async def scenario() -> None:
        pe = PolicyNode(store=None, node_id="n1", incarnation="i1", peer_timeout_s=1.0, hold_s=0.0)  # type: ignore[arg-type]
        pe.is_leader = lambda: True   # type: ignore[method-assign]
        bus = Published()
        for i in range(3):
            pe.outbox.put_nowait({"id": f"a{i}", "ds": "d", "name": "notify", "args": [i]})
        await _sent_through(pe, bus, until=3)
        for storm in range(5):
            pe.resend_recent(direct=False)
            await _sent_through(pe, bus, until=3 + 3 * (storm + 1))
        assert len(pe.recent) == 3 and not pe.resending
        assert [sorted(r["id"] for r in b) for b in bus.batches[1:]] == [["a0", "a1", "a2"]] * 5
    asyncio.run(scenario())
