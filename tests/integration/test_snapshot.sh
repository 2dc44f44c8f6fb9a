#!/usr/bin/env bash
# Bootstrapping (docs/guides/bootstrap.md) against a running server: snapshot + events in every interleaving (and a load running
# while the worker applies events) equal events alone; replace mode; reloading is a no-op;
# export -> load round trips for the three shapes; a file_fdw source.
cd "$(dirname "$0")/../.."
. scripts/lib.sh
. tests/integration/common.sh
IT_DIR=/tmp/pg_ecst-it-snap IT_PORT=54332
it_start "ecst.database = 'snap'" "ecst.naptime = 200"
DB=snap
q() { psql_it -d $DB -c "$1"; }
psql_it -d postgres -c "CREATE DATABASE snap" >/dev/null
create_differs $DB

psql_it -d $DB >/dev/null <<'SQL'
CREATE EXTENSION pg_ecst;
CREATE EXTENSION file_fdw;
-- History: 300 entities, versions 1..10 each; every 7th version is a delete.
CREATE TABLE history AS
SELECT e, v, CASE WHEN (e + v) % 7 = 0
         THEN format('{"id": "e%s", "ts": %s, "oldState": {}}', e, v)
         ELSE format('{"id": "e%s", "ts": %s, "newState": {"line1": "e%s v%s", "n": %s}}', e, v, e, v, e * v) END AS payload
FROM generate_series(1, 300) e, generate_series(1, 10) v;
-- The snapshot as of version 5: each entity's state at 5 as a create event (absent if deleted).
CREATE TABLE snapshot5 AS
SELECT payload FROM (
    SELECT DISTINCT ON (e) e, payload, payload::jsonb ? 'newState' AS live FROM history WHERE v <= 5 ORDER BY e, v DESC
) s WHERE live;
CREATE TABLE later AS SELECT e, v, payload FROM history WHERE v > 5;
CREATE FUNCTION make_replica(name text) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
    EXECUTE format('CREATE TABLE %I (id text PRIMARY KEY, line1 text, n bigint)', name);
    PERFORM ecst.create_stream(name, name::regclass, 'entity_snapshot', '{"id": "id"}', version => 'ts');
END $f$;
SELECT make_replica('ref');
SELECT count(*) FROM (SELECT ecst.apply('ref', payload) FROM history ORDER BY e, v) a;
SQL
check "reference replica has rows" t "$(q "SELECT count(*) > 100 FROM ref")"

echo "-- snapshot + events in every interleaving"
psql_it -d $DB >/dev/null <<'SQL'
SELECT make_replica('snap_first');
SELECT * FROM ecst.load_snapshot('snap_first', 'snapshot5');
SELECT count(*) FROM (SELECT ecst.apply('snap_first', payload) FROM later ORDER BY e, v) a;
SELECT make_replica('events_first');
SELECT count(*) FROM (SELECT ecst.apply('events_first', payload) FROM later ORDER BY random()) a;
SELECT * FROM ecst.load_snapshot('events_first', 'snapshot5');
SELECT make_replica('interleaved');
SELECT count(*) FROM (SELECT ecst.apply('interleaved', payload) FROM later WHERE v % 2 = 0 ORDER BY random()) a;
SELECT * FROM ecst.load_snapshot('interleaved', 'snapshot5');
SELECT count(*) FROM (SELECT ecst.apply('interleaved', payload) FROM later WHERE v % 2 = 1 ORDER BY random()) a;
SQL
for t in snap_first events_first interleaved; do
    check "$t = events alone in order" 0 "$(q "SELECT differs('ref', '$t')")"
done

echo "-- a load while the worker applies the later events"
q "SELECT make_replica('concurrent')" >/dev/null
q "INSERT INTO ecst.inbox (stream, payload) SELECT 'concurrent', payload FROM later ORDER BY random()" >/dev/null
q "SELECT * FROM ecst.load_snapshot('concurrent', 'snapshot5')" >/dev/null
wait_for $DB "the worker drains the inbox" "SELECT count(*) FROM ecst.inbox" 0 60
check "concurrent load + events = events alone" 0 "$(q "SELECT differs('ref', 'concurrent')")"

