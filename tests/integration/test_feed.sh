#!/usr/bin/env bash
# ecst.feed against a running server: COPY ... FROM STDIN applies within the COPY's transaction
# (text and CSV, malformed lines mixed in, the command tag counting every line), a rolled-back
# COPY leaves nothing, memory stays bounded by ecst.feed_buffer on a COPY far larger than it,
# every shape, and COPYs into the feed running beside the worker and each other on the same
# entities converge on the replica that applying every event in version order gives.
cd "$(dirname "$0")/../.."
. scripts/lib.sh
. tests/integration/common.sh
IT_DIR=/tmp/pg_ecst-it-feed IT_PORT=54344
it_start "ecst.database = 'ecst_feed'" "ecst.naptime = 200" "ecst.batch_size = 500" "shared_buffers = 16MB"
gen() { python3 tests/integration/gen_events.py "$@"; }
work=$IT_DIR/work
mkdir -p "$work"
DB=ecst_feed
q() { psql_it -d $DB -c "$1"; }
copy() { psql -X -h "$IT_DIR/sock" -p "$IT_PORT" -U postgres -d $DB -v ON_ERROR_STOP=1 "$@"; }

psql_it -d postgres -c "CREATE DATABASE $DB"
psql_it -d $DB >/dev/null <<'SQL'
CREATE EXTENSION pg_ecst;
CREATE TABLE snap (id text PRIMARY KEY, line1 text);
SELECT ecst.create_stream('snap', 'snap', 'entity_snapshot', '{"id": "id"}', version => 'ts');
CREATE TABLE delt (id text PRIMARY KEY, a text, b text);
SELECT ecst.create_stream('delt', 'delt', 'delta', '{"id": "id"}');
CREATE TABLE cust (customer_id text PRIMARY KEY, name text);
CREATE TABLE cust_addr (customer_id text NOT NULL, address_id text NOT NULL, line1 text, PRIMARY KEY (customer_id, address_id));
SELECT ecst.create_stream('cust', 'cust', 'aggregate_snapshot', '{"customerId": "customer_id"}', version => 'v',
    children => '{"addresses": {"path": "addresses", "table": "cust_addr", "key": {"addressId": "address_id"},
                  "parent_key": "customer_id", "columns": {"addressLine1": "line1"}}}');
CREATE TABLE big (id text PRIMARY KEY, line1 text);
SELECT ecst.create_stream('big', 'big', 'entity_snapshot', '{"id": "id"}', version => 'ts');
CREATE TABLE conv (id text PRIMARY KEY, line1 text);
SELECT ecst.create_stream('conv', 'conv', 'entity_snapshot', '{"id": "id"}', version => 'ts');
CREATE TABLE expected (id text PRIMARY KEY, x text, y text);
SQL

echo "-- COPY (text format) with malformed lines"
gen --shape snapshot --stream snap --entities 2000 --events 20000 --bad 25 --seed 7 \
    --out "$work/snap.tsv" --expected "$work/snap.csv" --bad-out "$work/snap.bad"
check "the COPY's command tag counts every line, malformed ones too" "COPY 20025" \
    "$(copy -c "\\copy ecst.feed (stream, payload) FROM '$work/snap.tsv'")"
check "the replica is up to date when the COPY returns: highest version per entity" 0 \
    "$(compare snap "$work/snap.csv" "id, line1, ''")"
check "every malformed line is a dead letter, none aborted the COPY" 25 \
    "$(q "SELECT count(*) FROM ecst.dead_letters WHERE stream = 'snap'")"
check "malformed lines kept verbatim" 0 "$(psql_it -d $DB -c "CREATE TEMP TABLE bad (payload text)" -c "\\copy bad FROM '$work/snap.bad' WITH (FORMAT csv, DELIMITER E'\\x01', QUOTE E'\\x02')" -c "SELECT count(*) FROM (SELECT payload FROM bad EXCEPT SELECT payload FROM ecst.dead_letters) d" | tail -1)"
check "stats count every event once" "20000|25" \
    "$(q "SELECT (applied + stale) || '|' || dead_lettered FROM ecst.stats WHERE stream = 'snap'")"
check "nothing is stored in the inbox" 0 "$(q "SELECT count(*) FROM ecst.inbox")"

echo "-- CSV, deltas in row order, aggregates"
gen --shape delta --stream delt --entities 300 --events 6000 --seed 3 --out "$work/delt.tsv" --expected "$work/delt.csv"
python3 - "$work" <<'PY'
import csv, json, sys
d = sys.argv[1]
with open(f"{d}/delt.tsv") as src, open(f"{d}/delt.csv.in", "w", newline="") as dst:
    w = csv.writer(dst)
    for line in src:
        s, p = line.rstrip("\n").split("\t", 1)
        w.writerow([s, p])
