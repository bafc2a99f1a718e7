"""The command line: parse options, call the library, print with rich. Nothing else lives here."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import click
from rich.console import Console
from rich.table import Table

from congressctl.errors import CongressctlError
from congressctl.inventory import SERVED_ROLES

if TYPE_CHECKING:   # imported where used, so that each command loads only what it needs
    from congressctl.deploy import DeployResult
    from congressctl.inventory import Inventory
    from congressctl.status import BusStatus, DsdStatus, StatusReport

PIPE_WIDTH = 200

# Piped or redirected, rich would lay tables out for 80 columns; a file has no screen to fit.
out = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else PIPE_WIDTH)
err = Console(stderr=True)

inventory_option = click.option("-i", "--inventory", "inventory_path", required=True,
                                type=click.Path(dir_okay=False, path_type=Path), help="The inventory YAML file.")
output_option = click.option("--output", "output", type=click.Choice(["table", "json"]), default="table",
                             show_default=True, help="How to print the result rows.")
accept_new_option = click.option("--accept-new-host-keys", "accept_new", is_flag=True,
                                 help="Like OpenSSH's accept-new: record unknown host keys; changed keys are still "
                                      "refused.")


class Program(click.Group):
    """Turns the library's named errors into one message on stderr and an exit code (traceback with --debug),
    and Ctrl-C into one line and exit status 130."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CongressctlError as exc:
            if ctx.params.get("debug"):
                raise
            for line in str(exc).splitlines():
                err.print(f"[bold red]error:[/] {line}", highlight=False, markup=True, soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            _interrupted()
        except click.Abort as exc:
            if not isinstance(exc.__context__, KeyboardInterrupt):   # a prompt turns Ctrl-C into Abort
                raise
            _interrupted()


def _interrupted() -> None:
    err.print("interrupted", highlight=False)
    sys.exit(130)


def emit(rows: list[dict], output: str, title: str | None = None, columns: list[str] | None = None) -> None:
    """Data to stdout: a rich table, or JSON for machines."""
    if output == "json":
        click.echo(json.dumps(rows, indent=2, sort_keys=True, default=str))
        return
    columns = columns or (list(rows[0]) if rows else [])
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")   # a narrow terminal or a pipe wraps a value, never cuts it
    for row in rows:
        table.add_row(*(_cell(c, row.get(c)) for c in columns))
    out.print(table)


def _cell(column: str, value: Any) -> str:
    if isinstance(value, bool) and column == "ok":
        return "[green]ok[/]" if value else "[red]FAIL[/]"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def warn_all(warnings: list[str]) -> None:
    for warning in warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)


@click.group(cls=Program, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="congressctl")
def main(debug: bool) -> None:
    """congressctl: deploy, run, watch and failure-test an HA Congress-style policy service.

    \b
    Example:
        congressctl validate -i inventory.yaml
        congressctl render -i inventory.yaml -o out/
    """


@main.command()
@inventory_option
@click.option("--no-tools", is_flag=True, help="Skip the checks by corosync/haproxy/crm_verify/crm_simulate.")
@output_option
def validate(inventory_path: Path, no_tools: bool, output: str) -> None:
    """Validate an inventory, then check every rendered file with the cluster's own tools.

    Exit status 2 when the inventory is invalid (every problem is listed with file:line:column and field),
    1 when a tool refuses a rendered file.

    \b
    Example:
        congressctl validate -i inventory.example.yaml
        congressctl validate -i inventory.example.yaml --no-tools --output json
    """
    from congressctl import inventory, render, verify

    inv = inventory.load_inventory(inventory_path)
    warn_all(inv.warnings)
    rows = [{"check": "inventory", "target": str(inventory_path), "ok": True,
             "detail": f"{len(inv.nodes)} nodes, cluster {inv.cluster}"}]
    if no_tools:
        err.print("[yellow]warning:[/] --no-tools: rendered files were not checked by their tools")
    else:
        results = verify.verify_all(inv, render.render_all(inv), render.render_cib(inv))
        rows += [{"check": r.tool, "target": r.target, "ok": r.ok, "detail": r.detail} for r in results]
    emit(rows, output, title="validate")
    if not all(r["ok"] for r in rows):
        sys.exit(1)