echo "-- reloading the same snapshot is a no-op"
before=$(q "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM snap_first t")
check "reload: nothing loaded, all stale" "0|$(q "SELECT count(*) FROM snapshot5")|0|0" \
    "$(q "SELECT concat_ws('|', loaded, stale, deleted, dead_lettered) FROM ecst.load_snapshot('snap_first', 'snapshot5')")"
check "replica unchanged" "$before" "$(q "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM snap_first t")"

echo "-- replace mode"
psql_it -d $DB >/dev/null <<'SQL'
SELECT make_replica('rep');
SELECT ecst.apply('rep', '{"id": "old", "ts": 3, "newState": {"line1": "absent, older than as_of"}}');
SELECT ecst.apply('rep', '{"id": "new", "ts": 7, "newState": {"line1": "absent, newer than as_of"}}');
SELECT ecst.apply('rep', '{"id": "e1", "ts": 2, "newState": {"line1": "in the snapshot"}}');
SQL
check "replace deletes exactly the stale absentees" "1" \
    "$(q "SELECT deleted FROM ecst.load_snapshot('rep', 'snapshot5', mode => 'replace', as_of => '5')")"
check "absent but newer entity kept; absent older one gone" "e1,new" \
    "$(q "SELECT string_agg(id, ',' ORDER BY id) FROM rep WHERE id IN ('old', 'new', 'e1')")"
check "a tombstone at as_of keeps an older event out" "stale" \
    "$(q "SELECT ecst.apply('rep', '{\"id\": \"old\", \"ts\": 4, \"newState\": {\"line1\": \"late\"}}')")"
check "replace needs as_of on a versioned stream" "22023" \
    "$(psql_it -d $DB -c "DO \$\$ BEGIN PERFORM ecst.load_snapshot('rep', 'snapshot5', mode => 'replace'); EXCEPTION WHEN OTHERS THEN RAISE NOTICE '%', SQLSTATE; END \$\$" 2>&1 | grep -o 22023)"
check "a source without payload column is refused" "42703" \
    "$(psql_it -d $DB -c "DO \$\$ BEGIN PERFORM ecst.load_snapshot('rep', 'ref'); EXCEPTION WHEN OTHERS THEN RAISE NOTICE '%', SQLSTATE; END \$\$" 2>&1 | grep -o 42703)"

echo "-- the bulk path: an empty replica whose version is a column"
psql_it -d $DB >/dev/null <<'SQL'
CREATE TABLE b_src AS
SELECT format('{"id": "b%s", "newState": {"line1": "b%s\tv%s", "ts": %s}}', e, e, e % 5 + 1, e % 5 + 1) AS payload
FROM generate_series(1, 3000) e;
INSERT INTO b_src VALUES ('not json');
CREATE FUNCTION make_bulk(name text) RETURNS void LANGUAGE plpgsql AS $f$
BEGIN
    EXECUTE format('CREATE TABLE %I (id text PRIMARY KEY, line1 text, ts bigint)', name);
    PERFORM ecst.create_stream(name, name::regclass, 'entity_snapshot', '{"id": "id"}', version => 'newState.ts');
END $f$;
SELECT make_bulk(n) FROM unnest(ARRAY['bulk1', 'bulk2', 'bulk3', 'bulk4']) n;
SQL
states() { q "SELECT count(*) FROM ecst.entity_state s JOIN ecst.streams t ON t.id = s.stream_id WHERE t.name = '$1'"; }
check "bulk load: counts" "3000|0|0|1" \
    "$(q "SELECT concat_ws('|', loaded, stale, deleted, dead_lettered) FROM ecst.load_snapshot('bulk1', 'b_src')")"
