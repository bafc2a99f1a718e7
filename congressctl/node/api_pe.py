"""The api-pe node: the Congress v1 REST API (Starlette on uvicorn) in front of a policy engine.

Writes go to the store first (atomic Lua scripts that also publish the change notice), then to the local
engine so a client reads its own writes; every other PE applies the notice at once. Reads are served from
the local mirror and engine. `/healthz` is 200 only when the bus is connected and the PE has finished its
sync since the last (re)connect.

Stopping (SIGTERM) drains first: `/healthz` answers 503 at once while every other request is still served,
for DRAIN_S, long enough for HAProxy to mark the node down and send it nothing more; then the listener closes
and the requests in flight get up to IN_FLIGHT_S to finish. The bus stays up until the last one is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from congressctl.bus import Bus
from congressctl.errors import BusError, DatasourceConfigError, PolicyError
from congressctl.node.config import NodeConfig
from congressctl.node.drivers import coerce_rows, normalize_datasource, table_columns
from congressctl.node.pe import PolicyNode, rows_of
from congressctl.node.runtime import BusWorker
from congressctl.node.store import Store
from congressctl.payloads import (
    ActionsView,
    ApiPeStatus,
    BusView,
    DriverStatus,
    DsdHeartbeat,
    DsdView,
    PeerView,
    PeHeartbeat,
)

log = logging.getLogger("congressctl.api")

# what the engine takes as a policy name: refused here, before anything is stored
POLICY_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
POLICY_KINDS = ("nonrecursive", "action", "database", "materialized")
# Set on answers given while the bus is out of reach: seconds since it was last heard from (the answer comes
# from this node's copy, which may miss what changed meanwhile).
BUS_AGE_HEADER = "X-Congress-Bus-Age"
# A bus failover (promote a replica, move the bus address) takes a few seconds; a node whose bus stays away
# longer leaves HAProxy's pool (its /healthz answers 503).
BUS_OUTAGE_GRACE_S = 10.0
# The v1 API's date as Congress publishes it (congress/api/versions.py): this node serves that same v1, and
# python-congressclient's `congress version list` shows the date.
V1_UPDATED = "2013-08-12T17:42:13Z"
# Congress has no per-tenant policies: its engine creates every policy with owner "user", and
# python-congressclient's `congress policy list` shows the column.
POLICY_OWNER = "user"
# HAProxy (templates/haproxy.cfg.j2) marks a server down after `fall 2` failed checks, the first within
# `inter 500ms`, the second `fastinter 250ms` later: 1.5 s covers that with room for a slow check.
DRAIN_S = 1.5
IN_FLIGHT_S = 5.0


class ApiError(Exception):
    """An HTTP error answer (status, message, extra error fields)."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "error_code": status, **extra}}, status_code=status)


def results(items: list) -> JSONResponse:
    return JSONResponse({"results": items})


def table_spec(table: str, columns: list[str]) -> dict:
    return {"table_id": table, "columns": [{"name": c, "description": ""} for c in columns]}


def rows_body(rows: list[tuple]) -> JSONResponse:
    return results([{"data": list(r)} for r in rows])


