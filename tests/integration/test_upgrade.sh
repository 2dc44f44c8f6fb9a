#!/usr/bin/env bash
# Existing installations upgrade: a database created with the released 0.1.0 SQL
# (tests/upgrade/pg_ecst--0.1.0.sql, as 0.1.0 installed it) holds streams, versions, dead letters
# and replicas; the new library is installed and `ALTER EXTENSION pg_ecst UPDATE` runs the
# sql/pg_ecst--A--B.sql scripts. Everything is intact afterwards, the new functions work, and the
# updated database has exactly the objects (definitions, comments, grants) of a fresh install.
cd "$(dirname "$0")/../.."
. scripts/lib.sh
. tests/integration/common.sh
IT_DIR=/tmp/pg_ecst-it-upgrade IT_PORT=54337
it_start "ecst.naptime = 200" "ecst.workers = 1"

current=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
oldest=0.1.0
as_root install -m 0644 tests/upgrade/pg_ecst--$oldest.sql "$("$PG_CONFIG" --sharedir)/extension/pg_ecst--$oldest.sql"

q() { psql_it -d up -c "$1"; }
psql_it -d postgres -c "CREATE DATABASE up" -c "CREATE DATABASE fresh" >/dev/null
psql_it -d up -v snapshot="$(cat "$FIXTURES/fine_grained_snapshot.json")" -v delta="$(cat "$FIXTURES/fine_grained_delta.json")" >/dev/null <<SQL
CREATE EXTENSION pg_ecst VERSION '$oldest';
CREATE TABLE address (address_id text PRIMARY KEY, address_purpose text, line1 text, address_line2 text, address_ts bigint);
SELECT ecst.create_stream(name => 'address', target => 'address'::regclass, shape => 'entity_snapshot',
    key => '{"addressId": "address_id"}', state_path => 'addressContent', columns => '{"addressLine1": "line1"}',
    version => 'newState.addressContent.addressTS');
CREATE TABLE address_line (address_id text PRIMARY KEY, address_purpose text, line1 text, address_line2 text);
SELECT ecst.create_stream('address_changes', 'address_line', 'delta', key => '{"addressId": "address_id"}',
    columns => '{"addressLine1": "line1"}', version => 'v');
CREATE TABLE customer (customer_id text PRIMARY KEY);
CREATE TABLE customer_address (customer_id text NOT NULL REFERENCES customer, address_id text NOT NULL,
    line1 text, PRIMARY KEY (customer_id, address_id));
SELECT ecst.create_stream('customer', 'customer', 'aggregate_snapshot', key => '{"customerId": "customer_id"}',
    version => 'v', children => '{"addresses": {"path": "addresses", "table": "customer_address",
        "key": {"addressId": "address_id"}, "parent_key": "customer_id", "columns": {"addressLine1": "line1"}}}');
SELECT ecst.apply('address', :'snapshot');
SELECT ecst.apply('address_changes', '{"addressId": "12366", "v": 1, "newState": {"addressPurpose": "billing", "addressLine1": "84 Baker Street"}}');
SELECT ecst.apply('address_changes', '{"addressId": "12366", "v": 3, "newState": {"addressLine2": "London"}}');
SELECT ecst.apply('customer', '{"customerId": "c1", "v": 1, "newState": {"addresses": [{"addressId": "a1", "addressLine1": "x"}, {"addressId": "a2", "addressLine1": "y"}]}}');
SELECT ecst.apply('address', 'not json at all');
INSERT INTO ecst.inbox (stream, payload) VALUES ('nobody', '{}');
SELECT ecst.process_inbox();
SQL
check "the database runs the released version" "$oldest" "$(q "SELECT extversion FROM pg_extension WHERE extname = 'pg_ecst'")"

state() {
    q "SELECT md5(string_agg(x, '|' ORDER BY x)) FROM (
         SELECT 'a:' || a::text x FROM address a UNION ALL SELECT 'l:' || l::text FROM address_line l
         UNION ALL SELECT 'c:' || c::text FROM customer_address c
         UNION ALL SELECT 's:' || (s.name, s.shape, s.key, s.version, s.columns)::text FROM ecst.streams s
         UNION ALL SELECT 'e:' || (e.stream_id, e.entity_key, e.live_version, e.tomb_version, e.field_versions)::text
                   FROM ecst.entity_state e
         UNION ALL SELECT 'd:' || (d.id, d.stream, d.payload, d.error_code)::text FROM ecst.dead_letters d) q"
}
before=$(state)

psql_it -d up -c "ALTER EXTENSION pg_ecst UPDATE" >/dev/null
check "ALTER EXTENSION pg_ecst UPDATE reaches $current" "$current" "$(q "SELECT extversion FROM pg_extension WHERE extname = 'pg_ecst'")"
check "replicas, streams, version state and dead letters are intact" "$before" "$(state)"
check "events still apply after the update" "applied stale" \
    "$(q "SELECT ecst.apply('address_changes', '{\"addressId\": \"12366\", \"v\": 4, \"newState\": {\"line1\": \"new\"}}')") $(q "SELECT ecst.apply('address_changes', '{\"addressId\": \"12366\", \"v\": 2, \"newState\": {\"addressLine2\": \"old\"}}')")"
check "the delta's merged fields" "billing|new|London" \
    "$(q "SELECT address_purpose || '|' || line1 || '|' || address_line2 FROM address_line")"
check "a new view works on the old letters" "address:invalid_json:true,nobody:unknown_stream:false" \
    "$(q "SELECT string_agg(stream || ':' || error_code || ':' || stream_exists, ',' ORDER BY stream) FROM ecst.dead_letter_summary")"
