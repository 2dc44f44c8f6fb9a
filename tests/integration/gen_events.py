#!/usr/bin/env python3
"""Seeded workload generator for the integration tests and the benchmark.

Writes COPY text-format lines "stream<TAB>payload" (payloads avoid backslashes and tabs, so the
text format needs no escaping) and the expected final replica as CSV.

  --shape snapshot: versioned entity snapshots (column line1, version ts), shuffled, some deletes;
                    expected = the highest version per entity (absent if it is a delete).
  --shape delta:    unversioned deltas in inbox order per entity (fields a, b);
                    expected = the last value written per field, in file order. With --versioned
                    each event carries a version ts (growing), and the events are shuffled;
                    expected = per field, the value of the newest event that wrote it.
  --shape aggregate: versioned aggregate snapshots (version ts; children under newState.items,
                    keyed by itemId, column line1), shuffled, some deletes; expected = the child
                    rows ("entity:itemId", line1) of the highest version per entity.

  --redeliver F:    every event carries a unique event id (eid), and a fraction F of them is
                    delivered again, unchanged, somewhere after the first delivery (the expected
                    replica is the same: a stream with event_id => 'eid' drops the copies).
"""
import argparse
import csv
import json
import random

p = argparse.ArgumentParser()
p.add_argument("--shape", choices=["snapshot", "delta", "aggregate"], required=True)
p.add_argument("--stream", required=True)
p.add_argument("--entities", type=int, default=500)
p.add_argument("--events", type=int, default=5000)
p.add_argument("--versioned", action="store_true", help="delta: versions and shuffled order")
p.add_argument("--redeliver", type=float, default=0.0, help="event ids, and this fraction delivered twice")
p.add_argument("--bad", type=int, default=0, help="malformed lines mixed in")
p.add_argument("--seed", type=int, default=1)
p.add_argument("--out", required=True)
p.add_argument("--expected", required=True)
p.add_argument("--bad-out", help="file receiving the bad payloads, one per line")
args = p.parse_args()
rng = random.Random(args.seed)

lines = []
expected = {}
if args.shape == "snapshot":
    per_entity = {}
    for i in range(args.events):
        e = f"e{rng.randrange(args.entities)}"
        per_entity.setdefault(e, 0)
        per_entity[e] += 1
    events = []
    for e, n in per_entity.items():
        versions = rng.sample(range(1, n * 10 + 1), n)
        for v in versions:
            if rng.random() < 0.1:
                ev = {"id": e, "ts": v, "oldState": {}}
            else:
                ev = {"id": e, "ts": v, "newState": {"line1": f"{e} at {v}", "note": "x" * rng.randrange(0, 40)}}
            events.append(ev)
        top = max(versions)
        last = next(x for x in events if x["id"] == e and x["ts"] == top)
        if "newState" in last:
            expected[e] = (last["newState"]["line1"], "")
    rng.shuffle(events)
    lines = [json.dumps(ev, separators=(", ", ": ")) for ev in events]
elif args.shape == "aggregate":
    events, top = [], {}
    for i in range(args.events):
        e = f"e{rng.randrange(args.entities)}"
        v = i + 1
        if rng.random() < 0.1:
            ev = {"id": e, "ts": v, "oldState": {}}
        else:
            items = rng.sample(range(8), rng.randrange(0, 5))
            ev = {"id": e, "ts": v, "newState": {"items": [{"itemId": f"i{k}", "line1": f"{e}/i{k} at {v}"} for k in items]}}
        events.append(ev)
        top[e] = ev  # versions grow with i: the last event of an entity is its newest
    for e, ev in top.items():
        for item in ev.get("newState", {}).get("items", []):
            expected[f"{e}:{item['itemId']}"] = (item["line1"], "")
    rng.shuffle(events)
    lines = [json.dumps(ev, separators=(", ", ": ")) for ev in events]
else:
    state, events = {}, []
    for i in range(args.events):
        e = f"e{rng.randrange(args.entities)}"
        fields = {}
        for f in ("a", "b"):
            if rng.random() < 0.6:
                fields[f] = f"{f}{i}"
        if not fields:
            fields["a"] = f"a{i}"
        cur = state.setdefault(e, {"a": "", "b": ""})
        cur.update(fields)  # in file order, or (versioned) in version order: the same here
        events.append({"id": e, "ts": i + 1, "newState": fields} if args.versioned else {"id": e, "newState": fields})
    expected = {e: (s["a"], s["b"]) for e, s in state.items()}
    if args.versioned:
        rng.shuffle(events)
    lines = [json.dumps(ev) for ev in events]

if args.redeliver:
    events = [json.loads(line) for line in lines]
    for n, ev in enumerate(events):
        ev["eid"] = f"ev{n}"
    out = [[ev] for ev in events]
    for n in rng.sample(range(len(events)), int(len(events) * args.redeliver)):
        later = rng.randrange(n, len(events))
        out[later].append(events[n])
    lines = [json.dumps(ev, separators=(", ", ": ")) for group in out for ev in group]

bad_payloads = ["this is not json", "{\"id\": \"e1\", \"newState\": ", "[1, 2, 3]", "{\"id\": null, \"newState\": {}}",
                "42", "{\"newState\": {\"line1\": \"no key\"}}"]
bad = []
for i in range(args.bad):
    payload = bad_payloads[i % len(bad_payloads)] + ("" if i < len(bad_payloads) else f" #{i}")
    bad.append(payload)
    lines.insert(rng.randrange(len(lines) + 1), payload)

with open(args.out, "w") as f:
    for line in lines:
        assert "\\" not in line and "\t" not in line
        f.write(f"{args.stream}\t{line}\n")
with open(args.expected, "w", newline="") as f:
    w = csv.writer(f)
    for e, (x, y) in sorted(expected.items()):
        w.writerow([e, x, y])
if args.bad_out:
    with open(args.bad_out, "w") as f:
        for b in bad:
            f.write(b + "\n")