async def json_body(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise ApiError(400, "request body is not valid JSON") from None


def _v1_version(request: Request) -> dict:
    return {"id": "v1", "status": "CURRENT", "updated": V1_UPDATED,
            "links": [{"rel": "self", "href": str(request.url_for("v1"))}]}


def public_rule(rule: dict) -> dict:
    return {k: rule.get(k, "") for k in ("id", "name", "comment", "rule")}


class Api:
    """Route handlers; each one is a small method, errors are raised as ApiError / named exceptions."""

    def __init__(self, node: ApiPeNode):
        self.node = node
        self.pe = node.pe
        self.store = node.store

    # -- helpers --------------------------------------------------------------------------------------
    # A name this node does not know may have been created through another node a moment ago: catch up on
    # the notices before answering 404.
    async def _policy(self, request: Request) -> dict:
        ref = request.path_params["policy"]
        if self.pe.policy(ref) is None:
            await self.pe.catch_up()
        policy = self.pe.policy(ref)
        if policy is None:
            raise ApiError(404, f"policy {ref!r} not found")
        return policy

    async def _datasource(self, request: Request) -> dict:
        ref = request.path_params["ds"]
        if self.pe.datasource(ref) is None:
            await self.pe.catch_up()
        ds = self.pe.datasource(ref)
        if ds is None:
            raise ApiError(404, f"datasource {ref!r} not found")
        return ds

    def _rule(self, policy: dict, rule_id: str) -> dict:
        rule = self.pe.rules.get(policy["id"], {}).get(rule_id)
        if rule is None:
            rule = next((r for r in self.pe.rules.get(policy["id"], {}).values() if r.get("name") == rule_id), None)
        if rule is None:
            raise ApiError(404, f"rule {rule_id!r} not found in policy {policy['name']!r}")
        return rule

    # -- root, health, status -------------------------------------------------------------------------
    async def root(self, request: Request) -> Response:
        """Version document of the v1 API."""
        return JSONResponse(_v1_version(request))

    async def versions(self, request: Request) -> Response:
        """List of API versions."""
        return JSONResponse({"versions": [_v1_version(request)]})

    async def healthz(self, request: Request) -> Response:
        """200 when the bus is reachable and the PE is synced, else 503 (used by HAProxy)."""
        problem = self.node.health_problem()
        if problem:
            return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ok", "node": self.node.cfg.node_id})

    async def status(self, request: Request) -> Response:
        """Bus peers, the DSD's leader and counts, and (epoch, seq) per table with lag (congressctl status)."""
        return JSONResponse(self.node.status().to_dict())

    async def openapi(self, request: Request) -> Response:
        """This OpenAPI document."""
        return JSONResponse(self.node.openapi)

    # -- policies -------------------------------------------------------------------------------------
    async def list_policies(self, request: Request) -> Response:
        """List policies."""
        return results(sorted(self.pe.policies.values(), key=lambda p: p["name"]))

    async def create_policy(self, request: Request) -> Response:
        """Create a policy: {"name", "description"?, "kind"?, "abbreviation"?}."""
        body = await json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        name = body.get("name")
        if not isinstance(name, str) or not POLICY_NAME_RE.match(name):
            raise ApiError(400, f"policy name must match {POLICY_NAME_RE.pattern} (got {name!r})", field="name")
        kind = body.get("kind") or "nonrecursive"
        if kind not in POLICY_KINDS:
            raise ApiError(400, f"policy kind must be one of {', '.join(POLICY_KINDS)}", field="kind")
        if self.pe.datasource(name) is not None:
            raise ApiError(409, f"name {name!r} is already used by a datasource")
        policy = {"id": str(uuid.uuid4()), "name": name, "description": str(body.get("description") or ""),
                  "kind": kind, "abbreviation": str(body.get("abbreviation") or name[:5]), "owner_id": POLICY_OWNER}
        if not await self.store.create_policy(policy):
            raise ApiError(409, f"policy {name!r} already exists")
        try:
            self.pe.apply_policy(policy)
        except PolicyError:
            await self.store.delete_policy(policy)
            raise
        return JSONResponse(policy, status_code=201)

    async def show_policy(self, request: Request) -> Response:
        """Show one policy (id or name)."""
        return JSONResponse(await self._policy(request))

    async def delete_policy(self, request: Request) -> Response:
        """Delete a policy and its rules."""
        policy = await self._policy(request)
        if not await self.store.delete_policy(policy):
            raise ApiError(404, f"policy {policy['name']!r} not found")
        self.pe.drop_policy(policy["id"])
        return JSONResponse(policy)

    # -- rules ----------------------------------------------------------------------------------------
    async def list_rules(self, request: Request) -> Response:
        """List the rules of a policy."""
        policy = await self._policy(request)
        return results([public_rule(r) for r in self.pe.rule_list(policy["id"])])

    async def create_rule(self, request: Request) -> Response:
        """Add a rule: {"rule": text, "name"?, "comment"?}; 400 names the position of a parse/check error."""
        await self.pe.catch_up()   # the policy and the datasources it names may be a moment old
        policy = await self._policy(request)
        body = await json_body(request)
        text = body.get("rule") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "body must be {\"rule\": \"<rule text>\"}", field="rule")
        self.pe.engine.check_rule(policy["name"], text)
        normal = " ".join(text.split())
        if any(" ".join(r["rule"].split()) == normal for r in self.pe.rules.get(policy["id"], {}).values()):
            raise ApiError(409, f"rule already exists in policy {policy['name']!r}")
        rule = {"id": str(uuid.uuid4()), "name": str(body.get("name") or ""),
                "comment": str(body.get("comment") or ""), "rule": text}
        stored = await self.store.add_rule(policy, rule)
        if stored is None:
            raise ApiError(404, f"policy {policy['name']!r} not found")
        try:
            self.pe.apply_rule(policy["id"], stored)
        except PolicyError:
            await self.store.delete_rule(policy, rule["id"])
            raise
        return JSONResponse(public_rule(stored), status_code=201)

    async def show_rule(self, request: Request) -> Response:
        """Show one rule."""
        return JSONResponse(public_rule(self._rule(await self._policy(request), request.path_params["rule"])))

    async def delete_rule(self, request: Request) -> Response:
        """Delete one rule."""
        policy = await self._policy(request)
        rule = self._rule(policy, request.path_params["rule"])
        if not await self.store.delete_rule(policy, rule["id"]):
            raise ApiError(404, f"rule {rule['id']!r} not found")
        self.pe.drop_rule(policy["id"], rule["id"])
        return JSONResponse(public_rule(rule))

    # -- policy tables --------------------------------------------------------------------------------
    async def list_policy_tables(self, request: Request) -> Response:
        """Tables defined by a policy's rules."""
        policy = await self._policy(request)
        return results([{"id": t} for t in self.pe.engine.tables(policy["name"])])

    async def show_policy_table(self, request: Request) -> Response:
        """One table of a policy."""
        policy = await self._policy(request)
        table = request.path_params["table"]
        if table not in self.pe.engine.tables(policy["name"]):
            raise ApiError(404, f"table {table!r} not found in policy {policy['name']!r}")
        return JSONResponse({"id": table})

    async def policy_rows(self, request: Request) -> Response:
        """Rows of a policy table: {"results": [{"data": [...]}]}."""
        policy = await self._policy(request)
        table = request.path_params["table"]
        if table not in self.pe.engine.tables(policy["name"]):
            raise ApiError(404, f"table {table!r} not found in policy {policy['name']!r}")
        return rows_body(rows_of(self.pe.engine, f"{policy['name']}:{table}"))

    # -- datasources ----------------------------------------------------------------------------------
    async def list_datasources(self, request: Request) -> Response:
        """List datasources."""
        return results(sorted(self.pe.datasources.values(), key=lambda d: d["name"]))

    async def create_datasource(self, request: Request) -> Response:
        """Create a datasource: {"name", "driver": "push"|"http", "config": {"tables": ...}, ...}."""
        ds = {"id": str(uuid.uuid4()), **normalize_datasource(await json_body(request))}
        if self.pe.policy(ds["name"]) is not None:
            raise ApiError(409, f"name {ds['name']!r} is already used by a policy")
        if not await self.store.create_datasource(ds):
            raise ApiError(409, f"datasource {ds['name']!r} already exists")
        try:
            self.pe.apply_datasource(ds, strict=True)
        except PolicyError:
            await self.store.delete_datasource(ds)
            raise
        return JSONResponse(ds, status_code=201)

    async def show_datasource(self, request: Request) -> Response:
        """Show one datasource (id or name)."""
        return JSONResponse(await self._datasource(request))

    async def delete_datasource(self, request: Request) -> Response:
        """Delete a datasource; the DSD stops it."""
        ds = await self._datasource(request)
        if not await self.store.delete_datasource(ds):
            raise ApiError(404, f"datasource {ds['name']!r} not found")
        self.pe.drop_datasource(ds["id"])
        return JSONResponse(ds)

    async def datasource_action(self, request: Request) -> Response:
        """POST ?action=execute {"name", "args": {"positional": [...]}}: run an action on the datasource."""
        ds = await self._datasource(request)
        if request.query_params.get("action") != "execute":
            raise ApiError(400, "unsupported action; use ?action=execute")
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise ApiError(400, "body must be {\"name\": ACTION, \"args\": {\"positional\": [...]}}")
        args = body.get("args") or {}
        positional = args.get("positional", []) if isinstance(args, dict) else args
        if not isinstance(positional, list):
            raise ApiError(400, "args.positional must be a list")
        req = {"id": uuid.uuid4().hex, "ds": ds["name"], "action": body["name"], "args": positional, "direct": True}
        await self.node.bus.publish(self.node.channels.action,
                                    {"pe": self.node.cfg.node_id, "inc": self.node.incarnation, "reqs": [req]})
        return JSONResponse({"action_id": req["id"]})

    async def _ds_table(self, request: Request) -> tuple[dict, str]:
        ds = await self._datasource(request)
        table = request.path_params["table"]
        if table not in ds["config"]["tables"]:
            raise ApiError(404, f"table {table!r} not found in datasource {ds['name']!r}")
        return ds, table

    async def list_datasource_tables(self, request: Request) -> Response:
        """Tables of a datasource."""
        ds = await self._datasource(request)
        return results([{"id": t, "columns": c} for t, c in table_columns(ds).items()])

    async def show_datasource_table(self, request: Request) -> Response:
        """One table of a datasource."""
        _, table = await self._ds_table(request)
        return JSONResponse({"id": table})

    async def datasource_schema(self, request: Request) -> Response:
        """Schema of every table of a datasource."""
        ds = await self._datasource(request)
        return JSONResponse({"tables": [table_spec(t, c) for t, c in table_columns(ds).items()]})

    async def datasource_table_spec(self, request: Request) -> Response:
        """Schema of one datasource table."""
        ds, table = await self._ds_table(request)
        return JSONResponse(table_spec(table, table_columns(ds)[table]))

    async def list_drivers(self, request: Request) -> Response:
        """The datasource drivers this service runs."""
        return results([{"id": "push", "description": "rows replaced through the API (PUT .../rows)"},
                        {"id": "http", "description": "polls a JSON URL and maps fields to columns"}])

    async def datasource_rows(self, request: Request) -> Response:
        """Rows of a datasource table as this PE holds them."""
        ds, table = await self._ds_table(request)
        return rows_body(rows_of(self.pe.engine, f"{ds['name']}:{table}"))

    async def push_rows(self, request: Request) -> Response:
        """Replace a push datasource's table: body is a list of rows (lists, {"data": [...]} or objects)."""
        ds, table = await self._ds_table(request)
        if ds["driver"] != "push":
            raise ApiError(400, f"datasource {ds['name']!r} is not a push datasource")
        rows = coerce_rows(await json_body(request), ds["config"]["tables"][table]["columns"])
        if not await self.store.push_rows(ds, table, [list(r) for r in rows]):
            raise ApiError(404, f"datasource {ds['name']!r} not found")
        return JSONResponse({})

    async def datasource_status(self, request: Request) -> Response:
        """Driver status as the DSD reports it in its heartbeat, plus (epoch, seq) of each table."""
        ds = await self._datasource(request)
        reported = self.pe.dsd.datasources.get(ds["id"]) if self.pe.dsd else None
        driver = reported.status if reported else DriverStatus()
        tables = [t.to_dict() for t in self.pe.table_status() if t.datasource_id == ds["id"]]
        return JSONResponse({"initialized": bool(driver.initialized),
                             "last_updated": driver.last_updated,
                             "number_of_updates": driver.number_of_updates,
                             "last_error": driver.last_error,
                             "actions_executed": driver.actions_executed,
                             "actions_failed": driver.actions_failed, "tables": tables})

    # -- app ------------------------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        p = "/v1/policies/{policy}"
        d = "/v1/data-sources/{ds}"
        # Starlette tries the routes in order: the push of rows, by far the most frequent request, goes first
        spec: list[tuple[str, Callable[..., Awaitable[Response]], list[str], str | None]] = [
            (d + "/tables/{table}/rows", self.push_rows, ["PUT"], None),
            ("/", self.versions, ["GET"], None),
            ("/v1", self.root, ["GET"], "v1"),
            ("/v1/", self.root, ["GET"], None),
            ("/healthz", self.healthz, ["GET"], None),
            ("/v1/status", self.status, ["GET"], None),
            ("/v1/openapi.json", self.openapi, ["GET"], None),
            ("/v1/policies", self.list_policies, ["GET"], None),
            ("/v1/policies", self.create_policy, ["POST"], None),
            (p, self.show_policy, ["GET"], None),
            (p, self.delete_policy, ["DELETE"], None),
            (p + "/rules", self.list_rules, ["GET"], None),
            (p + "/rules", self.create_rule, ["POST"], None),
            (p + "/rules/{rule}", self.show_rule, ["GET"], None),
            (p + "/rules/{rule}", self.delete_rule, ["DELETE"], None),
            (p + "/tables", self.list_policy_tables, ["GET"], None),
            (p + "/tables/{table}", self.show_policy_table, ["GET"], None),
            (p + "/tables/{table}/rows", self.policy_rows, ["GET"], None),
            ("/v1/system/drivers", self.list_drivers, ["GET"], None),
            ("/v1/data-sources", self.list_datasources, ["GET"], None),
            ("/v1/data-sources", self.create_datasource, ["POST"], None),
            (d, self.show_datasource, ["GET"], None),
            (d, self.delete_datasource, ["DELETE"], None),
            (d, self.datasource_action, ["POST"], None),
            (d + "/status", self.datasource_status, ["GET"], None),
            (d + "/tables", self.list_datasource_tables, ["GET"], None),
            (d + "/schema", self.datasource_schema, ["GET"], None),
            (d + "/tables/{table}", self.show_datasource_table, ["GET"], None),
            (d + "/tables/{table}/spec", self.datasource_table_spec, ["GET"], None),
            (d + "/tables/{table}/rows", self.datasource_rows, ["GET"], None),
        ]
        gated = ("/v1/policies", "/v1/data-sources", "/v1/system")
        return [Route(path, guarded(fn, self._not_synced if path.startswith(gated) else None,
                                    self.node.bus_age if path.startswith(gated) else None),
                      methods=methods, name=name or f"{fn.__name__}-{'-'.join(methods)}")
                for path, fn, methods, name in spec]

    def _not_synced(self) -> str | None:
        """Until its first sync a node would answer from an empty mirror (a 404 for a policy that exists):
        a 503 instead lets HAProxy retry the request on another node. Once it has a copy, a resync (after the
        bus came back) or a bus outage does not stop its reads: they answer from that copy, marked."""
        return None if self.node.has_copy else "policy engine not synced yet; try another node"


