"""The api-pe's guards on real processes and Redis: tokens and roles on every route of the route table, the
limits on bad input, the outbound allow-list; python-congressclient through keystoneauth's token plugin; and
schemathesis over the node's own OpenAPI document, finding no server error."""

from __future__ import annotations

import json
import re
import socket
import time
import types

import pytest
from fixtures_redis import ADMIN_TOKEN, READER_TOKEN, http_json
from hypothesis import HealthCheck, given, settings

from congressctl.node.access import OPEN_PATHS
from congressctl.node.api_pe import Api

POLICY, RULE, DATASOURCE, LIBRARY = "authp", "r1", "authds", "authlib"
PARAMS = {"policy": POLICY, "rule": RULE, "ds": DATASOURCE, "lib": LIBRARY, "driver": "push"}
# the table a path names: the policy's derived table, or the datasource's own
TABLES = {"/v1/policies/": "bad", "/v1/data-sources/": "vms"}


def route_cases() -> list[tuple[str, str]]:
    """(method, path) of every route in the table, as the node builds it (so a new route is never missed)."""
    stub = types.SimpleNamespace(pe=None, store=None, bus_age=lambda: None)
    return [(method, route.path) for route in Api(stub).routes() for method in sorted(route.methods or ())]


def concrete(path: str) -> str:
    table = next(t for prefix, t in TABLES.items() if path.startswith(prefix)) if "{table}" in path else ""
    return re.sub(r"{(\w+)}", lambda m: table if m.group(1) == "table" else PARAMS[m.group(1)], path)


