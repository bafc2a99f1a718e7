"""Policy engine speed on 100k base rows; last line: one JSON object.

View: v(x, y) :- ds:a(x, z), ds:b(z, y), not ds:c(x)   with a: 100k rows (z in 0..999), b: 1000 rows,
c: every 10th x. Goals (issue 3): load_s <= 2, insert_p50_us <= 50, insert_p99_us <= 500,
negation_toggle_p50_us <= 100, batch_rows_per_s >= 20000, point_query_us <= 20.
Run: .venv/bin/python bench/engine.py [--rows N]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time

from congressctl.policy import Engine

RULE = "v(x, y) :- ds:a(x, z), ds:b(z, y), not ds:c(x)"
GOALS = {"load_s": 2.0, "insert_p50_us": 50, "insert_p99_us": 500, "negation_toggle_p50_us": 100,
         "point_query_us": 20}


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def micros(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rnd = random.Random(args.seed)
    n = args.rows

    engine = Engine()
    engine.create_policy("bench")
    engine.add_rule("bench", RULE)
    a = [(x, rnd.randrange(1000)) for x in range(n)]
    b = [(z, f"y{z}") for z in range(1000)]
    c = [(x,) for x in range(0, n, 10)]
    t0 = time.perf_counter()
    loaded = engine.update({"ds:a": (a, []), "ds:b": (b, []), "ds:c": (c, [])})
    load_s = time.perf_counter() - t0
    view_rows = len(loaded.deltas["bench:v"][0])

    inserts, deletes = [], []
    for i in range(1000):
        row = (n + i, rnd.randrange(1000))
        inserts.append(micros(engine.update, {"ds:a": ([row], [])}))
        deletes.append(micros(engine.update, {"ds:a": ([], [row])}))

    toggles = []
    for _ in range(1000):
        x = rnd.randrange(6, n)
        if x % 10 == 0:
            x += 1
        toggles.append(micros(engine.update, {"ds:c": ([(x,)], [])}))
        toggles.append(micros(engine.update, {"ds:c": ([], [(x,)])}))

    batches = 20
    gone_a = rnd.sample(range(6, n), 400 * batches)       # a rows to delete, each once; x=5 stays for the query
    gone_c = rnd.sample(c, 100 * batches)
    plan = []
    for i in range(batches):
        added = [(2 * n + 400 * i + j, rnd.randrange(1000)) for j in range(400)]
        deleted = [a[x] for x in gone_a[400 * i:400 * (i + 1)]]
        c_add = [(rnd.randrange(1, n // 10) * 10 + 3,) for _ in range(100)]
        c_del = gone_c[100 * i:100 * (i + 1)]
        plan.append({"ds:a": (added, deleted), "ds:c": (c_add, c_del)})
    t0 = time.perf_counter()
    for diffs in plan:
        engine.update(diffs)
    batch_rows_per_s = 1000 * batches / (time.perf_counter() - t0)

    expected = engine.query("v(5, y)", "bench")
    queries = [micros(engine.query, "v(5, y)", "bench") for _ in range(10_000)]

    result = {
        "rows": n,
        "view_rows": view_rows,
        "load_s": round(load_s, 3),
        "insert_p50_us": round(percentile(inserts, 0.5), 1),
        "insert_p99_us": round(percentile(inserts, 0.99), 1),
        "delete_p50_us": round(percentile(deletes, 0.5), 1),
        "negation_toggle_p50_us": round(percentile(toggles, 0.5), 1),
        "batch_rows_per_s": round(batch_rows_per_s),
        "point_query_us": round(statistics.median(queries), 2),
        "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    result["goals_met"] = (all(result[k] <= v for k, v in GOALS.items())
                           and result["batch_rows_per_s"] >= 20_000)
    print(f"v(5, y) -> {expected}", file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
