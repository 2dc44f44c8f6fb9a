#!/usr/bin/env bash
# The privilege model (README: Privileges): replica tables are written with the caller's
# privileges, pg_ecst's own tables only through its functions, stream-wide operations need
# ownership, the two group roles grant exactly what they say, the worker runs as
# ecst.worker_role, and no caller-created operator runs with the extension owner's privileges.
cd "$(dirname "$0")/../.."
. scripts/lib.sh
IT_DIR=/tmp/pg_ecst-it-priv
IT_PORT=54335
. tests/integration/common.sh
it_start "ecst.database = 'app'" "ecst.workers = 0" "ecst.naptime = 100"

# as ROLE SQL: runs SQL logged in as ROLE; prints the result.
as() { psql -X -q -t -A -h "$IT_DIR/sock" -p "$IT_PORT" -U "$1" -d app -v ON_ERROR_STOP=1 -c "$2"; }
# sqlstate ROLE SQL: the SQLSTATE SQL fails with as ROLE (empty if it succeeds).
sqlstate() {
    psql -X -q -t -A -h "$IT_DIR/sock" -p "$IT_PORT" -U "$1" -d app -v VERBOSITY=sqlstate -c "$2" 2>&1 >/dev/null |
        sed -n 's/^ERROR: *\([0-9A-Z]\{5\}\).*/\1/p' | head -1
}
ev() { printf '{"id": "%s", "newState": {"name": "%s", "v": %s}}' "$1" "$2" "$3"; }

psql_it -d postgres -c "CREATE DATABASE app" >/dev/null
psql_it -d app >/dev/null <<'SQL'
CREATE EXTENSION pg_ecst;
CREATE ROLE app LOGIN;
CREATE ROLE stranger LOGIN;
CREATE ROLE feeder LOGIN IN ROLE ecst_writer;
CREATE ROLE monitor LOGIN IN ROLE ecst_reader;
CREATE ROLE worker LOGIN;
GRANT CREATE ON DATABASE app TO app;
CREATE TABLE t1 (id text PRIMARY KEY, name text, v bigint);
CREATE TABLE t2 (id text PRIMARY KEY, name text, v bigint);
CREATE TABLE t3 (id text PRIMARY KEY, name text, v bigint);
ALTER TABLE t3 OWNER TO app;
GRANT SELECT, INSERT, UPDATE, DELETE ON t1 TO app, worker;
SELECT ecst.create_stream('s1', 't1', 'entity_snapshot', '{"id": "id"}', version => 'newState.v', retain_events => true);
SELECT ecst.create_stream('s2', 't2', 'entity_snapshot', '{"id": "id"}', version => 'newState.v');
CREATE TABLE snap (payload text);
INSERT INTO snap VALUES ('{"id": "z", "newState": {"name": "z", "v": 1}}');
GRANT SELECT ON snap TO PUBLIC;
SQL

echo "-- a role with no privileges"
for t in entity_state applied_events dead_letters inbox streams stream_children stream_counters event_log; do
    check "stranger cannot read ecst.$t" "42501" "$(sqlstate stranger "SELECT * FROM ecst.$t")"
