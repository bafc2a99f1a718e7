"""The messages congress nodes exchange with each other and with congressctl: one dataclass per payload, shared
by the writer (which builds it and sends `to_dict()`) and every reader (which calls `from_dict`).

Three payloads: the heartbeat each node publishes on the bus (`PeHeartbeat`, `DsdHeartbeat`), the api-pe's
`GET /v1/status` answer (`ApiPeStatus`) and the DSD's liveness file (`DsdLiveness`, read by its OCF agent).
The JSON is the one nodes have always sent, so nodes of different versions understand each other: `from_dict`
ignores keys it does not know and gives a missing optional key its default; a missing required key, or a part
that is not a JSON object or list, raises TypeError.
No third-party imports: `congressctl status` reads these on the operator's machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Self

TablePositions = dict[str, list]   # "<datasource id>/<table>" -> [epoch, seq]


def _known(cls: type, data: Any) -> dict[str, Any]:
    """The keys of `data` that are fields of `cls` (a newer node may send more)."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    return {f.name: data[f.name] for f in fields(cls) if f.name in data}


def _optional(cls: Any, data: Any) -> Any:
    return cls.from_dict(data) if data else None


def _object(data: Any, what: str) -> dict:
    if not isinstance(data, dict):
        raise TypeError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


def _list(data: Any, what: str) -> list:
    if not isinstance(data, list):
        raise TypeError(f"{what}: expected a JSON list, got {type(data).__name__}")
    return data


@dataclass
class _Flat:
    """to_dict/from_dict of a dataclass whose fields are all plain JSON values (a dataclass itself, with no
    fields, so that mypy sees asdict() is given one)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        return cls(**_known(cls, data))


# ---------------------------------------------------------------------------------------------- requests


@dataclass
class RefreshRequest(_Flat):
    """An api-pe asks the DSD to poll a datasource now (POST /v1/data-sources/{ds}?action=request-refresh); sent
    on the action channel, where the DSD hears every request from the PEs."""

    refresh: str          # the datasource's id
    pe: str = ""


# ---------------------------------------------------------------------------------------------- heartbeats


@dataclass
class Leader(_Flat):
    """The PE process a DSD takes its action requests from."""

    node: str
    inc: str


@dataclass
class DsdCounts(_Flat):
    """The DSD's action requests since it started, by what became of them."""

    executed: int = 0
    replayed: int = 0
    ignored: int = 0
    expired: int = 0
    failed: int = 0
    leader_changes: int = 0


@dataclass
class DriverStatus(_Flat):
    """One datasource's driver as the DSD runs it."""

    initialized: bool = False
    last_updated: float | None = None
    number_of_updates: int = 0
    last_error: str | None = None
    actions_executed: int = 0
    actions_failed: int = 0