@main.command(name="render")
@inventory_option
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write <node>/<file> and cib.xml into.")
@output_option
def render_cmd(inventory_path: Path, out_dir: Path, output: str) -> None:
    """Render every node's corosync.conf, haproxy.cfg, congress.yaml (and redis.conf), plus cib.xml.

    Same inventory, same bytes. Secrets are never rendered here: deploy adds them on the hosts.

    \b
    Example:
        congressctl render -i inventory.example.yaml -o out/example
    """
    from congressctl import inventory, render

    inv = inventory.load_inventory(inventory_path)
    warn_all(inv.warnings)
    written = render.write_tree(render.render_all(inv), render.render_cib(inv), out_dir)
    emit([{"file": str(p), "bytes": p.stat().st_size} for p in written], output, title="rendered")


@main.command()
@click.argument("role", type=click.Choice(SERVED_ROLES))
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The node config that `congressctl render` wrote (congress.yaml).")
@click.option("--live-file", "live_file", type=click.Path(dir_okay=False), default=None,
              help="dsd: rewrite this liveness file at every heartbeat (its OCF agent's monitor reads it).")
def serve(role: str, config_path: str, live_file: str | None) -> None:
    """Run one congress node in the foreground: the REST API + policy engine, or the datasource drivers.

    Pacemaker starts these through the OCF agents; SIGTERM stops them cleanly.

    \b
    Example:
        congressctl serve api-pe --config /etc/congressctl/congress.yaml
        congressctl serve dsd --config /etc/congressctl/congress.yaml
    """
    from congressctl import node

    sys.exit(node.serve(role, config_path, live_file))


class HostProgress:
    """One rich progress task per host on stderr; the library reports (host, step) from its threads."""

    def __init__(self, hosts: list[str]):
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[host]:<10}"),
                                 TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=False)
        self.tasks = {h: self.progress.add_task("waiting", host=h, total=None) for h in hosts}

    def __call__(self, host: str, step: str) -> None:
        self.progress.update(self.tasks[host], description=step)

    def __enter__(self) -> Self:
        self.progress.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.progress.__exit__(exc_type, exc, tb)


@main.command(name="deploy")
@inventory_option
@click.option("--dry-run", is_flag=True, help="Show a unified diff per host of what would change; touch nothing.")
@accept_new_option
@click.option("--timeout", "wait_timeout", type=float, default=240, show_default=True,
              help="Seconds to wait for Pacemaker to start every resource.")
@click.option("--serial", type=click.IntRange(min=1), default=1, show_default=True,
              help="Hosts a rolling restart takes out of service at a time.")
@output_option
def deploy_cmd(inventory_path: Path, dry_run: bool, accept_new: bool, wait_timeout: float, serial: int,
               output: str) -> None:
    """Install congressctl, push every rendered file and start the cluster on every host, over SSH.

    Idempotent: a second run with the same inventory changes no file and restarts nothing. A host that
    fails is reported with its step; files this run changed are put back on every host; exit status 1.
    Processes that must restart to see a new package or config restart a few hosts at a time (--serial),
    each drained in HAProxy first, so that the API keeps answering; a host that does not come back healthy
    stops the roll there (exit status 1, naming it) and the next deploy goes on with the hosts after it.
    --dry-run shows what would restart, and in what order.

    \b
    Example:
        congressctl deploy -i lab/inventory.yaml
        congressctl deploy -i lab/inventory.yaml --dry-run
        congressctl deploy -i inventory.yaml --accept-new-host-keys --output json
    """
    from dataclasses import asdict

    from congressctl import deploy, inventory

    inv = inventory.load_inventory(inventory_path)
    warn_all(inv.warnings)
    with HostProgress([n.name for n in inv.nodes]) as progress:
        result = deploy.deploy(inv, accept_new=accept_new, dry_run=dry_run, serial=serial,
                               wait_timeout=wait_timeout, progress=progress)
    if output == "json":
        click.echo(json.dumps({**asdict(result), "ok": result.ok, "changed": result.changed}, indent=2, default=str))
    elif dry_run:
        for report in result.hosts.values():
            package = ", congressctl would be installed" if report.installed else ""
            out.rule(f"{report.host}: {len(report.changed)} file(s) would change{package}" if report.ok
                     else f"{report.host}: FAILED at {report.step}")
            if report.diff:
                click.echo(report.diff, nl=False)
        out.rule("restarts, in order" if result.plan else "nothing would restart")
        for number, step in enumerate(result.plan, 1):
            click.echo(f"{number}. {step}")
    else:
        emit([{"host": r.host, "ok": r.ok, "step": r.step, "installed": r.installed, "changed": len(r.changed),
               "restarted": r.restarted, "error": r.error} for r in result.hosts.values()], output,
             title=f"deploy ({result.duration_s:.1f}s)")
    _deploy_summary(result)
    if result.ok and not dry_run:
        from congressctl import auth
        err.print(f"API admin token: {auth.admin_token_path(inv.state_dir)} (send it as X-Auth-Token)", highlight=False)
    if not result.ok:
        sys.exit(1)


