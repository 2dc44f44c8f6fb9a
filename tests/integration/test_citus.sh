#!/usr/bin/env bash
# pg_ecst on a Citus cluster (a coordinator and two workers on this machine), when Citus can be
# built: CITUS_SRC names a Citus source release (.ci/run points it at the copy beside the clone);
# without it this test is skipped with one line. Runs with PostgreSQL $CITUS_MAJOR only.
# Checks: ./scripts/citus-demo runs; the three fixture shapes apply through the coordinator into
# distributed replicas whose rows live on the workers; create_stream refuses child tables that
# are not co-located with their aggregate by the aggregate's key, naming the fix.
cd "$(dirname "$0")/../.."
. scripts/lib.sh
if [ -z "${CITUS_SRC:-}" ]; then
    echo "  skip the Citus tests: CITUS_SRC is not set (a Citus source release, citus-<version>.tar.gz)"
    exit 0
fi
if [ "${PG_MAJOR:-$DEFAULT_MAJOR}" != "$CITUS_MAJOR" ]; then
    echo "  skip the Citus tests here: they run with PostgreSQL $CITUS_MAJOR"
    exit 0
fi
. tests/integration/common.sh
use_citus citus
install_extension
# The cluster's nodes live in $CLUSTER/<node>; common.sh's helpers (psql_it, compare, wait_for,
# it_done) talk to the coordinator.
CLUSTER=/tmp/pg_ecst-it-citus IT_PORT=54350 DB=cit
IT_DIR=$CLUSTER/coordinator
DEMO_DIR=/tmp/pg_ecst-it-citus-demo DEMO_PORT=54355
cleanup() {
    stop_citus_cluster "$CLUSTER"
    stop_citus_cluster "$DEMO_DIR"
    as_root rm -rf "$CLUSTER" "$DEMO_DIR"
}
# KEEP=1 leaves the cluster running (for a look after a failure).
[ -n "${KEEP:-}" ] || trap cleanup EXIT

echo "-- ./scripts/citus-demo"
out=$(CITUS_DEMO_DIR=$DEMO_DIR CITUS_DEMO_PORT=$DEMO_PORT ./scripts/citus-demo 2>&1) || { echo "$out"; }
check "the demo applies the fixture snapshot, then sees it as a duplicate" "applied|duplicate" \
    "$(grep -A2 '^ *first *| *second' <<<"$out" | tail -1 | tr -d ' ')"
check "the demo's delta changes line1 only" "12366|billing|48 Baker Street|London, UK, E1 7AE" \
    "$(grep -E '^ *12366 *\| *billing' <<<"$out" | tail -1 | sed 's/ *| */|/g; s/^ *//; s/ *$//')"
stop_citus_cluster "$DEMO_DIR"

echo "-- a cluster of three nodes"
start_citus_cluster "$CLUSTER" "$IT_PORT" "ecst.database = '$DB'" "ecst.workers = 1" "ecst.naptime = 100" \
    "track_functions = 'all'"
