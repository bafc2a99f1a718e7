"""Datasource drivers run by the DSD: `push` (rows replaced through the API) and `http` (polls a JSON URL).

A datasource definition (as stored and as the API returns it):
  {"id", "name", "driver": "push"|"http", "description", "enabled",
   "config": {"tables": {TABLE: {"columns": [COL, ...], "path": "a.b"}},   # path: http only
              "url": "http://...", "poll_interval": 1.0,                   # http only
              "action_url": "http://..."}}                                 # optional, both drivers
Columns may also be given as a plain list (`"tables": {"t": ["a", "b"]}`); they are normalised.
Config as `openstack congress datasource create --config k=v` sends it (every value a string) is taken too:
`tables` as a JSON string, or one `tables.<name>` key per table with its columns comma-separated
(`tables.vms=id,state`), and `poll_interval` as a numeric string.
Actions are POSTed to action_url as JSON {"action_id", "datasource", "action", "args"}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from congressctl.errors import ActionDeliveryError, DatasourceConfigError, InputLimitError
from congressctl.node.limits import MAX_JSON_DEPTH, MAX_TEXT_CHARS, check_name, check_text, deeper_than
from congressctl.payloads import DriverStatus

log = logging.getLogger("congressctl.drivers")

DRIVERS = ("push", "http")
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-.]*$")
HTTP_TIMEOUT_S = 5.0
# An action POST that fails to connect or gets a 5xx is retried (the sink deduplicates by action_id).
ACTION_RETRY_DELAYS_S = (0.05, 0.2, 0.5, None)

Row = tuple
Emit = Callable[[str, set[Row]], Awaitable[None]]


def _check_url(value: Any, field_name: str) -> str:
    if not isinstance(value, str) or not re.match(r"^https?://[^\s]+$", value):
        raise DatasourceConfigError(f"must be an http(s) URL, got {value!r}", field=field_name)
    return value


# Each driver's config options and what they mean, as Congress's driver info (GET /v1/system/drivers/{id})
# describes them: "(required) ..." or "(optional) ...".
_TABLES_OPTION = ("(required) the tables and their columns: {\"<table>\": [\"<column>\", ...]} (also as a JSON "
                  "string, or one tables.<table>=col1,col2 option per table)")
_ACTION_URL_OPTION = ("(optional) http(s) URL each action is POSTed to as JSON {action_id, datasource, action, "
                      "args}")
DRIVER_INFO: dict[str, dict[str, Any]] = {
    "push": {
        "description": "rows replaced through the API (PUT /v1/data-sources/{ds}/tables/{table}/rows)",
        "config": {"tables": _TABLES_OPTION, "action_url": _ACTION_URL_OPTION},
    },
    "http": {
        "description": "polls a JSON URL and maps fields to columns",
        "config": {"tables": _TABLES_OPTION + "; a table may be {\"columns\": [...], \"path\": \"a.b\"}, the "
                             "dotted path of its list in the polled document",
                   "url": "(required) http(s) URL of the JSON document polled",
                   "poll_interval": "(optional) seconds between polls (default 1.0); request-refresh polls at once",
                   "action_url": _ACTION_URL_OPTION},
    },
}


def driver_info(driver: str) -> dict | None:
    """Congress's driver info: id, description, config options with their meaning, secret options, tables
    (none fixed: every table is declared by the datasource's config)."""
    info = DRIVER_INFO.get(driver)
    if info is None:
        return None
    return {"id": driver, "description": info["description"], "config": dict(info["config"]), "secret": [],
            "module": f"congressctl.node.drivers.{driver}", "tables": []}


def _cli_config(config: dict) -> dict:
    """Config values given as strings (the CLI's --config k=v) in their JSON form."""
    out = {k: v for k, v in config.items() if not k.startswith("tables.")}
    split = {k[len("tables."):]: v for k, v in config.items() if k.startswith("tables.")}
    tables = out.get("tables")
    if isinstance(tables, str):
        try:
            out["tables"] = json.loads(tables)
        except ValueError:
            raise DatasourceConfigError("is a string but not JSON: give {\"<table>\": [columns]} or "
                                        "tables.<table>=col1,col2", field="config.tables") from None
    if split:
        if not isinstance(out.get("tables", {}), dict):
            raise DatasourceConfigError("cannot be given both whole and as tables.<name>", field="config.tables")
        merged = dict(out.get("tables") or {})
        for table, columns in split.items():
            merged[table] = ([c.strip() for c in columns.split(",") if c.strip()] if isinstance(columns, str)
                             else columns)
        out["tables"] = merged
    interval = out.get("poll_interval")
    if isinstance(interval, str):
        try:
            out["poll_interval"] = float(interval)
        except ValueError:
            raise DatasourceConfigError(f"must be a number > 0, got {interval!r}",
                                        field="config.poll_interval") from None
    return out


def normalize_datasource(body: Any) -> dict:
    """Check an API body for a new datasource and return its canonical definition (without id)."""
    if not isinstance(body, dict):
        raise DatasourceConfigError("body must be a JSON object")
    name = body.get("name")
    check_name(name, "name")
    if not isinstance(name, str) or not NAME_RE.match(name) or ":" in name:
        raise DatasourceConfigError(f"must be a name of letters, digits, _ - . (got {name!r})", field="name")
    driver = body.get("driver")
    if driver not in DRIVERS:
        raise DatasourceConfigError(f"unknown driver {driver!r}; known: {', '.join(DRIVERS)}", field="driver")
    config = body.get("config") or {}
    if not isinstance(config, dict):
        raise DatasourceConfigError("must be an object", field="config")
    config = _cli_config(config)
    tables = config.get("tables")
    if not isinstance(tables, dict) or not tables:
        raise DatasourceConfigError("must map each table name to its columns", field="config.tables")
    norm_tables: dict[str, dict] = {}
    for table, spec in tables.items():
        check_name(table, "config.tables")
        where = f"config.tables.{table}"
        if not isinstance(table, str) or not NAME_RE.match(table):
            raise DatasourceConfigError(f"bad table name {table!r}", field=where)
        if isinstance(spec, list):
            spec = {"columns": spec}
        if not isinstance(spec, dict):
            raise DatasourceConfigError("must be a list of columns or {columns: [...]}", field=where)
        columns = spec.get("columns")
        for column in columns if isinstance(columns, list) else ():
            check_name(column, where + ".columns")
        if (not isinstance(columns, list) or not columns
                or not all(isinstance(c, str) and NAME_RE.match(c) for c in columns)
                or len(set(columns)) != len(columns)):
            raise DatasourceConfigError("must be a non-empty list of distinct column names", field=where + ".columns")
        entry: dict[str, Any] = {"columns": list(columns)}
        if driver == "http":
            path = spec.get("path", "")
            if not isinstance(path, str):
                raise DatasourceConfigError("must be a dotted path string", field=where + ".path")
            entry["path"] = path
        norm_tables[table] = entry
    norm: dict[str, Any] = {"tables": norm_tables}
    if config.get("action_url") is not None:
        norm["action_url"] = _check_url(config["action_url"], "config.action_url")
    if driver == "http":
        norm["url"] = _check_url(config.get("url"), "config.url")
        interval = config.get("poll_interval", 1.0)
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
            raise DatasourceConfigError(f"must be a number > 0, got {interval!r}", field="config.poll_interval")
        norm["poll_interval"] = float(interval)
    description = body.get("description", "")
    enabled = body.get("enabled", True)
    if not isinstance(description, str):
        raise DatasourceConfigError("must be a string", field="description")
    check_text(description, "description")
    if not isinstance(enabled, bool):
        raise DatasourceConfigError("must be true or false", field="enabled")
    return {"name": name, "driver": driver, "config": norm, "description": description, "enabled": enabled}


def table_columns(ds: dict) -> dict[str, list[str]]:
    return {t: spec["columns"] for t, spec in ds["config"]["tables"].items()}


def cell(value: Any) -> int | float | str:
    """A JSON value as a row cell (int, float or string)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int, float, str)):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def pushed_cell(value: Any, room: int) -> int | float | str:
    """A cell of a pushed row, within the bounds: at most MAX_TEXT_CHARS, nesting within `room` more levels."""
    if isinstance(value, str):
        if len(value) > MAX_TEXT_CHARS:
            raise InputLimitError(f"longer than {MAX_TEXT_CHARS} characters ({len(value)})")
        return value
    if isinstance(value, (list, dict)):
        if deeper_than(value, room):
            raise InputLimitError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        text = json.dumps(value, sort_keys=True, separators=(",", ":"))
        if len(text) > MAX_TEXT_CHARS:
            raise InputLimitError(f"longer than {MAX_TEXT_CHARS} characters as JSON ({len(text)})")
        return text
    return cell(value)


def coerce_rows(rows: Any, columns: list[str]) -> list[Row]:
    """Rows pushed through the API: lists, {"data": [...]}, or objects keyed by column name. This walk over the
    cells is also where their bounds are checked (length, nesting): the hot path walks them once."""
    if not isinstance(rows, list):
        raise DatasourceConfigError("rows must be a JSON list")
    out = []
    for i, row in enumerate(rows):
        room = MAX_JSON_DEPTH - 2    # the list of rows, and the row
        if isinstance(row, dict) and "data" in row:
            row = row["data"]
            room -= 1
        if isinstance(row, dict):
            unknown = set(row) - set(columns)
            if unknown:
                raise DatasourceConfigError(f"unknown column(s) {sorted(unknown)}", field=f"rows[{i}]")
            row = [row.get(c) for c in columns]
        if not isinstance(row, list) or len(row) != len(columns):
            raise DatasourceConfigError(f"needs {len(columns)} values ({', '.join(columns)})", field=f"rows[{i}]")
        try:
            out.append(tuple([v if type(v) is int else pushed_cell(v, room) for v in row]))
        except InputLimitError:
            _refuse_cell(row, i, room)
    return out


def _refuse_cell(row: list, i: int, room: int) -> None:
    """Raise the error of the row's first cell out of bounds, naming it (found again only on this error path)."""
    for j, value in enumerate(row):
        try:
            pushed_cell(value, room)
        except InputLimitError as exc:
            raise InputLimitError(exc.message, field=f"rows[{i}][{j}]") from None


def extract_rows(document: Any, path: str, columns: list[str]) -> set[Row]:
    """Rows of one table from a polled JSON document: the list at `path`, fields mapped to columns."""
    node = document
    for part in [p for p in path.split(".") if p]:
        if not isinstance(node, dict) or part not in node:
            raise DatasourceConfigError(f"path {path!r}: no field {part!r}")
        node = node[part]
    if isinstance(node, dict):
        node = [node]
    if not isinstance(node, list):
        raise DatasourceConfigError(f"path {path!r} is not a list")
    rows = set()
    for item in node:
        if isinstance(item, dict):
            rows.add(tuple(cell(item.get(c)) for c in columns))
        elif isinstance(item, list) and len(item) == len(columns):
            rows.add(tuple(cell(v) for v in item))
    return rows


@dataclass
class Driver:
    """One running datasource. `run()` is long-lived for polling drivers; push drivers are notice-driven."""

    ds: dict
    http: httpx.AsyncClient
    poster: HttpPoster
    status: DriverStatus = field(default_factory=DriverStatus)

    @property
    def id(self) -> str:
        return str(self.ds["id"])

    @property
    def name(self) -> str:
        return str(self.ds["name"])

    @property
    def tables(self) -> dict[str, list[str]]:
        return table_columns(self.ds)

    refresh: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, emit: Emit) -> None:
        """Push drivers wait forever; their rows arrive through DSD.refresh_pushed."""
        await asyncio.Event().wait()

    def request_refresh(self) -> None:
        """Poll now rather than at the next interval (request-refresh); nothing to poll for a push driver."""
        self.refresh.set()

    async def execute(self, action_id: str, action: str, args: list) -> None:
        url = self.ds["config"].get("action_url")
        if not url:
            raise DatasourceConfigError(f"datasource {self.name} has no action_url", field="config.action_url")
        body = json.dumps({"action_id": action_id, "datasource": self.name, "action": action, "args": args},
                          separators=(",", ":")).encode()
        status = 0
        for delay in ACTION_RETRY_DELAYS_S:
            try:
                status = await self.poster.post_json(url, body)
                if status < 500:
                    break
            except ActionDeliveryError:
                if delay is None:
                    raise
            if delay is not None:
                await asyncio.sleep(delay)
        if status >= 300:
            raise ActionDeliveryError(f"{url} answered HTTP {status}")


