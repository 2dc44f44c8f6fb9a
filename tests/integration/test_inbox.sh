#!/usr/bin/env bash
# The inbox (docs/guides/ingest.md) against a running server with pg_ecst preloaded: COPY into the inbox (text and CSV,
# malformed lines mixed in), the background worker, wake-up latency, kill -9 in the middle of a
# drain, several workers keeping per-entity order, trigger mode, process_inbox without workers,
# and waiting quietly for a database that does not exist yet.
cd "$(dirname "$0")/../.."
. scripts/lib.sh
. tests/integration/common.sh
it_start "ecst.database = 'ecst_it'" "ecst.naptime = 2000" "ecst.batch_size = 500"
gen() { python3 tests/integration/gen_events.py "$@"; }
work=$IT_DIR/work
mkdir -p "$work"
DB=ecst_it
q() { psql_it -d $DB -c "$1"; }

psql_it -d postgres -c "CREATE DATABASE ecst_it"
psql_it -d $DB >/dev/null <<'SQL'
CREATE EXTENSION pg_ecst;
CREATE TABLE snap (id text PRIMARY KEY, line1 text);
SELECT ecst.create_stream('snap', 'snap', 'entity_snapshot', '{"id": "id"}', version => 'ts');
CREATE TABLE crash (id text PRIMARY KEY, line1 text);
SELECT ecst.create_stream('crash', 'crash', 'entity_snapshot', '{"id": "id"}', version => 'ts');
CREATE TABLE delt (id text PRIMARY KEY, a text, b text);
SELECT ecst.create_stream('delt', 'delt', 'delta', '{"id": "id"}');
CREATE TABLE lat (id text PRIMARY KEY, v text);
SELECT ecst.create_stream('lat', 'lat', 'entity_snapshot', '{"id": "id"}');
CREATE TABLE expected (id text PRIMARY KEY, x text, y text);
SQL

echo "-- worker"
wait_for $DB "one worker runs" "SELECT count(*) FROM ecst.workers WHERE backend_type = 'pg_ecst worker'" 1
check "worker is named pg_ecst in pg_stat_activity" "pg_ecst worker 0" \
    "$(q "SELECT application_name FROM pg_stat_activity WHERE backend_type = 'pg_ecst worker'")"


echo "-- COPY (text format) with malformed lines"
gen --shape snapshot --stream snap --entities 2000 --events 20000 --bad 25 --seed 7 \
    --out "$work/snap.tsv" --expected "$work/snap.csv" --bad-out "$work/snap.bad"
check "COPY of 20025 lines with 25 malformed ones succeeds" "COPY 20025" \
    "$(psql -X -h "$IT_DIR/sock" -p "$IT_PORT" -U postgres -d $DB -c "\\copy ecst.inbox (stream, payload) FROM '$work/snap.tsv'")"
wait_for $DB "the worker drains the inbox" "SELECT count(*) FROM ecst.inbox" 0 120
check "replica = highest version per entity" 0 "$(compare snap "$work/snap.csv" "id, line1, ''")"
check "every bad line is a dead letter" 25 "$(q "SELECT count(*) FROM ecst.dead_letters WHERE stream = 'snap'")"
q "CREATE TEMP TABLE bad (payload text)" >/dev/null
check "bad lines kept verbatim" 0 "$(psql_it -d $DB -c "CREATE TEMP TABLE bad (payload text)" -c "\\copy bad FROM '$work/snap.bad' WITH (FORMAT csv, DELIMITER E'\\x01', QUOTE E'\\x02')" -c "SELECT count(*) FROM (SELECT payload FROM bad EXCEPT SELECT payload FROM ecst.dead_letters) d" | tail -1)"
check "stats: every event accounted once" "20000|0|25|0" \
    "$(q "SELECT (applied + stale) || '|' || duplicate || '|' || dead_lettered || '|' || pending FROM ecst.stats WHERE stream = 'snap'")"

