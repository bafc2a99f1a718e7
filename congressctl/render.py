"""Inventory model -> every config file, per node and once per cluster. Deterministic: same input, same bytes.

Templates live in templates/ (reached through the link congressctl/templates, so wheels carry them). No config text is
built in Python: each file is one template, rendered with StrictUndefined (and autoescape for XML).
"""

from __future__ import annotations

import importlib.resources
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from congressctl import tls
from congressctl.files import atomic_write
from congressctl.inventory import Inventory, Node
from congressctl.payloads import TokenHash

CIB_PATH = "/etc/congressctl/cib.xml"
REDIS_CONF_PATH = "/etc/congressctl/redis.conf"
OCF_DIR = "/usr/lib/ocf/resource.d/congressctl"
SBIN_DIR = "/opt/congressctl/sbin"
CLUSTER_SCRIPT = f"{SBIN_DIR}/congressctl-cluster"
FENCE_AGENT_DIR = "/usr/sbin"


@dataclass(frozen=True)
class Secrets:
    """Generated once by deploy and kept in the state dir; render never needs them to produce public files."""

    bus_password: str
    corosync_authkey: bytes
    api_tokens: tuple[TokenHash, ...] = ()   # only their hashes: what the node config carries
    tls: tls.Material | None = None


@dataclass(frozen=True)
class RenderedFile:
    path: str           # absolute path on the host
    content: bytes
    mode: int = 0o644
    owner: str | None = None
    secret: bool = False

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def templates_dir() -> Path:
    return Path(str(importlib.resources.files("congressctl") / "templates"))


def _environment(autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        autoescape=autoescape,
        keep_trailing_newline=True,
        trim_blocks=False,
    )
    env.filters["sh"] = shlex.quote   # paths in generated shell scripts (the lab host's setup.sh)
    return env


_TEXT = _environment(autoescape=False)
_XML = _environment(autoescape=True)


def render_template(name: str, **context: Any) -> str:
    """Render one template of templates/; XML and HTML templates are autoescaped."""
    env = _XML if name.endswith((".xml.j2", ".html.j2")) else _TEXT
    return env.get_template(name).render(**context)


def _context(inv: Inventory) -> dict:
    return {"inv": inv, "inventory_name": inv.path.name, "tls": tls}


def render_cib(inv: Inventory) -> bytes:
    """The Pacemaker configuration: properties, VIP+HAProxy, api-pe clone, DSD warm standby, the bus."""
    bus_nodes = inv.with_role("bus")
    multi_bus = len(bus_nodes) > 1
    count = len(inv.dsd_preference)
    dsd_scores = {name: 10 * (count - i) for i, name in enumerate(inv.dsd_preference)}
    return render_template("cib.xml.j2",
        **_context(inv),
        fencing_disabled=inv.pacemaker.fencing == "disabled",
        bus_nodes=bus_nodes,
        api_nodes=inv.with_role("api-pe"),
        multi_bus=multi_bus,
        bus_resource="bus-clone" if multi_bus else "bus",
        bus_entry="bus-vip" if multi_bus else "bus",
        dsd_scores=dsd_scores,
        **(_multi_bus(inv, bus_nodes) if multi_bus else {}),
    ).encode()


# Several bus nodes: the promoted bus, the DSD and the frontend prefer three hosts, so that one host's loss takes
# at most one of them. The DSD keeps following its preference list (scores 10 apart): it yields APART_DSD to
# each of the others, and two of those never outweigh one step of the list. The frontend yields APART_FRONTEND
# to the bus VIP, less than stickiness (100 by default): nothing running moves just to get out of the way.
# A resource placed afresh is also steered off the hosts of its active dependents (by their stickiness), which
# keeps a moving bus or frontend off the DSD. All finite: with fewer hosts they share one, nothing stops.
APART_FRONTEND = -50
APART_DSD = -4
FRONTEND_TIE_BREAK = 10


def _multi_bus(inv: Inventory, bus_nodes: list[Node]) -> dict:
    """The bus peers for congress-bus, and the tie-breaks that place the promoted bus and the frontend, when
    nothing runs yet, off the DSD's first choice and each other (later, congress-bus's scores decide)."""
    first_dsd = inv.dsd_preference[0]
    order = sorted(bus_nodes, key=lambda n: n.name == first_dsd)
    return {
        "bus_peers": " ".join(f"{n.name}={n.address}" for n in bus_nodes),
        "promote_scores": {n.name: len(order) - i for i, n in enumerate(order)},
        "frontend_prefers": [n.name for n in inv.nodes if n.name not in (first_dsd, order[0].name)],
        "frontend_tie_break": FRONTEND_TIE_BREAK,
        "apart_frontend": APART_FRONTEND,
        "apart_dsd": APART_DSD,
    }