check "bulk load wrote no version-state rows" "0" "$(states bulk1)"
check "bulk load kept values exactly (tab, version)" "b7	v3|3" "$(q "SELECT line1 || '|' || ts FROM bulk1 WHERE id = 'b7'")"
check "an older event after the bulk load is stale" "stale" \
    "$(q "SELECT ecst.apply('bulk1', '{\"id\": \"b5\", \"newState\": {\"line1\": \"old\", \"ts\": 0}}')")"
check "a newer one applies" "applied" \
    "$(q "SELECT ecst.apply('bulk1', '{\"id\": \"b5\", \"newState\": {\"line1\": \"new\", \"ts\": 9}}')")"
check "... and its version stays in the row (no state row)" "0|9" "$(states bulk1)|$(q "SELECT ts FROM bulk1 WHERE id = 'b5'")"
check "a batch after the bulk load: older stale, newer applied" "applied:1,stale:1" \
    "$(q "SELECT string_agg(outcome || ':' || count, ',' ORDER BY outcome) FROM ecst.apply_batch('bulk1', ARRAY['{\"id\": \"b1\", \"newState\": {\"line1\": \"old\", \"ts\": 1}}', '{\"id\": \"b2\", \"newState\": {\"line1\": \"new\", \"ts\": 9}}'])")"
check "... rows as expected" "b1:b1	v2,b2:new,b5:new" "$(q "SELECT string_agg(id || ':' || line1, ',' ORDER BY id) FROM bulk1 WHERE id IN ('b1', 'b2', 'b5')")"
q "CREATE TABLE bulk1_export AS SELECT p AS payload FROM ecst.export_snapshot('bulk1') p" >/dev/null
check "export -> bulk load into an empty replica" "3000|0" \
    "$(q "SELECT loaded || '|' || (SELECT count(*) FROM ecst.entity_state s JOIN ecst.streams t ON t.id = s.stream_id WHERE t.name = 'bulk2') FROM ecst.load_snapshot('bulk2', 'bulk1_export')")"
check "... reproduces the replica" 0 "$(q "SELECT differs('bulk1', 'bulk2')")"
q "CREATE TABLE b_first AS SELECT payload FROM b_src WHERE payload ~ '\"b[0-9]{1,3}\"|\"b1000\"'" >/dev/null
check "replace mode over bulk-loaded entities: absent and not newer than as_of are deleted" "1200" \
    "$(q "SELECT deleted FROM ecst.load_snapshot('bulk1', 'b_first', mode => 'replace', as_of => '3')")"
check "... leaving tombstones: an event at as_of is not applied, a newer one is" "duplicate,applied" \
    "$(q "SELECT ecst.apply('bulk1', '{\"id\": \"b1001\", \"newState\": {\"ts\": 3}}') || ',' || ecst.apply('bulk1', '{\"id\": \"b1001\", \"newState\": {\"ts\": 4}}')")"
check "... absent entities newer than as_of are kept" "800" "$(q "SELECT count(*) FROM bulk1 WHERE substr(id, 2)::int > 1001 AND ts > 3")"
# A session applying while a bulk load is in flight waits for it, then sees its versions.
psql_it -d $DB -c "BEGIN" -c "SELECT loaded FROM ecst.load_snapshot('bulk3', 'b_src')" -c "SELECT pg_sleep(1.5)" -c "COMMIT" >/dev/null &
sleep 0.5
check "an apply during a bulk load waits for it, then is stale" "stale" \
    "$(q "SELECT ecst.apply('bulk3', '{\"id\": \"b7\", \"newState\": {\"line1\": \"older\", \"ts\": 0}}')")"
wait
check "... and the loaded row stands" "b7	v3" "$(q "SELECT line1 FROM bulk3 WHERE id = 'b7'")"
q "CREATE TABLE b_dup AS SELECT payload FROM b_src UNION ALL SELECT replace(payload, '\"ts\": ', '\"ts\": 1') FROM b_src WHERE payload ~ '\"b[0-9]\"'" >/dev/null
check "two rows of one entity: the bulk path steps aside, newest wins" "3009|0|1|b7	v3|13" \
    "$(q "SELECT concat_ws('|', loaded, stale, dead_lettered) FROM ecst.load_snapshot('bulk4', 'b_dup')")|$(q "SELECT line1 || '|' || ts FROM bulk4 WHERE id = 'b7'")"