def _deploy_summary(result: DeployResult) -> None:
    for problem in result.problems:
        err.print(f"[red]problem:[/] {problem}", highlight=False)
    if result.dry_run:
        return
    if result.ok and not result.changed:
        err.print("[green]no change[/]: every file was already up to date; nothing restarted")
    elif result.ok:
        loaded = "CIB loaded; " if result.cib_loaded else ""
        err.print(f"[green]deployed[/]: {loaded}every resource is running where it should")
    if result.ok and result.ca_file:
        err.print(f"clients: --os-cacert {result.ca_file}", highlight=False)


@main.command(name="status")
@inventory_option
@click.option("--watch", type=click.FloatRange(min=0.5), is_flag=False, flag_value=2.0, default=None,
              metavar="[SECONDS]", help="Refresh every SECONDS (2 when not given) until Ctrl-C.")
@accept_new_option
@click.option("--output", "output", type=click.Choice(["table", "json", "prometheus"]), default="table",
              show_default=True, help="How to print the result (prometheus: the cluster view as Prometheus text, "
                                      "one sample, not with --watch).")
def status_cmd(inventory_path: Path, watch: float | None, accept_new: bool, output: str) -> None:
    """Show the cluster's health: hosts, congress nodes, the DSD and its tables, the API through the VIP.

    Every host is asked at once over SSH (crm_mon, HAProxy's stats socket, the api-pe's /v1/status) while
    /healthz is asked through the VIP from here. Exit status 0 healthy; 1 degraded (something is down, but
    the API through the VIP answers healthy); 2 unavailable (it does not, or no host can be reached).
    With --watch the exit status is the last sample's; --output json then prints one JSON line per sample.

    \b
    Example:
        congressctl status -i lab/inventory.yaml
        congressctl status -i lab/inventory.yaml --output json
        congressctl status -i lab/inventory.yaml --watch 5
        congressctl status -i lab/inventory.yaml --output prometheus > /var/lib/node_exporter/congress.prom
    """
    from congressctl import inventory, status

    if watch is not None and output == "prometheus":
        raise click.UsageError("--output prometheus prints one sample; run it periodically instead of --watch")
    inv = inventory.load_inventory(inventory_path)
    warn_all(inv.warnings)
    if watch is not None:
        sys.exit(_watch_status(inv, accept_new, output, watch))
    with err.status("gathering status ..."):
        report = status.gather(inv, accept_new=accept_new)
    if output == "json":
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    elif output == "prometheus":
        from congressctl import status_metrics
        click.echo(status_metrics.render(report), nl=False)
    else:
        _show_status(report)
    sys.exit(report.exit_code)


def _watch_status(inv: Inventory, accept_new: bool, output: str, interval: float) -> int:
    """Sample until Ctrl-C; the table is rendered through `emit` into a capture and shown by rich Live."""
    from rich.live import Live
    from rich.text import Text

    from congressctl import status

    report = None
    try:
        if output == "json":
            while True:
                report = status.gather(inv, accept_new=accept_new)
                click.echo(json.dumps(report.to_dict(), sort_keys=True))
                time.sleep(max(0.0, interval - report.duration_s))
        with Live(console=Console(), auto_refresh=False) as live:
            while True:
                report = status.gather(inv, accept_new=accept_new)
                with out.capture() as captured:
                    _show_status(report)
                    out.print(f"[dim]every {interval:g}s; Ctrl-C to stop[/]")
                live.update(Text.from_ansi(captured.get(), no_wrap=True), refresh=True)
                time.sleep(max(0.0, interval - report.duration_s))
    except KeyboardInterrupt:
        pass
    return report.exit_code if report is not None else 130