def raw(node, method: str, path: str, headers: dict[str, str] | None = None,
        body: bytes = b"") -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request over a plain socket (no client library in the way)."""
    head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    with socket.create_connection(("127.0.0.1", node.api_port), timeout=10) as conn:
        conn.sendall(f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{head}"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head_text, _, payload = data.partition(b"\r\n\r\n")
    lines = head_text.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}, payload


@pytest.fixture
def api(node_cluster, sink):
    node_cluster.add("dsd", "d1")
    node = node_cluster.add("api-pe", "n1")
    assert node.request("POST", "/v1/data-sources", {"name": DATASOURCE, "driver": "push", "config": {
        "tables": {"vms": ["id", "state"]}, "action_url": sink.url}})[0] == 201
    assert node.request("POST", "/v1/policies", {"name": POLICY})[0] == 201
    assert node.request("POST", f"/v1/policies/{POLICY}/rules",
                        {"rule": f'bad(x) :- {DATASOURCE}:vms(id=x, state="ERROR")', "name": RULE})[0] == 201
    assert node.request("POST", "/v1/librarypolicies", {"name": LIBRARY, "rules": [{"rule": "p(1)"}]})[0] == 201
    return node


def assert_healthy(node) -> None:
    assert node.alive() and node.get("/healthz")[0] == 200
    log = node.log_text()
    assert "Traceback" not in log and "RecursionError" not in log
    assert ADMIN_TOKEN not in log and READER_TOKEN not in log


def test_every_route_needs_a_token_and_a_reader_cannot_write(api) -> None:
    cases = route_cases()
    assert len(cases) >= 30 and ("PUT", "/v1/data-sources/{ds}/tables/{table}/rows") in cases
    for method, template in cases:
        path = concrete(template)
        what = f"{method} {template}"
        if template in OPEN_PATHS:
            assert raw(api, method, path)[0] == 200, what
            continue
        for headers in ({}, {"X-Auth-Token": "wrong"}, {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
                        {"Authorization": "Basic " + ADMIN_TOKEN}):
            status, answer_headers, body = raw(api, method, path, headers)
            assert status == 401, (what, headers, status)
            assert answer_headers["www-authenticate"].startswith("Bearer"), what
            # the same answer whatever was sent: it never says which tokens exist
            if method != "HEAD":
                assert json.loads(body)["error"]["message"].startswith("a valid token is required"), what
        reader = raw(api, method, path, {"X-Auth-Token": READER_TOKEN})[0]
        if method in ("GET", "HEAD"):
            assert reader == 200, (what, reader)
        else:
            assert reader == 403, (what, reader)
        for headers in ({"X-Auth-Token": ADMIN_TOKEN}, {"Authorization": f"Bearer {ADMIN_TOKEN}"}):
            # writes to objects that are not there: past the check, the handler's own answer
            target = path if method in ("GET", "HEAD") else (
                path.replace(POLICY, "nope").replace(DATASOURCE, "nope").replace(LIBRARY, "nope"))
            status = raw(api, method, target, {**headers, "Content-Type": "application/json"}, b"{}")[0]
            assert status not in (401, 403) and status < 500, (what, status)
            if method in ("GET", "HEAD"):
                assert status == 200, (what, status)
    assert_healthy(api)


def test_limits_answer_413_and_400_naming_the_field_and_the_node_stays_healthy(api) -> None:
    rows = f"/v1/data-sources/{DATASOURCE}/tables/vms/rows"
    admin = {"X-Auth-Token": ADMIN_TOKEN, "Content-Type": "application/json"}
    with socket.create_connection(("127.0.0.1", api.api_port), timeout=10) as conn:
        conn.sendall(f"PUT {rows} HTTP/1.1\r\nHost: t\r\nX-Auth-Token: {ADMIN_TOKEN}\r\n"
                     f"Content-Length: {50 * 1024 * 1024}\r\n\r\n".encode() + b"[" * 65536)
        assert conn.makefile("rb").readline().split()[1] == b"413"   # answered before the body was sent
    deep = b"[" * 200_000 + b"]" * 200_000
    for method, path in (("PUT", rows), ("POST", "/v1/policies"), ("POST", "/v1/data-sources")):
        status, _, body = raw(api, method, path, admin, deep)
        assert status == 400 and "nested deeper than 32" in body.decode(), (path, status, body[:200])
    nested = json.dumps([[1, json.loads("[" * 40 + "]" * 40)]]).encode()
    status, _, body = raw(api, "PUT", rows, admin, nested)
    assert status == 400 and json.loads(body)["error"]["field"] == "rows[0][1]", body
    status, body = api.request("POST", "/v1/policies", {"name": "p" * 100_000})
    assert status == 400 and body["error"]["field"] == "name" and len(json.dumps(body)) < 1000
    long_rule = "q(x) :- " + "r(x), " * 12_000 + "r(x)"
    status, body = api.request("POST", f"/v1/policies/{POLICY}/rules", {"rule": long_rule})
    assert status == 400 and body["error"]["field"] == "rule", body
    status, body = api.request("PUT", rows, [[1, "x" * 70_000]])
    assert status == 400 and body["error"]["field"] == "rows[0][1]", body
    status, body = api.request("POST", "/v1/data-sources", {"name": "d" * 300, "driver": "push",
                                                            "config": {"tables": {"t": ["a"]}}})
    assert status == 400 and body["error"]["field"] == "name", body
    assert api.request("PUT", rows, [[1, "x" * 60_000], [2, [[["ok"]]]]])[0] == 200   # within the bounds
    assert_healthy(api)


def test_a_chunked_body_is_counted_as_it_arrives(node_cluster) -> None:
    node = node_cluster.add("api-pe", "n1", extra={"limits": {"max_body_mb": 1}})
    with socket.create_connection(("127.0.0.1", node.api_port), timeout=10) as conn:
        conn.sendall(f"POST /v1/policies HTTP/1.1\r\nHost: t\r\nX-Auth-Token: {ADMIN_TOKEN}\r\n"
                     "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"[" * 65536
        try:
            for _ in range(32):
                conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except OSError:
            pass   # the node answered and closed while the body was still coming
        assert conn.makefile("rb").readline().split()[1] == b"413"
    assert_healthy(node)


def test_datasource_urls_outside_the_allow_list_are_refused_naming_the_field_and_the_rule(api, sink) -> None:
    http_ds = {"name": "feed", "driver": "http", "config": {"tables": {"t": ["a"]}, "url": "http://10.9.9.9/x"}}
    status, body = api.request("POST", "/v1/data-sources", http_ds)
    assert status == 400 and body["error"]["field"] == "config.url"
    assert "datasources.allowed_urls" in body["error"]["message"]
    status, body = api.request("POST", "/v1/data-sources", {"name": "out", "driver": "push", "config": {
        "tables": {"t": ["a"]}, "action_url": "https://elsewhere.example/hook"}})
    assert status == 400 and body["error"]["field"] == "config.action_url"
    http_ds["config"]["url"] = sink.url
    assert api.request("POST", "/v1/data-sources", http_ds)[0] == 201   # the fixture allows http://127.0.0.1:
    assert api.request("GET", "/v1/data-sources/out")[0] == 404


def test_a_node_without_an_allow_list_refuses_every_http_datasource(node_cluster, sink) -> None:
    node = node_cluster.add("api-pe", "n1", extra={"datasources": {}})
    status, body = node.request("POST", "/v1/data-sources", {"name": "feed", "driver": "http", "config": {
        "tables": {"t": ["a"]}, "url": sink.url}})
    assert status == 400 and "none (the list is empty)" in body["error"]["message"]
    assert node.request("POST", "/v1/data-sources", {"name": "pushed", "driver": "push",
                                                    "config": {"tables": {"t": ["a"]}}})[0] == 201


def test_python_congressclient_with_keystoneauth_token_endpoint_plugin(api) -> None:
    from congressclient.v1 import client
    from keystoneauth1 import session
    from keystoneauth1.token_endpoint import Token

    congress = client.Client(session=session.Session(auth=Token(api.url, ADMIN_TOKEN)), service_type="policy")
    congress.create_policy({"name": "viaclient", "description": "from python-congressclient"})
    assert "viaclient" in [p["name"] for p in congress.list_policy()["results"]]
    assert [r["name"] for r in congress.list_policy_rules(POLICY)["results"]] == [RULE]
    reader = client.Client(session=session.Session(auth=Token(api.url, READER_TOKEN)), service_type="policy")
    assert reader.list_datasources()["results"][0]["name"] == DATASOURCE
    with pytest.raises(Exception, match="403|Forbidden"):
        reader.create_policy({"name": "refused"})
    wrong = client.Client(session=session.Session(auth=Token(api.url, "wrong")), service_type="policy")
    with pytest.raises(Exception, match="401|Unauthorized"):
        wrong.list_policy()


def test_schemathesis_finds_no_server_error_with_an_admin_token(api) -> None:
    import schemathesis
    from schemathesis.checks import not_a_server_error

    headers = {"X-Auth-Token": ADMIN_TOKEN}
    schema = schemathesis.openapi.from_url(api.url + "/v1/openapi.json", headers=headers)
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case) -> None:
            case.call_and_validate(headers=headers, checks=[not_a_server_error], timeout=10)
        call()
    assert time.monotonic() - started < 90
    assert_healthy(api)
    assert http_json("GET", api.url + "/v1/policies", token=None)[0] == 401
