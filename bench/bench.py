#!/usr/bin/env python3
"""pg_ecst benchmark harness (python3 stdlib only; drives psql through subprocess).

Started by bench/run, which builds/installs the extension first (unless --no-build). See
bench/README.md for what each workload and contestant is.

Everything runs on one private scratch server (same settings for every contestant). The workloads
are generated here from a fixed seed; the generator also computes the final replica, which is what
contestant A loads and what every other contestant is compared with.
"""
import argparse
import csv
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIR = "/tmp/pg_ecst-bench"
PORT = 54340
DB = "bench"
DATA = f"{DIR}/data"
OUT = f"{ROOT}/bench/out"
# The installation bench/run prepared (a private PostgreSQL of the chosen major, see scripts/lib.sh).
PG_BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")

# One set of server settings for every contestant.
SETTINGS = [
    "shared_buffers = '1GB'",
    "max_wal_size = '8GB'",
    "checkpoint_timeout = '30min'",
    "synchronous_commit = on",
    "work_mem = '256MB'",
    "jit = off",  # JIT compiles B's statements for ~0.3 s and makes them no faster
    "maintenance_work_mem = '512MB'",
    "ecst.database = 'bench'",
    "ecst.workers = 1",
    "ecst.naptime = 1000",
]

WORKLOADS = ["entity_snapshot", "delta", "aggregate", "snapshot_load", "percall", "latency", "memory", "replay"]

PSQL = [f"{PG_BIN}/psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
        "-h", f"{DIR}/sock", "-p", str(PORT), "-U", "postgres"]


class BenchError(Exception):
    pass


# --perf: directory where each pg_ecst run's worker profile goes (None: no profiling).
PERF_DIR = None


def log(msg):
    print(f"\033[1m==> {msg}\033[0m", file=sys.stderr, flush=True)


