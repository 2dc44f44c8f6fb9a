#!/usr/bin/env bash
# Secure by default: with zero configuration (the workers run as the bootstrap superuser), a
# plain role that owns a replica cannot get code of its choosing run as superuser — through a
# trigger, a column DEFAULT, a CHECK constraint or a domain check calling its functions — by the
# worker, nor by another role's process_inbox or retry_dead_letters(). Its events wait in the dead
# letters (42501, counted, one log line per stream) and it applies them itself. Also: a replica
# with a deferred foreign key, a trigger that always raises 40001 (bounded, dead-lettered), and
# SIGTERM in the middle of a long batch.
cd "$(dirname "$0")/../.."
. scripts/lib.sh
. tests/integration/common.sh
IT_DIR=/tmp/pg_ecst-it-esc IT_PORT=54339
it_start "ecst.naptime = 200"
DB=esc
q() { psql_it -d $DB -c "$1"; }
as_mallory() { psql -X -q -t -A -h "$IT_DIR/sock" -p "$IT_PORT" -U mallory -d $DB -v ON_ERROR_STOP=1 -c "$1"; }
superuser() { q "SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'"; }

psql_it -d postgres -c "CREATE DATABASE $DB" >/dev/null
q "CREATE EXTENSION pg_ecst" >/dev/null
q "CREATE ROLE mallory LOGIN" >/dev/null
q "GRANT CREATE ON SCHEMA public TO mallory" >/dev/null
as_mallory "
CREATE FUNCTION escalate() RETURNS boolean LANGUAGE plpgsql AS \$\$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE 'ALTER ROLE mallory SUPERUSER';
    END IF;
    RETURN true;
END \$\$;
CREATE FUNCTION escalate_text() RETURNS text LANGUAGE sql AS \$\$ SELECT escalate()::text \$\$;
CREATE FUNCTION escalate_trigger() RETURNS trigger LANGUAGE plpgsql AS \$\$ BEGIN PERFORM escalate(); RETURN NEW; END \$\$;
CREATE DOMAIN checked_text AS text CHECK (escalate());
CREATE TABLE by_trigger (id text PRIMARY KEY, v text);
CREATE TRIGGER t BEFORE INSERT OR UPDATE ON by_trigger FOR EACH ROW EXECUTE FUNCTION escalate_trigger();
CREATE TABLE by_default (id text PRIMARY KEY, v text, d text DEFAULT escalate_text());
CREATE TABLE by_check (id text PRIMARY KEY, v text CHECK (escalate()));
CREATE TABLE by_domain (id text PRIMARY KEY, v checked_text);
CREATE TABLE harmless (id text PRIMARY KEY, v text);
" >/dev/null
for t in by_trigger by_default by_check by_domain harmless; do
    as_mallory "SELECT ecst.create_stream('$t', '$t', 'entity_snapshot', '{\"id\": \"id\"}')" >/dev/null
done
# A superuser's table whose default calls mallory's function runs mallory's code too.
q "CREATE TABLE su_table (id text PRIMARY KEY, v text, d text DEFAULT escalate_text())" >/dev/null
q "SELECT ecst.create_stream('su_table', 'su_table', 'entity_snapshot', '{\"id\": \"id\"}')" >/dev/null
# The demo's case: a superuser's own table.
q "CREATE TABLE plain (id text PRIMARY KEY, v text)" >/dev/null
q "SELECT ecst.create_stream('plain', 'plain', 'entity_snapshot', '{\"id\": \"id\"}')" >/dev/null
streams="by_trigger by_default by_check by_domain harmless su_table"
feed() { for s in $streams plain; do q "INSERT INTO ecst.inbox (stream, payload) VALUES ('$s', '{\"id\": \"$1\", \"newState\": {\"v\": \"x\"}}')" >/dev/null; done; }

echo "-- through the worker, with zero configuration"
check "ecst.worker_role is not set" "" "$(q "SHOW ecst.worker_role")"
feed 1
wait_for $DB "the worker drains the inbox" "SELECT count(*) FROM ecst.inbox" 0
check "a superuser's own replica is applied (the demo's case)" 1 "$(q "SELECT count(*) FROM plain")"
check "mallory is not superuser" f "$(superuser)"
check "none of mallory's replicas (nor the superuser's table running her function) was written" 0 \
    "$(q "SELECT (SELECT count(*) FROM by_trigger) + (SELECT count(*) FROM by_default) + (SELECT count(*) FROM by_check)
                 + (SELECT count(*) FROM by_domain) + (SELECT count(*) FROM harmless) + (SELECT count(*) FROM su_table)")"
