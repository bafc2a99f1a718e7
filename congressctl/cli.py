"""The command line: parse options, call the library, print with rich. Nothing else lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from congressctl.errors import CongressctlError

out = Console()
err = Console(stderr=True)

inventory_option = click.option("-i", "--inventory", "inventory_path", required=True,
                                type=click.Path(dir_okay=False, path_type=Path), help="The inventory YAML file.")
output_option = click.option("--output", "output", type=click.Choice(["table", "json"]), default="table",
                             show_default=True, help="How to print the result rows.")


class Program(click.Group):
    """Turns the library's named errors into one message on stderr and an exit code (traceback with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CongressctlError as exc:
            if ctx.params.get("debug"):
                raise
            for line in str(exc).splitlines():
                err.print(f"[bold red]error:[/] {line}", highlight=False, markup=True, soft_wrap=True)
            sys.exit(exc.exit_code)


def emit(rows: list[dict], output: str, title: str | None = None, columns: list[str] | None = None) -> None:
    """Data to stdout: a rich table, or JSON for machines."""
    if output == "json":
        click.echo(json.dumps(rows, indent=2, sort_keys=True, default=str))
        return
    columns = columns or (list(rows[0]) if rows else [])
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    out.print(table)


def _cell(value: Any) -> str:
    if value is True:
        return "[green]ok[/]"
    if value is False:
        return "[red]FAIL[/]"
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
@click.argument("role", type=click.Choice(["api-pe", "dsd"]))
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The node config that `congressctl render` wrote (congress.yaml).")
def serve(role: str, config_path: str) -> None:
    """Run one congress node in the foreground: the REST API + policy engine, or the datasource drivers.

    Pacemaker starts these through the OCF agents; SIGTERM stops them cleanly.

    \b
    Example:
        congressctl serve api-pe --config /etc/congressctl/congress.yaml
        congressctl serve dsd --config /etc/congressctl/congress.yaml
    """
    from congressctl import node

    sys.exit(node.serve(role, config_path))


if __name__ == "__main__":
    main()
