#!/usr/bin/env bash
# Committed transactions (counters flushed at commit) and pg_dump/restore of stream
# definitions, version state and dead letters.
cd "$(dirname "$0")/../.."
. scripts/lib.sh
. tests/integration/common.sh
it_start

psql_it -d postgres -c "CREATE DATABASE src"
psql_it -d src -v snapshot="$(cat "$FIXTURES/fine_grained_snapshot.json")" <<'SQL' >/dev/null
CREATE EXTENSION pg_ecst;
CREATE TABLE address (address_id text PRIMARY KEY, address_purpose text, line1 text, address_line2 text, address_ts bigint);
SELECT ecst.create_stream('address', 'address', 'entity_snapshot', '{"addressId": "address_id"}',
    state_path => 'addressContent', columns => '{"addressLine1": "line1"}', version => 'newState.addressContent.addressTS');
CREATE TABLE customer (customer_id text PRIMARY KEY);
CREATE TABLE customer_address (customer_id text NOT NULL, address_id text NOT NULL, line1 text, PRIMARY KEY (customer_id, address_id));
SELECT ecst.create_stream('customer', 'customer', 'aggregate_snapshot', '{"customerId": "customer_id"}',
    children => '{"addresses": {"path": "addresses", "table": "customer_address", "key": {"addressId": "address_id"}, "parent_key": "customer_id"}}');
SELECT ecst.apply('address', :'snapshot');
SELECT ecst.apply('address', :'snapshot');
SELECT ecst.apply('address', 'not json');
SELECT ecst.apply('customer', '{"customerId": "c1", "newState": {"addresses": [{"addressId": "a1", "line1": "x"}]}}');
SQL

check "counters are flushed at commit" "1|1|1" \
    "$(psql_it -d src -c "SELECT sum(applied) || '|' || sum(duplicate) || '|' || sum(dead_lettered) FROM ecst.stream_counters c JOIN ecst.streams s ON s.id = c.stream_id WHERE s.name = 'address'")"
check "ecst.stats after commit" "address|1|1|1" \
    "$(psql_it -d src -c "SELECT concat_ws('|', stream, applied, duplicate, dead_lettered) FROM ecst.stats WHERE stream = 'address'")"
psql_it -d src -c "BEGIN; SELECT ecst.apply('address', '{\"addressId\": \"9\", \"newState\": {\"addressContent\": {\"addressTS\": 5}}}'); ROLLBACK;" >/dev/null
check "rolled-back applies are not counted" "1" \
    "$(psql_it -d src -c "SELECT applied FROM ecst.stats WHERE stream = 'address'")"
psql_it -d src -c "SELECT ecst.compact_counters()" >/dev/null
check "compact_counters folds rows to one per stream" "1|1" \
    "$(psql_it -d src -c "SELECT count(*) || '|' || sum(applied) FROM ecst.stream_counters c JOIN ecst.streams s ON s.id = c.stream_id WHERE s.name = 'address'")"

sudo -u postgres "$PG_BIN"/pg_dump -h "$IT_DIR/sock" -p "$IT_PORT" -U postgres -Fc -f "$IT_DIR/src.dump" src
psql_it -d postgres -c "CREATE DATABASE dst"
sudo -u postgres "$PG_BIN"/pg_restore -h "$IT_DIR/sock" -p "$IT_PORT" -U postgres -d dst "$IT_DIR/src.dump"

check "streams survive pg_dump/restore" "address,customer" \
    "$(psql_it -d dst -c "SELECT string_agg(name, ',' ORDER BY name) FROM ecst.streams")"
check "child definitions survive" "customer_address" \
    "$(psql_it -d dst -c "SELECT target::text FROM ecst.stream_children")"
check "version state survives (older event is stale after restore)" "stale" \
    "$(psql_it -d dst -c "SELECT ecst.apply('address', '{\"addressId\": \"12366\", \"newState\": {\"addressContent\": {\"addressTS\": 1}}}')")"
check "dead letters survive" "invalid_json|not json" \
    "$(psql_it -d dst -c "SELECT error_code || '|' || payload FROM ecst.dead_letters")"