def guarded(fn: Callable[[Request], Awaitable[Response]], unready: Callable[[], str | None] | None = None,
            bus_age: Callable[[], float | None] | None = None) -> Callable[[Request], Awaitable[Response]]:
    """Turn the named errors into clear 4xx/503 answers; nothing else is caught. `unready` names why the
    node cannot answer yet (503). `bus_age` says how long the bus has been out of reach (None: it is not):
    an answer given meanwhile carries it in BUS_AGE_HEADER, since it comes from the node's copy."""
    async def endpoint(request: Request) -> Response:
        problem = unready() if unready else None
        if problem:
            return error_response(503, problem)
        try:
            response = await fn(request)
        except ApiError as exc:
            response = error_response(exc.status, exc.message, **exc.extra)
        except PolicyError as exc:
            status = {"not-found": 404, "exists": 409}.get(exc.kind, 400)
            response = error_response(status, str(exc), kind=exc.kind, position=exc.position, rule=exc.rule)
        except DatasourceConfigError as exc:
            response = error_response(400, str(exc), field=exc.field)
        except BusError as exc:
            response = error_response(503, f"control bus unavailable: {exc}")
        age = bus_age() if bus_age else None
        if age is not None:
            response.headers[BUS_AGE_HEADER] = f"{age:.3f}"
        return response
    endpoint.__name__ = fn.__name__
    endpoint.__doc__ = fn.__doc__
    return endpoint