@dataclass
class DatasourceStatus:
    """A datasource in the DSD's heartbeat: its name and its driver's status, side by side on the wire."""

    name: str = ""
    status: DriverStatus = field(default_factory=DriverStatus)

    def to_dict(self) -> dict:
        return {"name": self.name, **self.status.to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> DatasourceStatus:
        return cls(name=_object(data, "datasource").get("name", ""), status=DriverStatus.from_dict(data))


@dataclass
class PeHeartbeat:
    """What an api-pe publishes every heartbeat interval: who it is, whether it finished its sync (only then
    does the DSD count it as a PE it hears from), the (epoch, seq) of each table it holds, and its breaks: one
    more at each bus subscription and at each table resync that jumped over diffs. A PE whose breaks changed
    missed some diffs (it was off the bus, or they waited behind a resync and were dropped as old), so a row that
    came and went among them derived no action there (0 from a node older than this field)."""

    node: str
    inc: str
    ts: float = 0.0
    synced: bool = False
    actions_sent: int = 0
    tables: TablePositions = field(default_factory=dict)
    role: str = "api-pe"
    breaks: int = 0

    def to_dict(self) -> dict:
        # the key order nodes have always sent
        return {"node": self.node, "role": self.role, "inc": self.inc, "ts": self.ts, "synced": self.synced,
                "actions_sent": self.actions_sent, "tables": dict(self.tables), "breaks": self.breaks}

    @classmethod
    def from_dict(cls, data: Any) -> PeHeartbeat:
        known = _known(cls, data)
        known["tables"] = _object(known.get("tables") or {}, "tables")
        return cls(**known)


@dataclass
class DsdHeartbeat:
    """What the DSD publishes every heartbeat interval: its epoch and tables' (epoch, seq) (a PE behind them
    resyncs), its leader PE, its request counts and its datasources' status."""

    node: str
    inc: str
    ts: float = 0.0
    epoch: int | None = None
    tables: TablePositions = field(default_factory=dict)
    leader: Leader | None = None
    leader_since: float | None = None
    counts: DsdCounts = field(default_factory=DsdCounts)
    buffered: int = 0
    datasources: dict[str, DatasourceStatus] = field(default_factory=dict)
    role: str = "dsd"

    def to_dict(self) -> dict:
        return {"node": self.node, "role": self.role, "inc": self.inc, "ts": self.ts, "epoch": self.epoch,
                "tables": dict(self.tables), "leader": self.leader.to_dict() if self.leader else None,
                "leader_since": self.leader_since, "counts": self.counts.to_dict(), "buffered": self.buffered,
                "datasources": {k: d.to_dict() for k, d in self.datasources.items()}}

    @classmethod
    def from_dict(cls, data: Any) -> DsdHeartbeat:
        known = _known(cls, data)
        known["tables"] = _object(known.get("tables") or {}, "tables")
        known["leader"] = _optional(Leader, known.get("leader"))
        known["counts"] = DsdCounts.from_dict(known.get("counts") or {})
        known["buffered"] = known.get("buffered") or 0
        known["datasources"] = {k: DatasourceStatus.from_dict(d)
                                for k, d in _object(known.get("datasources") or {}, "datasources").items()}
        return cls(**known)


# ---------------------------------------------------------------------------------------------- liveness


@dataclass
class DsdLiveness(_Flat):
    """What the DSD writes to its liveness file at every turn of its loop (atomically, one JSON line). Its OCF
    agent is shell: it reads the file's age (a paused or hung DSD writes nothing), `pid`, `epoch` (None: not
    serving yet) and `problem` (why this DSD must not run on this host, e.g. its bus is unreachable from here;
    None: it may), with `stale_after_s` the age past which the DSD counts as hung (whole seconds: the agent
    compares file times in seconds)."""

    node: str
    inc: str
    pid: int
    ts: float
    stale_after_s: int
    epoch: int | None = None
    bus_silent_s: float = 0.0
    problem: str | None = None


# ---------------------------------------------------------------------------------------------- /v1/status


@dataclass
class BusView(_Flat):
    """The api-pe's connection to the control bus."""

    host: str | None = None
    port: int | None = None
    connected: bool = False
    connects: int = 0
    last_error: str | None = None


@dataclass
class PeerView(_Flat):
    """A node the api-pe hears on the bus: how long ago its last heartbeat came."""

    node: str
    role: str
    incarnation: str | None = None
    age_ms: float | None = None
    alive: bool = False


@dataclass
class DsdView:
    """The DSD as the api-pe heard it last (its heartbeat, `age_ms` ago)."""

    node: str | None = None
    incarnation: str | None = None
    epoch: int | None = None
    leader: Leader | None = None
    leader_since: float | None = None
    counts: DsdCounts = field(default_factory=DsdCounts)
    buffered: int = 0
    age_ms: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> DsdView:
        known = _known(cls, data)
        known["leader"] = _optional(Leader, known.get("leader"))
        known["counts"] = DsdCounts.from_dict(known.get("counts") or {})
        known["buffered"] = known.get("buffered") or 0
        return cls(**known)


@dataclass
class TableView(_Flat):
    """One datasource table on this PE: the (epoch, seq) it holds, the DSD's, and how far behind it is
    (`lag` None: not comparable, e.g. another epoch)."""

    table: str
    datasource_id: str | None = None
    epoch: int = 0
    seq: int = 0
    dsd_epoch: int | None = None
    dsd_seq: int | None = None
    lag: int | None = None
    diffs_applied: int = 0
    rows_applied: int = 0
    resyncs: int = 0


@dataclass
class ActionsView(_Flat):
    """The action requests of this PE."""

    sent: int = 0
    queued: int = 0
    dropped: int = 0
    resent: int = 0


@dataclass
class ApiPeStatus:
    """An api-pe's answer to GET /v1/status."""

    node: str
    role: str = "api-pe"
    incarnation: str | None = None
    synced: bool = False
    healthy: bool = False
    bus: BusView = field(default_factory=BusView)
    peers: list[PeerView] = field(default_factory=list)
    dsd: DsdView | None = None
    tables: list[TableView] = field(default_factory=list)
    actions: ActionsView = field(default_factory=ActionsView)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ApiPeStatus:
        known = _known(cls, data)
        known["bus"] = BusView.from_dict(known.get("bus") or {})
        known["peers"] = [PeerView.from_dict(p) for p in _list(known.get("peers") or [], "peers")]
        known["dsd"] = _optional(DsdView, known.get("dsd"))
        known["tables"] = [TableView.from_dict(t) for t in _list(known.get("tables") or [], "tables")]
        known["actions"] = ActionsView.from_dict(known.get("actions") or {})
        return cls(**known)

    def table(self, name: str) -> TableView | None:
        return next((t for t in self.tables if t.table == name), None)


@dataclass(frozen=True)
class TokenHash:
    """One token as a host knows it: a name (for the operator), its role, the sha256 of its text (hex)."""

    name: str
    role: str
    sha256: str

    def to_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: dict) -> TokenHash:
        return cls(name=str(data["name"]), role=str(data["role"]), sha256=str(data["sha256"]))
