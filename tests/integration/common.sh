# Helpers for integration tests against a real running server. Source after scripts/lib.sh.
set -euo pipefail

IT_DIR=${IT_DIR:-/tmp/pg_ecst-it}
IT_PORT=${IT_PORT:-54331}
FIXTURES=${FIXTURES:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../fixtures" && pwd)}

psql_it() { psql -X -q -t -A -h "$IT_DIR/sock" -p "$IT_PORT" -U postgres -v ON_ERROR_STOP=1 "$@"; }

# The integration tests' own PostgreSQL installation (scripts/test sets PG_MAJOR).
use_pg "${PG_MAJOR:-$DEFAULT_MAJOR}" it

# Starts a fresh cluster; builds and installs the extension first unless scripts/test already
# did (PG_ECST_INSTALLED=<major>). The cluster and its folder are gone when the script exits.
it_start() {
    if [ "${PG_ECST_INSTALLED:-}" != "$PG_MAJOR" ]; then
        install_extension
        export PG_ECST_INSTALLED=$PG_MAJOR
    fi
    start_cluster "$IT_DIR" "$IT_PORT" "$@"
    trap 'it_cleanup' EXIT
}

it_cleanup() {
    stop_cluster "$IT_DIR"
    as_root rm -rf "$IT_DIR"
}

failures=0
# check NAME EXPECTED ACTUAL
check() {
    if [ "$2" == "$3" ]; then
        printf '  ok   %s\n' "$1"
    else
        printf '  FAIL %s\n       expected: %s\n       actual:   %s\n' "$1" "$2" "$3"
        failures=$((failures + 1))
    fi
}

it_done() {
    if [ "$failures" -gt 0 ]; then
        echo "$failures check(s) failed; the server log's end:"
        tail -40 "$IT_DIR/server.log"
        exit 1
    fi
}

# wait_for DB DESCRIPTION SQL EXPECTED [TIMEOUT_S]: polls until SQL returns EXPECTED.
wait_for() {
    local db=$1 desc=$2 sql=$3 want=$4 deadline=$((SECONDS + ${5:-90})) got
    while true; do
        got=$(psql_it -d "$db" -c "$sql" 2>/dev/null || true)
        if [ "$got" == "$want" ]; then
            check "$desc" "$want" "$got"
            return 0
        fi
        if [ $SECONDS -ge $deadline ]; then
            check "$desc (timed out)" "$want" "$got"
            return 0
        fi
        sleep 0.2
    done
}

# wait_ready: waits for the server to accept connections again (after a crash restart).
wait_ready() {
    local deadline=$((SECONDS + 60))
    until sudo -u postgres "$PG_BIN"/pg_isready -q -h "$IT_DIR/sock" -p "$IT_PORT"; do
        [ $SECONDS -lt $deadline ] || { echo "server did not come back"; exit 1; }
        sleep 0.2
    done
    sleep 0.5
}

# create_differs DB: SQL function differs(a, b) = rows in one table and not the other, both ways.
create_differs() {
    psql_it -d "$1" >/dev/null <<'SQL'
CREATE FUNCTION differs(a text, b text) RETURNS bigint LANGUAGE plpgsql AS $f$
DECLARE n bigint;
BEGIN
    EXECUTE format('SELECT count(*) FROM ((TABLE %I EXCEPT TABLE %I) UNION ALL (TABLE %I EXCEPT TABLE %I)) d', a, b, b, a) INTO n;
    RETURN n;
END $f$;
SQL
}

# failed_workers: pg_ecst processes that exited with an error, in the server log — not counting
# workers ended on purpose in the middle of a batch (SIGTERM: "terminating background worker ...
# due to administrator command", which exits with code 1 as PostgreSQL's own workers do).
failed_workers() {
    local exited terminated
    exited=$(grep -c 'background worker "pg_ecst.*exited with exit code 1' "$IT_DIR/server.log" || true)
    terminated=$(grep -c 'terminating background worker "pg_ecst worker" due to administrator command' "$IT_DIR/server.log" || true)
    echo $((exited - terminated))
}

# compare TABLE CSV COLUMNS: how many rows differ, both ways, between TABLE's COLUMNS (three, the
# first the id) and the expected CSV, loaded into table `expected (id, x, y)` of database $DB.
compare() {
    psql_it -d "$DB" -c "TRUNCATE expected" >/dev/null
    psql_it -d "$DB" -c "\\copy expected FROM '$2' WITH (FORMAT csv)" >/dev/null
    psql_it -d "$DB" -c "SELECT count(*) FROM ((SELECT $3 FROM $1 EXCEPT SELECT id, coalesce(x, ''), coalesce(y, '') FROM expected) UNION ALL (SELECT id, coalesce(x, ''), coalesce(y, '') FROM expected EXCEPT SELECT $3 FROM $1)) d"
}
