#!/usr/bin/env bash
# From an AsyncAPI contract to replicas, as the guide (docs/guides/asyncapi.md) does it: the
# fixture document's plan runs in a fresh database with psql's \gexec, and the streams it creates
# take events through the inbox and the worker: events shaped as the document says apply, events
# that break it are schema_violation dead letters naming each path.
cd "$(dirname "$0")/../.."
. scripts/lib.sh
. tests/integration/common.sh
IT_DIR=/tmp/pg_ecst-it-asyncapi IT_PORT=54343
it_start "ecst.workers = 1" "ecst.naptime = 200"

psql_it -d postgres -c "CREATE DATABASE contracts" >/dev/null
q() { psql_it -d contracts -c "$1"; }
q "CREATE EXTENSION pg_ecst" >/dev/null

check "the plan: three messages, three shapes" \
    "FineGrained|delta|addressId,FineGrainedSnapshots|entity_snapshot|addressId,Snapshots|aggregate_snapshot|customerId" \
    "$(psql_it -d contracts -v doc="$(cat "$FIXTURES/asyncapi.json")" <<'SQL'
SELECT string_agg(concat_ws('|', message, shape, key), ',') FROM ecst.asyncapi_plan(:'doc', 'addressChanged')
SQL
)"
psql_it -d contracts -v doc="$(cat "$FIXTURES/asyncapi.json")" >/dev/null <<'SQL'
SELECT sql FROM ecst.asyncapi_plan(:'doc') \gexec
SQL
check "its SQL, run with \\gexec, created the tables and the streams" \
    "fine_grained:delta,fine_grained_snapshots:entity_snapshot,snapshots:aggregate_snapshot|snapshots_addresses" \
    "$(q "SELECT string_agg(name || ':' || shape, ',' ORDER BY name) || '|' ||
             (SELECT string_agg(target::text, ',') FROM ecst.stream_children) FROM ecst.streams")"
check "the tables carry the messages' descriptions" \
    "Snapshot ESCT pattern, notice the \`customerId\` in the root, and \`addressId\` in the state" \
    "$(q "SELECT obj_description('snapshots'::regclass, 'pg_class')")"

# The fixture events as the note wrote them (states under addressContent), and shaped as the
# document says (states directly under oldState/newState); then events that break the contract.
python3 - "$IT_DIR" "$FIXTURES" <<'PY'
import csv, json, sys
d, fx = sys.argv[1], sys.argv[2]
load = lambda f: json.load(open(f"{fx}/{f}"))
def unwrapped(e):
    for s in ("oldState", "newState"):
        if isinstance(e.get(s), dict) and "addressContent" in e[s]:
            e[s] = e[s]["addressContent"]
    return e
rows = [
    ("fine_grained", load("fine_grained_delta.json")),
    ("fine_grained_snapshots", load("fine_grained_snapshot.json")),
    ("snapshots", load("aggregate_snapshot.json")),
    ("fine_grained_snapshots", unwrapped(load("fine_grained_snapshot.json"))),
]
agg = unwrapped(load("aggregate_snapshot.json"))
for i, a in enumerate(agg["newState"]["addresses"]):
    a["addressId"] = f"a{i}"
rows.append(("snapshots", agg))
rows.append(("fine_grained_snapshots", {"addressId": "77", "newState": {"addressPurpose": "home", "addressLine1": "1 Main St", "addressTS": 3}}))
rows.append(("fine_grained_snapshots", {"addressId": 78, "newState": {"addressPurpose": "home", "addressLine1": "1 Main St", "addressLine2": "x", "addressTS": "soon"}}))
rows.append(("fine_grained", {"addressId": "79", "newState": {"addressLine1": ["not", "a", "string"]}}))
with open(f"{d}/events.csv", "w", newline="") as f:
    w = csv.writer(f)
    for stream, event in rows:
        w.writerow([stream, json.dumps(event)])
PY
as_root chmod a+r "$IT_DIR/events.csv"
q "\\copy ecst.inbox (stream, payload) FROM '$IT_DIR/events.csv' WITH (FORMAT csv)"
wait_for contracts "the worker drains the inbox" "SELECT count(*) FROM ecst.inbox" 0 60

check "the delta applied" "12366|48 Baker Street" \
    "$(q "SELECT concat_ws('|', address_id, address_line1, address_purpose) FROM fine_grained")"
check "the snapshot shaped as the document says applied" "12366|billing|48 Baker Street|London, UK, E1 7AE|1572134205" \
    "$(q "SELECT concat_ws('|', address_id, address_purpose, address_line1, address_line2, address_ts) FROM fine_grained_snapshots")"
check "the aggregate applied with its four children" "911000100|4" \
    "$(q "SELECT customer_id || '|' || (SELECT count(*) FROM snapshots_addresses) FROM snapshots")"
check "every other event is a schema_violation dead letter" \
    "fine_grained:1,fine_grained_snapshots:3,snapshots:1" \
    "$(q "SELECT string_agg(stream || ':' || n, ',' ORDER BY stream) FROM (SELECT stream, count(*) n FROM ecst.dead_letters WHERE error_code = 'schema_violation' GROUP BY 1) d")"
check "no other dead letters" 0 "$(q "SELECT count(*) FROM ecst.dead_letters WHERE error_code <> 'schema_violation'")"
check "the note's wrapped snapshot: the contract names what is missing" 1 \
    "$(q "SELECT count(*) FROM ecst.dead_letters WHERE payload LIKE '%addressContent%' AND stream = 'fine_grained_snapshots'
          AND message LIKE '%(8 violations)%' AND message LIKE '%newState.addressPurpose: required, missing%'
          AND message LIKE '%; and 3 more'")"
check "a missing required field is named by its path" \
    "the event does not match the stream's schema (1 violation): newState.addressLine2: required, missing" \
    "$(q "SELECT message FROM ecst.dead_letters WHERE payload LIKE '%\"77\"%'")"
check "type errors are named by their paths" \
    "the event does not match the stream's schema (2 violations): addressId: 78 is not of type \"string\"; newState.addressTS: \"soon\" is not of type \"number\"" \
    "$(q "SELECT message FROM ecst.dead_letters WHERE payload LIKE '%\"soon\"%'")"
check "the payloads are kept verbatim" 1 \
    "$(q "SELECT count(*) FROM ecst.dead_letters WHERE payload = '{\"addressId\": \"79\", \"newState\": {\"addressLine1\": [\"not\", \"a\", \"string\"]}}'")"
check "nothing of the violating events was written" "0|0" \
    "$(q "SELECT (SELECT count(*) FROM fine_grained_snapshots WHERE address_id IN ('77', '78')) || '|' || (SELECT count(*) FROM fine_grained WHERE address_id = '79')")"
check "ecst.stats counts them" "1|3|1" \
    "$(q "SELECT string_agg(dead_lettered::text, '|' ORDER BY stream) FROM ecst.stats")"
check "no worker failed" 0 "$(failed_workers)"
it_done