done
check "stranger cannot write ecst.inbox" "42501" "$(sqlstate stranger "INSERT INTO ecst.inbox (stream, payload) VALUES ('s1', 'x')")"
check "stranger cannot alter ecst.entity_state" "42501" "$(sqlstate stranger "DELETE FROM ecst.entity_state")"
check "stranger cannot apply to a replica it may not write" "42501" "$(sqlstate stranger "SELECT ecst.apply('s1', '$(ev a A 1)')")"
check "... not even a bad event (no dead letter)" "42501" "$(sqlstate stranger "SELECT ecst.apply('s1', 'not json')")"
check "... nor a batch" "42501" "$(sqlstate stranger "SELECT * FROM ecst.apply_batch('s1', ARRAY['$(ev a A 1)'])")"
check "... nor a snapshot load" "42501" "$(sqlstate stranger "SELECT * FROM ecst.load_snapshot('s1', 'snap')")"
check "stranger cannot export a replica it may not read" "42501" "$(sqlstate stranger "SELECT * FROM ecst.export_snapshot('s1')")"
check "stranger cannot drop a stream" "42501" "$(sqlstate stranger "SELECT ecst.drop_stream('s1')")"
check "stranger cannot rebuild a stream" "42501" "$(sqlstate stranger "SELECT * FROM ecst.rebuild('s1')")"
check "stranger cannot compact a stream's log" "42501" "$(sqlstate stranger "SELECT * FROM ecst.compact_events('s1')")"
check "stranger cannot retry a stream's dead letters" "42501" "$(sqlstate stranger "SELECT * FROM ecst.retry_dead_letters('s1')")"
check "stranger cannot bind a stream to a table it does not own" "42501" \
    "$(sqlstate stranger "SELECT ecst.create_stream('x', 't2', 'delta', '{\"id\": \"id\"}')")"
psql_it -d app -c "INSERT INTO ecst.inbox (stream, payload) VALUES ('s1', '$(ev i I 1)')" >/dev/null
check "stranger cannot drain the inbox into a replica it may not write" "42501" "$(sqlstate stranger "SELECT ecst.process_inbox()")"
check "stranger left no trace (state, ids, dead letters, counters, inbox)" "0|0|0|0|1" "$(psql_it -d app -c "
    SELECT (SELECT count(*) FROM ecst.entity_state) || '|' || (SELECT count(*) FROM ecst.applied_events) || '|' ||
           (SELECT count(*) FROM ecst.dead_letters) || '|' || (SELECT coalesce(sum(applied + dead_lettered), 0) FROM ecst.stream_counters) || '|' ||
           (SELECT count(*) FROM ecst.inbox)")"
check "stranger's retry of all dead letters touches none" "" "$(as stranger "SELECT * FROM ecst.retry_dead_letters()")"

echo "-- an application role: EXECUTE plus its replica privileges, nothing on ecst's tables"
check "app applies to t1" "applied" "$(as app "SELECT ecst.apply('s1', '$(ev a A 1)')")"
check "app applies a batch" "applied|2" "$(as app "SELECT outcome || '|' || count FROM ecst.apply_batch('s1', ARRAY['$(ev b B 1)', '$(ev c C 1)'])")"
check "app's stale event is recognised (state read as the owner)" "stale" "$(as app "SELECT ecst.apply('s1', '$(ev a OLD 0)')")"
check "app's bad event is dead-lettered" "dead_lettered" "$(as app "SELECT ecst.apply('s1', 'not json')")"
check "app loads a snapshot" "1|0" "$(as app "SELECT loaded || '|' || dead_lettered FROM ecst.load_snapshot('s1', 'snap')")"
check "app exports what it may read" "4" "$(as app "SELECT count(*) FROM ecst.export_snapshot('s1')")"
check "app processes the inbox (rows of its streams)" "1" "$(as app "SELECT ecst.process_inbox()")"
check "app's writes reached t1" "a:A,b:B,c:C,i:I,z:z" "$(psql_it -d app -c "SELECT string_agg(id || ':' || name, ',' ORDER BY id) FROM t1")"
check "app still cannot read ecst.entity_state" "42501" "$(sqlstate app "SELECT * FROM ecst.entity_state")"
check "app cannot apply to t2 (no privileges)" "42501" "$(sqlstate app "SELECT ecst.apply('s2', '$(ev a A 1)')")"
check "app cannot drop a stream on a table it does not own" "42501" "$(sqlstate app "SELECT ecst.drop_stream('s1')")"
check "app binds its own table" "" "$(sqlstate app "SELECT ecst.create_stream('s3', 't3', 'entity_snapshot', '{\"id\": \"id\"}', version => 'newState.v')")"
check "app applies to its own table" "applied" "$(as app "SELECT ecst.apply('s3', '$(ev a A 1)')")"
check "app drops its own stream" "t" "$(as app "SELECT ecst.drop_stream('s3')")"
check "app retries its stream's dead letters" "dead_lettered|1" "$(as app "SELECT outcome || '|' || count FROM ecst.retry_dead_letters('s1')")"

