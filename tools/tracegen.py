#!/usr/bin/env python3
"""Seeded trace generator for laneguard-replay: northwind's bad morning (seed 000).

    python3 tools/tracegen.py [--seed N] [--tenants N] [--out FILE]

Writes a JSONL trace (the format `laneguard-replay --trace` reads, docs/rollout.md), one
request a line, in time order. Every tenant gets the same morning, drawn from its own
random stream, all at the top of the hour (06:00 UTC, the shift change):

- interactive: the customer web app (principal `web`, 30 users), 0.3 requests/s, 0.5/s
  from 06:00 when the morning shift logs in;
- integration: the ERP integration (principal `erp`) polls at 0.25/s, and bursts at the
  shift change (05:58 to 06:10): 3.75/s more, in update pushes;
- export: the nightly export starts at 06:00 and pages through the public order API
  (principal `export`, 0.35/s until 06:20): the seed's "finance export path called the
  public tenant API";
- repair: the reconciliation worker (principal `recon`) catches up after an upstream
  mismatch, 0.4/s from 05:55 to 06:18;
- recovery: a support engineer replays failed shipments (principal `support`), 0.1/s
  from 06:04 to 06:08.

The first tenant is `northwind`; more (`--tenants N`) are `tenant-0001` ... for load tests
(about 4,900 requests per tenant: `--tenants 205` is a million lines). Python's
`random.Random(seed).random()` is the only source of randomness (its Mersenne Twister
stream is the same on every Python 3), so a seed always gives the same trace.

Standard library only.
"""

import argparse
import heapq
import math
import random
import sys
import time

T0 = 1795500000  # 2026-11-24T06:00:00Z: the top of the hour, the shift change
FROM = T0 - 10 * 60  # 05:50
TO = T0 + 20 * 60  # 06:20


def rfc3339(t):
    ms = int(round(t * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + ".%03dZ" % (ms % 1000)


def poisson(rng, rate, start, end):
    """Arrival times of a Poisson process of `rate` per second in [start, end)."""
    t = start
    while True:
        t += -math.log(1.0 - rng.random()) / rate
        if t >= end:
            return
        yield t


def pick(rng, n):
    return int(rng.random() * n)


def tenant_morning(tenant, rng):
    """(time, json line) of one tenant's morning, in time order."""
    events = []

    def add(t, principal, user, cls, method, path):
        events.append(
            (
                t,
                '{"ts": "%s", "tenant": "%s", "principal": "%s", "user": "%s", "class": "%s", '
                '"method": "%s", "path": "%s"}' % (rfc3339(t), tenant, principal, user, cls, method, path),
            )
        )

    # interactive: the web app; the morning shift logs in at 06:00.
    for start, end, rate in ((FROM, T0, 0.3), (T0, TO, 0.5)):
        for t in poisson(rng, rate, start, end):
            user = "u-%02d" % (pick(rng, 30) + 1)
            order = 100000 + pick(rng, 900000)
            if rng.random() < 0.8:
                add(t, "web", user, "interactive", "GET", "/orders/%d" % order)
            else:
                add(t, "web", user, "interactive", "POST", "/orders/%d/status" % order)
    # integration: the ERP polls all morning, and pushes updates at the shift change.
    for t in poisson(rng, 0.25, FROM, TO):
        add(t, "erp", "svc-erp", "integration", "GET", "/orders?updated_since=%d" % int(t - 60))
    burst_from, burst_to = T0 - 2 * 60, T0 + 10 * 60
    push = burst_from
    while push < burst_to:
        # An update push every 20 s: 75 requests over about 6 s (3.75/s on average).
        for t in poisson(rng, 75 / 6.0, push, push + 6.0):
            order = 100000 + pick(rng, 900000)
            add(t, "erp", "svc-erp", "integration", "PUT", "/orders/%d" % order)
        push += 20.0
    # export: the nightly export starts at the top of the hour, paging through the public API.
    page = 0
    for t in poisson(rng, 0.35, T0, TO):
        page += 1
        add(t, "export", "svc-export", "export", "GET", "/orders?page=%d&size=500" % page)
    # repair: reconciliation catching up after the upstream mismatch.
    for t in poisson(rng, 0.4, T0 - 5 * 60, T0 + 18 * 60):
        order = 100000 + pick(rng, 900000)
        add(t, "recon", "svc-recon", "repair", "POST", "/orders/%d/reconcile" % order)
    # recovery: support replays failed shipments.
    for t in poisson(rng, 0.1, T0 + 4 * 60, T0 + 8 * 60):
        add(t, "support", "agent-7", "recovery", "POST", "/replay/shipments/%d" % (5000 + pick(rng, 1000)))
    events.sort()
    return events


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--tenants", type=int, default=1, help="northwind, then tenant-0001, ...")
    ap.add_argument("--out", default="-", help="the trace file (default: stdout)")
    a = ap.parse_args()
    if a.tenants < 1:
        ap.error("--tenants must be at least 1")
    names = ["northwind"] + ["tenant-%04d" % i for i in range(1, a.tenants)]
    # One random stream per tenant, each seeded from the seed and the tenant's index.
    mornings = [tenant_morning(n, random.Random(a.seed * 1_000_003 + i)) for i, n in enumerate(names)]
    out = sys.stdout if a.out == "-" else open(a.out, "w", encoding="utf-8")
    n = 0
    with out:
        out.write("# northwind's bad morning (tools/tracegen.py --seed %d --tenants %d)\n" % (a.seed, a.tenants))
        for _, line in heapq.merge(*mornings):
            out.write(line)
            out.write("\n")
            n += 1
    print("tracegen: %d requests, %d tenants, seed %d" % (n, a.tenants, a.seed), file=sys.stderr)


if __name__ == "__main__":
    main()