PUSH_PATH = re.compile(r"^/v1/data-sources/(?P<ds>[^/]+)/tables/(?P<table>[^/]+)/rows$")


class PushFastPath:
    """Pure ASGI wrapper: the rows PUT, by far the most frequent request, goes straight to its guarded handler,
    skipping Starlette's middleware stack and router (about a third of that request's CPU in the API node);
    every other request goes to the app. The handler, its errors and its answers are the app's own."""

    def __init__(self, app: Starlette, push: Callable[[Request], Awaitable[Response]]):
        self.app = app
        self.push = push

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        match = PUSH_PATH.match(scope["path"]) if scope["type"] == "http" and scope["method"] == "PUT" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        scope["path_params"] = match.groupdict()
        response = await self.push(Request(scope, receive))
        await response(scope, receive, send)


def openapi_document(routes: list[Route]) -> dict:
    """A small OpenAPI 3 document generated from the route table and the handlers' docstrings."""
    paths: dict[str, dict] = {}
    for route in routes:
        for method in sorted(route.methods or []):
            if method == "HEAD":
                continue
            doc = (route.endpoint.__doc__ or route.name).strip().splitlines()[0]
            params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                      for n in re.findall(r"{(\w+)}", route.path)]
            paths.setdefault(route.path, {})[method.lower()] = {
                "summary": doc, "operationId": f"{method.lower()}_{route.endpoint.__name__}",
                "parameters": params, "responses": {"200": {"description": "OK"}}}
    return {"openapi": "3.0.3", "info": {"title": "congressctl policy API (Congress v1)", "version": "1.0"},
            "paths": paths}