check "restored stream applies" "applied" \
    "$(psql_it -d dst -c "SELECT ecst.apply('customer', '{\"customerId\": \"c1\", \"newState\": {\"addresses\": []}}')")"
check "restored aggregate replaced its children" "0" \
    "$(psql_it -d dst -c "SELECT count(*) FROM customer_address")"
psql_it -d dst -c "SELECT ecst.apply('address', 'still not json')" >/dev/null
check "dead letter ids continue after restore" "2|2" \
    "$(psql_it -d dst -c "SELECT count(DISTINCT id) || '|' || max(id) FROM ecst.dead_letters")"

# A column's type changes while another session holds the stream cached (the row API and the
# worker convert values with the stream's column types): it waits for the ALTER, then uses the
# new types (it crashed the server with SIGSEGV before).
psql_it -d src <<'SQL' >/dev/null
CREATE TABLE at2 (id int PRIMARY KEY, v int, ts bigint);
SELECT ecst.create_stream('at2', 'at2', 'entity_snapshot', '{"id": "id"}', version => 'newState.ts');
SQL
{
    echo "SELECT ecst.apply('at2', '{\"id\": 1, \"newState\": {\"v\": 1, \"ts\": 1}}');"
    echo "SELECT pg_sleep(1.5);"
    echo "SELECT outcome || '=' || count FROM ecst.apply_batch('at2', ARRAY['{\"id\": 2, \"newState\": {\"v\": \"twelve\", \"ts\": 1}}', '{\"id\": 3, \"newState\": {\"v\": \"x\", \"ts\": 1}}']::jsonb[]);"
} | psql_it -d src >"$IT_DIR/at2.out" 2>&1 &
cached=$!
sleep 0.5
psql_it -d src -c "BEGIN; ALTER TABLE at2 ALTER COLUMN v TYPE text; SELECT pg_sleep(2); COMMIT;" >/dev/null
wait "$cached" || true
check "a session that cached the stream before ALTER COLUMN TYPE writes the new type" "applied|applied=2" \
    "$(grep -v '^$' "$IT_DIR/at2.out" | paste -sd'|')"
check "... and the values are right" "1=1,2=twelve,3=x" \
    "$(psql_it -d src -c "SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM at2")"
check "the server did not restart" "0" \
    "$(grep -c 'terminated by signal' "$IT_DIR/server.log" || true)"

# Replace mode against a concurrent newer event of a state-row stream: the newer version stays.
psql_it -d src <<'SQL' >/dev/null
CREATE TABLE r2 (id text PRIMARY KEY, line1 text);
SELECT ecst.create_stream('r2', 'r2', 'entity_snapshot', '{"id": "id"}', version => 'ts');
SELECT ecst.apply('r2', '{"id": "a", "ts": 1, "newState": {"line1": "a1"}}');
SELECT ecst.apply('r2', '{"id": "x", "ts": 3, "newState": {"line1": "x3"}}');
CREATE TABLE r2_snap AS SELECT '{"id": "a", "ts": 4, "newState": {"line1": "a4"}}'::text AS payload;
CREATE FUNCTION r2_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$;
CREATE TRIGGER r2_slow BEFORE DELETE ON r2 FOR EACH STATEMENT EXECUTE FUNCTION r2_slow();
SQL
psql_it -d src -c "SELECT deleted FROM ecst.load_snapshot('r2', 'r2_snap', mode => 'replace', as_of => '5')" >"$IT_DIR/r2.out" 2>&1 &
loading=$!
sleep 0.7
newer=$(psql_it -d src -c "SELECT ecst.apply('r2', '{\"id\": \"x\", \"ts\": 9, \"newState\": {\"line1\": \"x9\"}}')")
wait "$loading" || true
check "replace mode: the concurrent newer event applies" "applied" "$newer"
check "replace mode: ... and survives the load" "a=a4,x=x9" \
    "$(psql_it -d src -c "SELECT string_agg(id || '=' || line1, ',' ORDER BY id) FROM r2")"
check "replace mode: the load itself succeeded" "1" "$(grep -c '^[01]$' "$IT_DIR/r2.out" || true)"
it_done
