# Helpers for integration tests against a real running server. Source after scripts/lib.sh.
set -euo pipefail

IT_DIR=${IT_DIR:-/tmp/pg_ecst-it}
IT_PORT=${IT_PORT:-54331}
FIXTURES=${FIXTURES:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)/shared/fixtures}

psql_it() { psql -X -q -t -A -h "$IT_DIR/sock" -p "$IT_PORT" -U postgres -v ON_ERROR_STOP=1 "$@"; }

# Installs the extension once per scripts/test run and starts a fresh cluster.
it_start() {
    if [ -z "${PG_ECST_INSTALLED:-}" ]; then
        install_extension
        export PG_ECST_INSTALLED=1
    fi
    start_cluster "$IT_DIR" "$IT_PORT" "$@"
    trap 'stop_cluster "$IT_DIR"' EXIT
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
        echo "$failures check(s) failed; server log: $IT_DIR/server.log"
        tail -20 "$IT_DIR/server.log"
        exit 1
    fi
}
