"""Every error the library raises on purpose: small, named, carrying where it happened.

The CLI has one wrapper that turns these into a message on stderr and an exit code.
"""

from __future__ import annotations

from typing import TypedDict, Unpack


class Where(TypedDict, total=False):
    """Where an error happened: the keyword arguments every CongressctlError takes (subclasses pass them on)."""

    host: str | None
    file: str | None
    line: int | None
    column: int | None
    field: str | None


class CongressctlError(Exception):
    """Base of every error congressctl raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, host: str | None = None, file: str | None = None,
                 line: int | None = None, column: int | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.host = host
        self.file = file
        self.line = line
        self.column = column
        self.field = field

    def where(self) -> str:
        """Location prefix such as 'inv.yaml:12:5: nodes[1].address' or 'host n2'."""
        parts = []
        if self.file:
            loc = self.file
            if self.line is not None:
                loc += f":{self.line}"
                if self.column is not None:
                    loc += f":{self.column}"
            parts.append(loc)
        if self.host:
            parts.append(f"host {self.host}")
        if self.field:
            parts.append(self.field)
        return ": ".join(parts)

    def __str__(self) -> str:
        where = self.where()
        return f"{where}: {self.message}" if where else self.message


class InventoryError(CongressctlError):
    """The inventory is invalid; nothing is rendered or written."""

    exit_code = 2

    def __init__(self, problems: list[InventoryProblem] | None = None, message: str | None = None,
                 **kw: Unpack[Where]):
        self.problems = problems or []
        super().__init__(message or "\n".join(str(p) for p in self.problems), **kw)

    def __str__(self) -> str:
        if self.problems:
            return "\n".join(str(p) for p in self.problems)
        return super().__str__()


class InventoryProblem(CongressctlError):
    """One problem found in an inventory (one of InventoryError.problems)."""

    exit_code = 2


class UnknownNodeError(CongressctlError):
    """A node name that the inventory does not have."""

    exit_code = 2


class ToolMissingError(CongressctlError):
    """A validator tool that a check needs is not installed."""

    exit_code = 2


class ToolFailedError(CongressctlError):
    """A tool that a check or a build runs failed on its own (not a rendered file refused): nothing was checked."""

    exit_code = 2


class ToolTimeoutError(CongressctlError):
    """A tool that a check or a build runs did not finish within its time and was killed."""

    exit_code = 2


class RemoteError(CongressctlError):
    """An SSH connection, transfer or remote command failed on one host."""


class HostKeyError(RemoteError):
    """A host's SSH key is unknown or has changed; refused as OpenSSH would."""

    exit_code = 2


class NoHostAnswered(RemoteError):
    """Every host tried in turn failed (remote.first_reachable); `failures` says how, one "NAME: error" each."""

    def __init__(self, failures: list[str], **kw: Unpack[Where]):
        self.failures = failures
        super().__init__("no host answered: " + ("; ".join(failures) or "no host to try"), **kw)


class DeployError(CongressctlError):
    """A deploy step failed on one or more hosts."""

    def __init__(self, message: str, *, step: str | None = None, **kw: Unpack[Where]):
        super().__init__(message, **kw)
        self.step = step


class AuthError(CongressctlError):
    """An API token could not be read or made (its file, its environment variable, the state dir's admin token)."""


class TlsError(CongressctlError):
    """A certificate, key or CA file is missing or unusable."""


class LabError(CongressctlError):
    """The lab could not be made, inspected or torn down."""

    exit_code = 2


class BusError(CongressctlError):
    """The Redis control bus is unreachable or refused us."""


class NodeConfigError(CongressctlError):
    """A node config file (what `congressctl serve` reads) is missing or invalid."""

    exit_code = 2


class StatusError(CongressctlError):
    """Cluster status could not be gathered."""

    exit_code = 2


class FailoverError(CongressctlError):
    """A failover-test scenario could not be run or the cluster did not recover."""


class PolicyError(CongressctlError):
    """A policy, rule or query was refused: syntax, safety, arity/schema, recursion, unknown name."""

    exit_code = 2

    def __init__(self, message: str, *, rule: str | None = None, position: int | None = None,
                 kind: str = "invalid", **kw: Unpack[Where]):
        super().__init__(message, **kw)
        self.rule = rule
        self.position = position
        self.kind = kind


class DatasourceConfigError(CongressctlError):
    """A datasource definition was refused: unknown driver, bad tables/columns, bad URL or interval."""


class InputLimitError(CongressctlError):
    """A request went past a bound on its input: nesting, or the length of a name, rule text or row cell."""


class ActionDeliveryError(CongressctlError):
    """An action could not be delivered to its datasource's action URL (connect, timeout or HTTP error)."""


class NotReplicatedError(BusError):
    """A bus write was not confirmed by enough replicas in time (or was refused for lack of them)."""


class DelayError(FailoverError):
    """The packet delayer could not bind its NFQUEUE (not root, queue taken) or lost its netlink socket."""


class PowerSwitchError(CongressctlError):
    """The lab's power switch refused a request (bad key, replay, unknown plug) or could not be reached."""
