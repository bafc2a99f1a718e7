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
import ssl
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
from congressctl.errors import BusError, DatasourceConfigError, InputLimitError, NodeConfigError, PolicyError
from congressctl.node import limits
from congressctl.node.access import OPEN_PATHS, TokenCheck, refusal
from congressctl.node.config import NodeConfig
from congressctl.node.drivers import DRIVER_INFO, coerce_rows, driver_info, normalize_datasource, table_columns
from congressctl.node.metrics import ApiPeCollector, ApiPeMetrics
from congressctl.node.openapi import POLICY_KINDS, openapi_document
from congressctl.node.pe import PolicyNode, rows_of
from congressctl.node.runtime import BUS_OUTAGE_GRACE_S, BusWorker
from congressctl.node.store import Store, row_keys_of
from congressctl.payloads import (
    ActionsView,
    ApiPeStatus,
    BusView,
    DriverStatus,
    DsdHeartbeat,
    DsdView,
    PeerView,
    PeHeartbeat,
    RefreshRequest,
)
from congressctl.policy.parser import parse_statement

log = logging.getLogger("congressctl.api")

# what the engine takes as a policy name: refused here, before anything is stored
POLICY_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set on answers given while the bus is out of reach: seconds since it was last heard from (the answer comes
# from this node's copy, which may miss what changed meanwhile).
BUS_AGE_HEADER = "X-Congress-Bus-Age"
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


def too_large(limit: int) -> JSONResponse:
    return error_response(413, f"request body larger than {limit // (1024 * 1024)} MB "
                               "(the inventory's api.max_body_mb)")


def results(items: list) -> JSONResponse:
    return JSONResponse({"results": items})


def table_spec(table: str, columns: list[str]) -> dict:
    return {"table_id": table, "columns": [{"name": c, "description": ""} for c in columns]}


def rows_body(rows: list[tuple]) -> JSONResponse:
    return results([{"data": list(r)} for r in rows])


# A large push is checked in pieces of this many rows, yielding between them: heartbeats and other requests go on.
PUSH_PIECE_ROWS = 20_000
# A rows PUT body larger than this is parsed in pieces of about this size (some 20 ms of json.loads each): one
# json.loads of 50 MB took the loop away for over a second.
PARSE_PIECE_BYTES = 1 << 20
# where the next cut is looked for first, past a piece's size (then to the body's end)
CUT_WINDOW_BYTES = 1 << 16


def split_rows(raw: bytes, piece_bytes: int) -> list[bytes] | None:
    """The text of a JSON list's elements in pieces of about `piece_bytes`, cut at commas that follow a "]" or
    "}"; None when `raw` is no "[...]". A cut inside a string or a nested value makes its piece invalid JSON (a
    string or bracket left open), so pieces that parse are exactly the elements of the whole."""
    text = raw.strip()
    if not (text.startswith(b"[") and text.endswith(b"]")):
        return None
    pieces: list[bytes] = []
    start, end = 1, len(text) - 1
    while end - start > piece_bytes:
        cut = _element_end(text, start + piece_bytes, end)
        if cut is None:
            break
        pieces.append(text[start:cut])
        start = cut + 1
    pieces.append(text[start:end])
    return pieces


def _element_end(text: bytes, after: int, end: int) -> int | None:
    """The first "]" or "}" followed by a comma at or past `after`. Looked for in a window first: a body of
    rows that are all lists has no "}," and a search to its end for every piece took 130 ms for 30 MB."""
    for stop in (min(end, after + CUT_WINDOW_BYTES), end):
        cuts = [c for c in (text.find(b"],", after, stop), text.find(b"},", after, stop)) if c >= 0]
        if cuts:
            return min(cuts) + 1
    return None


async def rows_in_pieces(raw: bytes, piece_bytes: int = PARSE_PIECE_BYTES) -> list[Any]:
    """A large rows body parsed in pieces, yielding between them: its rows as a list of lists (one per piece),
    or the value itself when it is not a list. A piece that does not parse (cut where no element ends) is
    parsed again with the rest of the body, in one go; ValueError when the body is not JSON."""
    pieces = split_rows(raw, piece_bytes)
    if pieces is None:
        return [limits.loads(raw)]
    out: list[Any] = []
    for i, piece in enumerate(pieces):
        try:
            out.append(limits.loads(b"[" + piece + b"]"))
        except (ValueError, InputLimitError):
            out.append(limits.loads(b"[" + b",".join(pieces[i:]) + b"]"))
            break
        await asyncio.sleep(0)
    return out


async def keys_in_pieces(pieces: list[list], columns: list[str]) -> list[str]:
    """The checked rows' keys, PUSH_PIECE_ROWS at a time, yielding between them; each piece of parsed rows is
    dropped once done (`pieces` is emptied), so the body is not held twice."""
    keys: list[str] = []
    pieces.reverse()
    while pieces:
        parsed = pieces.pop()
        for i in range(0, len(parsed), PUSH_PIECE_ROWS):
            try:
                keys += row_keys_of(coerce_rows(parsed[i:i + PUSH_PIECE_ROWS], columns))
            except DatasourceConfigError as exc:
                field = exc.field or ""
                if not field.startswith("rows["):
                    raise
                n = int(field[5:].split("]", 1)[0]) + len(keys)   # the row's index in the whole body
                raise DatasourceConfigError(exc.message, field=f"rows[{n}]") from None
            await asyncio.sleep(0)
    return keys


async def json_body(request: Request, *, depth_checked: bool = True) -> Any:
    """The request's JSON body; nesting past MAX_JSON_DEPTH is refused unless the caller bounds it in its own
    walk (`depth_checked=False`: the rows PUT, whose cells are walked anyway)."""
    try:
        body = limits.loads(await request.body())
    except ValueError:
        raise ApiError(400, "request body is not valid JSON") from None
    if depth_checked:
        limits.check_depth(body)
    return body


def _v1_version(request: Request) -> dict:
    return {"id": "v1", "status": "CURRENT", "updated": V1_UPDATED,
            "links": [{"rel": "self", "href": str(request.url_for("v1"))}]}


def public_rule(rule: dict) -> dict:
    return {k: rule.get(k, "") for k in ("id", "name", "comment", "rule")}


def flag(request: Request, name: str) -> bool:
    """A query flag as python-congressclient sends it (trace=True, delta=False, include_rules=True)."""
    return request.query_params.get(name, "").lower() in ("true", "1", "yes")


def policy_fields(body: Any) -> dict:
    """A new policy's (or library policy's) checked fields: name, description, kind, abbreviation."""
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    name = body.get("name")
    limits.check_name(name, "name")
    limits.check_name(body.get("abbreviation"), "abbreviation")
    limits.check_text(body.get("description"), "description")
    if not isinstance(name, str) or not POLICY_NAME_RE.match(name):
        raise ApiError(400, f"policy name must match {POLICY_NAME_RE.pattern} (got {name!r})", field="name")
    kind = body.get("kind") or "nonrecursive"
    if kind not in POLICY_KINDS:
        raise ApiError(400, f"policy kind must be one of {', '.join(POLICY_KINDS)}", field="kind")
    return {"name": name, "description": str(body.get("description") or ""), "kind": kind,
            "abbreviation": str(body.get("abbreviation") or name[:5])}


def rule_fields(body: Any) -> dict:
    """A new rule's fields: {"rule": text, "name"?, "comment"?}."""
    text = body.get("rule") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "body must be {\"rule\": \"<rule text>\"}", field="rule")
    limits.check_text(text, "rule")
    limits.check_name(body.get("name"), "name")
    limits.check_text(body.get("comment"), "comment")
    return {"name": str(body.get("name") or ""), "comment": str(body.get("comment") or ""), "rule": text}