class _JoinedWrites:
    """A transport that sends the writes made within one event-loop step as one: uvicorn writes a response's
    head and body separately, and with TCP_NODELAY that is two sends and two segments for the client to
    wake up to, on every request."""

    def __init__(self, transport: asyncio.Transport):
        self._transport = transport
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending and not self._transport.is_closing():
            self._transport.write(b"".join(self._pending))
        self._pending.clear()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Http(HttpToolsProtocol):
    # uvicorn's own connection_made takes an asyncio.Transport, narrower than its base's; _JoinedWrites is one
    # by duck typing (it forwards every other attribute)
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_JoinedWrites(transport))  # type: ignore[arg-type]


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the worker owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ApiPeNode(BusWorker):
    def __init__(self, cfg: NodeConfig):
        super().__init__(cfg)
        self.store = Store(self.redis, self.channels, origin=f"{cfg.node_id}/{self.incarnation}",
                           sync_replicas=cfg.bus.sync_replicas)
        t = cfg.timings
        self.pe = PolicyNode(self.store, cfg.node_id, self.incarnation, t.peer_timeout_s, hold_s=t.heartbeat_s)
        self.bus = Bus(self.redis, self.channels, heartbeat_s=t.heartbeat_s, peer_timeout_s=t.peer_timeout_s,
                       subscribe=[self.channels.notice, self.channels.diff], on_message=self.on_message,
                       on_connect=self.on_connect, heartbeat_payload=self.heartbeat_payload)
        self.synced = False
        self.has_copy = False     # synced at least once: reads can answer from the copy while the bus is away
        self.api = Api(self)
        routes = self.api.routes()
        self.openapi = openapi_document(routes)
        push = next(r.endpoint for r in routes
                    if r.path.endswith("/tables/{table}/rows") and "PUT" in (r.methods or ()))
        self.app = PushFastPath(Starlette(routes=routes), push)
        self.server: _Server | None = None
        self.sock: socket.socket | None = None
        self.http: asyncio.Task | None = None
        self.draining = False

    async def startup(self) -> None:
        family = socket.AF_INET6 if ":" in self.cfg.api.bind else socket.AF_INET
        # proto given explicitly: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and
        # without it keep-alive clients wait 40 ms (Nagle + delayed ACK) on every request
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.cfg.api.bind, self.cfg.api.port))
        except OSError as exc:
            sock.close()
            raise BusError(f"cannot bind the API to {self.cfg.api.bind}:{self.cfg.api.port}: {exc.strerror}") from exc
        sock.listen(512)
        sock.setblocking(False)
        self.sock = sock
        # proxy_headers off: nothing here reads the client's address, and the middleware costs every request.
        # uvicorn annotates timeout_graceful_shutdown as int, but it is an asyncio.wait_for timeout: 0.5 works
        config = uvicorn.Config(self.app, http=_Http, log_config=None, access_log=False, lifespan="off",
                                proxy_headers=False, timeout_graceful_shutdown=IN_FLIGHT_S,  # type: ignore[arg-type]
                                timeout_keep_alive=5)
        self.server = _Server(config)
        log.info("api-pe %s starting, incarnation %s, API on %s:%d", self.cfg.node_id, self.incarnation,
                 self.cfg.api.bind, self.cfg.api.port)

    def start_tasks(self) -> None:
        assert self.server is not None and self.sock is not None
        self.http = self.tasks.spawn(self.serve_http(), "http", critical=True)
        self.tasks.spawn(self.bus.run(), "bus-reader", critical=True)
        self.tasks.spawn(self.bus.heartbeat_loop(), "heartbeat", critical=True)
        self.tasks.spawn(self.pe.send_actions(self.bus), "action-sender", critical=True)
        self.tasks.spawn(self.full_sync_loop(), "full-sync", critical=True)

    async def serve_http(self) -> None:
        assert self.server is not None and self.sock is not None
        try:
            await self.server.serve(sockets=[self.sock])
        finally:
            self.bus.stop()   # only now: a request in flight may still wait for a notice

    async def drain(self) -> None:
        self.draining = True
        log.info("draining: /healthz answers 503 for %.1f s, then requests in flight get %.1f s", DRAIN_S,
                 IN_FLIGHT_S)
        await asyncio.sleep(DRAIN_S)
        if self.server is None or self.http is None:
            return
        self.server.should_exit = True
        # uvicorn itself cancels what is still running after IN_FLIGHT_S
        await asyncio.wait({self.http}, timeout=IN_FLIGHT_S + 1.0)

    def stop_taking_work(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        self.bus.stop()

    async def shutdown(self) -> None:
        await self.redis.aclose()

    async def on_connect(self) -> None:
        self.synced = False
        await self.pe.full_sync()
        self.synced = self.has_copy = True
        # a request published just before the bus was lost may never have reached the DSD (a cut host, a bus
        # failover): send the recent ones again; the DSD's claims run each action once whatever arrives twice
        if self.pe.recent:
            self.pe.resend_recent(direct=False)
        log.info("synced: %d policies, %d datasources, %d tables", len(self.pe.policies),
                 len(self.pe.datasources), len(self.pe.tables))

    async def on_message(self, channel: str, data: dict) -> None:
        if channel == self.channels.diff:
            await self.pe.on_diff(data)
        elif channel == self.channels.notice:
            self.pe.on_notice(data)
        elif channel == self.channels.heartbeat and data.get("role") == "dsd":
            await self.pe.on_dsd_heartbeat(DsdHeartbeat.from_dict(data))

    async def full_sync_loop(self) -> None:
        while not self.bus.stopping:
            await self.bus.wait_stop(self.cfg.timings.full_sync_interval_s)
            # not once stopping: the bus reader is gone, so the sync would find the tables behind and derive
            # their new rows' actions again under the snapshot's (epoch, seq), other ids than the other PEs'
            if self.bus.connected and self.synced and not self.bus.stopping:
                try:
                    await self.pe.full_sync()
                except BusError as exc:
                    log.warning("periodic full sync failed: %s", exc)

    def heartbeat_payload(self) -> dict:
        return PeHeartbeat(node=self.cfg.node_id, inc=self.incarnation, ts=time.time(), synced=self.synced,
                           actions_sent=self.pe.actions_sent,
                           tables={s.key: [s.epoch, s.seq] for s in self.pe.tables.values()}).to_dict()

    def health_problem(self) -> str | None:
        """Why HAProxy should not send here (None: it may). A node with a copy stays in the pool while the bus
        is out of reach for less than BUS_OUTAGE_GRACE_S: a bus failover takes seconds, and meanwhile reads
        answer from the copy (writes answer 503). Longer, the node leaves the pool: its bus is gone."""
        if self.draining:
            return "stopping: finishing the requests in flight"
        age = self.bus_age()
        if age is not None and (not self.has_copy or age > BUS_OUTAGE_GRACE_S):
            return f"control bus not connected for {age:.1f}s ({self.bus.last_error or 'connecting'})"
        return None if self.has_copy else "policy engine not synced yet"

    def bus_age(self) -> float | None:
        """Seconds since the bus was last heard from, while it is not connected (None while it is)."""
        return None if self.bus.connected else time.monotonic() - self.bus.last_message

    def status(self) -> ApiPeStatus:
        now = time.monotonic()
        peers = [PeerView(node=p.node, role=p.role, incarnation=p.incarnation, age_ms=round(p.age(now) * 1000, 1),
                          alive=p.age(now) <= self.bus.peer_timeout_s)
                 for p in sorted(self.bus.peers.values(), key=lambda p: (p.role, p.node))]
        dsd = None
        if self.pe.dsd is not None:
            hb = self.pe.dsd
            dsd = DsdView(node=hb.node, incarnation=hb.inc, epoch=hb.epoch, leader=hb.leader,
                          leader_since=hb.leader_since, counts=hb.counts, buffered=hb.buffered,
                          age_ms=round((now - self.pe.dsd_received) * 1000, 1))
        return ApiPeStatus(node=self.cfg.node_id, role="api-pe", incarnation=self.incarnation,
                           synced=self.synced, healthy=self.health_problem() is None,
                           bus=BusView(host=self.cfg.bus.host, port=self.cfg.bus.port, connected=self.bus.connected,
                                       connects=self.bus.reconnects, last_error=self.bus.last_error),
                           peers=peers, dsd=dsd, tables=self.pe.table_status(),
                           actions=ActionsView(sent=self.pe.actions_sent, queued=self.pe.outbox.qsize(),
                                               dropped=self.pe.actions_dropped, resent=self.pe.resent))