@dataclass
class HttpDriver(Driver):
    async def poll_once(self) -> dict[str, set[Row]]:
        response = await self.http.get(self.ds["config"]["url"], timeout=HTTP_TIMEOUT_S)
        response.raise_for_status()
        document = response.json()
        return {t: extract_rows(document, spec.get("path", ""), spec["columns"])
                for t, spec in self.ds["config"]["tables"].items()}

    async def run(self, emit: Emit) -> None:
        interval = self.ds["config"].get("poll_interval", 1.0)
        while True:
            started = time.monotonic()
            self.refresh.clear()
            try:
                tables = await self.poll_once()
            except (httpx.HTTPError, ValueError, DatasourceConfigError) as exc:
                self.status.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("datasource %s poll failed: %s", self.name, self.status.last_error)
            else:
                self.status.last_error = None
                for table, rows in tables.items():
                    await emit(table, rows)
                self.status.initialized = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, interval - (time.monotonic() - started))):
                    await self.refresh.wait()


class HttpPoster:
    """Minimal HTTP/1.1 JSON POST over kept-alive asyncio connections, for action delivery.

    httpx costs about 1 ms of CPU per request, which alone would cap the DSD near 1000 actions/s; this
    costs a small fraction of that. It handles Content-Length, chunked and close-delimited answers, and
    retries once on a fresh connection when a kept-alive one turns out to be closed.
    """

    def __init__(self, timeout: float = HTTP_TIMEOUT_S, executor: str = ""):
        self.timeout = timeout
        self.executor = f"X-Congress-Executor: {executor}\r\n" if executor else ""
        self.idle: dict[tuple[str, str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def post_json(self, url: str, body: bytes) -> int:
        """POST `body`; returns the HTTP status. Raises ActionDeliveryError when no answer comes."""
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ActionDeliveryError(f"not an http(s) URL: {url}")
        port = u.port or (443 if u.scheme == "https" else 80)
        key = (u.scheme, u.hostname, port)
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        # X-Congress-Sent: when this DSD sent it (wall clock), so that a receiver can tell a late delivery of an
        # old DSD's action (a segment retransmitted after a partition) from an old DSD executing again
        head = (f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n{self.executor}"
                f"X-Congress-Sent: {time.time():.6f}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        for attempt in range(2):
            conn = self._take(key) if attempt == 0 else None
            reused = conn is not None
            try:
                async with asyncio.timeout(self.timeout):   # unlike wait_for, no extra task per POST
                    if conn is None:
                        conn = await self._open(key)
                    status, keep = await self._exchange(conn, head + body)
            except (TimeoutError, OSError, EOFError, ValueError, asyncio.IncompleteReadError) as exc:
                if conn is not None:
                    conn[1].close()
                if reused and not isinstance(exc, TimeoutError):
                    continue
                raise ActionDeliveryError(f"POST {url}: {type(exc).__name__}: {exc}") from None
            if keep:
                self.idle.setdefault(key, []).append(conn)
            else:
                conn[1].close()
            return status
        raise ActionDeliveryError(f"POST {url}: connection closed")

    def _take(self, key: tuple[str, str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        pool = self.idle.get(key)
        while pool:
            reader, writer = pool.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer
            writer.close()
        return None

    async def _open(self, key: tuple[str, str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        scheme, host, port = key
        if scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
        return await asyncio.open_connection(host, port, ssl=self._ssl if scheme == "https" else None)

    @staticmethod
    async def _exchange(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes) -> tuple[int, bool]:
        reader, writer = conn
        writer.write(request)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise EOFError("no answer")
        version, status = status_line.split(None, 2)[:2]
        headers: dict[str, str] = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        keep = version == b"HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        elif "content-length" in headers:
            await reader.readexactly(int(headers["content-length"]))
        elif int(status) not in (204, 304):
            await reader.read()
            keep = False
        return int(status), keep

    async def aclose(self) -> None:
        for pool in self.idle.values():
            for _, writer in pool:
                writer.close()
        self.idle.clear()


def make_driver(ds: dict, http: httpx.AsyncClient, poster: HttpPoster) -> Driver:
    kind = HttpDriver if ds["driver"] == "http" else Driver
    return kind(ds=ds, http=http, poster=poster)