echo "-- a broken stream, or an on_conflict 'error' event, does not stop the worker for the others"
psql_it -d $DB >/dev/null <<'SQL'
CREATE TABLE brk (id text PRIMARY KEY, extra text);
SELECT ecst.create_stream('brk', 'brk', 'entity_snapshot', '{"id": "id"}', columns => '{"more": "extra"}');
CREATE TABLE strict_t (id text PRIMARY KEY, a text, v bigint);
SELECT ecst.create_stream('strict', 'strict_t', 'delta', '{"id": "id"}', version => 'v', on_conflict => 'error');
SELECT ecst.apply('strict', '{"id": "s", "v": 1, "newState": {"a": "x"}}');
ALTER TABLE brk DROP COLUMN extra;
INSERT INTO ecst.inbox (stream, payload) VALUES
    ('brk', '{"id": "b1", "newState": {"more": "m"}}'),
    ('strict', '{"id": "s", "v": 2, "oldState": {"a": "WRONG"}, "newState": {"a": "y"}}'),
    ('lat', '{"id": "after-broken", "newState": {"v": "ok"}}');
SQL
wait_for $DB "the other stream's event is applied" "SELECT count(*) FROM lat WHERE id = 'after-broken'" 1 30
check "the broken stream's event is a dead letter" "write_failed" \
    "$(q "SELECT error_code FROM ecst.dead_letters WHERE stream = 'brk'")"
check "... counted in ecst.stats" 1 "$(q "SELECT dead_lettered FROM ecst.stats WHERE stream = 'brk'")"
check "the conflicting event of an on_conflict 'error' stream is a dead letter" "conflict|23000" \
    "$(q "SELECT error_code || '|' || sqlstate FROM ecst.dead_letters WHERE stream = 'strict'")"
check "the worker did not restart" "0" "$(grep -c 'pg_ecst worker.*exited with exit code' "$IT_DIR/server.log" || true)"
q "DELETE FROM ecst.dead_letters WHERE stream = 'strict'" >/dev/null # (its retry would raise: on_conflict 'error')
check "retrying every dead letter goes on beside the broken stream, whose letters stay" "1" \
    "$(q "SELECT count(*) FROM ecst.retry_dead_letters()" >/dev/null 2>&1 && q "SELECT count(*) FROM ecst.dead_letters WHERE stream = 'brk'")"

echo "-- what one replica's trigger sets in the worker's session does not reach the next stream"
psql_it -d $DB >/dev/null <<'SQL'
CREATE TABLE a_set (id text PRIMARY KEY);
CREATE TABLE b_log (id text PRIMARY KEY, seen text);
SELECT ecst.create_stream('a_set', 'a_set', 'entity_snapshot', '{"id": "id"}');
SELECT ecst.create_stream('b_log', 'b_log', 'entity_snapshot', '{"id": "id"}');
CREATE FUNCTION a_set_trg() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_catalog.set_config('search_path', 'x_marker, public', false); RETURN NEW; END $$;
CREATE TRIGGER a_set_trg BEFORE INSERT ON a_set FOR EACH ROW EXECUTE FUNCTION a_set_trg();
CREATE FUNCTION b_log_trg() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.seen := pg_catalog.current_setting('search_path'); RETURN NEW; END $$;
CREATE TRIGGER b_log_trg BEFORE INSERT ON b_log FOR EACH ROW EXECUTE FUNCTION b_log_trg();
INSERT INTO ecst.inbox (stream, payload) VALUES ('a_set', '{"id": "1", "newState": {}}'), ('b_log', '{"id": "1", "newState": {}}');
SQL
wait_for $DB "both streams applied" "SELECT count(*) FROM b_log" 1 30
check "the second stream's trigger did not see the first one's search_path" "f" \
    "$(q "SELECT seen LIKE '%x_marker%' FROM b_log")"

echo "-- a worker with a backlog stops between batches when terminated (not after the whole inbox)"
psql_it -d $DB >/dev/null <<'SQL'
CREATE TABLE slowt (id text PRIMARY KEY, v text);
SELECT ecst.create_stream('slowt', 'slowt', 'entity_snapshot', '{"id": "id"}');
CREATE FUNCTION slowt_sleep() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.002); RETURN NEW; END $$;
CREATE TRIGGER slowt_sleep BEFORE INSERT ON slowt FOR EACH ROW EXECUTE FUNCTION slowt_sleep();
INSERT INTO ecst.inbox (stream, payload)
    SELECT 'slowt', format('{"id": "e%s", "newState": {"v": "x"}}', i) FROM generate_series(1, 4000) i;
SQL
sleep 1
victim=$(q "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_ecst worker' LIMIT 1")
q "SELECT pg_terminate_backend($victim)" >/dev/null
sleep 3
check "the terminated worker is gone within a batch, with a backlog left" "0|t" \
    "$(q "SELECT count(*) FROM pg_stat_activity WHERE pid = $victim")|$(q "SELECT count(*) > 0 FROM ecst.inbox WHERE stream = 'slowt'")"