check "a new function works on the old letters" "1" "$(q "SELECT ecst.discard_dead_letters(error_code => 'invalid_json')")"
q "CREATE TABLE enveloped (address_id text PRIMARY KEY, line1 text)" >/dev/null
q "SELECT ecst.create_stream('enveloped', 'enveloped', 'entity_snapshot', '{\"addressId\": \"address_id\"}', event_path => 'data', version => 'time')" >/dev/null
check "a stream with an event_path (0.3.0) applies envelopes" "applied" \
    "$(q "SELECT ecst.apply('enveloped', '{\"time\": 5, \"data\": {\"addressId\": \"1\", \"newState\": {\"line1\": \"x\"}}}')")"
q "SELECT ecst.create_route('feed', 'type', '{\"address\": \"enveloped\"}')" >/dev/null
check "a route (0.3.0) sends events to its stream" "applied" \
    "$(q "SELECT ecst.apply('feed', '{\"type\": \"address\", \"time\": 6, \"data\": {\"addressId\": \"1\", \"newState\": {\"line1\": \"y\"}}}')")"
q "CREATE TABLE snap (payload text)" >/dev/null
check "load_snapshot takes a numeric as_of" "0|0|0|0" \
    "$(q "SELECT loaded || '|' || stale || '|' || deleted || '|' || dead_lettered FROM ecst.load_snapshot('address', 'snap', as_of => 1)")"
plan_sql=$(q "SELECT string_agg(sql, '') FROM ecst.asyncapi_plan('$(sed "s/'/''/g" "$FIXTURES/asyncapi.json")') WHERE message = 'FineGrainedSnapshots'")
psql_it -d up -c "$plan_sql" >/dev/null
check "an AsyncAPI plan (0.4.0) creates a stream whose schema checks events" "dead_lettered schema_violation" \
    "$(q "SELECT ecst.apply('fine_grained_snapshots', '{\"addressId\": \"1\", \"newState\": {\"addressTS\": 1}}')") $(q "SELECT error_code FROM ecst.dead_letters ORDER BY id DESC LIMIT 1")"
q "INSERT INTO ecst.feed (stream, payload) VALUES ('address_changes', '{\"addressId\": \"12366\", \"v\": 9, \"newState\": {\"addressLine2\": \"fed\"}}')" >/dev/null
check "ecst.feed (0.4.0) applies within the statement" "fed" "$(q "SELECT address_line2 FROM address_line")"
feed_worker() {
    q "INSERT INTO ecst.inbox (stream, payload) VALUES ('customer', '{\"customerId\": \"c2\", \"v\": 1, \"newState\": {\"addresses\": []}}')" >/dev/null
}
feed_worker
wait_for up "the background worker serves the updated database" "SELECT count(*) FROM customer WHERE customer_id = 'c2'" 1 30

# Every object of the extension, with what defines it: the same after an update as after a
# fresh install of the current version.
psql_it -d fresh -c "CREATE EXTENSION pg_ecst" >/dev/null
fingerprint() {
    psql_it -d "$1" <<'SQL'
WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'pg_ecst'),
objs AS (
    SELECT d.classid, d.objid FROM pg_depend d, ext
    WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
)
SELECT pg_describe_object(o.classid, o.objid, 0) || ' ' ||
       coalesce(CASE o.classid
           WHEN 'pg_proc'::regclass THEN
               pg_get_functiondef(o.objid) || coalesce((SELECT proacl::text FROM pg_proc WHERE oid = o.objid), '')
           WHEN 'pg_class'::regclass THEN
               (SELECT relkind::text || coalesce(relacl::text, '') FROM pg_class WHERE oid = o.objid)
               || coalesce(pg_get_viewdef(o.objid), '')
               || coalesce((SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod) || ' ' || attnotnull
                                              || coalesce(' ' || attacl::text, '')
                                              || coalesce(' ' || pg_get_expr(ad.adbin, ad.adrelid), ''), ', ' ORDER BY attnum)
                            FROM pg_attribute a LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
                            WHERE a.attrelid = o.objid AND a.attnum > 0 AND NOT a.attisdropped), '')
               || coalesce((SELECT string_agg(pg_get_constraintdef(c.oid), ', ' ORDER BY conname)
                            FROM pg_constraint c WHERE c.conrelid = o.objid), '')
               || coalesce((SELECT string_agg(pg_get_indexdef(indexrelid), ', ' ORDER BY indexrelid::regclass::text)
                            FROM pg_index WHERE indrelid = o.objid), '')
               || coalesce((SELECT string_agg(tgname || ' ' || pg_get_triggerdef(t.oid), ', ' ORDER BY tgname)
                            FROM pg_trigger t WHERE t.tgrelid = o.objid AND NOT t.tgisinternal), '')
           WHEN 'pg_type'::regclass THEN
               coalesce((SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum WHERE enumtypid = o.objid), '')
           ELSE '' END, '')
       || ' comment: ' || coalesce(obj_description(o.objid, (SELECT relname FROM pg_class WHERE oid = o.classid)), '')
FROM objs o ORDER BY 1;
SQL
}
fingerprint up > "$IT_DIR/up.txt"
fingerprint fresh > "$IT_DIR/fresh.txt"
check "the updated database has exactly the objects of a fresh install ($(wc -l < "$IT_DIR/fresh.txt") objects)" "" \
    "$(diff "$IT_DIR/up.txt" "$IT_DIR/fresh.txt" | head -20)"
check "every released version has an update path to $current" "" \
    "$(q "SELECT string_agg(source, ',') FROM pg_extension_update_paths('pg_ecst') WHERE target = '$current' AND path IS NULL AND source <> '$current'")"
it_done
