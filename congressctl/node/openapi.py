"""The api-pe's OpenAPI 3.1 document: every route with its parameters, request body and answer schemas.

Built from the route table (paths, methods, the handlers' docstrings) and OPERATIONS below, which gives each
(path, method) its schemas; a route without an entry is an error at startup, so the document covers them all.
Schemas are JSON Schema (OpenAPI 3.1), so a test validates real answers against them as they are.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.routing import Route

from congressctl.node.access import OPEN_PATHS

POLICY_KINDS = ["nonrecursive", "action", "database", "materialized"]


def _obj(required: list[str], props: dict[str, Any], extra: bool = True) -> dict:
    return {"type": "object", "required": required, "properties": props, "additionalProperties": extra}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _results(item: dict) -> dict:
    return _obj(["results"], {"results": {"type": "array", "items": item}})


STR = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}
OBJ = {"type": "object"}

SCHEMAS: dict[str, dict] = {
    "Error": _obj(["error"], {"error": _obj(["message", "error_code"], {"message": STR, "error_code": INT})}),
    "Cell": {"type": ["integer", "number", "string"]},
    "Row": _obj(["data"], {"data": {"type": "array", "items": _ref("Cell")}}, extra=False),
    "Rows": _obj(["results"], {"results": {"type": "array", "items": _ref("Row")},
                               "trace": {"type": "string", "description": "derivation trace (?trace=true)"}}),
    "RuleInput": _obj(["rule"], {"rule": STR, "name": STR, "comment": STR}),
    "Rule": _obj(["id", "name", "comment", "rule"], {"id": STR, "name": STR, "comment": STR, "rule": STR},
                 extra=False),
    "PolicyInput": _obj(["name"], {"name": STR, "description": {"type": ["string", "null"]},
                                   "kind": {"enum": [*POLICY_KINDS, None]},
                                   "abbreviation": {"type": ["string", "null"]},
                                   "rules": {"type": "array", "items": _ref("RuleInput")}}),
    "Policy": _obj(["id", "name", "description", "kind", "abbreviation", "owner_id"],
                   {"id": STR, "name": STR, "description": STR, "kind": {"enum": POLICY_KINDS},
                    "abbreviation": STR, "owner_id": STR, "rules": {"type": "array", "items": _ref("Rule")}},
                   extra=False),
    "LibraryPolicy": _obj(["id", "name", "description", "kind", "abbreviation"],
                          {"id": STR, "name": STR, "description": STR, "kind": {"enum": POLICY_KINDS},
                           "abbreviation": STR,
                           "rules": {"type": "array", "items": _obj(["rule", "name", "comment"],
                                                                    {"rule": STR, "name": STR, "comment": STR})}},
                          extra=False),
    "DatasourceInput": _obj(["name", "driver", "config"],
                            {"name": STR, "driver": {"enum": ["push", "http"]}, "description": STR,
                             "enabled": BOOL,
                             "config": _obj([], {"tables": {"type": ["object", "string"]}, "url": STR,
                                                 "poll_interval": {"type": ["number", "string"]},
                                                 "action_url": STR})}),
    "Datasource": _obj(["id", "name", "driver", "config", "description", "enabled"],
                       {"id": STR, "name": STR, "driver": STR, "description": STR, "enabled": BOOL,
                        "config": _obj(["tables"], {"tables": {"type": "object", "additionalProperties": _obj(
                            ["columns"], {"columns": {"type": "array", "items": STR}, "path": STR})}})}),
    "TableSpec": _obj(["table_id", "columns"], {"table_id": STR, "columns": {"type": "array", "items": _obj(
        ["name", "description"], {"name": STR, "description": STR})}}),
    "Version": _obj(["id", "status", "updated", "links"], {"id": STR, "status": STR, "updated": STR,
                                                            "links": {"type": "array", "items": OBJ}}),
    "Driver": _obj(["id", "description", "config", "secret", "module", "tables"],
                   {"id": STR, "description": STR, "config": {"type": "object", "additionalProperties": STR},
                    "secret": {"type": "array", "items": STR}, "module": STR,
                    "tables": {"type": "array", "items": _ref("TableSpec")}}),
    "Action": _obj(["name", "description", "args"], {"name": STR, "description": STR, "args": {
        "type": "array", "items": _obj(["name", "description"], {"name": STR, "description": STR})}}),
    "SimulateInput": _obj(["query"], {"query": STR, "sequence": {"type": ["string", "null"]},
                                      "action_policy": {"type": ["string", "null"]}}),
    "SimulateResult": _obj(["result"], {"result": {"type": "array", "items": STR}, "trace": STR}),
    "ExecuteInput": _obj(["name"], {"name": STR, "args": {"type": ["object", "array"]}}),
    "DatasourceStatus": _obj(["initialized", "last_updated", "number_of_updates", "last_error", "actions_executed",
                              "actions_failed", "tables"],
                             {"initialized": BOOL, "last_updated": {"type": ["number", "null"]},
                              "number_of_updates": INT, "last_error": {"type": ["string", "null"]},
                              "actions_executed": INT, "actions_failed": INT,
                              "tables": {"type": "array", "items": OBJ}}),
    "Status": _obj(["node", "role", "synced", "healthy", "bus", "peers", "tables", "actions"],
                   {"node": STR, "role": STR, "synced": BOOL, "healthy": BOOL, "bus": OBJ,
                    "peers": {"type": "array", "items": OBJ}, "tables": {"type": "array", "items": OBJ},
                    "actions": OBJ}),
    "Health": _obj(["status"], {"status": STR, "node": STR, "reason": STR}),
}

_FLAG = {"type": "string", "enum": ["True", "False", "true", "false", "1", "0"]}
_QUERY = {
    "trace": ("trace", _FLAG, "true: also return the trace of the derivation"),
    "delta": ("delta", _FLAG, "true: answer with the change to the query's rows (t+(..), t-(..))"),
    "include_rules": ("include_rules", _FLAG, "false: leave the rules out (default true)"),
    "library_policy": ("library_policy", STR, "id or name of a library policy to create the policy from"),
    "simulate": ("action", {"type": "string", "enum": ["simulate"]}, "the policy action"),
    "ds_action": ("action", {"type": "string", "enum": ["execute", "request-refresh"]}, "the datasource action"),
}

# (path, method) -> (request body schema or None, success status, answer schema, query parameters)
OPERATIONS: dict[tuple[str, str], tuple[dict | None, int, dict, tuple[str, ...]]] = {
    ("/", "get"): (None, 200, _obj(["versions"], {"versions": {"type": "array", "items": _ref("Version")}}), ()),
    ("/v1", "get"): (None, 200, _ref("Version"), ()),
    ("/v1/", "get"): (None, 200, _ref("Version"), ()),
    ("/healthz", "get"): (None, 200, _ref("Health"), ()),
    ("/v1/status", "get"): (None, 200, _ref("Status"), ()),
    ("/v1/openapi.json", "get"): (None, 200, _obj(["openapi", "paths"], {"openapi": STR, "paths": OBJ}), ()),
    ("/v1/policies", "get"): (None, 200, _results(_ref("Policy")), ()),
    ("/v1/policies", "post"): (_ref("PolicyInput"), 201, _ref("Policy"), ("library_policy",)),
    ("/v1/policies/{policy}", "get"): (None, 200, _ref("Policy"), ()),
    ("/v1/policies/{policy}", "delete"): (None, 200, _ref("Policy"), ()),
    ("/v1/policies/{policy}", "post"): (_ref("SimulateInput"), 200, _ref("SimulateResult"),
                                        ("simulate", "trace", "delta")),
    ("/v1/policies/{policy}/rules", "get"): (None, 200, _results(_ref("Rule")), ()),
    ("/v1/policies/{policy}/rules", "post"): (_ref("RuleInput"), 201, _ref("Rule"), ()),
    ("/v1/policies/{policy}/rules/{rule}", "get"): (None, 200, _ref("Rule"), ()),
    ("/v1/policies/{policy}/rules/{rule}", "delete"): (None, 200, _ref("Rule"), ()),
    ("/v1/policies/{policy}/tables", "get"): (None, 200, _results(_obj(["id"], {"id": STR})), ()),
    ("/v1/policies/{policy}/tables/{table}", "get"): (None, 200, _obj(["id"], {"id": STR}), ()),
    ("/v1/policies/{policy}/tables/{table}/rows", "get"): (None, 200, _ref("Rows"), ("trace",)),
    ("/v1/librarypolicies", "get"): (None, 200, _results(_ref("LibraryPolicy")), ("include_rules",)),
    ("/v1/librarypolicies", "post"): (_ref("PolicyInput"), 201, _ref("LibraryPolicy"), ()),
    ("/v1/librarypolicies/{lib}", "get"): (None, 200, _ref("LibraryPolicy"), ("include_rules",)),
    ("/v1/librarypolicies/{lib}", "delete"): (None, 200, _ref("LibraryPolicy"), ()),
    ("/v1/system/drivers", "get"): (None, 200, _results(_obj(["id", "description"], {"id": STR,
                                                                                      "description": STR})), ()),
    ("/v1/system/drivers/{driver}", "get"): (None, 200, _ref("Driver"), ()),
    ("/v1/data-sources", "get"): (None, 200, _results(_ref("Datasource")), ()),
    ("/v1/data-sources", "post"): (_ref("DatasourceInput"), 201, _ref("Datasource"), ()),
    ("/v1/data-sources/{ds}", "get"): (None, 200, _ref("Datasource"), ()),
    ("/v1/data-sources/{ds}", "delete"): (None, 200, _ref("Datasource"), ()),
    ("/v1/data-sources/{ds}", "post"): ({"anyOf": [_ref("ExecuteInput"), {"type": "object", "maxProperties": 0}]}, 200,
                                        {"anyOf": [_obj(["action_id"], {"action_id": STR}),
                                                   {"type": "object", "maxProperties": 0}]}, ("ds_action",)),
    ("/v1/data-sources/{ds}/status", "get"): (None, 200, _ref("DatasourceStatus"), ()),
    ("/v1/data-sources/{ds}/actions", "get"): (None, 200, _results(_ref("Action")), ()),
    ("/v1/data-sources/{ds}/tables", "get"): (None, 200, _results(_obj(["id", "columns"], {
        "id": STR, "columns": {"type": "array", "items": STR}})), ()),
    ("/v1/data-sources/{ds}/schema", "get"): (None, 200, _obj(["tables"], {"tables": {
        "type": "array", "items": _ref("TableSpec")}}), ()),
    ("/v1/data-sources/{ds}/tables/{table}", "get"): (None, 200, _obj(["id"], {"id": STR}), ()),
    ("/v1/data-sources/{ds}/tables/{table}/spec", "get"): (None, 200, _ref("TableSpec"), ()),
    ("/v1/data-sources/{ds}/tables/{table}/rows", "get"): (None, 200, _ref("Rows"), ()),
    ("/v1/data-sources/{ds}/tables/{table}/rows", "put"): (
        {"type": "array", "items": {"anyOf": [{"type": "array", "items": {}}, OBJ]}}, 200,
        {"type": "object", "maxProperties": 0}, ()),
}


def _operation(route: Route, method: str) -> dict:
    request, status, answer, query = OPERATIONS[(route.path, method)]
    doc = (route.endpoint.__doc__ or route.name).strip()
    params = [{"name": n, "in": "path", "required": True, "schema": STR,
               "description": "id or name" if n in ("policy", "ds", "lib", "rule") else n}
              for n in re.findall(r"{(\w+)}", route.path)]
    params += [{"name": _QUERY[q][0], "in": "query", "required": q in ("simulate",), "schema": _QUERY[q][1],
                "description": _QUERY[q][2]} for q in query]
    op: dict[str, Any] = {
        "summary": doc.splitlines()[0], "description": " ".join(doc.split()),
        "operationId": f"{method}_{route.endpoint.__name__}", "parameters": params,
        "responses": {str(status): {"description": "OK", "content": {"application/json": {"schema": answer}}},
                      "default": {"description": "error", "content": {"application/json": {
                          "schema": _ref("Error")}}}}}
    if route.path in OPEN_PATHS:
        op["security"] = []   # the versions and /healthz answer without a token
    if request is not None:
        op["requestBody"] = {"required": method != "post" or route.path != "/v1/policies",
                             "content": {"application/json": {"schema": request}}}
    return op


def openapi_document(routes: list[Route]) -> dict:
    """The OpenAPI 3.1 document of `routes`; KeyError when a route has no entry in OPERATIONS."""
    paths: dict[str, dict] = {}
    for route in routes:
        for method in sorted(m.lower() for m in route.methods or [] if m != "HEAD"):
            paths.setdefault(route.path, {})[method] = _operation(route, method)
    return {"openapi": "3.1.0", "info": {"title": "congressctl policy API (Congress v1)", "version": "1.0"},
            "paths": paths, "security": [{"token": []}],
            "components": {"schemas": SCHEMAS, "securitySchemes": {
                "token": {"type": "apiKey", "in": "header", "name": "X-Auth-Token"}}}}


def answer_schema(document: dict, path: str, method: str, status: int) -> dict | None:
    """The schema of an answer (the path as in the document, e.g. /v1/policies/{policy}), with the document's
    components so that its $refs resolve; None when the document has no schema for that status."""
    responses = document["paths"][path][method]["responses"]
    entry = responses.get(str(status)) or (responses.get("default") if status >= 400 else None)
    if entry is None:
        return None
    return {**entry["content"]["application/json"]["schema"], "components": document["components"]}