wait_for $DB "a new worker drains the rest" "SELECT count(*) FROM slowt" 4000 120

echo "-- a long transaction elsewhere, and a row that commits late with an older seq"
# While a REPEATABLE READ transaction is open, the inbox rows the worker deletes stay in the
# index: claims that all started from the oldest row walked past every one of them again. The
# worker's claims start after the newest row it looked at while nothing was inserted into the
# inbox meanwhile (and from the oldest row otherwise), and still take a row that appears later
# with an older seq.
q "CREATE TABLE held (id text PRIMARY KEY, line1 text); SELECT ecst.create_stream('held', 'held', 'entity_snapshot', '{\"id\": \"id\"}', version => 'ts')" >/dev/null
psql_it -d $DB -c "BEGIN ISOLATION LEVEL REPEATABLE READ" -c "SELECT count(*) FROM ecst.streams" -c "SELECT pg_sleep(300)" >/dev/null 2>&1 &
holder=$!
sleep 1
walked() { q "SELECT idx_tup_read FROM pg_stat_all_indexes WHERE indexrelid = 'ecst.inbox_seq_idx'::regclass"; }
before=$(walked)
gen --shape snapshot --stream held --entities 2000 --events 20000 --seed 9 --out "$work/held.tsv" --expected "$work/held.csv"
psql_it -d $DB -c "\\copy ecst.inbox (stream, payload) FROM '$work/held.tsv'" >/dev/null
wait_for $DB "the worker drains 20,000 events while a transaction holds back cleanup" "SELECT count(*) FROM ecst.inbox" 0 120
check "replica = highest version per entity" 0 "$(compare held "$work/held.csv" "id, line1, ''")"
q "INSERT INTO ecst.inbox (stream, payload, seq) VALUES ('held', '{\"id\": \"old-seq\", \"ts\": 1, \"newState\": {\"line1\": \"late\"}}', 1)" >/dev/null
wait_for $DB "a row with an older seq than any claimed is taken too" "SELECT line1 FROM held WHERE id = 'old-seq'" late
sleep 3 # the worker reports its statistics at most once a second
# 40 claims of 500: from the oldest row each time, 500 + 1,000 + ... + 20,000 = 410,000 index
# entries, and 20,000 more for every idle look; after the newest row claimed, each row once, and
# all of them once more when a claim must start from the oldest row (after the late row's insert;
# the first one also walks the rows drained above, once) - about 60,000, plus count(*) polls.
n=$(( $(walked) - before ))
check "the claims walked fewer than 120,000 index entries ($n)" t "$([ "$n" -lt 120000 ] && echo t || echo f)"
q "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(300)') t" >/dev/null
wait $holder 2>/dev/null || true
# One writer's rows on both sides of the worker's claims: a row with an old seq (as from a block
# of cached sequence values taken long ago), then, in the same transaction, one with a new seq.
# Once they commit, the old one must be applied first, as a claim from the oldest row does.
q "CREATE TABLE ord (id text PRIMARY KEY, v text); SELECT ecst.create_stream('ord', 'ord', 'entity_snapshot', '{\"id\": \"id\"}')" >/dev/null
psql_it -d $DB -c "BEGIN" \
    -c "INSERT INTO ecst.inbox (stream, payload, seq) VALUES ('ord', '{\"id\": \"x\", \"newState\": {\"v\": \"first\"}}', 2)" \
    -c "SELECT pg_sleep(4)" \
    -c "INSERT INTO ecst.inbox (stream, payload) VALUES ('ord', '{\"id\": \"x\", \"newState\": {\"v\": \"second\"}}')" \
    -c "COMMIT" >/dev/null &
writer=$!
gen --shape snapshot --stream held --entities 2000 --events 3000 --seed 11 --out "$work/held2.tsv" --expected "$work/held2.csv"
psql_it -d $DB -c "\\copy ecst.inbox (stream, payload) FROM '$work/held2.tsv'" >/dev/null
wait $writer
wait_for $DB "the worker drains them all" "SELECT count(*) FROM ecst.inbox" 0 60
check "one writer's rows are applied in its order across the worker's claims" "second" "$(q "SELECT v FROM ord WHERE id = 'x'")"

echo "-- COPY (CSV format)"
printf '%s\n' 'delt,"{""id"": ""csv1"", ""newState"": {""a"": ""x, \""quoted\"" y""}}"' \
              'delt,not json either' > "$work/events.csv"