def render_node(inv: Inventory, node: Node, secrets: Secrets | None = None) -> list[RenderedFile]:
    """Every file one node needs. Secret files are included only when secrets are given (deploy)."""
    ctx = {**_context(inv), "node": node}
    files = [
        RenderedFile("/etc/corosync/corosync.conf", render_template("corosync.conf.j2", **ctx).encode()),
        RenderedFile("/etc/haproxy/haproxy.cfg", render_template("haproxy.cfg.j2",
            **ctx, api_nodes=inv.with_role("api-pe")).encode()),
        RenderedFile("/etc/congressctl/congress.yaml", render_template("congress.yaml.j2", **ctx,
            api_tokens=[t.to_dict() for t in secrets.api_tokens] if secrets else []).encode()),
        RenderedFile(CIB_PATH, render_cib(inv)),
    ]
    if node.has("bus"):
        password = secrets.bus_password if secrets else None
        bus_nodes = len(inv.with_role("bus"))
        files.append(RenderedFile(REDIS_CONF_PATH,
                                  render_template("redis.conf.j2", **ctx, password=password,
                                                  multi_bus=bus_nodes > 1, bus_nodes=bus_nodes).encode(),
                                  mode=0o600, owner="redis", secret=secrets is not None))
    files.extend(programs())
    files.extend(fence_agents(inv))
    if secrets:
        files.append(RenderedFile("/etc/corosync/authkey", secrets.corosync_authkey, mode=0o400, secret=True))
        files.append(RenderedFile("/etc/congressctl/bus.password", secrets.bus_password.encode(), mode=0o600,
                                  secret=True))
    if secrets and secrets.tls:
        files.extend(tls_files(inv, node, secrets.tls))
    return files


def tls_files(inv: Inventory, node: Node, material: tls.Material) -> list[RenderedFile]:
    """The certificates and keys a node needs: the API's on every node (any may hold the VIP), the bus's on the
    bus nodes; the CA files everywhere (every node's clients verify with them)."""
    files = []
    if inv.api_tls.enabled:
        api = material.api
        files += [RenderedFile(tls.API_CA, material.api_ca),
                  RenderedFile(tls.API_CERT, api.cert),
                  RenderedFile(tls.API_KEY, api.key, mode=0o600, secret=True),
                  RenderedFile(tls.API_PEM, api.cert.rstrip(b"\n") + b"\n" + api.key, mode=0o600, secret=True)]
    if material.bus and material.bus_ca:
        files.append(RenderedFile(tls.BUS_CA, material.bus_ca))
        if node.has("bus"):
            files += [RenderedFile(tls.BUS_CERT, material.bus.cert, owner="redis"),
                      RenderedFile(tls.BUS_KEY, material.bus.key, mode=0o600, owner="redis", secret=True)]
    return files


def programs() -> list[RenderedFile]:
    """Executables shipped as they are: the OCF agents (ocf:congressctl:<name>) and the host's
    cluster-stack script."""
    files = []
    for folder, target in (("ocf", OCF_DIR), ("bin", SBIN_DIR)):
        source = templates_dir() / folder
        files += [RenderedFile(f"{target}/{p.name}", p.read_bytes(), mode=0o755)
                  for p in sorted(source.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return files


def fence_agents(inv: Inventory) -> list[RenderedFile]:
    """The fence agents shipped in templates/fence/ that the inventory's fence devices use, where Pacemaker's
    fencer looks for them."""
    used = {device.agent for device in inv.pacemaker.devices}
    return [RenderedFile(f"{FENCE_AGENT_DIR}/{p.name}", p.read_bytes(), mode=0o755)
            for p in sorted((templates_dir() / "fence").iterdir()) if p.name in used]


def render_all(inv: Inventory, secrets: Secrets | None = None) -> dict[str, list[RenderedFile]]:
    return {node.name: render_node(inv, node, secrets) for node in inv.nodes}


def write_tree(rendered: dict[str, list[RenderedFile]], cib: bytes, out: Path) -> list[Path]:
    """Write `out/<node>/<file>` and `out/cib.xml`, each atomically; returns the paths written."""
    written = [atomic_write(out / "cib.xml", cib, 0o644)]
    for node, files in sorted(rendered.items()):
        for f in files:
            if f.path == CIB_PATH:
                continue
            written.append(atomic_write(out / node / f.name, f.content, f.mode))
    return written