check "each of their events is a dead letter with SQLSTATE 42501" "6:42501" \
    "$(q "SELECT count(*) || ':' || string_agg(DISTINCT sqlstate, ',') FROM ecst.dead_letters")"
check "counted in ecst.stats" 6 "$(q "SELECT sum(dead_lettered) FROM ecst.stats WHERE stream <> 'plain'")"
feed 2
wait_for $DB "a second round drains too" "SELECT count(*) FROM ecst.inbox" 0
check "one log line per stream, not per event" 6 "$(grep -c 'is not applied as role "postgres"' "$IT_DIR/server.log")"
check "mallory is still not superuser" f "$(superuser)"

echo "-- through another role's process_inbox and retry_dead_letters()"
psql_it -d postgres -c "ALTER SYSTEM SET ecst.workers = 0" -c "SELECT pg_reload_conf()" >/dev/null
wait_for $DB "the workers stop" "SELECT count(*) FROM ecst.workers WHERE backend_type = 'pg_ecst worker'" 0
feed 3
check "a superuser's process_inbox takes every row" 7 "$(q "SELECT ecst.process_inbox()")"
check "mallory is not superuser after it" f "$(superuser)"
check "a superuser's retry of every letter applies none of hers" "" "$(q "SELECT string_agg(outcome || '=' || count, ',') FROM ecst.retry_dead_letters()")"
check "nor escalates" f "$(superuser)"
check "a superuser's retry of her stream by name is refused" 42501 \
    "$(psql_it -d $DB -v VERBOSITY=sqlstate -c "SELECT * FROM ecst.retry_dead_letters('by_trigger')" 2>&1 | sed -n 's/^ERROR: *\([0-9A-Z]\{5\}\).*/\1/p')"
check "mallory retries her harmless stream's letters herself" "applied=3" \
    "$(as_mallory "SELECT string_agg(outcome || '=' || count, ',') FROM ecst.retry_dead_letters('harmless')")"
check "... and her trigger's, which run as her, without a superuser's privileges" "applied=3" \
    "$(as_mallory "SELECT string_agg(outcome || '=' || count, ',') FROM ecst.retry_dead_letters('by_trigger')")"
check "mallory is not superuser at the end" f "$(superuser)"

echo "-- a configured worker role is trusted with the streams it may write"
q "CREATE ROLE ecst_worker LOGIN" >/dev/null
as_mallory "GRANT SELECT, INSERT, UPDATE, DELETE ON harmless TO ecst_worker" >/dev/null
psql_it -d postgres -c "ALTER SYSTEM SET ecst.worker_role = 'ecst_worker'" -c "ALTER SYSTEM RESET ecst.workers" \
    -c "SELECT pg_reload_conf()" >/dev/null
q "INSERT INTO ecst.inbox (stream, payload) VALUES ('harmless', '{\"id\": \"w\", \"newState\": {\"v\": \"by the worker role\"}}')" >/dev/null
wait_for $DB "the worker role applies mallory's harmless stream" "SELECT v FROM harmless WHERE id = 'w'" "by the worker role"
psql_it -d postgres -c "ALTER SYSTEM RESET ecst.worker_role" -c "SELECT pg_reload_conf()" >/dev/null

echo "-- a replica with a deferred foreign key, through the worker"
q "CREATE TABLE parent (id text PRIMARY KEY)" >/dev/null
q "INSERT INTO parent VALUES ('p1')" >/dev/null
q "CREATE TABLE child (id text PRIMARY KEY, parent_id text REFERENCES parent DEFERRABLE INITIALLY DEFERRED)" >/dev/null
q "SELECT ecst.create_stream('child', 'child', 'entity_snapshot', '{\"id\": \"id\"}')" >/dev/null
q "INSERT INTO ecst.inbox (stream, payload) VALUES
   ('child', '{\"id\": \"c1\", \"newState\": {\"parentId\": \"p1\"}}'),
   ('child', '{\"id\": \"c2\", \"newState\": {\"parentId\": \"nowhere\"}}'),
   ('child', '{\"id\": \"c3\", \"newState\": {\"parentId\": \"p1\"}}')" >/dev/null