with open(f"{d}/cust.csv.in", "w", newline="") as f:
    w = csv.writer(f)
    for v in range(1, 6):
        for c in range(50):
            addrs = [{"addressId": f"a{i}", "addressLine1": f"{c}/{i} at v{v}"} for i in range(v % 3 + 1)]
            w.writerow(["cust", json.dumps({"customerId": f"c{c}", "v": v, "newState": {"name": f"n{c}", "addresses": addrs}})])
PY
check "CSV COPY of 6000 deltas" "COPY 6000" "$(copy -c "\\copy ecst.feed (stream, payload) FROM '$work/delt.csv.in' WITH (FORMAT csv)")"
check "deltas: the last value fed per field, in row order" 0 "$(compare delt "$work/delt.csv" "id, coalesce(a, ''), coalesce(b, '')")"
check "aggregates: COPY of 250 snapshots" "COPY 250" "$(copy -c "\\copy ecst.feed (stream, payload) FROM '$work/cust.csv.in' WITH (FORMAT csv)")"
check "aggregates: the newest snapshot's children" "50|150|7/2 at v5" \
    "$(q "SELECT (SELECT count(*) FROM cust) || '|' || (SELECT count(*) FROM cust_addr) || '|' || (SELECT line1 FROM cust_addr WHERE customer_id = 'c7' AND address_id = 'a2')")"

echo "-- a rolled-back COPY leaves nothing"
before=$(q "SELECT count(*) FROM snap")
letters=$(q "SELECT count(*) FROM ecst.dead_letters")
copy -q >/dev/null <<SQL
BEGIN;
\\copy ecst.feed (stream, payload) FROM '$work/snap.tsv'
ROLLBACK;
SQL
check "no replica row and no dead letter from a rolled-back COPY" "$before|$letters|20000" \
    "$(q "SELECT (SELECT count(*) FROM snap) || '|' || (SELECT count(*) FROM ecst.dead_letters) || '|' || (SELECT applied + stale FROM ecst.stats WHERE stream = 'snap')")"
check "a COPY that fails on a broken line of its own input leaves nothing" "ERROR" \
    "$(printf 'big\t{"id": "x", "ts": 1, "newState": {"line1": "a"}}\nnot-enough-columns\n' | copy -c "COPY ecst.feed (stream, payload) FROM STDIN" 2>&1 | grep -o '^ERROR' | head -1)"
check "... not even its good lines" 0 "$(q "SELECT count(*) FROM big")"

echo "-- memory stays bounded by ecst.feed_buffer, whatever the COPY's size"
python3 - "$work" <<'PY'
import sys
d = sys.argv[1]
for name, n in (("small", 150_000), ("big", 600_000)):
    with open(f"{d}/{name}.tsv", "w") as f:
        for i in range(n):
            f.write(f'big\t{{"id": "{name}{i}", "ts": {i}, "newState": {{"line1": "{i:08d} {"y" * 150}"}}}}\n')
PY
peak_of() {
    copy -q -t -A <<SQL
SET ecst.feed_buffer = '1MB';
\\copy ecst.feed (stream, payload) FROM '$work/$1.tsv'
SELECT substring(pg_read_file('/proc/self/status') from 'VmHWM:\\s+(\\d+)')::int / 1024;
SQL
}
small_mb=$(( $(stat -c %s "$work/small.tsv") / 1048576 )) big_mb=$(( $(stat -c %s "$work/big.tsv") / 1048576 ))
small_peak=$(peak_of small)
big_peak=$(peak_of big)
check "COPYs of ${small_mb} MB and ${big_mb} MB applied all their events" 750000 "$(q "SELECT count(*) FROM big")"
check "a backend's peak memory does not grow with the COPY (${small_peak} MB for ${small_mb} MB, ${big_peak} MB for ${big_mb} MB)" 1 \
    "$([ "$big_peak" -lt $((small_peak + 16)) ] && echo 1 || echo 0)"
check "... and stays well below the COPY's size" 1 "$([ "$big_peak" -lt $((big_mb * 3 / 4)) ] && echo 1 || echo 0)"

echo "-- the feed beside the worker and another feed, on the same entities"
gen --shape snapshot --stream conv --entities 3000 --events 60000 --seed 11 --out "$work/conv.tsv" --expected "$work/conv.csv"
split -n l/3 -d "$work/conv.tsv" "$work/conv.part"
copy -c "\\copy ecst.inbox (stream, payload) FROM '$work/conv.part00'" >/dev/null &
copy -c "\\copy ecst.feed (stream, payload) FROM '$work/conv.part01'" >/dev/null &
copy -c "\\copy ecst.feed (stream, payload) FROM '$work/conv.part02'" >/dev/null &
wait
wait_for $DB "the worker drains its part" "SELECT count(*) FROM ecst.inbox" 0 120
check "the replica equals applying every event in version order" 0 "$(compare conv "$work/conv.csv" "id, line1, ''")"
check "every event counted once, none dead-lettered" "60000|0" \
    "$(q "SELECT (applied + stale) || '|' || dead_lettered FROM ecst.stats WHERE stream = 'conv'")"
check "no worker failed" 0 "$(failed_workers)"
it_done
