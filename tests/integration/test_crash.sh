#!/usr/bin/env bash
# Crashes in the middle of bulk work: kill -9 of a client backend during a large apply_batch, and
# pg_ctl stop -m immediate during load_snapshot. Both are single transactions: after recovery
# nothing of them is visible, and running them again gives exactly the expected replica.
cd "$(dirname "$0")/../.."
. scripts/lib.sh
. tests/integration/common.sh
IT_DIR=/tmp/pg_ecst-it-crash IT_PORT=54334
it_start "ecst.workers = 0"
DB=crash
q() { psql_it -d $DB -c "$1"; }
psql_it -d postgres -c "CREATE DATABASE crash" >/dev/null
psql_it -d $DB >/dev/null <<'SQL'
CREATE EXTENSION pg_ecst;
CREATE TABLE events AS
SELECT format('{"id": "e%s", "ts": %s, "newState": {"line1": "e%s at %s"}}', i % 40000, i, i % 40000, i) AS payload
FROM generate_series(1, 400000) i;
CREATE TABLE t (id text PRIMARY KEY, line1 text);
SELECT ecst.create_stream('t', 't', 'entity_snapshot', '{"id": "id"}', version => 'ts');
CREATE TABLE expected AS SELECT DISTINCT ON (payload::jsonb->>'id') payload::jsonb->>'id' AS id,
       payload::jsonb->'newState'->>'line1' AS line1 FROM events ORDER BY payload::jsonb->>'id', (payload::jsonb->>'ts')::int DESC;
SQL
differs() { q "SELECT count(*) FROM ((TABLE t EXCEPT TABLE expected) UNION ALL (TABLE expected EXCEPT TABLE t)) d"; }
# stop_immediately_during SQL: runs SQL in the background, stops the server with -m immediate one
# second in, restarts it and waits until it accepts connections again.
stop_immediately_during() {
    psql_it -d $DB -c "$1" >/dev/null 2>&1 &
    sleep 1
    sudo -u postgres "$PG_BIN/pg_ctl" -D "$IT_DIR/data" -m immediate -w stop >/dev/null
    wait || true
    sudo -u postgres "$PG_BIN/pg_ctl" -D "$IT_DIR/data" -l "$IT_DIR/server.log" -w start >/dev/null
    wait_ready
}

echo "-- kill -9 of a client backend during apply_batch"
psql_it -d $DB -c "SELECT count(*) FROM ecst.apply_batch('t', (SELECT array_agg(payload) FROM events))" >/dev/null 2>&1 &
sleep 1
pid=$(q "SELECT pid FROM pg_stat_activity WHERE query LIKE '%apply_batch%' AND pid <> pg_backend_pid() LIMIT 1")
kill -9 "$pid"
wait || true
wait_ready
check "nothing of the killed batch is visible" "0|0" "$(q "SELECT (SELECT count(*) FROM t) || '|' || (SELECT count(*) FROM ecst.entity_state)")"
q "SELECT count(*) FROM ecst.apply_batch('t', (SELECT array_agg(payload) FROM events))" >/dev/null
check "applying it again gives exactly the expected replica" 0 "$(differs)"
check "every event counted once" "400000|0" "$(q "SELECT (applied + stale) || '|' || dead_lettered FROM ecst.stats WHERE stream = 't'")"

echo "-- pg_ctl stop -m immediate during load_snapshot"
q "SELECT ecst.drop_stream('t')" >/dev/null
q "TRUNCATE t" >/dev/null
q "SELECT ecst.create_stream('t', 't', 'entity_snapshot', '{\"id\": \"id\"}', version => 'ts')" >/dev/null
stop_immediately_during "SELECT * FROM ecst.load_snapshot('t', 'events')"
check "nothing of the interrupted load is visible" "0|0" "$(q "SELECT (SELECT count(*) FROM t) || '|' || (SELECT count(*) FROM ecst.entity_state)")"
check "loading again gives exactly the expected replica" "400000" "$(q "SELECT loaded FROM ecst.load_snapshot('t', 'events')")"
check "replica exact" 0 "$(differs)"

echo "-- pg_ctl stop -m immediate during a bulk load into an empty replica (COPY path, helper thread)"
psql_it -d $DB >/dev/null <<'SQL'
CREATE TABLE snap AS SELECT format('{"id": "s%s", "newState": {"line1": "s%s", "ts": %s}}', i, i, i) AS payload
FROM generate_series(1, 400000) i;
CREATE TABLE t2 (id text PRIMARY KEY, line1 text, ts bigint);
SELECT ecst.create_stream('t2', 't2', 'entity_snapshot', '{"id": "id"}', version => 'newState.ts');
SQL
stop_immediately_during "SELECT * FROM ecst.load_snapshot('t2', 'snap')"
check "nothing of the interrupted bulk load is visible" "0" "$(q "SELECT count(*) FROM t2")"
check "loading again takes the bulk path (no version-state rows) and loads every row" "400000|0|400000" \
    "$(q "SELECT loaded FROM ecst.load_snapshot('t2', 'snap')")|$(q "SELECT (SELECT count(*) FROM ecst.entity_state s JOIN ecst.streams x ON x.id = s.stream_id WHERE x.name = 't2') || '|' || (SELECT count(*) FROM t2 WHERE line1 = id AND ts = substr(id, 2)::int)")"
it_done
