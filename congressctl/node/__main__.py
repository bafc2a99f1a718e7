"""`python -m congressctl.node [serve] ROLE --config FILE [--live-file FILE]` (the same as `congressctl serve ...`)."""

from __future__ import annotations

import argparse
import sys

from congressctl.errors import CongressctlError
from congressctl.inventory import SERVED_ROLES
from congressctl.node import serve


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        args = args[1:]
    parser = argparse.ArgumentParser(prog="python -m congressctl.node")
    parser.add_argument("role", choices=SERVED_ROLES)
    parser.add_argument("--config", required=True)
    parser.add_argument("--live-file", default=None)
    ns = parser.parse_args(args)
    try:
        return serve(ns.role, ns.config, ns.live_file)
    except CongressctlError as exc:
        sys.stderr.write(f"congressctl: {exc}\n")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