psql_it -d $DB -c "\\copy ecst.inbox (stream, payload) FROM '$work/events.csv' WITH (FORMAT csv)" >/dev/null
wait_for $DB "CSV rows are applied" "SELECT a FROM delt WHERE id = 'csv1'" 'x, "quoted" y'
wait_for $DB "CSV bad row is a dead letter" "SELECT count(*) FROM ecst.dead_letters WHERE payload = 'not json either'" 1

echo "-- latency: single INSERTed events"
psql_it -d $DB >/dev/null <<'SQL'
CREATE TABLE latencies (ms float8);
CREATE PROCEDURE measure(n int) LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz;
BEGIN
    FOR i IN 1..n LOOP
        t0 := clock_timestamp();
        INSERT INTO ecst.inbox (stream, payload) VALUES ('lat', format('{"id": "l%s", "newState": {"v": "x"}}', i));
        COMMIT;
        WHILE NOT EXISTS (SELECT 1 FROM lat WHERE id = 'l' || i) LOOP
            PERFORM pg_sleep(0.0002);
            EXIT WHEN clock_timestamp() - t0 > interval '10 s';
        END LOOP;
        INSERT INTO latencies VALUES (extract(epoch FROM clock_timestamp() - t0) * 1000);
        COMMIT;
        PERFORM pg_sleep(0.01);
    END LOOP;
END $$;
CALL measure(200);
SQL
lat=$(q "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 2) || ' ms p50, ' || round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 2) || ' ms p99, ' || round(max(ms)::numeric, 2) || ' ms max' FROM latencies")
echo "  latency insert->visible over 200 events (naptime 2000 ms): $lat"
check "every single event is visible well under a second (naptime is 2 s)" "t" "$(q "SELECT max(ms) < 1000 FROM latencies")"

echo "-- trigger mode"
psql_it -d $DB >/dev/null <<'SQL'
CREATE TABLE app_events (id serial PRIMARY KEY, body jsonb);
CREATE TRIGGER apply_app_events AFTER INSERT ON app_events FOR EACH ROW EXECUTE FUNCTION ecst.apply_trigger('snap', 'body');
SQL
check "the trigger applies in the same transaction" "from trigger" \
    "$(psql_it -d $DB -c "BEGIN" -c "INSERT INTO app_events (body) VALUES ('{\"id\": \"trig\", \"ts\": 1, \"newState\": {\"line1\": \"from trigger\"}}')" -c "SELECT line1 FROM snap WHERE id = 'trig'" -c "ROLLBACK" | tail -1)"
check "rolled back with its transaction" "0" "$(q "SELECT count(*) FROM snap WHERE id = 'trig'")"
check "misuse is explained" "22023" \
    "$(psql_it -d $DB -c "CREATE TABLE t2 (p text)" -c "CREATE TRIGGER x BEFORE INSERT ON t2 FOR EACH ROW EXECUTE FUNCTION ecst.apply_trigger('snap', 'p')" -c "DO \$\$ BEGIN INSERT INTO t2 VALUES ('{}'); EXCEPTION WHEN OTHERS THEN RAISE NOTICE '%', SQLSTATE; END \$\$" 2>&1 | grep -o '22023')"

echo "-- kill -9 of the worker in the middle of a large drain"
gen --shape snapshot --stream crash --entities 5000 --events 60000 --seed 11 --out "$work/crash.tsv" --expected "$work/crash.csv"
psql_it -d $DB -c "\\copy ecst.inbox (stream, payload) FROM '$work/crash.tsv'" >/dev/null
wait_for $DB "the worker started draining" "SELECT count(*) < 55000 FROM ecst.inbox" t 60
pid=$(q "SELECT pid FROM ecst.workers WHERE backend_type = 'pg_ecst worker'")
pending_at_kill=$(q "SELECT count(*) FROM ecst.inbox")
kill -9 "$pid"
echo "  killed worker $pid with $pending_at_kill events pending"
wait_ready
wait_for $DB "the inbox drains after recovery" "SELECT count(*) FROM ecst.inbox" 0 180
check "replica exactly right after the crash" 0 "$(compare crash "$work/crash.csv" "id, line1, ''")"
check "nothing dead-lettered, nothing applied twice, nothing lost" "60000|0|0" \
    "$(q "SELECT (applied + stale) || '|' || duplicate || '|' || dead_lettered FROM ecst.stats WHERE stream = 'crash'")"

