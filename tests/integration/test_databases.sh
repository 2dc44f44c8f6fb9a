#!/usr/bin/env bash
# The background workers serve every database of the cluster that has the extension, with no
# configuration: two databases at once, a database that gets the extension later, DROP EXTENSION,
# DROP DATABASE and ALTER DATABASE ... RENAME while workers run there, ecst.workers per database,
# and ecst.database as a list restricting them.
cd "$(dirname "$0")/../.."
. scripts/lib.sh
. tests/integration/common.sh
IT_DIR=/tmp/pg_ecst-it-dbs IT_PORT=54335
it_start "ecst.naptime = 200"

workers_in() {
    psql_it -d postgres -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_ecst worker' AND datname = '$1'"
}
setup_db() {
    [ "$(psql_it -d postgres -c "SELECT count(*) FROM pg_database WHERE datname = '$1'")" = 1 ] ||
        psql_it -d postgres -c "CREATE DATABASE $1" >/dev/null
    psql_it -d "$1" >/dev/null <<'SQL'
CREATE EXTENSION pg_ecst;
CREATE TABLE item (id text PRIMARY KEY, v text);
SELECT ecst.create_stream('item', 'item', 'entity_snapshot', '{"id": "id"}', version => 'ts');
SQL
}
feed() { # DB ID TS V
    psql_it -d "$1" -c "INSERT INTO ecst.inbox (stream, payload) VALUES ('item', '{\"id\": \"$2\", \"ts\": $3, \"newState\": {\"v\": \"$4\"}}')" >/dev/null
}

echo "-- two databases with the extension, no ecst.database setting"
check "ecst.database defaults to every database" "*" "$(psql_it -d postgres -c "SHOW ecst.database")"
setup_db one
setup_db two
for i in $(seq 1 50); do feed one "e$i" 1 "one-$i"; feed two "e$i" 1 "two-$i"; done
wait_for one "the inbox of database one is applied" "SELECT count(*) FROM item WHERE v LIKE 'one-%'" 50
wait_for two "the inbox of database two is applied, at the same time" "SELECT count(*) FROM item WHERE v LIKE 'two-%'" 50
check "one worker in each" "1 1" "$(workers_in one) $(workers_in two)"
check "ecst.stats of each database counts its own worker" "1" \
    "$(psql_it -d two -c "SELECT workers_running FROM ecst.stats WHERE stream = 'item'")"

echo "-- a database without the extension holds no worker; CREATE EXTENSION starts one"
psql_it -d postgres -c "CREATE DATABASE plain" >/dev/null
sleep 2
check "no worker stays in a database without the extension" 0 "$(workers_in plain)"
check "nor in postgres" 0 "$(workers_in postgres)"
setup_db plain
feed plain x 1 late
wait_for plain "a worker starts there and applies its inbox" "SELECT v FROM item WHERE id = 'x'" late 20

echo "-- ecst.workers is per database"
psql_it -d postgres -c "ALTER SYSTEM SET ecst.workers = 2" -c "SELECT pg_reload_conf()" >/dev/null
wait_for postgres "two workers in each of the three databases" \
    "SELECT string_agg(datname || '=' || n, ',' ORDER BY datname) FROM (SELECT datname, count(*) n FROM pg_stat_activity WHERE backend_type = 'pg_ecst worker' GROUP BY datname) w" \
    "one=2,plain=2,two=2" 20
for i in $(seq 1 50); do feed two "e$i" 2 "two-again-$i"; done
wait_for two "two workers drain database two" "SELECT count(*) FROM item WHERE v LIKE 'two-again-%'" 50
psql_it -d postgres -c "ALTER SYSTEM RESET ecst.workers" -c "SELECT pg_reload_conf()" >/dev/null
wait_for postgres "back to one each" "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_ecst worker'" 3 20

echo "-- DROP EXTENSION releases the database; DROP DATABASE and RENAME work while workers run"
psql_it -d plain -c "DROP EXTENSION pg_ecst" >/dev/null
wait_for postgres "the worker leaves a database whose extension was dropped" \
    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_ecst worker' AND datname = 'plain'" 0 20
check "the workers of database one are running" 1 "$(workers_in one)"
check "DROP DATABASE (no FORCE) of a database the workers serve succeeds" "ok" \
    "$(out=$(psql_it -d postgres -c "DROP DATABASE one" 2>&1) && echo ok || echo "$out")"
check "ALTER DATABASE ... RENAME of a served database succeeds" "ok" \
    "$(out=$(psql_it -d postgres -c "ALTER DATABASE two RENAME TO deux" 2>&1) && echo ok || echo "$out")"
feed deux r 5 renamed
wait_for deux "the workers come back under the new name and apply" "SELECT v FROM item WHERE id = 'r'" renamed 30
check "CREATE DATABASE ... TEMPLATE of a served database succeeds" "ok" \
    "$(out=$(psql_it -d postgres -c "CREATE DATABASE copied TEMPLATE deux" 2>&1) && echo ok || echo "$out")"
wait_for copied "the copy has the extension, so it is served too" \
    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_ecst worker' AND datname = 'copied'" 1 30

echo "-- ecst.database as a list restricts the workers"
psql_it -d postgres -c "ALTER SYSTEM SET ecst.database = 'copied, nowhere'" -c "SELECT pg_reload_conf()" >/dev/null
wait_for postgres "only the listed database keeps workers" \
    "SELECT string_agg(datname, ',') FROM pg_stat_activity WHERE backend_type = 'pg_ecst worker'" copied 20
feed deux unserved 6 waits
sleep 1
check "an unlisted database's inbox waits" 1 "$(psql_it -d deux -c "SELECT count(*) FROM ecst.inbox")"
check "the missing listed database is logged once" 1 \
    "$(grep -c 'database "nowhere" (ecst.database) does not exist' "$IT_DIR/server.log")"

check "no pg_ecst process failed in the server log" 0 "$(failed_workers)"
check "no process was killed by a signal" 0 "$(grep -c 'terminated by signal' "$IT_DIR/server.log" || true)"
it_done