wait_for $DB "the batch commits: the children whose parent exists are applied" "SELECT string_agg(id, ',' ORDER BY id) FROM child" "c1,c3"
check "the orphan is a dead letter (23503), not a failed commit" "23503" \
    "$(q "SELECT sqlstate FROM ecst.dead_letters WHERE stream = 'child'")"

echo "-- a replica trigger that always raises 40001 does not hold the inbox forever"
q "CREATE TABLE flaky (id text PRIMARY KEY, v text)" >/dev/null
q "CREATE FUNCTION flaky_trigger() RETURNS trigger LANGUAGE plpgsql AS \$\$
   BEGIN IF NEW.v = 'poison' THEN RAISE EXCEPTION 'always a serialization failure' USING ERRCODE = '40001'; END IF; RETURN NEW; END \$\$" >/dev/null
q "CREATE TRIGGER flaky BEFORE INSERT OR UPDATE ON flaky FOR EACH ROW EXECUTE FUNCTION flaky_trigger()" >/dev/null
q "SELECT ecst.create_stream('flaky', 'flaky', 'entity_snapshot', '{\"id\": \"id\"}')" >/dev/null
q "INSERT INTO ecst.inbox (stream, payload) VALUES
   ('flaky', '{\"id\": \"a\", \"newState\": {\"v\": \"fine\"}}'),
   ('flaky', '{\"id\": \"b\", \"newState\": {\"v\": \"poison\"}}'),
   ('flaky', '{\"id\": \"c\", \"newState\": {\"v\": \"fine\"}}')" >/dev/null
wait_for $DB "after its last try the batch goes through" "SELECT string_agg(id, ',' ORDER BY id) FROM flaky" "a,c" 60
check "the poison event is a dead letter with its SQLSTATE and the reason" "40001:true" \
    "$(q "SELECT sqlstate || ':' || (message LIKE '%failed 4 times in a row%') FROM ecst.dead_letters WHERE stream = 'flaky'")"
check "the server log says so once" 1 "$(grep -c 'this time an event that fails on the same kind of error becomes a dead letter' "$IT_DIR/server.log")"

echo "-- SIGTERM in the middle of a long batch"
psql_it -d postgres -c "ALTER SYSTEM SET ecst.batch_size = 100000" -c "SELECT pg_reload_conf()" >/dev/null
q "CREATE TABLE slow (id text PRIMARY KEY, v text)" >/dev/null
q "CREATE FUNCTION slow_trigger() RETURNS trigger LANGUAGE plpgsql AS \$\$ BEGIN PERFORM pg_sleep(0.002); RETURN NEW; END \$\$" >/dev/null
q "CREATE TRIGGER slow BEFORE INSERT ON slow FOR EACH ROW EXECUTE FUNCTION slow_trigger()" >/dev/null
q "SELECT ecst.create_stream('slow', 'slow', 'entity_snapshot', '{\"id\": \"id\"}')" >/dev/null
q "INSERT INTO ecst.inbox (stream, payload) SELECT 'slow', '{\"id\": \"' || i || '\", \"newState\": {\"v\": \"x\"}}' FROM generate_series(1, 20000) i" >/dev/null
sleep 2
pid=$(q "SELECT pid FROM ecst.workers WHERE backend_type = 'pg_ecst worker' AND database = '$DB'")
check "the worker is in the middle of its one 20,000-event batch (~40 s of triggers)" "0|20000" \
    "$(q "SELECT (SELECT count(*) FROM slow) || '|' || (SELECT count(*) FROM ecst.inbox WHERE stream = 'slow')")"
q "SELECT pg_terminate_backend($pid)" >/dev/null
wait_for $DB "the terminated worker is gone" "SELECT count(*) FROM pg_stat_activity WHERE pid = $pid" 0 120
# Had it finished its batch first (as it did when it looked for SIGTERM between batches only),
# the 20,000 rows would be applied and gone from the inbox by now.
check "it ended mid-batch: its transaction rolled back, every event is still in the inbox" "0|20000" \
    "$(q "SELECT (SELECT count(*) FROM slow) || '|' || (SELECT count(*) FROM ecst.inbox WHERE stream = 'slow')")"
psql_it -d postgres -c "ALTER SYSTEM RESET ecst.batch_size" -c "SELECT pg_reload_conf()" >/dev/null
wait_for $DB "a new worker applies them all" "SELECT count(*) FROM slow" 20000 120
it_done