citus_database "$CLUSTER" "$IT_PORT" "$DB"
q() { psql_it -d "$DB" -c "$1"; }
# on NODE [ROLE] SQL: a query on node worker1 or worker2 (as ROLE).
on() {
    local node=$1 port=$((IT_PORT + ${1#worker})) role=postgres
    [ $# = 3 ] && { role=$2; shift; }
    psql -X -q -t -A -h "$CLUSTER/$node/sock" -p "$port" -U "$role" -d "$DB" -c "$2" 2>&1
}
fails() { psql_it -d "$DB" -v VERBOSITY=verbose -c "$1" 2>&1 \
    | sed -n 's/^ERROR: *\([0-9A-Z]\{5\}\): .*/\1/p; s/^HINT: *\(.*\)/\1/p' | paste -sd'|'; }
# replica NAME SHAPE PLACE COLUMNS [OPTIONS]: a table NAME (id text PRIMARY KEY, then COLUMNS,
# each with its leading comma) and, for an aggregate, NAME_item holding its "items" (keyed by
# itemId); distributed by id and co-located (PLACE distributed) or left local (PLACE local); and the
# stream NAME over them, keyed by id, with OPTIONS (more create_stream arguments, each with its
# leading comma).
replica() {
    local name=$1 shape=$2 place=$3 columns=$4 options=${5:-}
    q "CREATE TABLE $name (id text PRIMARY KEY$columns)" >/dev/null
    if [ "$shape" = aggregate_snapshot ]; then
        q "CREATE TABLE ${name}_item (id text NOT NULL, item_id text NOT NULL, line1 text, PRIMARY KEY (id, item_id))" >/dev/null
        options="$options, children => '{\"items\": {\"path\": \"items\", \"table\": \"${name}_item\", \"key\": {\"itemId\": \"item_id\"}, \"parent_key\": \"id\"}}'"
    fi
    if [ "$place" = distributed ]; then
        q "SELECT create_distributed_table('$name', 'id')" >/dev/null
        if [ "$shape" = aggregate_snapshot ]; then
            q "SELECT create_distributed_table('${name}_item', 'id', colocate_with => '$name')" >/dev/null
        fi
    fi
    q "SELECT ecst.create_stream('$name', '$name', '$shape', '{\"id\": \"id\"}'$options)" >/dev/null
}
# to_inbox NAME DESCRIPTION: the events of $work/NAME.tsv into the inbox; waits for it to drain.
to_inbox() {
    psql_it -d "$DB" -c "\\copy ecst.inbox (stream, payload) FROM '$work/$1.tsv'" >/dev/null
    wait_for "$DB" "$2" "SELECT count(*) FROM ecst.inbox" 0 120
}
check "two workers in the coordinator's metadata" "2" "$(q "SELECT count(*) FROM pg_dist_node WHERE noderole = 'primary' AND groupid > 0")"

q "CREATE TABLE customer (customer_id text PRIMARY KEY)" >/dev/null
q "SELECT create_distributed_table('customer', 'customer_id')" >/dev/null
children='{"addresses": {"path": "addressContent.addresses", "table": "%s", "key": {"addressId": "address_id"},
           "parent_key": "customer_id", "columns": {"addressLine1": "line1"}}}'
child_ddl="(customer_id text NOT NULL, address_id text NOT NULL, address_purpose text, line1 text,
            address_line2 text, address_ts bigint, PRIMARY KEY (customer_id, address_id))"
stream() { printf "SELECT ecst.create_stream('customer', 'customer', 'aggregate_snapshot', key => '{\"customerId\": \"customer_id\"}', children => '$children')" "$1"; }

echo "-- create_stream: child tables must be co-located with the aggregate, by its key"
q "CREATE TABLE local_child $child_ddl" >/dev/null
check "a local child of a distributed aggregate: refused (42P16), with the fix" \
    "42P16|Distribute it with the aggregate's table: SELECT create_distributed_table('public.local_child', 'customer_id', colocate_with => 'public.customer');" \
    "$(fails "$(stream local_child)")"
q "CREATE TABLE other_shards $child_ddl" >/dev/null
q "SELECT create_distributed_table('other_shards', 'customer_id', shard_count => 7)" >/dev/null
check "a child in another co-location group: refused" "42P16" "$(fails "$(stream other_shards)" | cut -d'|' -f1)"
q "CREATE TABLE by_address $child_ddl" >/dev/null
q "SELECT create_distributed_table('by_address', 'address_id', colocate_with => 'customer')" >/dev/null
check "a child distributed by its own key: refused" "42P16" "$(fails "$(stream by_address)" | cut -d'|' -f1)"
q "CREATE TABLE customer_address $child_ddl" >/dev/null
q "SELECT create_distributed_table('customer_address', 'customer_id', colocate_with => 'customer')" >/dev/null
check "a co-located child: accepted" "" "$(fails "$(stream customer_address)")"

echo "-- the fixture shapes through the coordinator"
q "CREATE TABLE address (address_id text PRIMARY KEY, address_purpose text, line1 text, address_line2 text, address_ts bigint)" >/dev/null
q "SELECT create_distributed_table('address', 'address_id')" >/dev/null
q "SELECT ecst.create_stream('address', 'address', 'entity_snapshot', '{\"addressId\": \"address_id\"}',
       state_path => 'addressContent', columns => '{\"addressLine1\": \"line1\"}',
       version => 'newState.addressContent.addressTS')" >/dev/null
snapshot=$(cat "$FIXTURES/fine_grained_snapshot.json")
check "a snapshot applies, then is a duplicate" "applied|duplicate" \
    "$(psql_it -d "$DB" -v e="$snapshot" <<<"SELECT ecst.apply('address', :'e'), ecst.apply('address', :'e')")"
check "its row is stored on a worker, in the shard of its key" "1" \
    "$(q "SELECT count(*) FROM run_command_on_placements('address', \$\$SELECT count(*) FROM %s WHERE address_id = '12366'\$\$) p
              JOIN pg_dist_shard_placement USING (shardid) WHERE p.result = '1'
              AND pg_dist_shard_placement.nodeport IN ($((IT_PORT + 1)), $((IT_PORT + 2)))")"
check "an older snapshot of it is stale" "stale" \
    "$(q "SELECT ecst.apply('address', '{\"addressId\": \"12366\", \"newState\": {\"addressContent\": {\"addressLine1\": \"old\", \"addressTS\": 1}}}')")"