def rules_of(body: dict) -> list[dict]:
    rules = body.get("rules") or []
    if not isinstance(rules, list):
        raise ApiError(400, "rules must be a list of {\"rule\": text, \"name\"?, \"comment\"?}", field="rules")
    return [rule_fields(r) for r in rules]


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
        """Create a policy: {"name", "description"?, "kind"?, "abbreviation"?, "rules"?: [rule]}, or from a library
        policy with ?library_policy=ID (its fields and rules)."""
        body = await json_body(request) if await request.body() else {}
        lib_ref = request.query_params.get("library_policy")
        if lib_ref:
            lib = await self._library_policy(lib_ref)
            body = {**{k: lib[k] for k in ("name", "description", "kind", "abbreviation")},
                    **{k: v for k, v in (body or {}).items() if k != "rules" and v}, "rules": lib["rules"]}
        fields = policy_fields(body)
        rules = rules_of(body)
        if self.pe.datasource(fields["name"]) is not None:
            raise ApiError(409, f"name {fields['name']!r} is already used by a datasource")
        policy = {"id": str(uuid.uuid4()), **fields, "owner_id": POLICY_OWNER}
        if not await self.store.create_policy(policy):
            raise ApiError(409, f"policy {fields['name']!r} already exists")
        try:
            self.pe.apply_policy(policy)
            added = [await self._add_rule(policy, rule) for rule in rules]
        except (PolicyError, ApiError):
            await self.store.delete_policy(policy)
            self.pe.drop_policy(policy["id"])
            raise
        if "rules" in body or lib_ref:
            return JSONResponse({**policy, "rules": added}, status_code=201)
        return JSONResponse(policy, status_code=201)

    async def policy_action(self, request: Request) -> Response:
        """POST ?action=simulate&trace=&delta= {"query", "sequence", "action_policy"?}: the query's answers after
        the sequence of updates and actions, on a copy (nothing changes): {"result": [...], "trace"?}."""
        policy = await self._policy(request)
        if request.query_params.get("action") != "simulate":
            raise ApiError(400, "unsupported action; use ?action=simulate")
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            raise ApiError(400, "body must be {\"query\": ..., \"sequence\": ..., \"action_policy\": ...}",
                           field="query")
        sequence = body.get("sequence") or ""
        if not isinstance(sequence, str):
            raise ApiError(400, "sequence must be a string of updates and actions", field="sequence")
        action_policy = None
        if body.get("action_policy"):
            ref = str(body["action_policy"])
            action_policy = self.pe.policy(ref)
            if action_policy is None:
                raise ApiError(404, f"action policy {ref!r} not found", field="action_policy")
            if action_policy.get("kind") != "action":
                raise ApiError(400, f"policy {ref!r} is of kind {action_policy.get('kind')!r}, not action",
                               field="action_policy")
        trace = flag(request, "trace")
        answers, text = self.pe.simulate(policy, query=body["query"], sequence=sequence, action_policy=action_policy,
                                         delta=flag(request, "delta"), trace=trace)
        return JSONResponse({"result": answers, **({"trace": text} if trace else {})})

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
        return JSONResponse(await self._add_rule(policy, rule_fields(await json_body(request))), status_code=201)

    async def _add_rule(self, policy: dict, fields: dict) -> dict:
        text = fields["rule"]
        self.pe.check_rule(policy, text)
        normal = " ".join(text.split())
        if any(" ".join(r["rule"].split()) == normal for r in self.pe.rules.get(policy["id"], {}).values()):
            raise ApiError(409, f"rule already exists in policy {policy['name']!r}")
        rule = {"id": str(uuid.uuid4()), **fields}
        stored = await self.store.add_rule(policy, rule)
        if stored is None:
            raise ApiError(404, f"policy {policy['name']!r} not found")
        try:
            self.pe.apply_rule(policy["id"], stored)
        except PolicyError:
            await self.store.delete_rule(policy, rule["id"])
            raise
        return public_rule(stored)

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
        """Rows of a policy table: {"results": [{"data": [...]}]}; with ?trace=true also "trace", the text of
        their derivation (which rules and rows produced each row; format in congressctl/policy/topdown.py)."""
        policy = await self._policy(request)
        table = request.path_params["table"]
        if table not in self.pe.engine.tables(policy["name"]):
            raise ApiError(404, f"table {table!r} not found in policy {policy['name']!r}")
        if not flag(request, "trace"):
            return rows_body(rows_of(self.pe.engine, f"{policy['name']}:{table}"))
        rows, text = self.pe.trace_rows(policy, table)
        return JSONResponse({"results": [{"data": list(r)} for r in rows], "trace": text})

    # -- library policies -----------------------------------------------------------------------------
    async def _library_policy(self, ref: str) -> dict:
        if self.pe.library_policy(ref) is None:
            await self.pe.catch_up()
        lib = self.pe.library_policy(ref)
        if lib is None:
            raise ApiError(404, f"library policy {ref!r} not found")
        return lib

    @staticmethod
    def _library_view(lib: dict, request: Request) -> dict:
        keep_rules = request.query_params.get("include_rules", "true").lower() not in ("false", "0", "no")
        return lib if keep_rules else {k: v for k, v in lib.items() if k != "rules"}

    async def list_library_policies(self, request: Request) -> Response:
        """List library policies (?include_rules=False leaves their rules out)."""
        libs = sorted(self.pe.library.values(), key=lambda p: p["name"])
        return results([self._library_view(lib, request) for lib in libs])

    async def create_library_policy(self, request: Request) -> Response:
        """Store a library policy: {"name", "description"?, "kind"?, "abbreviation"?, "rules": [rule]}; its rules
        are checked for syntax only and never evaluated (a policy created from it evaluates them)."""
        body = await json_body(request)
        fields = policy_fields(body)
        rules = rules_of(body)
        for rule in rules:
            parse_statement(rule["rule"], updates=fields["kind"] == "action")
        lib = {"id": str(uuid.uuid4()), **fields, "rules": rules}
        if not await self.store.create_library_policy(lib):
            raise ApiError(409, f"library policy {fields['name']!r} already exists")
        self.pe.apply_library_policy(lib)
        return JSONResponse(lib, status_code=201)

    async def show_library_policy(self, request: Request) -> Response:
        """Show one library policy (id or name; ?include_rules=False leaves its rules out)."""
        return JSONResponse(self._library_view(await self._library_policy(request.path_params["lib"]), request))

    async def delete_library_policy(self, request: Request) -> Response:
        """Delete a library policy (policies created from it stay)."""
        lib = await self._library_policy(request.path_params["lib"])
        if not await self.store.delete_library_policy(lib):
            raise ApiError(404, f"library policy {lib['name']!r} not found")
        self.pe.drop_library_policy(lib["id"])
        return JSONResponse(lib)

    # -- datasources ----------------------------------------------------------------------------------
    async def list_datasources(self, request: Request) -> Response:
        """List datasources."""
        return results(sorted(self.pe.datasources.values(), key=lambda d: d["name"]))

    async def create_datasource(self, request: Request) -> Response:
        """Create a datasource: {"name", "driver": "push"|"http", "config": {"tables": ...}, ...}."""
        ds = {"id": str(uuid.uuid4()), **normalize_datasource(await json_body(request))}
        self._check_urls(ds)
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

    def _check_urls(self, ds: dict) -> None:
        """The outbound allow-list: a datasource makes the DSD send requests to its url and action_url."""
        rules = self.node.cfg.datasources
        for key in ("url", "action_url"):
            url = ds["config"].get(key)
            if url is not None and rules.refused(url):
                allowed = ", ".join(rules.allowed_urls) or "none (the list is empty)"
                raise ApiError(400, f"config.{key} {url[:200]!r} is outside datasources.allowed_urls "
                               f"(URL prefixes allowed: {allowed})", field=f"config.{key}",
                               rule="datasources.allowed_urls")

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
        """POST ?action=execute {"name", "args": {"positional": [...]}}: run an action on the datasource;
        ?action=request-refresh: the DSD polls the (http) datasource now."""
        ds = await self._datasource(request)
        if request.query_params.get("action") == "request-refresh":
            await self.node.bus.publish(self.node.channels.action,
                                        RefreshRequest(refresh=ds["id"], pe=self.node.cfg.node_id).to_dict())
            return JSONResponse({})
        if request.query_params.get("action") != "execute":
            raise ApiError(400, "unsupported action; use ?action=execute or ?action=request-refresh")
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise ApiError(400, "body must be {\"name\": ACTION, \"args\": {\"positional\": [...]}}")
        limits.check_name(body["name"], "name")
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
        return results([{"id": d, "description": info["description"]} for d, info in DRIVER_INFO.items()])

    async def show_driver(self, request: Request) -> Response:
        """One driver: its config options with what they mean, as Congress's driver info."""
        info = driver_info(request.path_params["driver"])
        if info is None:
            raise ApiError(404, f"driver {request.path_params['driver']!r} not found")
        return JSONResponse(info)

    async def list_datasource_actions(self, request: Request) -> Response:
        """The actions the datasource takes: those the policies' execute[] rules name for it, each POSTed to its
        action_url (none without one). Their arguments are positional, so "args" (Congress's named arguments)
        is empty and the description gives their number."""
        ds = await self._datasource(request)
        url = ds["config"].get("action_url")
        if not url:
            return results([])
        return results([{"name": action, "args": [],
                         "description": f"{arity} positional argument(s); POSTed to {url} as JSON "
                                        "{action_id, datasource, action, args}"}
                        for action, arity in self.pe.engine.actions_of(ds["name"])])

    async def datasource_rows(self, request: Request) -> Response:
        """Rows of a datasource table as this PE holds them."""
        ds, table = await self._ds_table(request)
        return rows_body(rows_of(self.pe.engine, f"{ds['name']}:{table}"))

    async def push_rows(self, request: Request) -> Response:
        """Replace a push datasource's table: body is a list of rows (lists, {"data": [...]} or objects)."""
        ds, table = await self._ds_table(request)
        if ds["driver"] != "push":
            raise ApiError(400, f"datasource {ds['name']!r} is not a push datasource")
        raw = await request.body()
        if len(raw) <= PARSE_PIECE_BYTES:
            return await self._push_small(ds, table, await json_body(request, depth_checked=False))
        try:
            pieces = await rows_in_pieces(raw)
        except ValueError:
            raise ApiError(400, "request body is not valid JSON") from None
        if not all(isinstance(p, list) for p in pieces):
            return await self._push_small(ds, table, pieces[0])   # not a list of rows: refused there
        self._check_row_count(sum(map(len, pieces)))
        keys = await keys_in_pieces(pieces, ds["config"]["tables"][table]["columns"])
        if not await self.store.push_keys(ds, table, keys):
            raise ApiError(404, f"datasource {ds['name']!r} not found")
        return JSONResponse({})

    async def _push_small(self, ds: dict, table: str, body: Any) -> Response:
        if isinstance(body, list):
            self._check_row_count(len(body))
        if not await self.store.push_rows(ds, table, coerce_rows(body, ds["config"]["tables"][table]["columns"])):
            raise ApiError(404, f"datasource {ds['name']!r} not found")
        return JSONResponse({})

    def _check_row_count(self, count: int) -> None:
        limit = self.node.cfg.api.max_rows_per_put
        if count > limit:
            raise ApiError(413, f"{count} rows in one PUT, more than api.max_rows_per_put ({limit}); nothing "
                           "was replaced")

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
            (p, self.policy_action, ["POST"], None),
            (p + "/rules", self.list_rules, ["GET"], None),
            (p + "/rules", self.create_rule, ["POST"], None),
            (p + "/rules/{rule}", self.show_rule, ["GET"], None),
            (p + "/rules/{rule}", self.delete_rule, ["DELETE"], None),
            (p + "/tables", self.list_policy_tables, ["GET"], None),
            (p + "/tables/{table}", self.show_policy_table, ["GET"], None),
            (p + "/tables/{table}/rows", self.policy_rows, ["GET"], None),
            ("/v1/librarypolicies", self.list_library_policies, ["GET"], None),
            ("/v1/librarypolicies", self.create_library_policy, ["POST"], None),
            ("/v1/librarypolicies/{lib}", self.show_library_policy, ["GET"], None),
            ("/v1/librarypolicies/{lib}", self.delete_library_policy, ["DELETE"], None),
            ("/v1/system/drivers", self.list_drivers, ["GET"], None),
            ("/v1/system/drivers/{driver}", self.show_driver, ["GET"], None),
            ("/v1/data-sources", self.list_datasources, ["GET"], None),
            ("/v1/data-sources", self.create_datasource, ["POST"], None),
            (d, self.show_datasource, ["GET"], None),
            (d, self.delete_datasource, ["DELETE"], None),
            (d, self.datasource_action, ["POST"], None),
            (d + "/status", self.datasource_status, ["GET"], None),
            (d + "/actions", self.list_datasource_actions, ["GET"], None),
            (d + "/tables", self.list_datasource_tables, ["GET"], None),
            (d + "/schema", self.datasource_schema, ["GET"], None),
            (d + "/tables/{table}", self.show_datasource_table, ["GET"], None),
            (d + "/tables/{table}/spec", self.datasource_table_spec, ["GET"], None),
            (d + "/tables/{table}/rows", self.datasource_rows, ["GET"], None),
        ]
        gated = ("/v1/policies", "/v1/data-sources", "/v1/system", "/v1/librarypolicies")
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
        except (DatasourceConfigError, InputLimitError) as exc:
            response = error_response(400, str(exc), field=exc.field)
        except limits.BodyTooLarge as exc:
            response = too_large(exc.limit)
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


