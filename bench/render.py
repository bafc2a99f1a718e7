"""Validate and render a generated 100-node inventory; last line: JSON with the seconds taken.

Goal (issue 2): render_s <= 1 s on this machine. Run: .venv/bin/python bench/render.py [--nodes N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

from congressctl.inventory import generate, load_inventory
from congressctl.render import render_all, render_cib, write_tree


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inv.yaml"
        path.write_text(yaml.safe_dump(generate(args.nodes, subnet="10.213.0" if args.nodes < 200 else "10.213.1")))
        best = {}
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            inv = load_inventory(path)
            t1 = time.perf_counter()
            files = write_tree(render_all(inv), render_cib(inv), Path(tmp) / "out")
            t2 = time.perf_counter()
            for key, value in (("validate_s", t1 - t0), ("render_only_s", t2 - t1), ("render_s", t2 - t0)):
                best[key] = min(best.get(key, value), value)
    print(f"{len(files)} files for {args.nodes} nodes, {len(inv.warnings)} warnings", file=sys.stderr)
    print(json.dumps({"nodes": args.nodes, "files": len(files), **{k: round(v, 3) for k, v in best.items()}}))


if __name__ == "__main__":
    main()
