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
IT_DIR=/tmp/pg_ecst-it-citus IT_PORT=54350
DEMO_DIR=/tmp/pg_ecst-it-citus-demo DEMO_PORT=54355
cleanup() {
    stop_citus_cluster "$IT_DIR"
    stop_citus_cluster "$DEMO_DIR"
    as_root rm -rf "$IT_DIR" "$DEMO_DIR"
}
trap cleanup EXIT

echo "-- ./scripts/citus-demo"
out=$(CITUS_DEMO_DIR=$DEMO_DIR CITUS_DEMO_PORT=$DEMO_PORT ./scripts/citus-demo 2>&1) || { echo "$out"; }
check "the demo applies the fixture snapshot, then sees it as a duplicate" "applied|duplicate" \
    "$(grep -A2 '^ *first *| *second' <<<"$out" | tail -1 | tr -d ' ')"
check "the demo's delta changes line1 only" "12366|billing|48 Baker Street|London, UK, E1 7AE" \
    "$(grep -E '^ *12366 *\| *billing' <<<"$out" | tail -1 | sed 's/ *| */|/g; s/^ *//; s/ *$//')"
stop_citus_cluster "$DEMO_DIR"

echo "-- a cluster of three nodes"
start_citus_cluster "$IT_DIR" "$IT_PORT"
citus_database "$IT_DIR" "$IT_PORT" cit
q() { psql -X -q -t -A -h "$IT_DIR/coordinator/sock" -p "$IT_PORT" -U postgres -d cit -v ON_ERROR_STOP=1 -c "$1"; }
fails() { psql -X -q -t -A -h "$IT_DIR/coordinator/sock" -p "$IT_PORT" -U postgres -d cit \
    -v VERBOSITY=verbose -c "$1" 2>&1 | sed -n 's/^ERROR: *\([0-9A-Z]\{5\}\): .*/\1/p; s/^HINT: *\(.*\)/\1/p' | paste -sd'|'; }
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
    "$(psql -X -q -t -A -h "$IT_DIR/coordinator/sock" -p "$IT_PORT" -U postgres -d cit -v e="$snapshot" \
        -c "SELECT ecst.apply('address', :'e'), ecst.apply('address', :'e')")"
check "its row lives on a worker" "1" \
    "$(q "SELECT count(*) FROM citus_shards WHERE shardid = get_shard_id_for_distribution_column('address', '12366')
              AND nodeport IN ($((IT_PORT + 1)), $((IT_PORT + 2)))")"
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
it_done