def _show_status(report: StatusReport) -> None:
    from rich.markup import escape

    emit([{"host": h.name, "address": h.address, "ok": h.reachable, "online": h.online, "quorum": h.quorum,
           "dc": h.dc, "resources": h.resources, "haproxy backends": [f"{b.server} {b.status}" for b in h.backends],
           "error": h.error or h.pacemaker_error or h.haproxy_error or h.api_error} for h in report.hosts],
         "table", title="hosts",
         columns=["host", "address", "ok", "online", "quorum", "dc", "resources", "haproxy backends", "error"])
    emit([{"node": n.node, "role": n.role, "incarnation": n.incarnation, "heartbeat ms": n.age_ms,
           "alive": n.alive, "synced": n.synced, "healthy": n.healthy,
           "note": "" if n.expected else "not placed here any more"} for n in report.nodes],
         "table", title="congress nodes",
         columns=["node", "role", "incarnation", "heartbeat ms", "alive", "synced", "healthy", "note"])
    if report.bus is not None:
        _show_bus(report.bus)
    if report.dsd is not None:
        _show_dsd(report.dsd)
    api = report.api
    emit([{"url": api.url, "ok": api.ok, "http": api.status, "latency ms": api.latency_ms, "served by": api.node,
           "error": api.error}], "table", title="API through the VIP")
    colour = {"healthy": "green", "degraded": "yellow"}.get(report.health, "red")
    out.print(f"[bold {colour}]{report.health}[/] ({report.duration_s:.2f}s)", highlight=False)
    for problem in report.problems:
        out.print(f"[{colour}]problem:[/] {escape(problem)}", highlight=False)


def _show_bus(bus: BusStatus) -> None:
    replicated = "yes" if bus.replicated else "NO"
    emit([{"node": n.node, "role": n.role or "?", "link": n.link, "offset": n.offset, "lag bytes": n.lag_bytes,
           "error": n.error} for n in bus.nodes], "table",
         title=f"bus: promoted {', '.join(bus.promoted) or 'none'}; writes replicated: {replicated} "
               f"({bus.in_sync} in sync, {bus.sync_replicas} required)",
         columns=["node", "role", "link", "offset", "lag bytes", "error"])


def _show_dsd(dsd: DsdStatus) -> None:
    from datetime import datetime

    since = datetime.fromtimestamp(dsd.leader_since).strftime("%H:%M:%S") if dsd.leader_since else None
    emit([{"node": dsd.node, "placed on": dsd.running_on, "epoch": dsd.epoch,
           "leader PE": dsd.leader["node"] if dsd.leader else None, "since": since, "heartbeat ms": dsd.age_ms}],
         "table", title=f"DSD (as {dsd.seen_by} hears it)")
    emit([{**dsd.counts, "buffered": dsd.buffered}], "table", title="DSD requests")
    if dsd.tables:
        emit([{"table": t.table, "epoch": t.epoch, "seq": t.seq,
               "lag per PE": [f"{pe} {'?' if lag is None else lag}" for pe, lag in sorted(t.lag.items())]}
              for t in dsd.tables], "table", title="DSD tables")


@main.group()
def lab() -> None:
    """Real hosts on this machine: network + mount namespaces on a bridge, each running its own sshd.

    \b
    Example:
        congressctl lab up --nodes 3
        congressctl deploy -i lab/inventory.yaml
        congressctl lab exec n1 -- crm_mon -1
        congressctl lab down
    """