echo "-- a bulk load cancelled midway: the session carries on, its helper thread is gone"
q "CREATE TABLE b_big AS SELECT format('{\"id\": \"g%s\", \"newState\": {\"line1\": \"x\", \"ts\": 1}}', e) AS payload
   FROM generate_series(1, 400000) e; SELECT make_bulk('bulk5')" >/dev/null
out=$(psql_it -d $DB -v ON_ERROR_STOP=0 -c "SET statement_timeout = '300ms'" \
    -c "SELECT loaded FROM ecst.load_snapshot('bulk5', 'b_big')" -c "RESET statement_timeout" \
    -c "SELECT 'threads ' || count(*) FROM pg_ls_dir('/proc/' || pg_backend_pid() || '/task')" \
    -c "SELECT 'rows ' || count(*) FROM bulk5" -c "SELECT 'loaded ' || loaded FROM ecst.load_snapshot('bulk5', 'b_big')" 2>&1)
check "the load was cancelled" "1" "$(grep -c 'canceling statement due to statement timeout' <<<"$out")"
check "... one thread left, nothing loaded, and the same session loads it all" "threads 1,rows 0,loaded 400000" \
    "$(grep -E '^(threads|rows|loaded) ' <<<"$out" | paste -sd,)"
check "... reporting progress every 100,000 rows" "1" \
    "$(grep -c 'load_snapshot("bulk5"): 400000 rows read (400000 loaded, 0 stale, 0 dead-lettered)' <<<"$out")"

echo "-- export -> load round trip, three shapes"
psql_it -d $DB >/dev/null <<'SQL'
-- entity_snapshot under a state_path, with a renamed column and a timestamp version
CREATE TABLE a1 (address_id text PRIMARY KEY, address_purpose text, line1 text, address_line2 text, address_ts bigint, seen timestamptz);
CREATE TABLE a2 (LIKE a1 INCLUDING ALL);
SELECT ecst.create_stream(s, s::regclass, 'entity_snapshot', '{"addressId": "address_id"}', state_path => 'addressContent',
        columns => '{"addressLine1": "line1"}', version => 'meta.at') FROM unnest(ARRAY['a1', 'a2']) s;
SELECT ecst.apply('a1', format('{"addressId": "%s", "meta": {"at": "2024-01-0%sT10:00:00.5Z"}, "newState": {"addressContent": {"addressPurpose": "billing", "addressLine1": "%s Baker St", "addressLine2": null, "addressTS": %s, "seen": "2024-02-01T00:00:00Z"}}}', i, 1 + i % 9, i, i * 1000))
FROM generate_series(1, 50) i;
CREATE TABLE a1_export AS SELECT p AS payload FROM ecst.export_snapshot('a1') p;
SELECT * FROM ecst.load_snapshot('a2', 'a1_export');
-- delta
CREATE TABLE d1 (id bigint PRIMARY KEY, a text, b numeric, c jsonb);
CREATE TABLE d2 (LIKE d1 INCLUDING ALL);
SELECT ecst.create_stream(s, s::regclass, 'delta', '{"id": "id"}', version => 'v') FROM unnest(ARRAY['d1', 'd2']) s;
SELECT ecst.apply('d1', format('{"id": %s, "v": %s, "newState": {"a": "x%s"}}', i % 20, i, i)) FROM generate_series(1, 100) i;
SELECT ecst.apply('d1', format('{"id": %s, "v": %s, "newState": {"b": %s.25, "c": {"k": [%s]}}}', i % 30, 100 + i, i, i)) FROM generate_series(1, 100) i;
CREATE TABLE d1_export AS SELECT p AS payload FROM ecst.export_snapshot('d1') p;
SELECT * FROM ecst.load_snapshot('d2', 'd1_export');
-- aggregate
CREATE TABLE c1 (customer_id text PRIMARY KEY, name text);
CREATE TABLE c1_addr (customer_id text NOT NULL, address_id text NOT NULL, line1 text, address_ts bigint, PRIMARY KEY (customer_id, address_id));
CREATE TABLE c2 (LIKE c1 INCLUDING ALL);
CREATE TABLE c2_addr (LIKE c1_addr INCLUDING ALL);
SELECT ecst.create_stream(p, p::regclass, 'aggregate_snapshot', '{"customerId": "customer_id"}', version => 'ts',
    children => format('{"addresses": {"path": "addressContent.addresses", "table": "%s_addr", "key": {"addressId": "address_id"}, "parent_key": "customer_id", "columns": {"addressLine1": "line1"}}}', p)::jsonb)