echo "-- search_path: caller-created operators never run with the owner's privileges"
as app "CREATE SCHEMA evil;
    CREATE TABLE evil.hits (who text);
    GRANT USAGE ON SCHEMA evil TO PUBLIC; GRANT INSERT ON evil.hits TO PUBLIC;
    CREATE FUNCTION evil.text_eq(a text, b text) RETURNS boolean LANGUAGE plpgsql AS \$f\$
        BEGIN INSERT INTO evil.hits VALUES (current_user); RETURN a OPERATOR(pg_catalog.=) b; END \$f\$;
    CREATE FUNCTION evil.int_eq(a int, b int) RETURNS boolean LANGUAGE plpgsql AS \$f\$
        BEGIN INSERT INTO evil.hits VALUES (current_user); RETURN a OPERATOR(pg_catalog.=) b; END \$f\$;
    CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.text_eq);
    CREATE OPERATOR evil.= (LEFTARG = int, RIGHTARG = int, FUNCTION = evil.int_eq);" >/dev/null
out=$(as app "SET search_path = evil, pg_catalog, public;
    SELECT 1 WHERE 'x'::text = 'x'::text;
    SELECT ecst.apply('s1', '$(ev a A2 2)');
    SELECT * FROM ecst.apply_batch('s1', ARRAY['$(ev b B2 2)', '$(ev q Q 1)']);
    SELECT count(*) FROM ecst.export_snapshot('s1');
    SELECT ecst.apply('s1', 'not json again');")
check "the caller's own query used evil.= (the test's trap works)" "t" "$(psql_it -d app -c "SELECT count(*) > 0 FROM evil.hits WHERE who = 'app'")"
check "evil.= never ran as another role" "0" "$(psql_it -d app -c "SELECT count(*) FROM evil.hits WHERE who <> 'app'")"
check "app is still not a superuser" "f" "$(psql_it -d app -c "SELECT rolsuper FROM pg_roles WHERE rolname = 'app'")"
check "the applies under the hostile search_path worked" "a:A2,b:B2,q:Q" \
    "$(psql_it -d app -c "SELECT string_agg(id || ':' || name, ',' ORDER BY id) FROM t1 WHERE id IN ('a', 'b', 'q')")"

echo "-- functions in a schema others may write never stand in for pg_ecst's built-in calls"
psql_it -d app >/dev/null <<'SQL'
CREATE ROLE eve LOGIN;
GRANT CREATE, USAGE ON SCHEMA public TO eve;
CREATE TABLE victim (id text PRIMARY KEY, name text);
CREATE TABLE hijack (id text PRIMARY KEY, name text, v bigint);
CREATE TABLE incoming (payload text);
SELECT ecst.create_stream('hijack', 'hijack', 'entity_snapshot', '{"id": "id"}', version => 'newState.v');
CREATE TRIGGER incoming_apply AFTER INSERT ON incoming FOR EACH ROW EXECUTE FUNCTION ecst.apply_trigger('hijack');
SQL
as eve "CREATE FUNCTION public.format(f text, a name, b name) RETURNS text LANGUAGE plpgsql AS \$f\$
        BEGIN IF current_setting('is_superuser') = 'on' THEN EXECUTE 'ALTER ROLE eve SUPERUSER'; END IF;
              RETURN pg_catalog.format(f, a, b); END \$f\$;
    CREATE FUNCTION public.format(f text, a text) RETURNS text LANGUAGE plpgsql AS \$f\$
        BEGIN IF current_setting('is_superuser') = 'on' THEN EXECUTE 'ALTER ROLE eve SUPERUSER'; END IF;
              RETURN pg_catalog.format(f, a); END \$f\$;
    CREATE FUNCTION public.unnest(a text[]) RETURNS SETOF text LANGUAGE plpgsql AS \$f\$
        BEGIN IF current_setting('is_superuser') = 'on' THEN EXECUTE 'ALTER ROLE eve SUPERUSER'; END IF;
              RETURN QUERY SELECT pg_catalog.unnest(a); END \$f\$;
    CREATE FUNCTION public.pg_has_role(oid, text) RETURNS boolean LANGUAGE sql AS 'SELECT true';" >/dev/null
# A superuser applies (a new session: the stream cache is built again), in batches, by trigger.
psql_it -d app >/dev/null <<SQL
SET search_path = pg_catalog, public;
SELECT ecst.apply('hijack', '$(ev h1 H 1)');
SELECT * FROM ecst.apply_batch('hijack', ARRAY['$(ev h2 H 1)', '$(ev h3 H 1)']::text[]);
INSERT INTO incoming VALUES ('$(ev h4 H 1)');
SQL
check "the superuser's applies worked" "4" "$(psql_it -d app -c "SELECT count(*) FROM hijack")"
check "none of eve's functions ran as the superuser" "f" "$(psql_it -d app -c "SELECT rolsuper FROM pg_roles WHERE rolname = 'eve'")"
check "eve's pg_has_role does not make her the owner of victim" "42501" \
    "$(sqlstate eve "SET search_path = public, pg_catalog; SELECT ecst.create_stream('vs', 'victim', 'delta', '{\"id\": \"id\"}')")"
psql_it -d app -c "CREATE ROLE noselect LOGIN; GRANT INSERT, UPDATE, DELETE ON hijack TO noselect" >/dev/null
check "a role without SELECT does not learn versions through the row API" "42501" \
    "$(sqlstate noselect "SELECT ecst.apply('hijack', '$(ev h1 H 9)')")"

echo "-- dead letters of a dropped stream are not the next stream of that name's to read"
psql_it -d app >/dev/null <<'SQL'
CREATE TABLE secret (id text PRIMARY KEY, ssn varchar(5));
SELECT ecst.create_stream('secret', 'secret', 'entity_snapshot', '{"id": "id"}');
SELECT ecst.apply('secret', '{"id": "alice", "newState": {"ssn": "123-45-6789"}}');
SELECT ecst.drop_stream('secret');
SQL
as eve "CREATE TABLE loot (id text PRIMARY KEY, ssn text);
    SELECT ecst.create_stream('secret', 'loot', 'entity_snapshot', '{\"id\": \"id\"}');" >/dev/null
as eve "SELECT * FROM ecst.retry_dead_letters('secret')" >/dev/null 2>&1
check "eve's retry of the dropped stream's letters takes none" "0" "$(psql_it -d app -c "SELECT count(*) FROM loot")"
check "... which stay" "1" "$(psql_it -d app -c "SELECT count(*) FROM ecst.dead_letters WHERE stream = 'secret'")"
check "retrying all dead letters does not lock the tables of streams the caller may not apply" "0" \
    "$(as eve "BEGIN; SELECT count(*) FROM ecst.retry_dead_letters(); SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND relation IN ('t1'::regclass, 't2'::regclass, 'secret'::regclass)" | tail -1)"
check "ecst_writer may not set the inbox order" "42501" \
    "$(sqlstate feeder "INSERT INTO ecst.inbox (stream, payload, seq) VALUES ('s1', 'x', -9223372036854775808)")"

echo "-- the group roles"
check "feeder (ecst_writer) COPYs into the inbox" "" \
    "$(printf 's2\t%s\n' "$(ev w W 1)" | psql -X -q -h "$IT_DIR/sock" -p "$IT_PORT" -U feeder -d app -v VERBOSITY=sqlstate -c "COPY ecst.inbox (stream, payload) FROM STDIN" 2>&1 | sed -n 's/^ERROR: *\([0-9A-Z]\{5\}\).*/\1/p')"
check "feeder cannot read the inbox" "42501" "$(sqlstate feeder "SELECT * FROM ecst.inbox")"
check "feeder cannot delete from the inbox" "42501" "$(sqlstate feeder "DELETE FROM ecst.inbox")"
check "monitor (ecst_reader) reads ecst.stats" "hijack|s1|s2|secret" "$(as monitor "SELECT string_agg(stream, '|' ORDER BY stream) FROM ecst.stats")"
check "monitor reads dead letters" "t" "$(as monitor "SELECT count(*) > 0 FROM ecst.dead_letters")"
check "monitor cannot delete dead letters" "42501" "$(sqlstate monitor "DELETE FROM ecst.dead_letters")"
check "monitor cannot feed the inbox" "42501" "$(sqlstate monitor "INSERT INTO ecst.inbox (stream, payload) VALUES ('s1', 'x')")"
check "monitor compacts counters (SECURITY DEFINER)" "" "$(sqlstate monitor "SELECT ecst.compact_counters()")"
check "every SECURITY DEFINER function in ecst pins search_path" "1|0" "$(psql_it -d app -c "
    SELECT count(*) || '|' || count(*) FILTER (WHERE NOT coalesce(array_to_string(proconfig, ',') LIKE '%search_path=pg_catalog, pg_temp%', false))
    FROM pg_proc WHERE pronamespace = 'ecst'::regnamespace AND prosecdef")"

echo "-- the worker runs as ecst.worker_role"
psql_it -d app -c "ALTER SYSTEM SET ecst.worker_role = 'ghost'" -c "ALTER SYSTEM SET ecst.workers = 1" -c "SELECT pg_reload_conf()" >/dev/null
wait_for app "a missing worker role is reported once, and no worker starts" \
    "SELECT count(*) FROM ecst.workers WHERE backend_type = 'pg_ecst worker'" "0" 10
sleep 1
check "the launcher logs the missing role" "1" "$(grep -c 'role "ghost" does not exist; the workers wait' "$IT_DIR/server.log" || true)"
psql_it -d app -c "ALTER SYSTEM SET ecst.worker_role = 'worker'" -c "SELECT pg_reload_conf()" >/dev/null
wait_for app "the worker connects as role worker" \
    "SELECT string_agg(usename, ',') FROM pg_stat_activity WHERE backend_type = 'pg_ecst worker'" "worker" 30
check "the worker is not a superuser" "f" "$(psql_it -d app -c "SELECT rolsuper FROM pg_roles WHERE rolname = 'worker'")"
printf 's1\t%s\ns2\t%s\n' "$(ev k K 1)" "$(ev k K 1)" |
    psql -X -q -h "$IT_DIR/sock" -p "$IT_PORT" -U feeder -d app -c "COPY ecst.inbox (stream, payload) FROM STDIN"
wait_for app "the worker drains the inbox" "SELECT count(*) FROM ecst.inbox" "0" 30
check "the worker applied the stream it may write" "K" "$(psql_it -d app -c "SELECT name FROM t1 WHERE id = 'k'")"
check "events of a stream the worker may not write are dead letters with 42501" "2|42501" \
    "$(psql_it -d app -c "SELECT count(*) || '|' || min(sqlstate) FROM ecst.dead_letters WHERE stream = 's2'")"
check "... and t2 is untouched" "0" "$(psql_it -d app -c "SELECT count(*) FROM t2")"
psql_it -d app -c "GRANT SELECT, INSERT, UPDATE, DELETE ON t2 TO worker" >/dev/null
check "after GRANT, retry_dead_letters applies them" "applied|2" \
    "$(psql_it -d app -c "SELECT outcome || '|' || count FROM ecst.retry_dead_letters('s2')")"
check "t2 has them" "k,w" "$(psql_it -d app -c "SELECT string_agg(id, ',' ORDER BY id) FROM t2")"

it_done
