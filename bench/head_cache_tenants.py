#!/usr/bin/env python
"""The head cache shared by tenants: one tenant's tuned heads against another's small ones, replayed.

    python bench/head_cache_tenants.py [--requests 200000]

Replays a seeded request stream through service/predictor.py's HeadCache (the real class, with heads that
only have a size) at the default budget (512 MiB): tenant A sends 30% of the requests, spread evenly over 20
tuned text tasks (a tuned minilm-l6 head counts 42.7 MiB x 1.1), tenant B 70% over 5,000 linear tasks (7 KiB
each; half of them Pareto-skewed towards a few tasks). It compares the cache's eviction by tenant (the
largest holder's least recently used head first; what the server does) with plain LRU over all heads, and
prints each tenant's hit rate and the loads (store reads of a head) in all. Writes
bench/results/head_cache_tenants.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

from service.predictor import HeadCache  # noqa: E402
from service.store import tenant_of  # noqa: E402

TUNED, SMALL = int(42.7 * 2**20 * 1.1), 7 * 2**10


class Head:
    def __init__(self, task_id: str, size: int) -> None:
        self.task_id, self.version, self.memory_bytes = task_id, 1, size


def replay(by_tenant: bool, requests: int, budget_mib: int) -> dict:
    cache = HeadCache(lambda t: Head(t, TUNED if t.startswith("a/") else SMALL), budget_mib << 20,
                      lambda t: True, tenant_of if by_tenant else (lambda t: ""))
    rng = random.Random(0)
    seen = {"a": [0, 0], "b": [0, 0]}  # tenant -> [hits, requests]
    for _ in range(requests):
        if rng.random() < 0.3:
            task = f"a/{rng.randrange(20)}"
        elif rng.random() < 0.5:
            task = f"b/{min(int(rng.paretovariate(1.0)) - 1, 4999)}"
        else:
            task = f"b/{rng.randrange(5000)}"
        loads = cache.stats.loads
        cache.get(task)
        counts = seen[task[0]]
        counts[0] += cache.stats.loads == loads
        counts[1] += 1
    return {"eviction": "by tenant" if by_tenant else "plain LRU", "a_hit_rate": seen["a"][0] / seen["a"][1],
            "b_hit_rate": seen["b"][0] / seen["b"][1], "loads": cache.stats.loads}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--budget-mib", type=int, default=512)
    p.add_argument("--results", type=pathlib.Path, default=HERE / "results")
    args = p.parse_args()
    rows = [replay(by_tenant, args.requests, args.budget_mib) for by_tenant in (False, True)]
    print(f"{args.requests} requests, {args.budget_mib} MiB; A: 20 tuned heads, B: 5,000 linear heads")
    print("| eviction | A hit rate | B hit rate | loads |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['eviction']} | {r['a_hit_rate']:.1%} | {r['b_hit_rate']:.1%} | {r['loads']:,} |")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "head_cache_tenants.json").write_text(json.dumps({"requests": args.requests,
                                                                      "budget_mib": args.budget_mib,
                                                                      "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