FROM unnest(ARRAY['c1', 'c2']) p;
SELECT ecst.apply('c1', format('{"customerId": "c%s", "ts": 1, "newState": {"name": "n%s", "addressContent": {"addresses": [%s]}}}', i, i,
    (SELECT string_agg(format('{"addressId": "a%s", "addressLine1": "%s Road", "addressTS": %s}', j, j, j), ', ') FROM generate_series(1, i % 5) j)))
FROM generate_series(1, 40) i;
CREATE TABLE c1_export AS SELECT p AS payload FROM ecst.export_snapshot('c1') p;
SELECT * FROM ecst.load_snapshot('c2', 'c1_export');
SQL
check "entity_snapshot round trip is exact" 0 "$(q "SELECT differs('a1', 'a2')")"
check "entity_snapshot versions round trip" 0 "$(q "SELECT count(*) FROM ((SELECT entity_key, live_version FROM ecst.entity_state e JOIN ecst.streams s ON s.id = e.stream_id WHERE s.name = 'a1') EXCEPT (SELECT entity_key, live_version FROM ecst.entity_state e JOIN ecst.streams s ON s.id = e.stream_id WHERE s.name = 'a2')) d")"
check "delta round trip is exact" 0 "$(q "SELECT differs('d1', 'd2')")"
check "aggregate round trip is exact" "0|0" "$(q "SELECT differs('c1', 'c2') || '|' || differs('c1_addr', 'c2_addr')")"
check "export uses the stream's own field names" "t" \
    "$(q "SELECT payload ? 'addressId' AND payload->'newState'->'addressContent' ? 'addressLine1' AND payload->'newState'->'addressContent' ? 'addressLine2' FROM a1_export LIMIT 1")"

echo "-- file_fdw source"
psql -X -q -h "$IT_DIR/sock" -p "$IT_PORT" -U postgres -d $DB -c "COPY (SELECT * FROM ecst.export_snapshot('c1')) TO '$IT_DIR/c1.ndjson'"
psql_it -d $DB >/dev/null <<SQL
CREATE SERVER files FOREIGN DATA WRAPPER file_fdw;
CREATE FOREIGN TABLE c1_file (payload text) SERVER files OPTIONS (filename '$IT_DIR/c1.ndjson');
CREATE TABLE c3 (LIKE c1 INCLUDING ALL);
CREATE TABLE c3_addr (LIKE c1_addr INCLUDING ALL);
SELECT ecst.create_stream('c3', 'c3', 'aggregate_snapshot', '{"customerId": "customer_id"}', version => 'ts',
    children => '{"addresses": {"path": "addressContent.addresses", "table": "c3_addr", "key": {"addressId": "address_id"}, "parent_key": "customer_id", "columns": {"addressLine1": "line1"}}}');
