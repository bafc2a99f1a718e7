"""The running nodes: `congressctl serve api-pe` (REST API + policy engine) and `congressctl serve dsd`."""

from __future__ import annotations

import asyncio
import logging

import uvloop

from congressctl.errors import NodeConfigError
from congressctl.inventory import SERVED_ROLES
from congressctl.node.config import NodeConfig, load_node_config

log = logging.getLogger("congressctl.node")


def serve(role: str, config_path: str, live_file: str | None = None) -> int:
    """Run one node process until SIGTERM; returns the process exit code (blocking). A DSD given `live_file`
    proves there at every heartbeat that it is alive (its OCF agent's monitor reads it)."""
    if role not in SERVED_ROLES:
        raise NodeConfigError(f"unknown role {role!r}; use one of {', '.join(SERVED_ROLES)}", field="role")
    cfg = load_node_config(config_path)
    from congressctl.node.runtime import setup_logging
    setup_logging(cfg.node_id, role, cfg.paths.log_dir)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_run(role, cfg, live_file))


async def _run(role: str, cfg: NodeConfig, live_file: str | None) -> int:
    if role == "dsd":
        from congressctl.node.dsd import DsdNode
        return await DsdNode(cfg, live_file=live_file).run()
    from congressctl.node.api_pe import ApiPeNode
    return await ApiPeNode(cfg).run()


__all__ = ["NodeConfig", "load_node_config", "serve"]