echo "-- two workers keep per-entity inbox order (unversioned deltas)"
q "ALTER SYSTEM SET ecst.workers = 2" >/dev/null
q "SELECT pg_reload_conf()" >/dev/null
wait_for $DB "two workers run" "SELECT count(*) FROM ecst.workers WHERE backend_type = 'pg_ecst worker'" 2
q "DELETE FROM delt" >/dev/null
gen --shape delta --stream delt --entities 300 --events 30000 --seed 5 --out "$work/delt.tsv" --expected "$work/delt.csv"
psql_it -d $DB -c "\\copy ecst.inbox (stream, payload) FROM '$work/delt.tsv'" >/dev/null
wait_for $DB "the workers drain the inbox" "SELECT count(*) FROM ecst.inbox" 0 180
check "final state = in-order application" 0 "$(compare delt "$work/delt.csv" "id, coalesce(a, ''), coalesce(b, '')" | tail -1)"
# With two workers each row's owner comes from its entity key, which needs the stream: a broken one
# must not stop the claims (its rows go to worker 0, which dead-letters them).
q "INSERT INTO ecst.inbox (stream, payload) VALUES ('brk', '{\"id\": \"b2\", \"newState\": {\"more\": \"m\"}}'), ('lat', '{\"id\": \"after-broken-2\", \"newState\": {\"v\": \"ok\"}}')" >/dev/null
wait_for $DB "two workers: the other stream's event is applied beside a broken stream" "SELECT count(*) FROM lat WHERE id = 'after-broken-2'" 1 30
wait_for $DB "... and the broken stream's event is a dead letter" "SELECT count(*) FROM ecst.dead_letters WHERE stream = 'brk'" 2 30

echo "-- an inbox with a delete trigger is claimed through SQL, by two workers and by one"
# A user's audit trigger on the inbox: the workers must then claim with DELETE statements (so that
# it fires) instead of the executor's row API, and still keep per-entity order.
q "CREATE TABLE inbox_audit (seq bigint PRIMARY KEY, stream text)" >/dev/null
q "CREATE FUNCTION audit_inbox() RETURNS trigger LANGUAGE plpgsql AS \$\$
   BEGIN INSERT INTO public.inbox_audit VALUES (OLD.seq, OLD.stream); RETURN OLD; END \$\$" >/dev/null
q "CREATE TRIGGER audit AFTER DELETE ON ecst.inbox FOR EACH ROW EXECUTE FUNCTION audit_inbox()" >/dev/null
for n in 2 1; do
    q "DELETE FROM delt" >/dev/null
    q "TRUNCATE inbox_audit" >/dev/null
    q "ALTER SYSTEM SET ecst.workers = $n" >/dev/null
    q "SELECT pg_reload_conf()" >/dev/null
    wait_for $DB "$n worker(s) run" "SELECT count(*) FROM ecst.workers WHERE backend_type = 'pg_ecst worker'" $n
    gen --shape delta --stream delt --entities 300 --events 20000 --seed $((20 + n)) --out "$work/delt$n.tsv" --expected "$work/delt$n.csv"
    psql_it -d $DB -c "\\copy ecst.inbox (stream, payload) FROM '$work/delt$n.tsv'" >/dev/null
    wait_for $DB "$n worker(s) drain the inbox" "SELECT count(*) FROM ecst.inbox" 0 180
    check "$n worker(s): final state = in-order application" 0 "$(compare delt "$work/delt$n.csv" "id, coalesce(a, ''), coalesce(b, '')" | tail -1)"
    check "$n worker(s): the trigger saw every event claimed, once" "20000|20000" \
        "$(q "SELECT count(*) || '|' || count(DISTINCT seq) FROM inbox_audit WHERE stream = 'delt'")"
done
q "DROP TRIGGER audit ON ecst.inbox" >/dev/null

echo "-- process_inbox without workers"
q "ALTER SYSTEM SET ecst.workers = 0" >/dev/null
q "SELECT pg_reload_conf()" >/dev/null
wait_for $DB "workers stop" "SELECT count(*) FROM ecst.workers WHERE backend_type = 'pg_ecst worker'" 0
q "INSERT INTO ecst.inbox (stream, payload) VALUES ('lat', '{\"id\": \"manual\", \"newState\": {\"v\": \"m\"}}'), ('lat', 'junk'), ('nope', '{}')" >/dev/null
check "process_inbox applies synchronously" "3|m" \
    "$(psql_it -d $DB -c "SELECT ecst.process_inbox()" -c "SELECT v FROM lat WHERE id = 'manual'" | paste -sd'|')"