SQL
check "file_fdw NDJSON loads" "40" "$(q "SELECT loaded FROM ecst.load_snapshot('c3', 'c1_file')")"
check "file_fdw load reproduces the replica" "0|0" "$(q "SELECT differs('c1', 'c3') || '|' || differs('c1_addr', 'c3_addr')")"
echo "-- event retention, rebuild, compaction"
psql_it -d $DB >/dev/null <<'SQL'
-- Deltas carrying a and b; only a is mapped at first. Shuffled, with deletes.
CREATE TABLE retained_events AS
SELECT e, v, CASE WHEN (e * v) % 11 = 0
         THEN format('{"id": "r%s", "v": %s, "oldState": {}}', e, v)
         ELSE format('{"id": "r%s", "v": %s, "newState": {%s}}', e, v,
              concat_ws(', ', CASE WHEN v % 2 = 0 THEN format('"a": "a%s"', v) END,
                              CASE WHEN v % 3 <> 1 THEN format('"b": "b%s"', v) END, '"x": 1')) END AS payload
FROM generate_series(1, 60) e, generate_series(1, 12) v;
CREATE TABLE rt (id text PRIMARY KEY, a text);
SELECT ecst.create_stream('rt', 'rt', 'delta', '{"id": "id"}', version => 'v', retain_events => true);
SELECT count(*) FROM (SELECT ecst.apply('rt', payload) FROM retained_events WHERE v <= 10 ORDER BY random()) x;
-- The reference: the final mapping (a and b) from the start, events in order.
CREATE TABLE rt_ref (id text PRIMARY KEY, a text, b text);
SELECT ecst.create_stream('rt_ref', 'rt_ref', 'delta', '{"id": "id"}', version => 'v');
SELECT count(*) FROM (SELECT ecst.apply('rt_ref', payload) FROM retained_events WHERE v <= 10 ORDER BY e, v) x;
ALTER TABLE rt ADD COLUMN b text;
SQL
check "the log keeps every event but duplicates and dead letters" t "$(q "SELECT count(*) = 600 FROM ecst.event_log l JOIN ecst.streams s ON s.id = l.stream_id WHERE s.name = 'rt'")"
check "rebuild replays the log" t "$(q "SELECT replayed > 0 AND dead_lettered = 0 FROM ecst.rebuild('rt')")"
check "rebuild after adding a mapped column fills it from the log" 0 "$(q "SELECT differs('rt', 'rt_ref')")"
check "compaction shrinks the log" t "$(q "SELECT events_after < events_before FROM ecst.compact_events('rt')")"
q "SELECT * FROM ecst.rebuild('rt')" >/dev/null
check "rebuild after compaction gives the same replica" 0 "$(q "SELECT differs('rt', 'rt_ref')")"
q "SELECT count(*) FROM (SELECT ecst.apply(s, payload) FROM retained_events, unnest(ARRAY['rt', 'rt_ref']) s WHERE v > 10 OR v % 5 = 0 ORDER BY random()) x" >/dev/null
check "late and duplicate events after compaction still converge (per-field versions kept)" 0 "$(q "SELECT differs('rt', 'rt_ref')")"
psql_it -d $DB >/dev/null <<'SQL'
CREATE TABLE rs (id text PRIMARY KEY, line1 text);
SELECT ecst.create_stream('rs', 'rs', 'entity_snapshot', '{"id": "id"}', version => 'ts', retain_events => true);
SELECT count(*) FROM (SELECT ecst.apply('rs', payload) FROM history ORDER BY random()) x;
ALTER TABLE rs ADD COLUMN n bigint;
SQL
q "SELECT ecst.compact_events('rs')" >/dev/null
q "SELECT * FROM ecst.rebuild('rs')" >/dev/null
check "snapshot stream: compact + rebuild fills the new column = events alone" 0 "$(q "SELECT differs('ref', 'rs')")"
check "rebuild needs retain_events" "55000" \
    "$(psql_it -d $DB -c "DO \$\$ BEGIN PERFORM ecst.rebuild('ref'); EXCEPTION WHEN OTHERS THEN RAISE NOTICE '%', SQLSTATE; END \$\$" 2>&1 | grep -o 55000)"
it_done