name_option = click.option("--name", default="lab", show_default=True, help="The lab's name.")
dir_option = click.option("--dir", "lab_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                          help="Folder for the lab's inventory, keys and state [default: ./NAME].")


@lab.command(name="up")
@click.option("--nodes", type=click.IntRange(2, 12), default=3, show_default=True, help="How many hosts (2-12).")
@name_option
@dir_option
@output_option
def lab_up(nodes: int, name: str, lab_dir: Path | None, output: str) -> None:
    """Make NODES hosts and write NAME/inventory.yaml, an SSH key and known_hosts for them.

    Leftovers of a crashed lab with the same name are cleaned first. Nothing of the cluster is started:
    `congressctl deploy` does that over SSH, as on real machines.

    \b
    Example:
        congressctl lab up --nodes 3 --name lab
    """
    from congressctl import lab as labmod

    with err.status(f"making {nodes} hosts ..."):
        made = labmod.lab_up(nodes=nodes, name=name, dir=lab_dir)
    emit([{"host": h.name, "address": h.address, "netns": h.netns, "pid": h.pid} for h in made.hosts], output,
         title=f"lab {made.name}: inventory {made.inventory}")
    err.print(f"next: congressctl deploy -i {made.inventory}")


@lab.command(name="down")
@name_option
@dir_option
def lab_down(name: str, lab_dir: Path | None) -> None:
    """Stop every process of the lab and remove its namespaces, bridge, mounts and state.

    \b
    Example:
        congressctl lab down --name lab
    """
    from congressctl import lab as labmod

    removed = labmod.lab_down(name=name, dir=lab_dir)
    err.print(f"lab {name} removed ({len(removed)} items)" if removed else f"no lab named {name} was found")


@lab.command(name="status")
@name_option
@dir_option
@output_option
def lab_status(name: str, lab_dir: Path | None, output: str) -> None:
    """One row per lab host: address, holder pid, alive and reachable.

    \b
    Example:
        congressctl lab status --output json
    """
    from congressctl import lab as labmod

    rows = labmod.lab_status(name=name, dir=lab_dir)
    emit(rows, output, title=f"lab {name}")
    switch = labmod.switch_status(name=name, dir=lab_dir)
    state = f"running, pid {switch['pid']}" if switch["running"] else "NOT RUNNING"
    err.print(f"power switch {switch['address']}: {state}; log {switch['log']}", highlight=False)


@lab.command(name="power")
@click.argument("action", type=click.Choice(["on", "off", "reboot", "status"]))
@click.argument("node")
@name_option
@dir_option
def lab_power(action: str, node: str, name: str, lab_dir: Path | None) -> None:
    """Switch lab host NODE through the lab's power switch, as the fence agent does: off kills every process
    of the host at once (a power loss), on boots it again (its cluster stack starts if deploy installed it).

    \b
    Example:
        congressctl lab power reboot n2
    """
    from congressctl import lab as labmod

    answer = labmod.power(labmod.lab_load(name=name, dir=lab_dir), action, node)
    click.echo(f"{node}: {answer.status}")


@lab.command(name="power-switch", hidden=True)
@name_option
@click.option("--dir", "lab_dir", type=click.Path(file_okay=False, path_type=Path), required=True)
def lab_power_switch(name: str, lab_dir: Path) -> None:
    """The lab's power switch daemon (lab up starts it; lab down stops it)."""
    from congressctl import lab as labmod

    labmod.serve_power_switch(name, lab_dir)


@lab.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("node")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@name_option
@dir_option
def lab_exec(node: str, command: tuple[str, ...], name: str, lab_dir: Path | None) -> None:
    """Run COMMAND inside lab host NODE (its network, mount, hostname and process namespaces).

    \b
    Example:
        congressctl lab exec n1 -- crm_mon -1 --output-as=xml
    """
    from congressctl import lab as labmod

    proc = labmod.lab_exec(labmod.lab_load(name=name, dir=lab_dir), node, list(command), timeout=None, stream=True)
    sys.exit(proc.returncode)


def _scenarios(ctx: click.Context, param: click.Parameter, names: tuple[str, ...]) -> list[str]:
    """--scenario checked while the options are parsed, so an unknown name is refused before anything happens."""
    from congressctl import failover
    from congressctl.errors import FailoverError

    try:
        return failover.scenarios_named(names)
    except FailoverError as exc:
        raise click.BadParameter(exc.message, ctx=ctx, param=param) from None


@main.command(name="failover-test")
@inventory_option
@click.option("--scenario", "names", multiple=True, metavar="NAME", callback=_scenarios,
              help="A scenario to run (repeatable; default: all): pe-leader-kill, pe-leader-pause, "
                   "dsd-node-fail, api-node-fail, vip-node-fail, bus-node-fail, bus-kill, bus-failback.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the timeline pages, raw events and summary.json [default: ./failover-report].")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation: the scenarios kill processes and cut hosts.")
@click.option("--push-rate", type=click.FloatRange(min=1), default=50, show_default=True,
              help="Data changes per second pushed during each scenario.")
@click.option("--get-rate", type=click.FloatRange(min=1), default=50, show_default=True,
              help="GETs per second through the VIP during each scenario.")
@click.option("--write-rate", type=click.FloatRange(min=0.1), default=5, show_default=True,
              help="Acknowledged writes (rule creates) per second through the VIP; each is checked afterwards.")
@click.option("--pe-recovery", type=click.FloatRange(min=0), default=1.5, show_default=True,
              help="Pass mark (s) for a new DSD leader executing after a PE fault.")
@click.option("--node-slack", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="Node faults must recover within corosync token + consensus + this many seconds.")
@click.option("--cut-seconds", type=click.FloatRange(min=1), default=None,
              help="How long a cut host stays off the network [default: token + consensus + 8 s].")
@click.option("--sink-address", default=None, metavar="ADDRESS",
              help="Address of this machine the hosts reach the action sink on [default: the route to the first "
                   "node].")
@click.option("--chaos", "chaos_s", type=click.FloatRange(min=30), default=None, metavar="SECONDS",
              help="Instead of the scenarios: a random schedule of faults (one at a time, sometimes two at once) "
                   "for this long under one workload, judged as one history.")
@click.option("--seed", type=int, default=None, help="The chaos schedule's seed, to replay a run [default: a new one, "
                                                      "printed first].")
@accept_new_option
@output_option
def failover_test(inventory_path: Path, names: list[str], report_dir: Path | None, yes: bool,
                  push_rate: float, get_rate: float, write_rate: float, pe_recovery: float, node_slack: float,
                  cut_seconds: float | None, sink_address: str | None, chaos_s: float | None, seed: int | None,
                  accept_new: bool, output: str) -> None:
    """Inject failures into a deployed cluster while a workload runs; measure detection, recovery, lost and
    duplicated actions, failed reads, the write outage and acknowledged writes lost; pass or fail each scenario
    against its thresholds.

    Destructive: kills processes and cuts hosts off the network (ordinary commands over SSH), then restores
    the cluster and waits until `congressctl status` is healthy before the next scenario. Exit 0 only if
    every scenario passed.

    With --chaos SECONDS the faults come from a random schedule of that length instead (--seed replays one),
    held under one workload and judged as one history (the "chaos" row): lost and duplicated actions,
    acknowledged writes lost, the longest stretches without successful reads and writes, two DSDs executing.

    \b
    Example:
        congressctl failover-test -i lab/inventory.yaml --yes
        congressctl failover-test -i lab/inventory.yaml --scenario pe-leader-kill --report out/ft --output json
        congressctl failover-test -i lab/inventory.yaml --yes --chaos 600 --seed 7
    """
    from congressctl import failover, inventory

    if chaos_s is None and seed is not None:
        raise click.UsageError("--seed goes with --chaos")
    given = click.get_current_context().get_parameter_source("names") != click.core.ParameterSource.DEFAULT
    if chaos_s is not None and given:
        raise click.UsageError("--chaos picks its own faults: give no --scenario with it")
    if chaos_s is not None:
        seed = failover.new_seed() if seed is None else seed
        err.print(f"chaos seed {seed} (replay: --chaos {chaos_s:g} --seed {seed})", highlight=False)
    inv = inventory.load_inventory(inventory_path)
    warn_all(inv.warnings)
    what = f"a {chaos_s:g}s chaos run" if chaos_s is not None else ", ".join(names)
    if not yes and not click.confirm(f"This kills processes and cuts hosts of cluster {inv.cluster!r} "
                                     f"({what}). Go on?", err=True):
        err.print("nothing done")
        sys.exit(1)
    report_dir = report_dir or Path("failover-report")
    options = failover.Options(push_rate=push_rate, get_rate=get_rate, write_rate=write_rate, cut_s=cut_seconds,
                               sink_address=sink_address, accept_new=accept_new)
    thresholds = failover.Thresholds(pe_recovery_s=pe_recovery, node_slack_s=node_slack)

    def log(line: str) -> None:
        err.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {line}", highlight=False)

    if chaos_s is None or seed is None:
        report = failover.run(inv, names, options=options, thresholds=thresholds, report_dir=report_dir, log=log)
    else:
        report = failover.run_chaos(inv, chaos_s, seed=seed, options=options, thresholds=thresholds,
                                    report_dir=report_dir, log=log)
    if output == "json":
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        emit(report.rows(), output, title=f"failover-test ({report.duration_s:.0f}s)")
        err.print(f"timings in force: {failover.timings_summary(report.timings)}", highlight=False)
    err.print(f"report: {report_dir}/index.html (the run's perf plot; a timeline page per scenario, raw events, "
              "summary.json)", highlight=False)
    if not report.passed:
        err.print("[red]failed[/]: " + "; ".join(f"{s.name}: {', '.join(s.failures)}" for s in report.scenarios
                                                  if not s.passed), highlight=False)
        sys.exit(1)
    err.print(f"[green]passed[/]: {len(report.scenarios)} scenario(s)")


if __name__ == "__main__":
    main()