WWW_AUTHENTICATE = 'Bearer realm="congress"'
REFUSALS = {401: "a valid token is required: send it as X-Auth-Token or Authorization: Bearer",
            403: "this token may only read (GET); writing needs the admin role"}


class PushFastPath:
    """Pure ASGI front of the app. Every request passes the token check and the body limit here (so that no
    route, the fast path included, can miss them). Then the rows PUT, by far the most frequent request, goes
    straight to its guarded handler, skipping Starlette's middleware stack and router (about a third of that
    request's CPU in the API node); every other request goes to the app. The handler, its errors and its
    answers are the app's own."""

    def __init__(self, app: Starlette, push: Callable[[Request], Awaitable[Response]], *, tokens: TokenCheck,
                 max_body: int):
        self.app = app
        self.push = push
        self.tokens = tokens
        self.max_body = max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path, headers = scope["method"], scope["path"], scope["headers"]
        refused = None if path in OPEN_PATHS else refusal(method, self.tokens.role_of(self.tokens.presented(headers)))
        if refused is not None:
            await self.refuse(refused, scope, receive, send)
            return
        length = limits.content_length(headers)
        if length is not None and length > self.max_body:
            await too_large(self.max_body)(scope, receive, send)
            return
        if length is None:   # chunked: counted as it arrives (with a length, the HTTP parser holds it to it)
            receive = limits.counted(receive, self.max_body)
        match = PUSH_PATH.match(path) if method == "PUT" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        scope["path_params"] = match.groupdict()
        scope["endpoint"] = self.push   # what the router would have set: RequestMetrics names the route by it
        response = await self.push(Request(scope, receive))
        await response(scope, receive, send)

    async def refuse(self, status: int, scope: dict, receive: Callable, send: Callable) -> None:
        response = error_response(status, REFUSALS[status])
        if status == 401:
            response.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
        await response(scope, receive, send)


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
        self.metrics = ApiPeMetrics(cfg.metrics)
        self.pe = PolicyNode(self.store, cfg.node_id, self.incarnation, t.peer_timeout_s, hold_s=t.heartbeat_s,
                             metrics=self.metrics, skip_diffs=frozenset(cfg.test_hooks.skip_diffs))
        self.bus = Bus(self.redis, self.channels, heartbeat_s=t.heartbeat_s, peer_timeout_s=t.peer_timeout_s,
                       subscribe=[self.channels.notice, self.channels.diff], on_message=self.on_message,
                       on_connect=self.on_connect, heartbeat_payload=self.heartbeat_payload)
        self.store.busy = self.bus.busy
        self.synced = False
        self.has_copy = False     # synced at least once: reads can answer from the copy while the bus is away
        self.api = Api(self)
        routes = self.api.routes()
        self.openapi = openapi_document(routes)
        push = next(r.endpoint for r in routes
                    if r.path.endswith("/tables/{table}/rows") and "PUT" in (r.methods or ()))
        self.app = self.metrics.asgi(PushFastPath(Starlette(routes=routes), push, tokens=TokenCheck(cfg.auth.tokens),
                                                  max_body=cfg.limits.max_body_mb * 1024 * 1024), routes)
        self.metrics.watch(ApiPeCollector(self))
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
        served = self.cfg.api_tls
        config = uvicorn.Config(self.app, http=_Http, log_config=None, access_log=False, lifespan="off",
                                proxy_headers=False, timeout_graceful_shutdown=IN_FLIGHT_S,  # type: ignore[arg-type]
                                timeout_keep_alive=5, ssl_certfile=served.cert_file if served else None,
                                ssl_keyfile=served.key_file if served else None)
        try:
            config.load()   # here, so that an unreadable certificate stops the start with its reason
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise NodeConfigError(f"cannot load the API certificate: {exc}", file=self.cfg.file,
                                  field="api_tls") from exc
        self.server = _Server(config)
        await self.metrics.start()
        log.info("api-pe %s starting, incarnation %s, API on %s://%s:%d", self.cfg.node_id, self.incarnation,
                 "https" if served else "http", self.cfg.api.bind, self.cfg.api.port)

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
        self.metrics.stop()
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
                           tables={s.key: [s.epoch, s.seq] for s in self.pe.tables.values()},
                           breaks=self.bus.reconnects + self.pe.skips).to_dict()

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