check "unknown stream in the inbox is a dead letter" "unknown_stream" "$(q "SELECT error_code FROM ecst.dead_letters WHERE stream = 'nope'")"
check "process_inbox(max_events) bounds the work" "1|1" \
    "$(psql_it -d $DB -c "INSERT INTO ecst.inbox (stream, payload) VALUES ('lat', '{\"id\": \"m2\", \"newState\": {}}'), ('lat', '{\"id\": \"m3\", \"newState\": {}}')" -c "SELECT ecst.process_inbox(max_events => 1)" -c "SELECT count(*) FROM ecst.inbox" | paste -sd'|')"
# One call drains 20,000 rows in 40 claims of 500 in one transaction: the rows it deleted stay in
# the index until it commits. Claims that all started from the oldest row walked past them again
# and again (500 + 1,000 + ... + 20,000 = 410,000 index entries, and 20,000 for the last, empty
# one); claims that start after the newest row claimed walk each once (and all once more in the
# last claim, from the oldest row).
q "DELETE FROM held" >/dev/null
psql_it -d $DB -c "\\copy ecst.inbox (stream, payload) FROM '$work/held.tsv'" >/dev/null
check "process_inbox drains 20,000 events, walking fewer than 50,000 index entries" "20001|t" \
    "$(psql_it -d $DB -c "BEGIN" -c "SELECT ecst.process_inbox()" \
        -c "SELECT pg_stat_get_xact_tuples_returned('ecst.inbox_seq_idx'::regclass) < 50000" -c "COMMIT" | paste -sd'|')"

# In REPEATABLE READ, rows another session drained after the transaction's snapshot stay visible
# to it but cannot be taken: process_inbox must still end, having taken none.
q "INSERT INTO ecst.inbox (stream, payload) SELECT 'lat', format('{\"id\": \"rr%s\", \"newState\": {\"v\": \"x\"}}', i) FROM generate_series(1, 1200) i" >/dev/null
psql_it -d $DB -c "SET statement_timeout = '60s'" -c "BEGIN ISOLATION LEVEL REPEATABLE READ" -c "SELECT count(*) FROM ecst.inbox" \
    -c "SELECT pg_sleep(2)" -c "SELECT ecst.process_inbox()" -c "COMMIT" > "$work/rr_pi.out" 2>&1 &
rr=$!
sleep 1
check "process_inbox drains 1,200 rows" "1200" "$(q "SELECT ecst.process_inbox()")"
wait $rr || true
check "... and one in REPEATABLE READ that saw them before ends without taking any" "1200||0" "$(paste -sd'|' "$work/rr_pi.out")"

echo "-- waiting quietly for a database that does not exist yet"
q "ALTER SYSTEM SET ecst.workers = 1" >/dev/null
q "ALTER SYSTEM SET ecst.database = 'later_db'" >/dev/null
q "SELECT pg_reload_conf()" >/dev/null
sleep 4
check "the launcher logs the missing database once" 1 "$(grep -c 'database "later_db" (ecst.database) does not exist' "$IT_DIR/server.log")"
psql_it -d postgres -c "CREATE DATABASE later_db" >/dev/null
sleep 3
check "no worker stays in the new database while it has no extension" 0 \
    "$(psql_it -d postgres -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_ecst worker' AND datname = 'later_db'")"
psql_it -d later_db -c "CREATE EXTENSION pg_ecst" -c "CREATE TABLE t (id text PRIMARY KEY)" \
    -c "SELECT ecst.create_stream('t', 't', 'entity_snapshot', '{\"id\": \"id\"}')" \
    -c "INSERT INTO ecst.inbox (stream, payload) VALUES ('t', '{\"id\": \"1\", \"newState\": {}}')" >/dev/null
wait_for later_db "CREATE EXTENSION starts a worker there, which applies its inbox" "SELECT count(*) FROM t" 1 30
check "no pg_ecst process failed (exit code 1, other than terminated on purpose) in the server log" 0 "$(failed_workers)"
check "no worker errors in the server log" 0 "$(grep -c 'ERROR' "$IT_DIR/server.log" | grep -v '^0$' >/dev/null; grep 'ERROR' "$IT_DIR/server.log" | grep -vc 'canceling\|terminating\|22023\|apply_trigger\|^$' || true)"
it_done