q "SELECT ecst.apply('customer', '{\"customerId\": \"c1\", \"newState\": {\"addressContent\": {\"addresses\": [
      {\"addressId\": \"a1\", \"addressLine1\": \"one\"}, {\"addressId\": \"a2\", \"addressLine1\": \"two\"}]}}}')" >/dev/null
q "SELECT ecst.apply('customer', '{\"customerId\": \"c1\", \"newState\": {\"addressContent\": {\"addresses\": [
      {\"addressId\": \"a2\", \"addressLine1\": \"two, moved\"}]}}}')" >/dev/null
check "an aggregate's second snapshot replaces its children" "a2:two, moved" \
    "$(q "SELECT string_agg(address_id || ':' || line1, ',') FROM customer_address WHERE customer_id = 'c1'")"
check "ecst.stats counts on the coordinator" "address:1:1:1,customer:2:0:0" \
    "$(q "SELECT string_agg(stream || ':' || applied || ':' || duplicate || ':' || stale, ',' ORDER BY stream) FROM ecst.stats")"
echo "-- a trigger on a distributed table fires on the workers, where no stream is defined"
q "CREATE TABLE events (id bigserial, k text, payload jsonb, PRIMARY KEY (k, id))" >/dev/null
q "SELECT create_distributed_table('events', 'k')" >/dev/null
psql_it -d "$DB" -c "SET citus.enable_unsafe_triggers = on" \
    -c "CREATE TRIGGER apply AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION ecst.apply_trigger('address')" >/dev/null
check "an insert there fails (42704), saying where streams are and what to do" \
    "42704|This is a Citus worker node, and pg_ecst's streams are defined on the coordinator: apply events there. A trigger on a distributed table runs here, on the shards' nodes: keep the table that receives events local to the coordinator, or send them to ecst.inbox or ecst.feed." \
    "$(fails "INSERT INTO events (k, payload) VALUES ('x', '{\"addressId\": \"x\"}')")"

on worker1 "INSERT INTO ecst.feed (stream, payload) VALUES ('address', '{\"addressId\": \"w\"}')" >/dev/null
check "events fed to a worker node are dead letters that say where streams are" \
    "unknown_stream|stream \"address\" does not exist: this is a Citus worker node, and pg_ecst's streams are defined on the coordinator" \
    "$(on worker1 "SELECT error_code || '|' || message FROM ecst.dead_letters")"
# The worker nodes run pg_ecst's workers too (the same settings): an event in a worker node's inbox.
on worker1 "INSERT INTO ecst.inbox (stream, payload) VALUES ('address', '{\"addressId\": \"w2\"}')" >/dev/null
for _ in $(seq 1 100); do [ "$(on worker1 "SELECT count(*) FROM ecst.inbox")" = 0 ] && break; sleep 0.1; done
check "... and so are events in a worker node's inbox" "2|1" \
    "$(on worker1 "SELECT count(*) FROM ecst.dead_letters WHERE message LIKE '%this is a Citus worker node%'")|$(on worker1 "SELECT count(*) FROM ecst.dead_letters WHERE payload LIKE '%w2%'")"

echo "-- a batch where an existing row keeps its newer version (row mode: the version in the replica row)"
replica item entity_snapshot distributed ", line1 text, ts bigint" ", version => 'newState.ts'"
batch() { q "SELECT string_agg(outcome || ':' || count, ',' ORDER BY outcome) FROM ecst.apply_batch('item', ARRAY[$1]::text[])"; }
check "shuffled, with a duplicate" "applied:4,duplicate:1,stale:1" "$(batch "'{\"id\": \"a\", \"newState\": {\"line1\": \"a2\", \"ts\": 2}}',
    '{\"id\": \"b\", \"newState\": {\"line1\": \"b1\", \"ts\": 1}}', '{\"id\": \"a\", \"newState\": {\"line1\": \"a1\", \"ts\": 1}}',
    '{\"id\": \"a\", \"newState\": {\"line1\": \"a2\", \"ts\": 2}}', '{\"id\": \"c\", \"newState\": {\"line1\": \"c5\", \"ts\": 5}}',
    '{\"id\": \"b\", \"newState\": {\"line1\": \"b3\", \"ts\": 3}}'")"
# The guarded upsert returns fewer rows than it was given (a's older event writes nothing): Citus
# counted the rows it routed, and SPI refused the statement (XX000) before the CTE around it.
check "an older event of an existing row among new ones" "applied:2,stale:1" "$(batch "'{\"id\": \"a\", \"newState\": {\"line1\": \"a1\", \"ts\": 1}}',
    '{\"id\": \"b\", \"newState\": {\"line1\": \"b9\", \"ts\": 9}}', '{\"id\": \"d\", \"newState\": {\"line1\": \"d1\", \"ts\": 1}}'")"
check "the replica" "a:a2:2,b:b9:9,c:c5:5,d:d1:1" "$(q "SELECT string_agg(id || ':' || line1 || ':' || ts, ',' ORDER BY id) FROM item")"

echo "-- shuffled events with duplicates through ecst.feed, into distributed replicas"
work=$CLUSTER/work
as_root mkdir -p "$work" && as_root chmod 777 "$work"
replica snap entity_snapshot distributed ", line1 text" ", version => 'ts'"
replica delt delta distributed ", a text, b text"
q "CREATE TABLE expected (id text PRIMARY KEY, x text, y text)" >/dev/null  # common.sh's compare
python3 tests/integration/gen_events.py --shape snapshot --stream snap --entities 500 --events 5000 --seed 3 \
    --out "$work/snap.tsv" --expected "$work/snap.csv"
python3 tests/integration/gen_events.py --shape delta --stream delt --entities 300 --events 3000 --seed 4 \
    --out "$work/delt.tsv" --expected "$work/delt.csv"
replica agg aggregate_snapshot distributed "" ", version => 'ts'"
python3 tests/integration/gen_events.py --shape aggregate --stream agg --entities 200 --events 2000 --seed 5 \
    --out "$work/agg.tsv" --expected "$work/agg.csv"
# Snapshots and aggregates twice (the second copy all duplicates or stale); deltas once (their
# order decides).
cat "$work/snap.tsv" "$work/snap.tsv" > "$work/snap2.tsv"
cat "$work/agg.tsv" "$work/agg.tsv" > "$work/agg2.tsv"
for f in snap2 delt agg2; do
    psql_it -d "$DB" -c "\\copy ecst.feed (stream, payload) FROM '$work/$f.tsv'" >/dev/null
done
check "entity snapshots: the replica equals in-order application" "0" "$(compare snap "$work/snap.csv" "id, coalesce(line1, ''), ''")"
check "deltas: the replica equals in-order application" "0" \
    "$(compare delt "$work/delt.csv" "id, coalesce(a, ''), coalesce(b, '')")"
check "aggregates: the child rows equal in-order application" "0" \
    "$(compare agg_item "$work/agg.csv" "id || ':' || item_id, coalesce(line1, ''), ''")"
check "every event counted once" "10000:3000:4000" \
    "$(q "SELECT sum(applied + duplicate + stale + skipped) FILTER (WHERE stream = 'snap') || ':' ||
              sum(applied + duplicate + stale + skipped) FILTER (WHERE stream = 'delt') || ':' ||
              sum(applied + duplicate + stale + skipped) FILTER (WHERE stream = 'agg') FROM ecst.stats")"

echo "-- every guarantee on distributed replicas: the same events into local tables give the same"
# Shuffled versioned snapshots with deletes, per-field versioned deltas, aggregates; event ids with
# redeliveries; malformed lines. Each into a distributed replica (d_*) and a local one (l_*) of
# the same coordinator, then snapshots out and back in, replace mode, compaction and rebuild.
stream_pair() {  # stream_pair NAME SHAPE COLUMNS: d_NAME distributed, l_NAME local
    replica "d_$1" "$2" distributed "$3" ", version => 'ts', event_id => 'eid', retain_events => true"
    replica "l_$1" "$2" local "$3" ", version => 'ts', event_id => 'eid', retain_events => true"
}
# same A B: how many rows of A and B differ.
same() { q "SELECT count(*) FROM ((TABLE $1 EXCEPT ALL TABLE $2) UNION ALL (TABLE $2 EXCEPT ALL TABLE $1)) d"; }
same_pair() {  # same_pair NAME: the distributed replica (and its child rows) against the local one
    local n
    n=$(same "d_$1" "l_$1")
    [ "$(q "SELECT to_regclass('d_$1_item') IS NOT NULL")" = t ] && n=$((n + $(same "d_$1_item" "l_$1_item")))
    echo "$n"
}
stream_pair snap entity_snapshot ", line1 text, note text"
stream_pair fld delta ", a text, b text"
stream_pair agg aggregate_snapshot ""
python3 tests/integration/gen_events.py --shape snapshot --stream s --entities 400 --events 4000 --seed 11 \
    --redeliver 0.1 --bad 3 --out "$work/g_snap.tsv" --expected "$work/g_snap.csv"
python3 tests/integration/gen_events.py --shape delta --versioned --stream s --entities 300 --events 3000 --seed 12 \
    --redeliver 0.1 --bad 3 --out "$work/g_fld.tsv" --expected "$work/g_fld.csv"
python3 tests/integration/gen_events.py --shape aggregate --stream s --entities 200 --events 2000 --seed 13 \
    --redeliver 0.1 --bad 3 --out "$work/g_agg.tsv" --expected "$work/g_agg.csv"
for name in snap fld agg; do
    for kind in d l; do
        sed "s/^s\t/${kind}_$name\t/" "$work/g_$name.tsv" > "$work/${kind}_$name.tsv"
        psql_it -d "$DB" -c "\\copy ecst.feed (stream, payload) FROM '$work/${kind}_$name.tsv'" >/dev/null
    done
done
stats() { q "SELECT applied || ':' || duplicate || ':' || stale || ':' || dead_lettered FROM ecst.stats WHERE stream = '$1'"; }
check "snapshots with deletes and redeliveries: the expected replica" "0" \
    "$(compare d_snap "$work/g_snap.csv" "id, coalesce(line1, ''), ''")"
check "per-field versioned deltas, shuffled: the expected replica" "0" \
    "$(compare d_fld "$work/g_fld.csv" "id, coalesce(a, ''), coalesce(b, '')")"
check "aggregates: the expected child rows" "0" \
    "$(compare d_agg_item "$work/g_agg.csv" "id || ':' || item_id, coalesce(line1, ''), ''")"
for name in snap fld agg; do
    check "$name: distributed and local replicas equal" "0" "$(same_pair $name)"
    check "$name: the same outcomes (applied:duplicate:stale:dead-lettered)" "$(stats l_$name)" "$(stats d_$name)"
done
check "redeliveries are duplicates by event id" "400" "$(q "SELECT duplicate FROM ecst.stats WHERE stream = 'd_snap'")"
check "the malformed lines are dead letters, and stay so when retried" "3|dead_lettered:3" \
    "$(q "SELECT count(*) FROM ecst.dead_letters WHERE stream = 'd_snap'")|$(q "SELECT string_agg(outcome || ':' || count, ',') FROM ecst.retry_dead_letters('d_snap')")"

echo "-- snapshots, replace mode, compaction and rebuild on distributed replicas"
for name in snap fld agg; do
    check "$name: export_snapshot gives the events of the local replica's export" "0" \
        "$(q "SELECT count(*) FROM ((SELECT * FROM ecst.export_snapshot('d_$name') EXCEPT ALL SELECT * FROM ecst.export_snapshot('l_$name'))
                  UNION ALL (SELECT * FROM ecst.export_snapshot('l_$name') EXCEPT ALL SELECT * FROM ecst.export_snapshot('d_$name'))) d")"
done
# Exported, then loaded into fresh distributed replicas: the same rows.
q "CREATE TABLE exp_snap AS SELECT e AS payload FROM ecst.export_snapshot('d_snap') e" >/dev/null
q "CREATE TABLE exp_agg AS SELECT e AS payload FROM ecst.export_snapshot('d_agg') e" >/dev/null
replica r_snap entity_snapshot distributed ", line1 text, note text" ", version => 'ts'"
replica r_agg aggregate_snapshot distributed "" ", version => 'ts'"
check "export, then load_snapshot into fresh distributed replicas: nothing dead-lettered" "0:0" \
    "$(q "SELECT dead_lettered FROM ecst.load_snapshot('r_snap', 'exp_snap')"):$(q "SELECT dead_lettered FROM ecst.load_snapshot('r_agg', 'exp_agg')")"
check "... the same rows" "0:0:0" "$(same r_snap d_snap):$(same r_agg d_agg):$(same r_agg_item d_agg_item)"
# Into empty replicas that take load_snapshot's bulk path on a local table (an unversioned stream,
# a stream whose version is a column of the replica): on a distributed one only Citus's own COPY
# reaches the shards, so the rows must be as visible as on the local table.
q "CREATE TABLE bulk_src AS SELECT jsonb_build_object('id', payload->>'id', 'newState',
       jsonb_build_object('line1', payload->'newState'->>'line1', 'ts', (payload->>'ts')::bigint)) AS payload FROM exp_snap" >/dev/null
for place in distributed local; do
    kind=${place:0:1}
    for mode in plain rowv; do
        replica "${kind}_bulk_$mode" entity_snapshot $place ", line1 text, ts bigint" \
            "$([ $mode = rowv ] && echo ", version => 'newState.ts'")"
        q "SELECT * FROM ecst.load_snapshot('${kind}_bulk_$mode', 'bulk_src')" >/dev/null
    done
done
n_exp=$(q "SELECT count(*) FROM exp_snap")
for mode in plain rowv; do
    check "load_snapshot into an empty distributed replica ($mode): every row visible, as on a local table" "$n_exp:0" \
        "$(q "SELECT count(*) FROM d_bulk_$mode"):$(same d_bulk_$mode l_bulk_$mode)"
done
# Replace mode with half of the export: the other half, not newer than as_of, is deleted.
q "CREATE TABLE half_snap AS SELECT payload FROM exp_snap WHERE payload->>'id' < 'e2'" >/dev/null
q "CREATE TABLE half_agg AS SELECT payload FROM exp_agg WHERE payload->>'id' < 'e15'" >/dev/null
replace() { q "SELECT loaded || ':' || stale || ':' || deleted FROM ecst.load_snapshot('$1', '$2', mode => 'replace', as_of => 100000)"; }
for name in snap agg; do
    got=$(replace d_$name half_$name)
    check "$name: replace mode deletes the same absentees as on a local table" "$(replace l_$name half_$name)" "$got"
    check "$name: ... some ($got: loaded, stale, deleted)" "t" "$([ "${got##*:}" -gt 0 ] && echo t)"
    check "$name: ... leaving the same replica" "0" "$(same_pair $name)"
done
for name in snap fld agg; do
    for kind in d l; do
        q "SELECT * FROM ecst.compact_events('${kind}_$name')" >/dev/null
        q "SELECT * FROM ecst.rebuild('${kind}_$name')" >/dev/null
    done
    check "$name: compaction and rebuild give the same replica on both" "0" "$(same_pair $name)"
done

echo "-- shuffled events through the inbox and the coordinator's worker"
replica snap_w entity_snapshot distributed ", line1 text" ", version => 'ts'"
python3 tests/integration/gen_events.py --shape snapshot --stream snap_w --entities 500 --events 8000 --seed 6 \
    --out "$work/snap_w.tsv" --expected "$work/snap_w.csv"
to_inbox snap_w "the worker drains the inbox"
check "the replica equals in-order application" "0" "$(compare snap_w "$work/snap_w.csv" "id, coalesce(line1, ''), ''")"
check "nothing dead-lettered" "0" "$(q "SELECT count(*) FROM ecst.dead_letters WHERE stream = 'snap_w'")"

echo "-- two workers on the coordinator: unversioned deltas, whose order per entity decides"
q "ALTER SYSTEM SET ecst.workers = 2" >/dev/null
q "SELECT pg_reload_conf()" >/dev/null
wait_for "$DB" "two workers run" "SELECT count(*) FROM ecst.workers WHERE backend_type = 'pg_ecst worker'" 2 60
replica delt_w delta distributed ", a text, b text"
python3 tests/integration/gen_events.py --shape delta --stream delt_w --entities 300 --events 12000 --seed 8 \
    --out "$work/delt_w.tsv" --expected "$work/delt_w.csv"
to_inbox delt_w "the two workers drain the inbox"
check "the replica equals in-order application" "0" \
    "$(compare delt_w "$work/delt_w.csv" "id, coalesce(a, ''), coalesce(b, '')")"
check "every event applied once, none dead-lettered" "12000|0|0" \
    "$(q "SELECT applied || '|' || duplicate || '|' || dead_lettered FROM ecst.stats WHERE stream = 'delt_w'")"


echo "-- the apply work on the shards' nodes; version state in the shard groups, moving with them"
sid() { q "SELECT id FROM ecst.streams WHERE name = '$1'"; }
check "a distributed replica's stream keeps its versions beside its rows, not on the coordinator" \
    "0|$(q "SELECT count(*) FROM ecst.entity_state WHERE stream_id = $(sid l_fld)")" \
    "$(q "SELECT count(*) FROM ecst.entity_state WHERE stream_id = $(sid d_fld)")|$(q "SELECT count(*) FROM ecst.entity_state_$(sid d_fld)")"
check "... in tables co-located with the replica (state, event ids, stage)" "3" \
    "$(q "SELECT count(*) FROM pg_dist_partition WHERE colocationid = (SELECT colocationid FROM pg_dist_partition WHERE logicalrelid = 'd_fld'::regclass) AND logicalrelid::text LIKE 'ecst.%\\_$(sid d_fld)'")"
check "... and so are its event ids" "$(q "SELECT count(*) FROM ecst.applied_events WHERE stream_id = $(sid l_snap)")" \
    "$(q "SELECT count(*) FROM ecst.applied_events_$(sid d_snap)")"
calls() {  # calls NODE: how often ecst._apply_shard ran there (function statistics arrive within seconds)
    local n
    for _ in $(seq 1 100); do
        n=$(on "$1" "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE funcname = '_apply_shard'")
        [ "$n" -gt 0 ] && break
        sleep 0.2
    done
    echo "$n"
}
check "both workers applied events (ecst._apply_shard ran on each)" "t|t" \
    "$([ "$(calls worker1)" -gt 0 ] && echo t)|$([ "$(calls worker2)" -gt 0 ] && echo t)"

# A shard group moves to the other worker between two halves of the events: its versions move
# with its rows, so the second half is decided against them (stale events stay stale).
replica mv entity_snapshot distributed ", line1 text, note text" ", version => 'ts', event_id => 'eid'"
replica mv_l entity_snapshot local ", line1 text, note text" ", version => 'ts', event_id => 'eid'"
python3 tests/integration/gen_events.py --shape snapshot --stream s --entities 300 --events 3000 --seed 21 \
    --redeliver 0.1 --out "$work/mv_all.tsv" --expected "$work/mv.csv"
head -n 1650 "$work/mv_all.tsv" > "$work/half_1.tsv"; tail -n +1651 "$work/mv_all.tsv" > "$work/half_2.tsv"
feed_half() {
    for t in mv mv_l; do
        sed "s/^s\t/$t\t/" "$work/half_$1.tsv" > "$work/${t}_$1.tsv"
        psql_it -d "$DB" -c "\\copy ecst.feed (stream, payload) FROM '$work/${t}_$1.tsv'" >/dev/null
    done
}
feed_half 1
read -r shard from < <(q "SELECT shardid, nodeport FROM citus_shards WHERE table_name = 'mv'::regclass AND shard_size >= 0
                          ORDER BY shardid LIMIT 1" | tr '|' ' ')
to=$((from == IT_PORT + 1 ? IT_PORT + 2 : IT_PORT + 1))
state_shard() { q "SELECT s.nodeport || ':' || s.shardid FROM citus_shards s JOIN pg_dist_shard d ON d.shardid = s.shardid
                   WHERE s.table_name = 'ecst.entity_state_$(sid mv)'::regclass
                     AND d.shardminvalue = (SELECT shardminvalue FROM pg_dist_shard WHERE shardid = $shard)"; }
before=$(state_shard)
node_of() { [ "$1" = $((IT_PORT + 1)) ] && echo worker1 || echo worker2; }
q "SELECT citus_move_shard_placement($shard, '$CLUSTER/$(node_of "$from")/sock', $from, '$CLUSTER/$(node_of "$to")/sock', $to,
       shard_transfer_mode => 'block_writes')" >/dev/null
check "the replica's shard moved, and its shard of version state with it" "$from -> $to" \
    "${before%%:*} -> $(state_shard | cut -d: -f1)"
feed_half 2
check "events after the move: the replica equals in-order application" "0" "$(compare mv "$work/mv.csv" "id, coalesce(line1, ''), ''")"
check "... and the local replica fed the same" "0" "$(same mv mv_l)"
check "... with the same outcomes" "$(stats mv_l)" "$(stats mv)"

# Nothing a caller passes decides what a node applies: the definition is the node's copy, the
# caller's privileges on the shards are checked, and rows committed into a stage table by hand are
# thrown away unapplied.
q "CREATE ROLE applier LOGIN" >/dev/null
q "CREATE ROLE intruder LOGIN" >/dev/null
q "GRANT SELECT, INSERT, UPDATE, DELETE ON mv TO applier" >/dev/null
check "a role with the privileges on the replica applies through the nodes" "applied" \
    "$(psql -X -q -t -A -h "$CLUSTER/coordinator/sock" -p "$IT_PORT" -U applier -d "$DB" \
        -c "SELECT ecst.apply('mv', '{\"id\": \"by_applier\", \"ts\": 1, \"eid\": \"e-applier\", \"newState\": {\"line1\": \"x\"}}')" 2>&1)"
stage_oid=$(on worker1 "SET citus.override_table_visibility = off;
    SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = 'ecst' AND c.relname LIKE 'stage\\_$(sid mv)\\_%' LIMIT 1")
check "a role without privileges on the replica cannot apply on a node by hand (42501)" "42501" \
    "$(psql -X -q -t -A -h "$CLUSTER/worker1/sock" -p $((IT_PORT + 1)) -U intruder -d "$DB" -v VERBOSITY=verbose \
        -c "SET citus.override_table_visibility = off" -c "SELECT ecst._apply_shard($(sid mv), $stage_oid, 'guess', 'caller')" 2>&1 \
        | sed -n 's/^ERROR: *\([0-9A-Z]\{5\}\):.*/\1/p')"
psql -X -q -h "$CLUSTER/coordinator/sock" -p "$IT_PORT" -U intruder -d "$DB" \
    -c "INSERT INTO ecst.stage_$(sid mv) (dist, token, seq, payload) SELECT 'e' || i, 'guess', i, '{\"id\": \"e' || i || '\", \"ts\": 99999999, \"newState\": {\"line1\": \"forged\"}}' FROM generate_series(0, 299) i" >/dev/null
q "SELECT ecst.apply_batch('mv', ARRAY(SELECT '{\"id\": \"e' || i || '\", \"ts\": 0, \"newState\": {\"line1\": \"old\"}}' FROM generate_series(0, 299) i))" >/dev/null
check "rows committed into a stage table by hand are removed, never applied" "0|0" \
    "$(q "SELECT count(*) FROM ecst.stage_$(sid mv)")|$(q "SELECT count(*) FROM mv WHERE line1 IN ('forged', 'old')")"

# A role that owns its replicas but is not the extension's owner: on the coordinator, Citus reaches
# the shards through the role's own connections, so pg_ecst's statements on a distributed stream's
# tables run as that role too (row security lets it reach only its streams' rows). Every
# operation, and an apply and an export in one transaction, against a local twin.
q "CREATE ROLE tenant LOGIN" >/dev/null
for kind in d l; do
    q "CREATE TABLE t_$kind (id text PRIMARY KEY, line1 text, note text)" >/dev/null
    [ $kind = d ] && q "SELECT create_distributed_table('t_d', 'id')" >/dev/null
    q "ALTER TABLE t_$kind OWNER TO tenant" >/dev/null
done
as_tenant() { psql -X -q -t -A -h "$CLUSTER/coordinator/sock" -p "$IT_PORT" -U tenant -d "$DB" -v ON_ERROR_STOP=1 "$@" 2>&1; }
q "CREATE TABLE t_events AS SELECT n, line AS payload FROM (SELECT row_number() OVER () n, pg_catalog.split_part(l, E'\t', 2) line
       FROM pg_catalog.regexp_split_to_table(pg_catalog.pg_read_file('$work/mv_all.tsv'), E'\n') l) x WHERE line <> ''" >/dev/null
q "GRANT SELECT ON t_events TO tenant" >/dev/null
for kind in d l; do
    as_tenant -c "SELECT ecst.create_stream('t_$kind', 't_$kind', 'entity_snapshot', '{\"id\": \"id\"}', version => 'ts', event_id => 'eid', retain_events => true)" >/dev/null
    as_tenant -c "SELECT count(*) FROM ecst.apply_batch('t_$kind', ARRAY(SELECT payload FROM t_events WHERE n <= 2000 ORDER BY n))" >/dev/null
done
check "as the replicas' owner: applied on the shards' nodes as on a local table" "0|$(q "SELECT count(*) FROM t_l")" \
    "$(same t_d t_l)|$(q "SELECT count(*) FROM t_d")"
both() { as_tenant -c "BEGIN" -c "SELECT count(*) FROM ecst.apply_batch('$1', ARRAY(SELECT payload FROM t_events WHERE n > 2000 ORDER BY n))" \
    -c "SELECT count(*) FROM ecst.export_snapshot('$1')" -c "COMMIT" | paste -sd' '; }
check "... an apply and an export in one transaction" "$(both t_l)" "$(both t_d)"
q "CREATE TABLE t_half AS SELECT e AS payload FROM ecst.export_snapshot('t_l') e WHERE e->>'id' < 'e15'" >/dev/null
q "GRANT SELECT ON t_half TO tenant" >/dev/null
t_replace() { as_tenant -c "SELECT loaded || ':' || stale || ':' || deleted FROM ecst.load_snapshot('$1', 't_half', mode => 'replace', as_of => 100000)"; }
check "... load_snapshot in replace mode" "$(t_replace t_l)" "$(t_replace t_d)"
t_rebuild() { as_tenant -c "SELECT * FROM ecst.rebuild('$1')" | paste -sd' '; }
check "... rebuild" "$(t_rebuild t_l)" "$(t_rebuild t_d)"
check "... the same replica" "0" "$(same t_d t_l)"
check "another role reaches none of its versions" "0|ERROR:  permission denied for table entity_state_$(sid t_d)" \
    "$(psql -X -q -t -A -h "$CLUSTER/coordinator/sock" -p "$IT_PORT" -U intruder -d "$DB" -c "SELECT count(*) FROM ecst.entity_state_$(sid t_d)" 2>&1)|$(psql -X -q -t -A -h "$CLUSTER/coordinator/sock" -p "$IT_PORT" -U intruder -d "$DB" -c "TRUNCATE ecst.entity_state_$(sid t_d)" 2>&1)"
check "... nor can it change them" "UPDATE 0" \
    "$(psql -X -t -A -h "$CLUSTER/coordinator/sock" -p "$IT_PORT" -U intruder -d "$DB" -c "UPDATE ecst.entity_state_$(sid t_d) SET live_version = 1e30" 2>&1)"

# A distribution column of a domain type: its checks are code anyone may write, which pg_ecst does
# not run as its owner on the nodes; such a stream is decided on the coordinator, and says so.
q "CREATE DOMAIN code AS text CHECK (VALUE <> '')" >/dev/null
q "CREATE TABLE dom (id code PRIMARY KEY, line1 text)" >/dev/null
q "SELECT create_distributed_table('dom', 'id')" >/dev/null
check "a domain-typed distribution column: the stream is decided on the coordinator, with a notice" \
    "NOTICE:  stream \"dom\" is decided on the coordinator" \
    "$(psql_it -d "$DB" -c "SELECT ecst.create_stream('dom', 'dom', 'entity_snapshot', '{\"id\": \"id\"}', version => 'ts')" 2>&1 | grep NOTICE | cut -d: -f1-2)"
check "... and applies" "applied|1" \
    "$(q "SELECT ecst.apply('dom', '{\"id\": \"x\", \"ts\": 1, \"newState\": {\"line1\": \"y\"}}')")|$(q "SELECT count(*) FROM ecst.entity_state WHERE stream_id = $(sid dom)")"

# A key of two columns, distributed by one of them: the version state's distribution value is
# taken from the entity's key.
q "CREATE TABLE ck (tenant int, id text, line1 text, PRIMARY KEY (tenant, id))" >/dev/null
q "SELECT create_distributed_table('ck', 'tenant')" >/dev/null
q "SELECT ecst.create_stream('ck', 'ck', 'delta', '{\"tenant\": \"tenant\", \"id\": \"id\"}', version => 'v', event_id => 'eid')" >/dev/null
ck_events="'{\"tenant\": 1, \"id\": \"a\", \"v\": 2, \"eid\": \"e1\", \"newState\": {\"line1\": \"a2\"}}',
           '{\"tenant\": 2, \"id\": \"a\", \"v\": 1, \"eid\": \"e2\", \"newState\": {\"line1\": \"b1\"}}',
           '{\"tenant\": 1, \"id\": \"a\", \"v\": 1, \"eid\": \"e3\", \"newState\": {\"line1\": \"a1\"}}',
           '{\"tenant\": 1, \"id\": \"a\", \"v\": 3, \"eid\": \"e1\", \"newState\": {\"line1\": \"again\"}}',
           '{\"tenant\": 3, \"id\": \"c\", \"v\": 1, \"newState\": {\"line1\": \"c1\"}}'"
check "a key of two columns, distributed by one: outcomes" "applied:3,duplicate:1,stale:1" \
    "$(q "SELECT string_agg(outcome || ':' || count, ',' ORDER BY outcome) FROM ecst.apply_batch('ck', ARRAY[$ck_events]::text[])")"
check "... the replica, and each state beside its row" "1:a:a2,2:a:b1,3:c:c1|3" \
    "$(q "SELECT string_agg(tenant || ':' || id || ':' || line1, ',' ORDER BY tenant) FROM ck")|$(q "SELECT count(*) FROM ecst.entity_state_$(sid ck) s JOIN ck ON ck.tenant = s.dist AND s.entity_key::jsonb = pg_catalog.to_jsonb(ARRAY[ck.id, ck.tenant::text])")"

q "SELECT ecst.set_stream_schema('mv', '{\"required\": [\"eid\"]}')" >/dev/null
check "a new schema reaches the nodes: an event without eid is a dead letter there" "dead_lettered|schema_violation" \
    "$(q "SELECT ecst.apply('mv', '{\"id\": \"new\", \"ts\": 1, \"newState\": {\"line1\": \"x\"}}')")|$(q "SELECT error_code FROM ecst.dead_letters WHERE stream = 'mv' ORDER BY id DESC LIMIT 1")"
mv_id=$(sid mv)
q "SELECT ecst.drop_stream('mv')" >/dev/null
check "drop_stream drops the stream's co-located tables and its definition on every node" "0|0|0" \
    "$(q "SELECT count(*) FROM pg_dist_partition WHERE logicalrelid::text LIKE 'ecst.%\\_$mv_id'")|$(q "SELECT count(*) FROM ecst.sharded_streams WHERE stream_id = $mv_id")|$(on worker2 "SET citus.override_table_visibility = off; SELECT count(*) FROM pg_class WHERE relnamespace = 'ecst'::regnamespace AND (relname LIKE '%\\_$mv_id' OR relname LIKE '%\\_$mv_id\\_%')")"
it_done
