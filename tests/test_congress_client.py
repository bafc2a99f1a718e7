"""Congress's own clients against real nodes on a real Redis: every method of python-congressclient's
`congressclient.v1.client.Client` and every `openstack congress` command, unmodified, with a token and the
endpoint (keystoneauth's token-endpoint plugin; openstackclient calls it `--os-auth-type admin_token`, with
`--os-endpoint URL` and the token in OS_TOKEN); and the OpenAPI document checked against the answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fixtures_redis import ADMIN_TOKEN, JsonSource, http_json, wait_for

congressclient = pytest.importorskip("congressclient.v1.client")
keystone_session = pytest.importorskip("keystoneauth1.session")
token_endpoint = pytest.importorskip("keystoneauth1.token_endpoint")

OPENSTACK = Path(sys.executable).parent / "openstack"
# the token in the environment, so that it is on no command line
CLI_ENV = {**os.environ, "OS_TOKEN": ADMIN_TOKEN}
ERROR_RULE = 'error(x) :- nova:vms(id=x, state="ERROR")'
# an action policy: the action "fail" puts a VM in state ERROR
ACTION_RULES = ['action("fail")', 'nova:vms+(x, "ERROR") :- fail(x)', "nova:vms-(x, s) :- fail(x), nova:vms(x, s)"]


@pytest.fixture
def json_server():
    s = JsonSource([{"name": "h1", "state": "up"}])
    yield s
    s.close()


def client_for(url: str):
    auth = token_endpoint.Token(url, ADMIN_TOKEN)
    return congressclient.Client(session=keystone_session.Session(auth=auth), endpoint_override=url)


def data(answer: dict) -> list[tuple]:
    return sorted(tuple(r["data"]) for r in answer["results"])


def test_every_client_method(two_apis, sink, json_server):
    _, a, b = two_apis
    c, other = client_for(a.url), client_for(b.url)
    called: set[str] = set()

    def call(method, *args, **kwargs):
        called.add(method)
        return getattr(c, method)(*args, **kwargs)

    assert call("list_api_versions")["versions"][0]["id"] == "v1"
    assert {d["id"] for d in call("list_drivers")["results"]} == {"push", "http"}
    driver = call("show_driver", "http")
    assert driver["config"]["url"].startswith("(required)") and driver["tables"] == []

    # config values as strings, as the CLI sends them: tables as a JSON string
    ds = call("create_datasource", {"name": "nova", "driver": "push", "description": "vms",
                                    "config": {"tables": '{"vms": ["id", "state"]}', "action_url": sink.url}})
    assert ds["config"]["tables"] == {"vms": {"columns": ["id", "state"]}}
    assert [d["name"] for d in call("list_datasources")["results"]] == ["nova"]
    assert call("show_datasource", ds["id"])["name"] == "nova"
    assert call("list_datasource_tables", "nova")["results"] == [{"id": "vms", "columns": ["id", "state"]}]
    assert call("show_datasource_table", "nova", "vms") == {"id": "vms"}
    assert call("show_datasource_schema", "nova")["tables"][0]["table_id"] == "vms"
    assert [col["name"] for col in call("show_datasource_table_schema", "nova", "vms")["columns"]] == ["id", "state"]
    call("update_datasource_rows", "nova", "vms", [[1, "ACTIVE"], [2, "ERROR"], [3, "ERROR"]])
    wait_for(lambda: data(call("list_datasource_rows", "nova", "vms")) == [(1, "ACTIVE"), (2, "ERROR"), (3, "ERROR")],
             5, what="pushed rows")
    wait_for(lambda: call("list_datasource_status", "nova")["initialized"] is True, 5, what="status from the DSD")

    policy = call("create_policy", {"name": "classification", "description": "d"})
    assert call("show_policy", "classification")["id"] == policy["id"]
    assert [p["name"] for p in call("list_policy")["results"]] == ["classification"]
    rule = call("create_policy_rule", "classification", {"rule": ERROR_RULE, "name": "r1", "comment": "c"})
    c.create_policy_rule("classification", {"rule": "execute[nova:reboot(x)] :- error(x)"})
    assert call("show_policy_rule", "classification", rule["id"])["name"] == "r1"
    assert len(call("list_policy_rules", "classification")["results"]) == 2
    assert {"id": "error"} in call("list_policy_tables", "classification")["results"]
    assert call("show_policy_table", "classification", "error") == {"id": "error"}
    wait_for(lambda: data(other.list_policy_rows("classification", "error")) == [(2,), (3,)], 5,
             what="derived rows on n2")
    assert data(call("list_policy_rows", "classification", "error")) == [(2,), (3,)]
    traced = c.list_policy_rows("classification", "error", trace=True)
    assert data(traced) == [(2,), (3,)]
    assert 'Exit: nova:vms(2, "ERROR")' in traced["trace"] and "Rule: error(x) :- nova:vms" in traced["trace"]

    wait_for(lambda: call("list_datasource_actions", "nova")["results"], 5, what="actions")
    assert call("list_datasource_actions", "nova")["results"][0]["name"] == "reboot"
    action = call("execute_datasource_action", "nova", "execute", {"name": "reboot", "args": {"positional": [9]}})
    assert action["action_id"]
    wait_for(lambda: (9,) in sink.args(), 5, what="executed action")

    # simulate with an action policy, through the other node; nothing changes
    c.create_policy({"name": "act", "kind": "action"})
    for text in ACTION_RULES:
        c.create_policy_rule("act", {"rule": text})
    wait_for(lambda: len(other.list_policy_rules("act")["results"]) == 3, 5, what="action rules on n2")
    body = {"query": "error(x)", "sequence": "fail(1)", "action_policy": "act"}
    assert call("execute_policy_action", "classification", "simulate", False, False, body) == {
        "result": ["error(1)", "error(2)", "error(3)"]}
    sim = other.execute_policy_action("classification", "simulate", True, True, body)
    assert sim["result"] == ["error+(1)"] and "Action: fail(1)" in sim["trace"]
    assert data(c.list_policy_rows("classification", "error")) == [(2,), (3,)]
    assert data(c.list_datasource_rows("nova", "vms")) == [(1, "ACTIVE"), (2, "ERROR"), (3, "ERROR")]

    # library policies: stored, replicated, not evaluated; a policy created from one evaluates its rules
    lib = call("create_library_policy", {"name": "lib1", "description": "l", "kind": "nonrecursive",
                                         "rules": [{"rule": 'bad(x) :- nova:vms(id=x, state="ERROR")', "name": "b"}]})
    wait_for(lambda: other.list_library_policy()["results"], 5, what="library policy on n2")
    assert [p["name"] for p in call("list_library_policy")["results"]] == ["lib1"]
    assert "rules" not in c.list_library_policy(include_rules=False)["results"][0]
    assert call("show_library_policy", "lib1")["rules"][0]["name"] == "b"
    assert "rules" not in c.show_library_policy(lib["id"], include_rules=False)
    assert "lib1" not in [p["name"] for p in c.list_policy()["results"]]
    created = c.create_policy({}, library_policy_id=lib["id"])
    assert created["name"] == "lib1" and created["rules"][0]["rule"].startswith("bad(x)")
    wait_for(lambda: data(other.list_policy_rows("lib1", "bad")) == [(2,), (3,)], 5, what="policy from library")
    call("delete_library_policy", lib["id"])
    wait_for(lambda: other.list_library_policy()["results"] == [], 5, what="library policy gone on n2")

    # an http datasource polled every 30 s; request-refresh makes it poll now; tables.<name>=columns
    web = c.create_datasource({"name": "web", "driver": "http", "config": {
        "url": json_server.url, "tables.hosts": "name,state", "poll_interval": "30"}})
    assert web["config"]["poll_interval"] == 30.0
    wait_for(lambda: data(c.list_datasource_rows("web", "hosts")) == [("h1", "up")], 10, what="first poll")
    json_server.document = [{"name": "h1", "state": "up"}, {"name": "h2", "state": "down"}]
    started = time.monotonic()
    call("request_refresh", web["id"], {})
    wait_for(lambda: data(other.list_datasource_rows("web", "hosts")) == [("h1", "up"), ("h2", "down")], 10,
             what="rows after request-refresh")
    assert time.monotonic() - started < 10

    call("delete_policy_rule", "classification", rule["id"])
    assert call("delete_policy", "lib1")["name"] == "lib1"
    assert call("delete_datasource", "web")["name"] == "web"

    every = {n for n, v in vars(congressclient.Client).items() if callable(v) and not n.startswith("_")}
    assert called == every, sorted(every - called)


def openstack(url: str, *args: str) -> str:
    done = subprocess.run([str(OPENSTACK), "--os-auth-type", "admin_token", "--os-endpoint", url, "congress", *args],
                          capture_output=True, text=True, timeout=60, check=False, env=CLI_ENV)
    assert done.returncode == 0, f"openstack congress {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def openstack_fails(url: str, *args: str) -> str:
    done = subprocess.run([str(OPENSTACK), "--os-auth-type", "admin_token", "--os-endpoint", url, "congress", *args],
                          capture_output=True, text=True, timeout=60, check=False, env=CLI_ENV)
    assert done.returncode != 0, done.stdout
    return done.stderr


def openstack_json(url: str, *args: str):
    return json.loads(openstack(url, *args, "-f", "json"))


CLI_COMMANDS = {
    "version list", "driver list", "driver config show", "driver schema show", "datasource create",
    "datasource list", "datasource delete", "datasource table list", "datasource table show",
    "datasource table schema show", "datasource schema show", "datasource row list", "datasource row update",
    "datasource status show", "datasource actions show", "datasource request-refresh", "policy create",
    "policy create-from-file", "policy list", "policy show", "policy delete", "policy rule create",
    "policy rule list", "policy rule show", "policy rule delete", "policy table list", "policy table show",
    "policy row list", "policy simulate",
}


@pytest.mark.skipif(not OPENSTACK.exists(), reason="python-openstackclient is not installed")
def test_every_openstack_congress_command(two_apis, sink, tmp_path):
    _, a, _ = two_apis
    url = a.url
    ran: set[str] = set()

    def cli(command: str, *args: str, as_json: bool = True):
        ran.add(command)
        return (openstack_json if as_json else openstack)(url, *command.split(), *args)

    assert cli("version list")[0]["id"] == "v1"
    assert {d["id"] for d in cli("driver list")} == {"push", "http"}
    assert cli("driver config show", "http")["config"]["url"].startswith("(required)")
    assert cli("driver schema show", "push") == []
    # the README's example: --config values are strings; tables as JSON
    created = cli("datasource create", "push", "ds1", "--config", 'tables={"t":["a","b"]}')
    assert created["name"] == "ds1"
    cli("datasource create", "push", "nova", "--config", "tables.vms=id,state", "--config", f"action_url={sink.url}")
    assert {d["name"] for d in cli("datasource list")} == {"ds1", "nova"}
    assert [t["id"] for t in cli("datasource table list", "nova")] == ["vms"]
    assert cli("datasource table show", "nova", "vms")["id"] == "vms"
    assert [c["name"] for c in cli("datasource table schema show", "nova", "vms")] == ["id", "state"]
    # python-congressclient 2.0.1 formats the columns with dict.iteritems (Python 2 only): the command fails in
    # the client whatever the server answers once a table has columns; the answer itself is checked above
    ran.add("datasource schema show")
    assert "iteritems" in openstack_fails(url, "datasource", "schema", "show", "nova")
    cli("datasource row update", "nova", "vms", '[[1, "ACTIVE"], [2, "ERROR"]]', as_json=False)
    wait_for(lambda: http_json("GET", f"{url}/v1/data-sources/nova/tables/vms/rows")[1]["results"], 5,
             what="pushed rows")
    assert cli("datasource row list", "nova", "vms") == [{"id": 1, "state": "ACTIVE"}, {"id": 2, "state": "ERROR"}]
    wait_for(lambda: cli("datasource status show", "nova")["initialized"] is True, 10, what="status from the DSD")
    cli("policy create", "classification", "--description", "d")
    cli("policy rule create", "classification", ERROR_RULE, "--name", "r1")
    cli("policy rule create", "classification", "execute[nova:reboot(x)] :- error(x)")
    listed = cli("policy rule list", "classification", as_json=False)
    assert "error(x) :- nova:vms" in listed
    assert cli("policy rule show", "classification", "r1")["name"] == "r1"
    assert {"id": "error"} in cli("policy table list", "classification")
    assert cli("policy table show", "classification", "error")["id"] == "error"
    assert [r["Col0"] for r in cli("policy row list", "classification", "error")] == [2]
    traced = cli("policy row list", "classification", "error", "--trace", as_json=False)
    assert 'Exit: nova:vms(2, "ERROR")' in traced
    wait_for(lambda: cli("datasource actions show", "nova"), 5, what="actions")
    assert cli("datasource actions show", "nova")[0]["action"] == "reboot"
    cli("policy create", "act", "--kind", "action")
    for text in ACTION_RULES:
        cli("policy rule create", "act", text)
    assert cli("policy show", "act")["kind"] == "action"
    assert {p["name"] for p in cli("policy list")} == {"classification", "act"}
    out = cli("policy simulate", "classification", "error(x)", "fail(1)", "act", as_json=False)
    assert out.split() == ["error(1)", "error(2)"]
    out = cli("policy simulate", "classification", "error(x)", "fail(1)", "act", "--delta", "--trace", as_json=False)
    assert out.splitlines()[0] == "error+(1)" and "Action: fail(1)" in out
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text("name: fromfile\ndescription: from a file\nrules:\n"
                           "  - rule: 'stopped(x) :- nova:vms(id=x, state=\"ACTIVE\")'\n    name: s\n")
    # python-congressclient 2.0.1 reads the file with yaml.load_all(stream), which PyYAML 6 refuses (no Loader):
    # the command fails in the client before sending; the body it would send is sent here as the client does
    ran.add("policy create-from-file")
    assert "Loader" in openstack_fails(url, "policy", "create-from-file", str(policy_file))
    created = client_for(url).create_policy(yaml.safe_load(policy_file.read_text()))
    assert created["rules"][0]["rule"].startswith("stopped(x)") and created["description"] == "from a file"
    cli("datasource request-refresh", "nova", as_json=False)
    rule_id = cli("policy rule show", "classification", "r1")["id"]
    cli("policy rule delete", "classification", rule_id, as_json=False)
    cli("policy delete", "fromfile", as_json=False)
    cli("datasource delete", "ds1", as_json=False)
    assert {d["name"] for d in cli("datasource list")} == {"nova"}
    assert ran == CLI_COMMANDS, sorted(CLI_COMMANDS - ran)


def test_cli_command_list_is_every_congress_command():
    """CLI_COMMANDS is what python-congressclient installs (so the test above runs every one)."""
    from importlib.metadata import entry_points
    names = {e.name for e in entry_points(group="openstack.congressclient.v1")}
    assert {n.removeprefix("congress_").replace("_", " ") for n in names} == CLI_COMMANDS


def test_answers_match_the_openapi_schemas(two_apis, sink):
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    from congressctl.node.openapi import answer_schema
    _, a, _ = two_apis
    document = a.get("/v1/openapi.json")[1]
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            assert "requestBody" in op or method in ("get", "delete"), (path, method)
            assert op["responses"], (path, method)
    checked: set[tuple[str, str]] = set()

    def valid(schema: dict, value) -> list[str]:
        return [str(e) for e in jsonschema_rs.validator_for(schema).iter_errors(value)]

    def check(method: str, template: str, path: str, body=None, status: int = 200):
        if body is not None:
            request = document["paths"][template][method.lower()]["requestBody"]["content"]["application/json"]
            assert not valid({**request["schema"], "components": document["components"]}, body), (method, path)
        got, answer = a.request(method, path, body)
        assert got == status, (method, path, answer)
        schema = answer_schema(document, template, method.lower(), got)
        errors = valid(schema, answer)
        assert not errors, (method, path, answer, errors)
        checked.add((template, method.lower()))

    p, r, d = "/v1/policies/{policy}", "/v1/policies/{policy}/rules/{rule}", "/v1/data-sources/{ds}"
    check("GET", "/", "/")
    check("GET", "/v1", "/v1")
    check("GET", "/v1/", "/v1/")
    check("GET", "/healthz", "/healthz")
    check("GET", "/v1/status", "/v1/status")
    check("GET", "/v1/openapi.json", "/v1/openapi.json")
    check("POST", "/v1/data-sources", "/v1/data-sources",
          {"name": "nova", "driver": "push", "config": {"tables": {"vms": ["id", "state"]}, "action_url": sink.url}},
          201)
    check("GET", "/v1/data-sources", "/v1/data-sources")
    check("GET", d, "/v1/data-sources/nova")
    check("PUT", d + "/tables/{table}/rows", "/v1/data-sources/nova/tables/vms/rows", [[1, "ERROR"]])
    check("GET", d + "/tables/{table}/rows", "/v1/data-sources/nova/tables/vms/rows")
    check("GET", d + "/tables", "/v1/data-sources/nova/tables")
    check("GET", d + "/tables/{table}", "/v1/data-sources/nova/tables/vms")
    check("GET", d + "/tables/{table}/spec", "/v1/data-sources/nova/tables/vms/spec")
    check("GET", d + "/schema", "/v1/data-sources/nova/schema")
    check("GET", d + "/status", "/v1/data-sources/nova/status")
    check("GET", "/v1/system/drivers", "/v1/system/drivers")
    check("GET", "/v1/system/drivers/{driver}", "/v1/system/drivers/push")
    check("POST", "/v1/policies", "/v1/policies", {"name": "p", "rules": [{"rule": ERROR_RULE}]}, 201)
    check("POST", "/v1/policies", "/v1/policies", {"name": "act", "kind": "action"}, 201)
    check("GET", "/v1/policies", "/v1/policies")
    check("GET", p, "/v1/policies/p")
    check("POST", "/v1/policies/{policy}/rules", "/v1/policies/p/rules",
          {"rule": "execute[nova:reboot(x)] :- error(x)"}, 201)
    rule_id = a.get("/v1/policies/p/rules")[1]["results"][0]["id"]
    check("GET", "/v1/policies/{policy}/rules", "/v1/policies/p/rules")
    check("GET", r, f"/v1/policies/p/rules/{rule_id}")
    check("GET", p + "/tables", "/v1/policies/p/tables")
    check("GET", p + "/tables/{table}", "/v1/policies/p/tables/error")
    wait_for(lambda: a.get("/v1/policies/p/tables/error/rows")[1]["results"], 5, what="derived rows")
    check("GET", p + "/tables/{table}/rows", "/v1/policies/p/tables/error/rows?trace=true")
    check("POST", p, "/v1/policies/p?action=simulate&trace=true&delta=true",
          {"query": "error(x)", "sequence": 'nova:vms+(2, "ERROR")', "action_policy": None})
    check("GET", d + "/actions", "/v1/data-sources/nova/actions")
    check("POST", d, "/v1/data-sources/nova?action=execute", {"name": "reboot", "args": {"positional": [1]}})
    check("POST", d, "/v1/data-sources/nova?action=request-refresh", {})
    check("POST", "/v1/librarypolicies", "/v1/librarypolicies", {"name": "lib", "rules": [{"rule": "q(1)"}]}, 201)
    check("GET", "/v1/librarypolicies", "/v1/librarypolicies?include_rules=false")
    check("GET", "/v1/librarypolicies/{lib}", "/v1/librarypolicies/lib")
    check("DELETE", "/v1/librarypolicies/{lib}", "/v1/librarypolicies/lib")
    check("GET", p, "/v1/policies/nope", status=404)
    check("DELETE", r, f"/v1/policies/p/rules/{rule_id}")
    check("DELETE", p, "/v1/policies/p")
    check("DELETE", d, "/v1/data-sources/nova")
    every = {(path, m) for path, methods in document["paths"].items() for m in methods}
    assert checked == every, sorted(every - checked)


def test_simulate_changes_nothing_in_store_or_engine(two_apis, redis_server):
    _, a, _ = two_apis
    assert a.request("POST", "/v1/data-sources", {"name": "nova", "driver": "push",
                                                  "config": {"tables": {"vms": ["id", "state"]}}})[0] == 201
    assert a.request("POST", "/v1/policies", {"name": "p", "rules": [{"rule": ERROR_RULE}]})[0] == 201
    assert a.request("PUT", "/v1/data-sources/nova/tables/vms/rows", [[1, "ERROR"], [2, "ACTIVE"]])[0] == 200
    wait_for(lambda: a.get("/v1/policies/p/tables/error/rows")[1]["results"], 5, what="derived rows")
    store = redis_server.client()
    before = {k: store.dump(k) for k in store.keys("*")}
    status, answer = a.request("POST", "/v1/policies/p?action=simulate&trace=false&delta=false",
                               {"query": "error(x)", "sequence": 'nova:vms-(1, "ERROR") nova:vms+(2, "ERROR") '
                                                                 'error+(7)'})
    assert (status, answer) == (200, {"result": ["error(2)", "error(7)"]})
    assert a.get("/v1/policies/p/tables/error/rows")[1] == {"results": [{"data": [1]}]}
    assert a.get("/v1/data-sources/nova/tables/vms/rows")[1]["results"] == [{"data": [1, "ERROR"]},
                                                                            {"data": [2, "ACTIVE"]}]
    assert {k: store.dump(k) for k in store.keys("*")} == before
    status, answer = a.request("POST", "/v1/policies/p?action=simulate",
                               {"query": "error(x)", "sequence": "q(1) :- r(1)"})
    assert status == 400 and "facts" in answer["error"]["message"]


def test_policy_kinds_are_stored_checked_and_replicated(two_apis):
    _, a, b = two_apis
    for name, kind in (("db", "database"), ("act", "action"), ("mat", "materialized")):
        assert a.request("POST", "/v1/policies", {"name": name, "kind": kind})[0] == 201
    # a database policy holds facts only
    status, answer = a.request("POST", "/v1/policies/db/rules", {"rule": "q(x) :- r(x)"})
    assert status == 400 and "facts only" in answer["error"]["message"]
    assert a.request("POST", "/v1/policies/db/rules", {"rule": "q(1)"})[0] == 201
    wait_for(lambda: b.get("/v1/policies/db/tables/q/rows")[1] == {"results": [{"data": [1]}]}, 5,
             what="database fact on n2")
    # an update head only in an action policy, whose rules are stored but never evaluated
    status, answer = a.request("POST", "/v1/policies/mat/rules", {"rule": "q+(x) :- r(x)"})
    assert status == 400 and answer["error"]["kind"] == "syntax"
    assert a.request("POST", "/v1/policies/mat/rules", {"rule": "m(x) :- db:q(x)"})[0] == 201
    assert a.request("POST", "/v1/policies/act/rules", {"rule": "db:q+(x) :- go(x)"})[0] == 201
    assert a.request("POST", "/v1/policies/act/rules", {"rule": 'action("go")'})[0] == 201
    status, answer = a.request("POST", "/v1/policies/act/rules", {"rule": "db:q+(x) :- go(y)"})
    assert status == 400 and answer["error"]["kind"] == "safety"
    wait_for(lambda: len(b.get("/v1/policies/act/rules")[1]["results"]) == 2, 5, what="action rules on n2")
    assert b.get("/v1/policies/act")[1]["kind"] == "action"
    assert b.get("/v1/policies/act/tables")[1] == {"results": []}
    wait_for(lambda: b.get("/v1/policies/mat/tables/m/rows")[1] == {"results": [{"data": [1]}]}, 5,
             what="materialized rows on n2")
    status, answer = b.request("POST", "/v1/policies/mat?action=simulate&delta=true",
                               {"query": "m(x)", "sequence": "go(2)", "action_policy": "act"})
    assert (status, answer) == (200, {"result": ["m+(2)"]})
    status, answer = b.request("POST", "/v1/policies/mat?action=simulate",
                               {"query": "m(x)", "sequence": "go(2)", "action_policy": "db"})
    assert status == 400 and "not action" in answer["error"]["message"]