def info(msg):
    print(f"    {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Server and psql

def lib_sh(cmd):
    subprocess.run(["bash", "-c", f'. "{ROOT}/scripts/lib.sh" && {cmd}'], check=True)


def start_cluster():
    lib_sh(f"start_cluster {DIR} {PORT} " + " ".join(shlex.quote(s) for s in SETTINGS))


def stop_cluster():
    lib_sh(f"stop_cluster {DIR}")


def psql(sql, db=DB):
    """Runs a script in a fresh psql session (autocommit, stops at the first error); returns stdout."""
    r = subprocess.run(PSQL + ["-d", db], input=sql, text=True, capture_output=True)
    if r.returncode != 0:
        raise BenchError(f"psql failed ({r.returncode}): {r.stderr.strip()}\n--- SQL ---\n{sql[:3000]}")
    return r.stdout.strip()


def q1(sql, db=DB):
    """The last output line of a script (its last query's single value)."""
    out = psql(sql, db).splitlines()
    return out[-1] if out else ""


def timed(sql, db=DB):
    t0 = time.perf_counter()
    psql(sql, db)
    return time.perf_counter() - t0


class Session:
    """A long-lived psql for cheap polling (no process start per query)."""

    MARK = "__bench_done__"

    def __init__(self, db=DB):
        self.p = subprocess.Popen(PSQL[:5] + PSQL[7:] + ["-d", db], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)

    def query(self, sql):
        self.p.stdin.write(f"{sql};\n\\echo {self.MARK}\n")
        self.p.stdin.flush()
        out = []
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise BenchError(f"polling psql exited; last output: {out}")
            line = line.rstrip("\n")
            if line == self.MARK:
                break
            out.append(line)
        if any(l.startswith(("ERROR:", "psql:")) for l in out):
            raise BenchError(f"polling query failed: {sql}: {out}")
        return out[-1] if out else ""

    def close(self):
        try:
            self.p.stdin.close()
            self.p.wait(10)
        except Exception:
            self.p.kill()


def set_workers(n, timeout=120):
    psql(f"ALTER SYSTEM SET ecst.workers = {n}; SELECT pg_reload_conf();")
    deadline = time.time() + timeout
    while True:
        got = int(q1("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_ecst worker'"))
        if got == n:
            return
        if time.time() > deadline:
            raise BenchError(f"expected {n} pg_ecst worker(s) in pg_stat_activity, found {got}")
        time.sleep(0.2)


def worker_pids():
    out = q1("SELECT string_agg(pid::text, ',' ORDER BY application_name) FROM pg_stat_activity "
             "WHERE backend_type = 'pg_ecst worker'")
    return [int(p) for p in out.split(",") if p]


def settle():
    """Same starting line for every timed run: no dirty buffers, fresh statistics."""
    psql("VACUUM ANALYZE ecst.inbox; VACUUM ANALYZE ecst.entity_state; CHECKPOINT;")


def proc_status(pid):
    vals = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    vals[k] = int(v.split()[0]) / 1024.0  # kB -> MB
    except (FileNotFoundError, ProcessLookupError):
        return None
    return vals


def wait_drained(t_start, n, sample_memory=False, interval=None):
    """Polls until ecst.inbox is empty. The worker deletes rows in the transaction that applies them,
    so an empty inbox means the replica writes are committed. Returns (end_time, memory peaks).
    Logs progress every 10 s (inbox seq values of one COPY are consecutive, so the head's distance
    from the first seq is roughly how many were applied; with 2 workers, by the slower one)."""
    s = Session()
    peaks, pid, restarts = {}, None, 0
    last_head, last_move = None, time.time()
    first, last_report, last_pos = None, time.perf_counter(), 0
    try:
        while True:
            if sample_memory:
                if pid is None or not os.path.exists(f"/proc/{pid}"):
                    pids = worker_pids()
                    if pid is not None and pids and pids[0] != pid:
                        restarts += 1
                    pid = pids[0] if pids else None
                st = proc_status(pid) if pid else None
                for k, v in (st or {}).items():
                    peaks[k] = max(peaks.get(k, 0.0), v)
            head = s.query("SELECT coalesce((SELECT seq FROM ecst.inbox ORDER BY seq LIMIT 1), -1)")
            now = time.perf_counter()
            if head == "-1":
                if restarts:
                    peaks["restarts"] = restarts
                return now, peaks
            if first is None:
                first = int(head)
            if now - last_report >= 10:
                pos = int(head) - first
                mem = f", worker RssAnon {st['RssAnon']:.0f} MB" if sample_memory and st else ""
                info(f"  ... ~{pos:,} of {n:,} applied, {(pos - last_pos) / (now - last_report):,.0f}/s "
                     f"over the last {now - last_report:.0f} s{mem}")
                last_report, last_pos = now, pos
            if head != last_head:
                last_head, last_move = head, time.time()
            elif time.time() - last_move > 900:
                raise BenchError("the inbox head has not moved for 15 minutes: is the worker running? "
                                 f"see {DIR}/server.log")
            elapsed = now - t_start
            time.sleep(interval or min(0.25, max(0.01, 0.005 * elapsed)))
    finally:
        s.close()


def perf_start(label, everything=False):
    """With --perf, samples the workers' stacks (perf record) until perf_stop; `everything`:
    every process's (the backend a COPY runs in is not known in advance)."""
    if not PERF_DIR:
        return None
    data = f"{PERF_DIR}/{label}.data"
    pids = ",".join(str(p) for p in worker_pids())
    # Frame-pointer call graphs stop at the first Rust frame (pg_ecst is built without frame
    # pointers); PERF_CALLGRAPH=dwarf unwinds through them, at a lower rate and larger data files.
    graph = ["-F", "199", "--call-graph", "dwarf,32768"] if os.environ.get("PERF_CALLGRAPH") == "dwarf" \
        else ["-F", "999", "-g"]
    target = ["-a"] if everything else ["-p", pids]
    proc = subprocess.Popen(["perf", "record", "-q", *graph, "-o", data, *target],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, data, label


def perf_stop(handle):
    """Stops perf record and writes two reports next to its data: flat (self time per function)
    and inclusive (time under each function, callees included)."""
    if handle is None:
        return
    proc, data, label = handle
    proc.send_signal(signal.SIGINT)
    proc.wait()
    base = ["perf", "report", "-i", data, "--stdio", "--sort", "symbol", "-g", "none"]
    for kind, extra in (("self", ["--no-children", "--percent-limit", "0.5"]),
                        ("inclusive", ["--children", "--percent-limit", "2"])):
        out = subprocess.run(base + extra, capture_output=True, text=True).stdout
        lines = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("#")]
        with open(f"{PERF_DIR}/{label}.{kind}.txt", "w") as f:
            f.write("\n".join(lines) + "\n")
    info(f"  perf profile of the worker(s): {PERF_DIR}/{label}.{{self,inclusive}}.txt")


def stats(stream):
    out = q1(f"SELECT applied || ' ' || duplicate || ' ' || stale || ' ' || skipped || ' ' || dead_lettered "
             f"FROM ecst.stats WHERE stream = '{stream}'")
    a, d, st, sk, dl = (int(x) for x in out.split())
    return {"applied": a, "duplicate": d, "stale": st, "skipped": sk, "dead_lettered": dl}


def diff_count(t1, t2, cols):
    """Rows of t1 not in t2 and rows of t2 not in t1 (EXCEPT both ways)."""
    out = q1(f"SELECT (SELECT count(*) FROM (SELECT {cols} FROM {t1} EXCEPT SELECT {cols} FROM {t2}) d) || ' ' ||"
             f"       (SELECT count(*) FROM (SELECT {cols} FROM {t2} EXCEPT SELECT {cols} FROM {t1}) d)")
    a, b = (int(x) for x in out.split())
    return a, b


# ---------------------------------------------------------------------------------------------
# Workload generators. Streaming: events are produced in version order per entity, then each
# window of WINDOW consecutive events is shuffled (local disorder: some events arrive stale).

WINDOW = 50
PURPOSES = ("billing", "shipping", "home", "work", "invoice")
STREETS = ("Baker Street", "Infinite Loop", "George Street", "Karl-Liebknecht-Str", "Rue de Rivoli",
           "Via Roma", "Main Street", "Calle Mayor", "Nevsky Prospekt", "Orchard Road", "Elm Street")
CITIES = ("London, UK", "Cupertino, CA, US", "Sydney, NSW, AU", "Berlin, DE", "Paris, FR", "Roma, IT",
          "Springfield, US", "Madrid, ES", "Singapore, SG", "Wien, AT", "Oslo, NO")
TS0 = 1572134105


class Picker:
    """Entity choice with some temporal locality (so that window shuffles create stale events), and
    each entity's versions: `next_event()` picks an entity and gives it its next version."""

    def __init__(self, rng, n):
        self.rng, self.n, self.recent, self.i = rng, n, [rng.randrange(n) for _ in range(16)], 0
        self.ver = {}  # entity -> its latest version

    def next_event(self):
        e = self()
        v = self.ver.get(e, TS0 + e) + 1 + self.rng.randrange(600)
        self.ver[e] = v
        return e, v

    def __call__(self):
        rng = self.rng
        e = self.recent[rng.randrange(16)] if rng.random() < 0.25 else rng.randrange(self.n)
        self.recent[self.i & 15] = e
        self.i += 1
        return e


def line1(rng):
    return f"{rng.randrange(1, 1000)} {STREETS[rng.randrange(len(STREETS))]}"


def line2(rng):
    return f"{CITIES[rng.randrange(len(CITIES))]}, {rng.randrange(1000, 99999)}"


class ShuffledOutput:
    """The event files of a workload: the TSV for `COPY ecst.inbox (stream, payload)` and, if
    asked, the NDJSON. Each window of WINDOW consecutive events is shuffled before it is written;
    `close()` returns how many events were written after a newer one of their entity (stale)."""

    def __init__(self, rng, stream, tsv, ndjson=None):
        self.rng, self.window, self.maxv, self.stale = rng, [], {}, 0
        self.files = [open(tsv, "w")] + ([open(ndjson, "w")] if ndjson else [])
        self.prefixes = [f"{stream}\t", ""]

    def add(self, entity, version, payload):
        self.window.append((entity, version, payload))
        if len(self.window) == WINDOW:
            self._flush()

    def _flush(self):
        self.rng.shuffle(self.window)
        for e, v, payload in self.window:
            if v < self.maxv.get(e, -1):
                self.stale += 1
            else:
                self.maxv[e] = v
            for f, prefix in zip(self.files, self.prefixes):
                f.write(prefix)
                f.write(payload)
                f.write("\n")
        self.window = []

    def close(self):
        if self.window:
            self._flush()
        for f in self.files:
            f.close()
        return self.stale


def gen_entity_snapshot(seed, n, entities, stream, tsv, ndjson=None, final=None):
    """1 event = the whole address. ~4% of addressLine2 are JSON null, ~2% omit addressPurpose."""
    rng = random.Random(seed)
    pick = Picker(rng, entities)
    state = {}
    out = ShuffledOutput(rng, stream, tsv, ndjson)
    rnd, rr = rng.random, rng.randrange
    for _ in range(n):
        e, v = pick.next_event()
        p = PURPOSES[rr(5)] if rnd() > 0.02 else None
        l1 = line1(rng)
        l2 = line2(rng) if rnd() > 0.04 else None
        parts = [f'"addressPurpose": "{p}", ' if p is not None else "",
                 f'"addressLine1": "{l1}", ',
                 f'"addressLine2": "{l2}", ' if l2 is not None else '"addressLine2": null, ',
                 f'"addressTS": {v}']
        payload = f'{{"addressId": "{e}", "newState": {{"addressContent": {{{"".join(parts)}}}}}}}'
        state[e] = (p, l1, l2, v)
        out.add(e, v, payload)
    stale = out.close()
    if final:
        with open(final, "w", newline="") as f:
            w = csv.writer(f)
            for e in sorted(state):
                p, l1, l2, v = state[e]
                w.writerow([e, p, l1, l2, v])  # None -> empty unquoted field -> NULL in COPY csv
    return {"events": n, "entities": len(state), "stale": stale}


DELTA_FIELDS = ("addressPurpose", "addressLine1", "addressLine2")


def gen_delta(seed, n, entities, stream, tsv, ndjson, final):
    """1 event = 1-3 changed fields and a root version ts. ~3% of the values are JSON null."""
    rng = random.Random(seed)
    pick = Picker(rng, entities)
    state = {}
    out = ShuffledOutput(rng, stream, tsv, ndjson)
    rnd, rr = rng.random, rng.randrange
    for _ in range(n):
        e, v = pick.next_event()
        fields = rng.sample(DELTA_FIELDS, 1 + rr(3))
        cur = state.setdefault(e, {})
        parts = []
        for fld in fields:
            if rnd() < 0.03:
                val = None
            elif fld == "addressPurpose":
                val = PURPOSES[rr(5)]
            elif fld == "addressLine1":
                val = line1(rng)
            else:
                val = line2(rng)
            cur[fld] = val
            parts.append(f'"{fld}": "{val}"' if val is not None else f'"{fld}": null')
        payload = f'{{"addressId": "{e}", "ts": {v}, "newState": {{{", ".join(parts)}}}}}'
        out.add(e, v, payload)
    stale = out.close()
    with open(final, "w", newline="") as f:
        w = csv.writer(f)
        for e in sorted(state):
            s = state[e]
            w.writerow([e, s.get("addressPurpose"), s.get("addressLine1"), s.get("addressLine2")])
    return {"events": n, "entities": len(state), "stale": stale}


def gen_aggregate(seed, n, customers, stream, tsv, ndjson, final_parent, final_children):
    """1 event = a customer with exactly 4 addresses (distinct ids). Between snapshots an address is
    sometimes dropped and a new one added, and addresses change."""
    rng = random.Random(seed)
    pick = Picker(rng, customers)
    ver, kids = pick.ver, {}
    next_id = [100000]
    out = ShuffledOutput(rng, stream, tsv, ndjson)
    rnd, rr = rng.random, rng.randrange

    def new_child():
        next_id[0] += 1
        return [str(next_id[0]), PURPOSES[rr(5)], line1(rng), line2(rng), TS0 + rr(10 ** 7)]

    for _ in range(n):
        c, v = pick.next_event()
        cur = kids.get(c)
        if cur is None:
            cur = [new_child() for _ in range(4)]
        else:
            cur = [list(k) for k in cur]
            if rnd() < 0.3:  # one address dropped, another added
                cur.pop(rr(4))
                cur.insert(rr(4), new_child())
            if rnd() < 0.6:  # one address changed
                k = cur[rr(4)]
                k[2] = line1(rng)
                if rnd() < 0.5:
                    k[1] = PURPOSES[rr(5)]
                k[4] += 1 + rr(1000)
        kids[c] = cur
        addrs = ", ".join(
            f'{{"addressId": "{a}", "addressPurpose": "{p}", "addressLine1": "{l1}", '
            f'"addressLine2": "{l2}", "addressTS": {ts}}}' for a, p, l1, l2, ts in cur)
        payload = (f'{{"customerId": "{c}", "ts": {v}, '
                   f'"newState": {{"ts": {v}, "addressContent": {{"addresses": [{addrs}]}}}}}}')
        out.add(c, v, payload)
    stale = out.close()
    with open(final_parent, "w", newline="") as f:
        w = csv.writer(f)
        for c in sorted(ver):
            w.writerow([c, ver[c]])
    nkids = 0
    with open(final_children, "w", newline="") as f:
        w = csv.writer(f)
        for c in sorted(kids):
            for a, p, l1, l2, ts in kids[c]:
                w.writerow([c, a, p, l1, l2, ts])
                nkids += 1
    return {"events": n, "entities": len(ver), "children": nkids, "stale": stale}


# ---------------------------------------------------------------------------------------------
# Results

RESULTS = []
MISMATCHES = []


def result(workload, contestant, seconds=None, events=None, a=None, b=None, notes=""):
    row = {"workload": workload, "contestant": contestant, "seconds": seconds,
           "eps": (events / seconds) if (events and seconds) else None,
           "xa": (seconds / a) if (seconds and a) else None,
           "xb": (seconds / b) if (seconds and b) else None, "notes": notes}
    RESULTS.append(row)
    eps = f"{row['eps']:,.0f}/s" if row["eps"] else ""
    info(f"{workload} | {contestant}: {fmt_s(seconds)} s {eps} {notes}")
    return row


def fmt_s(s):
    if s is None:
        return ""
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def fmt_x(x):
    return "" if x is None else f"{x:.2f}"


def table():
    head = ["workload", "contestant", "seconds", "events/s", "×A", "×B", "notes"]
    rows = [[r["workload"], r["contestant"], fmt_s(r["seconds"]),
             "" if r["eps"] is None else f"{r['eps']:,.0f}", fmt_x(r["xa"]), fmt_x(r["xb"]), r["notes"]]
            for r in RESULTS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    right = {2, 3, 4, 5}

    def line(cells):
        return "| " + " | ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i])
                                 for i, c in enumerate(cells)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


WARNINGS = []


def check(what, ok, detail="", fatal=True):
    """A replica check (fatal: a mismatch fails the run) or a bookkeeping check (a warning)."""
    if ok:
        info(f"OK        {what}")
    elif fatal:
        info(f"MISMATCH  {what} {detail}")
        MISMATCHES.append(f"{what} {detail}".strip())
    else:
        info(f"WARNING   {what} {detail}")
        WARNINGS.append(f"{what} {detail}".strip())
    return ok


# ---------------------------------------------------------------------------------------------
# Workloads 1-3: A (COPY of the final rows), B (hand-written set-based SQL), C (pg_ecst, 1 and 2 workers)

ADDRESS_DDL = """CREATE TABLE {s}.address (address_id text PRIMARY KEY, address_purpose text, line1 text,
    address_line2 text, address_ts bigint);"""
ADDRESS_D_DDL = """CREATE TABLE {s}.address_d (address_id text PRIMARY KEY, address_purpose text, line1 text,
    address_line2 text);"""
CUSTOMER_DDL = """CREATE TABLE {s}.customer (customer_id text PRIMARY KEY, ts bigint);
CREATE TABLE {s}.customer_address (customer_id text NOT NULL, address_id text NOT NULL, address_purpose text,
    line1 text, address_line2 text, address_ts bigint, PRIMARY KEY (customer_id, address_id));"""

# Contestant B, hand-written: one set-based statement over the raw events. Keys are sorted with
# COLLATE "C" (only grouping matters; much faster than the database's C.UTF-8 collation).
B_ENTITY = """
INSERT INTO b.address AS t (address_id, address_purpose, line1, address_line2, address_ts)
SELECT DISTINCT ON (k) k, s->>'addressPurpose', s->>'addressLine1', s->>'addressLine2', v
FROM (SELECT payload->>'addressId' COLLATE "C" AS k,
             payload #> '{newState,addressContent}' AS s,
             (payload #>> '{newState,addressContent,addressTS}')::bigint AS v
      FROM b.raw_entity_snapshot) e
ORDER BY k, v DESC
ON CONFLICT (address_id) DO UPDATE
   SET address_purpose = EXCLUDED.address_purpose, line1 = EXCLUDED.line1,
       address_line2 = EXCLUDED.address_line2, address_ts = EXCLUDED.address_ts
 WHERE t.address_ts < EXCLUDED.address_ts;
"""

# Delta: the events of each entity are folded in version order with jsonb || (a later field
# overwrites an earlier one), giving per field the value of the newest event that carried it;
# then MERGE sets only the fields present (an explicit null included).
B_DELTA = """
CREATE AGGREGATE b.jsonb_merge(jsonb) (SFUNC = jsonb_concat, STYPE = jsonb, INITCOND = '{}');
MERGE INTO b.address_d AS t
USING (SELECT payload->>'addressId' COLLATE "C" AS k, b.jsonb_merge(payload->'newState' ORDER BY (payload->>'ts')::bigint) AS m
       FROM b.raw_delta GROUP BY 1) AS d
   ON t.address_id = d.k
 WHEN MATCHED THEN UPDATE SET
      address_purpose = CASE WHEN d.m ? 'addressPurpose' THEN d.m->>'addressPurpose' ELSE t.address_purpose END,
      line1           = CASE WHEN d.m ? 'addressLine1'   THEN d.m->>'addressLine1'   ELSE t.line1 END,
      address_line2   = CASE WHEN d.m ? 'addressLine2'   THEN d.m->>'addressLine2'   ELSE t.address_line2 END
 WHEN NOT MATCHED THEN
      INSERT (address_id, address_purpose, line1, address_line2)
      VALUES (d.k, d.m->>'addressPurpose', d.m->>'addressLine1', d.m->>'addressLine2');
"""

# Aggregate: latest snapshot per customer; upsert the parent where newer; for the parents that
# were written, delete the children absent from the snapshot and upsert the others.
B_AGGREGATE = """
WITH latest AS MATERIALIZED (
    SELECT DISTINCT ON (k) k, v, s
    FROM (SELECT payload->>'customerId' COLLATE "C" AS k, (payload->>'ts')::bigint AS v, payload->'newState' AS s
          FROM b.raw_aggregate) e
    ORDER BY k, v DESC),
parents AS (
    INSERT INTO b.customer AS t (customer_id, ts)
    SELECT k, (s->>'ts')::bigint FROM latest
    ON CONFLICT (customer_id) DO UPDATE SET ts = EXCLUDED.ts WHERE t.ts < EXCLUDED.ts
    RETURNING customer_id),
kids AS MATERIALIZED (
    SELECT l.k, c->>'addressId' AS address_id, c->>'addressPurpose' AS address_purpose,
           c->>'addressLine1' AS line1, c->>'addressLine2' AS address_line2, (c->>'addressTS')::bigint AS address_ts
    FROM latest l
    JOIN parents p ON p.customer_id = l.k
    CROSS JOIN LATERAL jsonb_array_elements(l.s #> '{addressContent,addresses}') c),
gone AS (
    DELETE FROM b.customer_address ca USING parents p
    WHERE ca.customer_id = p.customer_id
      AND NOT EXISTS (SELECT 1 FROM kids WHERE kids.k = ca.customer_id AND kids.address_id = ca.address_id))
INSERT INTO b.customer_address AS t (customer_id, address_id, address_purpose, line1, address_line2, address_ts)
SELECT k, address_id, address_purpose, line1, address_line2, address_ts FROM kids
ON CONFLICT (customer_id, address_id) DO UPDATE
   SET address_purpose = EXCLUDED.address_purpose, line1 = EXCLUDED.line1,
       address_line2 = EXCLUDED.address_line2, address_ts = EXCLUDED.address_ts;
"""

ADDR_COLS = "address_id, address_purpose, line1, address_line2, address_ts"
ADDR_D_COLS = "address_id, address_purpose, line1, address_line2"
CUST_COLS = "customer_id, ts"
KIDS_COLS = "customer_id, address_id, address_purpose, line1, address_line2, address_ts"

SPECS = {
    "entity_snapshot": {
        "ddl": ADDRESS_DDL, "stream": "address",
        "create": "SELECT ecst.create_stream('address', '{s}.address', 'entity_snapshot', '{{\"addressId\": \"address_id\"}}', "
                  "state_path => 'addressContent', columns => '{{\"addressLine1\": \"line1\"}}', "
                  "version => 'newState.addressContent.addressTS');",
        "tables": [("address", ADDR_COLS)], "b_sql": B_ENTITY,
    },
    "delta": {
        "ddl": ADDRESS_D_DDL, "stream": "address_d",
        "create": "SELECT ecst.create_stream('address_d', '{s}.address_d', 'delta', '{{\"addressId\": \"address_id\"}}', "
                  "columns => '{{\"addressLine1\": \"line1\"}}', version => 'ts');",
        "tables": [("address_d", ADDR_D_COLS)], "b_sql": B_DELTA,
    },
    "aggregate": {
        "ddl": CUSTOMER_DDL, "stream": "customer",
        "create": "SELECT ecst.create_stream('customer', '{s}.customer', 'aggregate_snapshot', "
                  "'{{\"customerId\": \"customer_id\"}}', version => 'ts', children => "
                  "'{{\"addresses\": {{\"path\": \"addressContent.addresses\", \"table\": \"{s}.customer_address\", "
                  "\"key\": {{\"addressId\": \"address_id\"}}, \"parent_key\": \"customer_id\", "
                  "\"columns\": {{\"addressLine1\": \"line1\"}}}}}}');",
        "tables": [("customer", CUST_COLS), ("customer_address", KIDS_COLS)], "b_sql": B_AGGREGATE,
    },
}


def generate(name, scale, seed):
    t0 = time.perf_counter()
    d = DATA
    if name == "entity_snapshot":
        meta = gen_entity_snapshot(seed, round(1_000_000 * scale), max(1, round(200_000 * scale)), "address",
                                   f"{d}/entity_snapshot.tsv", f"{d}/entity_snapshot.ndjson",
                                   f"{d}/entity_snapshot.final.csv")
        meta["finals"] = [f"{d}/entity_snapshot.final.csv"]
    elif name == "delta":
        meta = gen_delta(seed + 1, round(1_000_000 * scale), max(1, round(200_000 * scale)), "address_d",
                         f"{d}/delta.tsv", f"{d}/delta.ndjson", f"{d}/delta.final.csv")
        meta["finals"] = [f"{d}/delta.final.csv"]
    elif name == "aggregate":
        meta = gen_aggregate(seed + 2, round(100_000 * scale), max(1, round(25_000 * scale)), "customer",
                             f"{d}/aggregate.tsv", f"{d}/aggregate.ndjson",
                             f"{d}/aggregate.final_customer.csv", f"{d}/aggregate.final_customer_address.csv")
        meta["finals"] = [f"{d}/aggregate.final_customer.csv", f"{d}/aggregate.final_customer_address.csv"]
    meta["tsv"], meta["ndjson"] = f"{d}/{name}.tsv", f"{d}/{name}.ndjson"
    info(f"generated {name}: {meta['events']:,} events, {meta['entities']:,} entities, "
         f"{meta['stale']:,} arrive after a newer one, in {time.perf_counter() - t0:.1f} s")
    return meta


# Contestants of the set workloads to run (empty: all), for a quicker run while working on one.
CONTESTANTS = set()


def wanted(contestant):
    return not CONTESTANTS or contestant in CONTESTANTS


def run_set_workload(name, meta):
    spec = SPECS[name]
    n = meta["events"]
    log(f"workload {name}: {n:,} events")

    # A. physical limit: COPY the final rows into an identical empty replica.
    psql("CREATE SCHEMA a;" + spec["ddl"].format(s="a"))
    settle()
    copies = "".join(f"\\copy a.{t} FROM '{f}' WITH (FORMAT csv)\n" for (t, _), f in zip(spec["tables"], meta["finals"]))
    a = timed(copies)
    rows = sum(int(q1(f"SELECT count(*) FROM a.{t}")) for t, _ in spec["tables"])
    result(name, "A  COPY final rows (physical limit)", a, n, a, None, f"{rows:,} rows")

    # B. hand-written SQL: COPY the NDJSON into raw(payload jsonb), then one set-based statement.
    psql("CREATE SCHEMA b;" + spec["ddl"].format(s="b") + f"CREATE TABLE b.raw_{name} (payload jsonb);")
    settle()
    b_copy = timed(f"\\copy b.raw_{name} (payload) FROM '{meta['ndjson']}'\n")
    psql(f"ANALYZE b.raw_{name}; CHECKPOINT;")
    b_sql = timed(spec["b_sql"])
    b_total = b_copy + b_sql
    result(name, "B1 COPY NDJSON into raw(payload jsonb)", b_copy, n, a, b_total)
    result(name, "B2 one set-based upsert statement", b_sql, n, a, b_total)
    result(name, "B  hand-written SQL total (B1+B2)", b_total, n, a, b_total)
    verify(name, "b", spec)

    # C. pg_ecst end to end: COPY into ecst.inbox, the background worker(s) apply. Every run starts
    # fresh worker processes, so that a run does not depend on what ran before it (a worker's cached
    # plans outlive streams; see README). For entity_snapshot, one more run reuses the worker process
    # of the previous run, as a long-lived worker would see a new stream.
    runs = [(1, True), (2, True)] + ([(1, False)] if name == "entity_snapshot" else [])
    runs = runs if wanted("C") else []
    for workers, fresh in runs:
        sch = f"c{workers}" if fresh else f"c{workers}r"
        if fresh:
            set_workers(0)
        set_workers(workers)
        psql(f"CREATE SCHEMA {sch};" + spec["ddl"].format(s=sch) + spec["create"].format(s=sch))
        settle()
        prof = perf_start(f"{name}-{sch}")
        t0 = time.perf_counter()
        psql(f"\\copy ecst.inbox (stream, payload) FROM '{meta['tsv']}'\n")
        t_copy = time.perf_counter()
        t_end, _ = wait_drained(t0, n)
        perf_stop(prof)
        total = t_end - t0
        st = stats(spec["stream"])
        dead = int(q1(f"SELECT count(*) FROM ecst.dead_letters WHERE stream = '{spec['stream']}'"))
        notes = (f"COPY {t_copy - t0:.2f} s + drain {t_end - t_copy:.2f} s; applied {st['applied']:,}, "
                 f"stale {st['stale']:,}, duplicate {st['duplicate']:,}, dead {st['dead_lettered']:,}")
        label = f"C  pg_ecst, {workers} worker{'s' if workers > 1 else ''}" + \
            ("" if fresh else ", reused process (2nd stream)")
        result(name, label, total, n, a, b_total, notes)
        verify(name, sch, spec)
        check(f"{name} {sch}: every event counted once, none dead-lettered",
              st["applied"] + st["stale"] + st["duplicate"] + st["skipped"] == n and dead == 0
              and st["dead_lettered"] == 0, f"(stats {st}, {dead} dead letters)", fatal=False)
        if name != "delta":  # for snapshots, 'stale' is exactly "older than one already applied"
            check(f"{name} {sch}: stale count = events arriving after a newer one ({meta['stale']:,})",
                  st["stale"] == meta["stale"] and st["duplicate"] == 0, f"(stats {st})", fatal=False)
        psql(f"SELECT ecst.drop_stream('{spec['stream']}');")
    if wanted("D"):
        run_feed(name, meta, a, b_total)
    if name == "entity_snapshot" and wanted("C"):
        run_schema(name, meta, a, b_total)
        run_envelope(name, meta, a, b_total)
    if name == "entity_snapshot" and wanted("F"):
        run_floors(name, meta, a, b_total)
    set_workers(1)


def run_feed(name, meta, a, b_total):
    """D: the same events COPYed into ecst.feed, applied within the COPY's own transaction (no
    inbox, no worker): the clock stops when the COPY returns, with the replica up to date."""
    spec = SPECS[name]
    n = meta["events"]
    set_workers(0)
    sch = "d"
    psql(f"CREATE SCHEMA {sch};" + spec["ddl"].format(s=sch) + spec["create"].format(s=sch))
    settle()
    prof = perf_start(f"{name}-feed", everything=True)
    d = timed(f"\\copy ecst.feed (stream, payload) FROM '{meta['tsv']}'\n")
    perf_stop(prof)
    st = stats(spec["stream"])
    dead = int(q1(f"SELECT count(*) FROM ecst.dead_letters WHERE stream = '{spec['stream']}'"))
    notes = (f"applied {st['applied']:,}, stale {st['stale']:,}, duplicate {st['duplicate']:,}, dead {dead:,}; "
             f"ecst.feed_buffer = {q1('SHOW ecst.feed_buffer')}")
    result(name, "D  ecst.feed: COPY, applied in its own transaction", d, n, a, b_total, notes)
    verify(name, sch, spec)
    check(f"{name} {sch}: every event counted once, none dead-lettered",
          st["applied"] + st["stale"] + st["duplicate"] + st["skipped"] == n and dead == 0,
          f"(stats {st}, {dead} dead letters)", fatal=False)
    psql(f"SELECT ecst.drop_stream('{spec['stream']}');")
    set_workers(1)


# What the bench's entity snapshots promise (addressPurpose is sometimes absent, addressLine2
# sometimes null): the schema a contract would give their stream.
ENTITY_SCHEMA = {
    "type": "object",
    "required": ["addressId", "newState"],
    "properties": {
        "addressId": {"type": "string"},
        "newState": {
            "type": "object",
            "required": ["addressContent"],
            "properties": {"addressContent": {
                "type": "object",
                "required": ["addressLine1", "addressLine2", "addressTS"],
                "properties": {
                    "addressPurpose": {"type": "string", "enum": list(PURPOSES)},
                    "addressLine1": {"type": "string", "minLength": 1},
                    "addressLine2": {"type": ["string", "null"]},
                    "addressTS": {"type": "integer", "minimum": 0},
                },
            }},
        },
    },
}


def run_schema(name, meta, a, b_total):
    """The same events into a stream with a JSON Schema (create_stream(..., schema)), 1 worker:
    what checking every event costs end to end, and in the core alone (parse with and without)."""
    spec = SPECS[name]
    schema = json.dumps(ENTITY_SCHEMA)
    schema_file = f"{DATA}/{name}.schema.json"
    with open(schema_file, "w") as f:
        f.write(schema)
    bare = parse_seconds("entity_snapshot", meta["ndjson"])
    checked = parse_seconds("entity_snapshot", meta["ndjson"], schema_file)
    n = meta["events"]
    result(name, "P  core parse, 1 core (no schema)", bare, n, a, b_total, "the parse floor, in Rust alone")
    result(name, "P  core parse + JSON Schema check, 1 core", checked, n, a, b_total,
           f"the check adds {(checked - bare) / n * 1e6:.2f} µs per event ({checked / bare:.2f}× the parse)")
    set_workers(0)
    set_workers(1)
    sch = "cs"
    create = spec["create"].format(s=sch).rstrip(";")[:-1] + ", schema => " + "'" + schema.replace("'", "''") + "');"
    psql(f"CREATE SCHEMA {sch};" + spec["ddl"].format(s=sch) + create)
    settle()
    t0 = time.perf_counter()
    psql(f"\\copy ecst.inbox (stream, payload) FROM '{meta['tsv']}'\n")
    t_copy = time.perf_counter()
    t_end, _ = wait_drained(t0, n)
    st = stats(spec["stream"])
    dead = int(q1(f"SELECT count(*) FROM ecst.dead_letters WHERE stream = '{spec['stream']}'"))
    notes = (f"COPY {t_copy - t0:.2f} s + drain {t_end - t_copy:.2f} s; applied {st['applied']:,}, "
             f"stale {st['stale']:,}, dead {dead:,}; same events as C, 1 worker, each checked against a JSON Schema")
    result(name, "C  pg_ecst, 1 worker, with a JSON Schema", t_end - t0, n, a, b_total, notes)
    verify(name, sch, spec)
    check(f"{name} {sch}: every event counted once, none dead-lettered",
          st["applied"] + st["stale"] + st["duplicate"] + st["skipped"] == n and dead == 0,
          f"(stats {st}, {dead} dead letters)", fatal=False)
    psql(f"SELECT ecst.drop_stream('{spec['stream']}');")


def run_envelope(name, meta, a, b_total):
    """The same events wrapped in CloudEvents envelopes (the event under `data`, with specversion,
    id, type and source around it), into a stream with event_path => 'data': what an envelope
    costs, against the bare 1-worker run; then the same envelopes fed under a route's name (a
    route with three types, as one topic of several event types would have)."""
    spec = SPECS[name]
    for routed in (False, True):
        feed = "acme" if routed else "address_ce"
        tsv = f"{DATA}/{name}.cloudevents{'.routed' if routed else ''}.tsv"
        with open(meta["tsv"]) as src, open(tsv, "w") as dst:
            for i, line in enumerate(src):
                _, payload = line.rstrip("\n").split("\t", 1)
                dst.write(f'{feed}\t{{"specversion":"1.0","id":"{i}","type":"com.acme.address.changed",'
                          f'"source":"/addresses","data":{payload}}}\n')
        n = meta["events"]
        set_workers(0)
        set_workers(1)
        sch = "cer" if routed else "ce"
        create = ("SELECT ecst.create_stream('address_ce', '{s}.address', 'entity_snapshot', '{{\"addressId\": \"address_id\"}}', "
                  "state_path => 'addressContent', columns => '{{\"addressLine1\": \"line1\"}}', "
                  "version => 'data.newState.addressContent.addressTS', event_path => 'data');")
        if routed:
            # Three types, two of them for streams that get no events here.
            create += ("CREATE TABLE {s}.other (id text PRIMARY KEY);"
                       "SELECT ecst.create_stream('other1', '{s}.other', 'entity_snapshot', '{{\"id\": \"id\"}}', event_path => 'data');"
                       "SELECT ecst.create_stream('other2', '{s}.other', 'entity_snapshot', '{{\"id\": \"id\"}}', event_path => 'data');"
                       "SELECT ecst.create_route('acme', 'type', '{{\"com.acme.address.changed\": \"address_ce\", "
                       "\"com.acme.customer.snapshot\": \"other1\", \"com.acme.order.placed\": \"other2\"}}');")
        psql(f"CREATE SCHEMA {sch};" + spec["ddl"].format(s=sch) + create.format(s=sch))
        settle()
        t0 = time.perf_counter()
        psql(f"\\copy ecst.inbox (stream, payload) FROM '{tsv}'\n")
        t_copy = time.perf_counter()
        t_end, _ = wait_drained(t0, n)
        st = stats("address_ce")
        dead = int(q1("SELECT count(*) FROM ecst.dead_letters WHERE stream IN ('address_ce', 'acme')"))
        notes = (f"COPY {t_copy - t0:.2f} s + drain {t_end - t_copy:.2f} s; applied {st['applied']:,}, "
                 f"stale {st['stale']:,}, dead {dead:,}; same events as C, 1 worker, in envelopes"
                 + (", fed through a route of three types" if routed else ""))
        label = "C  pg_ecst, 1 worker, CloudEvents envelopes" + (" through a route" if routed else "")
        result(name, label, t_end - t0, n, a, b_total, notes)
        verify(name, sch, spec)
        check(f"{name} {sch}: every event counted once, none dead-lettered",
              st["applied"] + st["stale"] + st["duplicate"] + st["skipped"] == n and dead == 0,
              f"(stats {st}, {dead} dead letters)", fatal=False)
        if routed:
            psql("SELECT ecst.drop_route('acme'); SELECT ecst.drop_stream('other1'); SELECT ecst.drop_stream('other2');")
        psql("SELECT ecst.drop_stream('address_ce');")


def parse_seconds(shape, ndjson, schema_file=None):
    """The core's parse of every event of `ndjson`, in Rust on one core (the fastest of 3 passes),
    each event checked against the JSON Schema in `schema_file` if given."""
    extra = ["3", schema_file] if schema_file else []
    out = subprocess.run(["cargo", "run", "--release", "-q", "-p", "ecst_core", "--example", "parse_rate", "--",
                          shape, ndjson] + extra, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchError(f"parse_rate failed: {out.stderr.strip()}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if got["rejected"]:
        raise BenchError(f"parse_rate rejected {got['rejected']} events of {ndjson}")
    return got["seconds"]


def run_floors(name, meta, a, b_total):
    """What any design that takes the raw events durably and applies them must spend at least,
    measured in this run with no worker running: the cheapest durable input (COPY into a bare,
    unindexed table), pg_ecst's own input (COPY into ecst.inbox), taking the rows out again
    (one DELETE), and parsing every event once. The floor sum (cheapest input + parse + writing the
    final rows, A) is the lower bound that C's targets are measured against."""
    n = meta["events"]
    set_workers(0)
    psql("CREATE SCHEMA f; CREATE TABLE f.bare (stream text, payload text);")
    settle()
    bare = timed(f"\\copy f.bare (stream, payload) FROM '{meta['tsv']}'\n")
    psql("DROP SCHEMA f CASCADE;")
    settle()
    inbox = timed(f"\\copy ecst.inbox (stream, payload) FROM '{meta['tsv']}'\n")
    psql("CHECKPOINT;")
    delete = timed("DELETE FROM ecst.inbox;")
    parse = parse_seconds(name, meta["ndjson"])
    result(name, "F1 floor: COPY into a bare (stream, payload) table", bare, n, a, b_total,
           "no index, no default: the cheapest durable input")
    result(name, "F2 COPY into ecst.inbox alone (no worker)", inbox, n, a, b_total,
           "C's input: F1 + the seq default and index")
    result(name, "F3 DELETE every inbox row, one statement", delete, n, a, b_total,
           "the least a drain does to take its rows")
    result(name, "F4 parse every event once (Rust, one core)", parse, n, a, b_total,
           f"{parse / n * 1e6:.2f} µs/event, ecst_core::event::parse")
    floor = bare + parse + a
    result(name, "F  floor sum F1+F4+A", floor, n, a, b_total,
           f"no design that accepts the events durably, parses them and writes the final rows "
           f"goes below this; C's targets: ≤ {2 * a:.2f} s (2×A), ≤ {0.5 * b_total:.2f} s (0.5×B)")


def verify(name, schema, spec):
    for t, cols in spec["tables"]:
        x, y = diff_count(f"{schema}.{t}", f"a.{t}", cols)
        check(f"{name}: {schema}.{t} = a.{t}", x == 0 and y == 0,
              f"({x} rows only in {schema}.{t}, {y} rows only in a.{t})")


# ---------------------------------------------------------------------------------------------
# D. per call

PERCALL_STREAM = """
SELECT ecst.create_stream('address_pc', 'pc.address_ecst', 'entity_snapshot', '{"addressId": "address_id"}',
    state_path => 'addressContent', columns => '{"addressLine1": "line1"}',
    version => 'newState.addressContent.addressTS');
"""

PERCALL_SETUP = """
CREATE SCHEMA pc;
CREATE TABLE pc.address_hand (address_id text PRIMARY KEY, address_purpose text, line1 text,
    address_line2 text, address_ts bigint);
CREATE TABLE pc.address_ecst (address_id text PRIMARY KEY, address_purpose text, line1 text,
    address_line2 text, address_ts bigint);
CREATE TABLE pc.payloads (id bigserial PRIMARY KEY, payload text NOT NULL);
-- Applies the first `n` payloads in order, one call each, committing every `every` calls
-- (0: never, all in one transaction). Static SQL, so both calls use cached plans.
""" + "".join(f"""CREATE PROCEDURE pc.loop_{name}(n int, every int) LANGUAGE plpgsql AS $$
DECLARE
    r record;
    i int := 0;
BEGIN
    FOR r IN SELECT payload FROM pc.payloads WHERE id <= n ORDER BY id LOOP
        PERFORM {call};
        i := i + 1;
        IF every > 0 AND i % every = 0 THEN
            COMMIT;
        END IF;
    END LOOP;
END $$;
""" for name, call in (("hand", "pc.upsert_address(r.payload::jsonb)"),
                       ("ecst", "ecst.apply('address_pc', r.payload)"),
                       ("floor", "length(r.payload)"),
                       ("jsonb", "r.payload::jsonb"))) + """-- The hand-written equivalent of one ecst.apply call: parse, upsert if newer.
CREATE FUNCTION pc.upsert_address(p jsonb) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    s jsonb := p #> '{newState,addressContent}';
BEGIN
    INSERT INTO pc.address_hand AS t (address_id, address_purpose, line1, address_line2, address_ts)
    VALUES (p->>'addressId', s->>'addressPurpose', s->>'addressLine1', s->>'addressLine2', (s->>'addressTS')::bigint)
    ON CONFLICT (address_id) DO UPDATE
       SET address_purpose = EXCLUDED.address_purpose, line1 = EXCLUDED.line1,
           address_line2 = EXCLUDED.address_line2, address_ts = EXCLUDED.address_ts
     WHERE t.address_ts < EXCLUDED.address_ts;
END $$;
""" + PERCALL_STREAM


def run_percall(scale, seed):
    """Both contestants run the same server-side loop (a procedure committing every 1,000 calls), then
    the same again over fewer events in ONE transaction: every ecst.apply call is a subtransaction,
    and thousands of subtransactions in one transaction cost more per call as they accumulate."""
    n = round(100_000 * scale)
    n1 = max(1, round(10_000 * scale))
    log(f"workload percall: {n:,} single calls, server-side loop")
    meta = gen_entity_snapshot(seed + 3, n, max(1, round(20_000 * scale)), "address_pc", f"{DATA}/percall.tsv",
                               f"{DATA}/percall.ndjson")
    psql(PERCALL_SETUP)
    psql(f"\\copy pc.payloads (payload) FROM '{DATA}/percall.ndjson'\nVACUUM ANALYZE pc.payloads;")

    def loop(name, limit, every):
        return timed(f"CALL pc.loop_{name}({limit}, {every});")

    hand_call, ecst_call = "hand", "ecst"
    settle()
    hand = loop(hand_call, n, 1000)
    settle()
    ecst = loop(ecst_call, n, 1000)
    result("percall", "B  PL/pgSQL upsert function, 1 call/event", hand, n, None, hand, "calls/s; COMMIT every 1,000 calls")
    result("percall", "C  SELECT ecst.apply(stream, payload), 1 call/event", ecst, n, None, hand,
           f"calls/s; COMMIT every 1,000 calls; ecst.apply takes {ecst / hand:.2f}× the time of the PL/pgSQL function")
    # What every call of either costs before it does anything: the loop itself, and (the PL/pgSQL
    # function's first step) the jsonb parse.
    settle()
    floor = loop("floor", n, 1000)
    settle()
    parse = loop("jsonb", n, 1000)
    result("percall", "F  the same loop, PERFORM length(payload)", floor, n, None, hand,
           f"calls/s; the harness's own {floor / n * 1e6:,.1f} µs/call, in both contestants")
    result("percall", "F  the same loop, PERFORM payload::jsonb", parse, n, None, hand,
           f"calls/s; + the PL/pgSQL function's parse: {(parse - floor) / n * 1e6:,.1f} µs/call")
    x, y = diff_count("pc.address_ecst", "pc.address_hand", ADDR_COLS)
    check("percall: ecst.apply replica = PL/pgSQL replica", x == 0 and y == 0, f"({x} / {y} rows differ)")
    st = stats("address_pc")
    check(f"percall: stale count = {meta['stale']}", st["stale"] == meta["stale"], f"(stats {st})", fatal=False)

    psql("TRUNCATE pc.address_hand, pc.address_ecst; SELECT ecst.drop_stream('address_pc');" + PERCALL_STREAM)
    settle()
    hand1 = loop(hand_call, n1, 0)
    settle()
    ecst1 = loop(ecst_call, n1, 0)
    result("percall", f"B  same, first {n1:,} events in ONE transaction", hand1, n1, None, hand1, "calls/s")
    result("percall", f"C  same, first {n1:,} events in ONE transaction", ecst1, n1, None, hand1,
           f"calls/s; {ecst1 / n1 * 1e6:,.0f} µs/call vs {ecst / n * 1e6:,.0f} µs/call with commits")
    x, y = diff_count("pc.address_ecst", "pc.address_hand", ADDR_COLS)
    check("percall (one transaction): ecst.apply replica = PL/pgSQL replica", x == 0 and y == 0,
          f"({x} / {y} rows differ)")


# ---------------------------------------------------------------------------------------------
# L. bootstrap: ecst.load_snapshot of 1M entity snapshots into an empty replica vs COPY of the same
#    final rows (SPEC §5; the target is at most 1.5x).

def run_snapshot_load(scale, seed):
    n = max(1, round(1_000_000 * scale))
    log(f"workload snapshot_load: {n:,} entity snapshots, one per entity")
    rng = random.Random(seed + 5)
    with open(f"{DATA}/snapload.ndjson", "w") as events, open(f"{DATA}/snapload.csv", "w", newline="") as rows:
        w = csv.writer(rows)
        for i in range(n):
            purpose, l1, l2, ts = rng.choice(["billing", "shipping"]), line1(rng), line2(rng), rng.randrange(1, 10**9)
            events.write(json.dumps({"addressId": f"s{i}", "newState": {"addressContent": {
                "addressPurpose": purpose, "addressLine1": l1, "addressLine2": l2, "addressTS": ts}}}) + "\n")
            w.writerow([f"s{i}", purpose, l1, l2, ts])
    psql("CREATE SCHEMA sl;" + ADDRESS_DDL.format(s="sl").replace("sl.address", "sl.address_a") +
         ADDRESS_DDL.format(s="sl").replace("sl.address", "sl.address_l") +
         "CREATE TABLE sl.src (payload text);"
         "SELECT ecst.create_stream('address_load', 'sl.address_l', 'entity_snapshot', '{\"addressId\": \"address_id\"}', "
         "state_path => 'addressContent', columns => '{\"addressLine1\": \"line1\"}', "
         "version => 'newState.addressContent.addressTS');")
    # Warm-up, untimed: the server's first bulk write pays for creating WAL segments; without it
    # A (which runs first) would carry that cost and flatter the ratio.
    psql(ADDRESS_DDL.format(s="sl").replace("sl.address", "sl.warmup") +
         f"\n\\copy sl.warmup FROM '{DATA}/snapload.csv' WITH (FORMAT csv)\nDROP TABLE sl.warmup;")
    settle()
    a = timed(f"\\copy sl.address_a FROM '{DATA}/snapload.csv' WITH (FORMAT csv)")
    settle()
    copy_src = timed(f"\\copy sl.src (payload) FROM '{DATA}/snapload.ndjson' WITH (FORMAT csv, DELIMITER E'\\x01', QUOTE E'\\x02')")
    # The source gets what settle() gives the inbox: vacuumed (hint bits set, so the load's scan
    # does not dirty and write back every page of it) and checkpointed.
    psql("VACUUM ANALYZE sl.src;")
    settle()
    load = timed("SELECT * FROM ecst.load_snapshot('address_load', 'sl.src');")
    result("snapshot_load", "A  COPY final rows", a, n, a, None, f"{n:,} rows")
    result("snapshot_load", "L1 COPY the events into a text table", copy_src, n, a, None, "")
    result("snapshot_load", "L2 ecst.load_snapshot from that table", load, n, a, None,
           f"target: at most 1.5×A; measured {load / a:.2f}×A")
    result("snapshot_load", "L  total", copy_src + load, n, a, None, "")
    x, y = diff_count("sl.address_l", "sl.address_a", ADDR_COLS)
    check("snapshot_load: load_snapshot replica = COPY replica", x == 0 and y == 0, f"({x} / {y} rows differ)")
    psql("DROP SCHEMA sl CASCADE; SELECT ecst.drop_stream('address_load');")


# ---------------------------------------------------------------------------------------------
# E. latency

LATENCY_SQL = """
CREATE SCHEMA lat;
""" + ADDRESS_DDL.format(s="lat") + """
SELECT ecst.create_stream('address_lat', 'lat.address', 'entity_snapshot', '{"addressId": "address_id"}',
    state_path => 'addressContent', columns => '{"addressLine1": "line1"}',
    version => 'newState.addressContent.addressTS');
CREATE TABLE lat.latencies (i int, ms float8);
-- Insert one event, commit, poll until visible in the replica, record; then pause.
CREATE PROCEDURE lat.measure(n int, pause float8) LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz;
BEGIN
    FOR i IN 1..n LOOP
        t0 := clock_timestamp();
        INSERT INTO ecst.inbox (stream, payload) VALUES ('address_lat', format(
            '{"addressId": "lat%s", "newState": {"addressContent": {"addressPurpose": "billing", '
            '"addressLine1": "%s Baker Street", "addressLine2": "London, UK, E1 7AE", "addressTS": %s}}}',
            i, i, 1572134105 + i));
        COMMIT;
        WHILE NOT EXISTS (SELECT 1 FROM lat.address WHERE address_id = 'lat' || i) LOOP
            PERFORM pg_sleep(0.0002);
            EXIT WHEN clock_timestamp() - t0 > interval '60 s';
        END LOOP;
        INSERT INTO lat.latencies VALUES (i, extract(epoch FROM clock_timestamp() - t0) * 1000);
        COMMIT;
        PERFORM pg_sleep(pause);
    END LOOP;
END $$;
"""


def run_latency():
    n, pause = 200, 0.01
    log(f"workload latency: {n} single INSERTs into ecst.inbox, {pause * 1000:.0f} ms apart")
    set_workers(0)
    set_workers(1)
    psql(LATENCY_SQL)
    settle()
    psql(f"CALL lat.measure({n}, {pause});")
    out = q1("SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 2) || ' ' || "
             "round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 2) || ' ' || "
             "round(max(ms)::numeric, 2) || ' ' || round(avg(ms)::numeric, 2) FROM lat.latencies")
    p50, p99, mx, avg = out.split()
    result("latency", "C  pg_ecst worker: insert -> visible in replica", None, None, None, None,
           f"p50 {p50} ms, p99 {p99} ms, max {mx} ms, mean {avg} ms ({n} events, {pause * 1000:.0f} ms apart, "
           f"naptime 1000 ms)")
    check(f"latency: all {n} events visible", q1("SELECT count(*) FROM lat.address") == str(n), fatal=False)


# ---------------------------------------------------------------------------------------------
# F. memory

def run_memory(scale, seed):
    n = round(10_000_000 * scale)
    log(f"workload memory: the worker draining {n:,} entity_snapshot events")
    t0 = time.perf_counter()
    meta = gen_entity_snapshot(seed + 4, n, max(1, round(2_000_000 * scale)), "address_mem", f"{DATA}/memory.tsv")
    info(f"generated memory: {n:,} events, {meta['entities']:,} entities in {time.perf_counter() - t0:.1f} s")
    set_workers(0)
    set_workers(1)
    psql("CREATE SCHEMA mem;" + ADDRESS_DDL.format(s="mem") +
         "SELECT ecst.create_stream('address_mem', 'mem.address', 'entity_snapshot', '{\"addressId\": \"address_id\"}', "
         "state_path => 'addressContent', columns => '{\"addressLine1\": \"line1\"}', "
         "version => 'newState.addressContent.addressTS');")
    settle()
    pid = worker_pids()[0]
    base = proc_status(pid) or {}
    t0 = time.perf_counter()
    psql(f"\\copy ecst.inbox (stream, payload) FROM '{DATA}/memory.tsv'\n")
    t_copy = time.perf_counter()
    t_end, peaks = wait_drained(t0, n, sample_memory=True, interval=0.5)
    after = proc_status(worker_pids()[0]) or {}
    total = t_end - t0
    notes = (f"peak RssAnon {peaks.get('RssAnon', 0):.1f} MB (idle before: {base.get('RssAnon', 0):.1f}, "
             f"after: {after.get('RssAnon', 0):.1f}), peak VmHWM {peaks.get('VmHWM', 0):.0f} MB, "
             f"peak RssShmem {peaks.get('RssShmem', 0):.0f} MB; COPY {t_copy - t0:.1f} s + drain {t_end - t_copy:.1f} s")
    if peaks.get("restarts"):
        notes += f"; WORKER RESTARTED {peaks['restarts']}×"
    result("memory", "C  pg_ecst, 1 worker, drain", total, n, None, None, notes)
    rows = int(q1("SELECT count(*) FROM mem.address"))
    st = stats("address_mem")
    check(f"memory: replica has the {meta['entities']:,} entities, nothing dead-lettered",
          rows == meta["entities"] and st["dead_lettered"] == 0 and not peaks.get("restarts"),
          f"({rows:,} rows, stats {st})")


def run_replay(scale, seed):
    """A new consumer replaying a topic from its beginning: 10 M entity snapshots over 2 M
    addresses COPYed into ecst.feed in one COPY (one transaction), with the defaults; events/s, and
    the COPY's backend's memory sampled while it runs."""
    n = round(10_000_000 * scale)
    log(f"workload replay: {n:,} entity_snapshot events through ecst.feed, one COPY")
    t0 = time.perf_counter()
    meta = gen_entity_snapshot(seed + 5, n, max(1, round(2_000_000 * scale)), "address_replay", f"{DATA}/replay.tsv")
    info(f"generated replay: {n:,} events, {meta['entities']:,} entities in {time.perf_counter() - t0:.1f} s")
    set_workers(0)
    psql("CREATE SCHEMA replay;" + ADDRESS_DDL.format(s="replay") +
         "SELECT ecst.create_stream('address_replay', 'replay.address', 'entity_snapshot', '{\"addressId\": \"address_id\"}', "
         "state_path => 'addressContent', columns => '{\"addressLine1\": \"line1\"}', "
         "version => 'newState.addressContent.addressTS');")
    settle()
    t0 = time.perf_counter()
    proc = subprocess.Popen(PSQL + ["-d", DB], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    proc.stdin.write("SET application_name = 'pg_ecst replay';\n"
                     f"\\copy ecst.feed (stream, payload) FROM '{DATA}/replay.tsv'\n")
    proc.stdin.close()
    pid, peaks = None, {}
    while proc.poll() is None:
        if pid is None:
            got = q1("SELECT pid FROM pg_stat_activity WHERE application_name = 'pg_ecst replay'")
            pid = int(got) if got else None
        status = proc_status(pid) if pid else None
        for k, v in (status or {}).items():
            peaks[k] = max(peaks.get(k, 0), v)
        time.sleep(0.5)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"replay COPY failed: {proc.stderr.read().strip()}")
    rows = int(q1("SELECT count(*) FROM replay.address"))
    st = stats("address_replay")
    notes = (f"one COPY of {n:,} events, {meta['entities']:,} entities; peak RssAnon {peaks.get('RssAnon', 0):.0f} MB, "
             f"peak VmHWM {peaks.get('VmHWM', 0):.0f} MB (shared buffers touched included); "
             f"ecst.feed_buffer = {q1('SHOW ecst.feed_buffer')}")
    result("replay", "D  ecst.feed, one COPY", total, n, None, None, notes)
    check(f"replay: replica has the {meta['entities']:,} entities, every event counted once",
          rows == meta["entities"] and st["applied"] + st["stale"] == n and st["dead_lettered"] == 0,
          f"({rows:,} rows, stats {st})")
    set_workers(1)


# ---------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description="pg_ecst benchmark")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--only", default=",".join(WORKLOADS),
                    help="comma-separated subset of: " + ",".join(WORKLOADS))
    ap.add_argument("--keep", action="store_true", help="leave the scratch server running")
    ap.add_argument("--perf", action="store_true",
                    help="profile the workers of every pg_ecst run with perf (reports in bench/out/perf)")
    ap.add_argument("--build", default="", help="(set by bench/run) how the extension was built")
    ap.add_argument("--contestants", default="",
                    help="run only these of the set workloads' contestants (e.g. A,B,D; default: all)")
    args = ap.parse_args()
    CONTESTANTS.update(c.strip() for c in args.contestants.split(",") if c.strip())
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = set(only) - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    if args.scale <= 0:
        ap.error("--scale must be positive")
    if args.perf:
        if not shutil.which("perf"):
            ap.error("--perf needs perf (Debian: apt-get install linux-perf)")
        global PERF_DIR
        PERF_DIR = f"{OUT}/perf"
        os.makedirs(PERF_DIR, exist_ok=True)

    so = os.path.join(subprocess.run([f"{PG_BIN}/pg_config", "--pkglibdir"], capture_output=True, text=True,
                                     check=True).stdout.strip(), "pg_ecst.so")
    so_mtime = os.path.getmtime(so) if os.path.exists(so) else None
    log(f"scratch server {DIR} port {PORT}: " + ", ".join(SETTINGS))
    start_cluster()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        os.makedirs(DATA, exist_ok=True)
        psql(f"CREATE DATABASE {DB};", db="postgres")
        psql("CREATE EXTENSION pg_ecst;")
        set_workers(1)
        version = q1("SELECT extversion FROM pg_extension WHERE extname = 'pg_ecst'")
        for name in ("entity_snapshot", "delta", "aggregate"):
            if name in only:
                meta = generate(name, args.scale, args.seed)
                run_set_workload(name, meta)
                # Keep the next workload's server small.
                psql("DROP SCHEMA IF EXISTS a, b, c1, c2, c1r, d, cs, ce, cer CASCADE;")
        if "snapshot_load" in only:
            run_snapshot_load(args.scale, args.seed)
        if "percall" in only:
            run_percall(args.scale, args.seed)
        if "latency" in only:
            run_latency()
        if "memory" in only:
            run_memory(args.scale, args.seed)
        if "replay" in only:
            run_replay(args.scale, args.seed)
    except BenchError as e:
        if RESULTS:
            print("\nresults so far (INCOMPLETE run):\n" + table(), file=sys.stderr)
        print(f"\nbench failed: {e}\nserver log: {DIR}/server.log", file=sys.stderr)
        if so_mtime is not None and os.path.exists(so) and os.path.getmtime(so) != so_mtime:
            print(f"note: {so} was replaced during the run (a concurrent install?): a server that has it "
                  "loaded can die of SIGBUS; run again", file=sys.stderr)
        if not args.keep:
            stop_cluster()
        sys.exit(2)
    except BaseException:
        if not args.keep:
            stop_cluster()
        raise
    if not args.keep:
        stop_cluster()
    else:
        log(f"server left running: psql -h {DIR}/sock -p {PORT} -U postgres -d {DB}")

    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "src", "core", "sql"],
                           capture_output=True, text=True).stdout.strip()
    so_time = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(so))) if os.path.exists(so) else "?"
    verdict = "OK: every contestant produced the same replica" if not MISMATCHES else \
        "MISMATCH:\n" + "\n".join(f"- {m}" for m in MISMATCHES)
    if WARNINGS:
        verdict += "\n\nWarnings (bookkeeping, not failing the run):\n" + "\n".join(f"- {w}" for w in WARNINGS)
    header = (f"# pg_ecst benchmark\n\n{started}, scale {args.scale:g}, seed {args.seed}, "
              f"{os.cpu_count()} CPUs; pg_ecst {version} at {commit}{' + uncommitted changes' if dirty else ''}, "
              f"{args.build or 'installed build'} (pg_ecst.so of {so_time})\n\n"
              f"Server: {', '.join(SETTINGS)}\n\n"
              "×A / ×B: seconds relative to A (COPY of the final rows) and B (hand-written SQL total; "
              "for percall the PL/pgSQL function). events/s: input events per second.\n\n")
    text = header + table() + "\n\n" + verdict + "\n"
    os.makedirs(OUT, exist_ok=True)
    with open(f"{OUT}/results.md", "w") as f:
        f.write(text)
    print()
    print(table())
    print()
    print(verdict)
    print(f"(written to {OUT}/results.md)")
    sys.exit(1 if MISMATCHES else 0)


if __name__ == "__main__":
    main()
