#!/usr/bin/env bash
# The README's Quickstart works as pasted: its SQL block (the first ```sql block under
# "## Quickstart") runs in psql against a fresh server, each ecst.apply returns the outcome its
# comment says, and the replica, dead letters and stats end as the README shows.
cd "$(dirname "$0")/../.."
. scripts/lib.sh
. tests/integration/common.sh
IT_DIR=/tmp/pg_ecst-it-readme IT_PORT=54336
it_start "ecst.naptime = 200"

block=$IT_DIR/quickstart.sql
python3 - README.md > "$block" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
section = text.split("\n## Quickstart", 1)[1]
print(re.search(r"```sql\n(.*?)```", section, re.S).group(1))
PY
check "the README has a Quickstart SQL block that creates its own database" 1 \
    "$(grep -c '^CREATE DATABASE ecst_quickstart;' "$block")"

# Every `SELECT ecst.apply(...)` is followed by a comment `--  <outcome>`: those, in order.
expected=$(python3 - "$block" <<'PY'
import re, sys
sql = open(sys.argv[1]).read()
for m in re.finditer(r"SELECT ecst\.apply\(.*?\);\n--\s+(\w+)", sql, re.S):
    print(m.group(1))
PY
)
out=$(psql -X -q -t -A -h "$IT_DIR/sock" -p "$IT_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -f "$block" 2>&1)
check "the Quickstart runs without an error" 0 "$?"
outcomes=$(grep -xE 'applied|duplicate|stale|skipped|dead_lettered' <<<"$out")
check "each ecst.apply returns the outcome its comment shows" "$(echo $expected)" "$(echo $outcomes)"
check "at least five outcomes are shown (create, duplicate, stale, delete, ...)" 1 \
    "$([ "$(wc -l <<<"$expected")" -ge 5 ] && echo 1 || echo 0)"
check "the delete removed the row" 0 "$(psql_it -d ecst_quickstart -c "SELECT count(*) FROM address")"
check "no delete was dead-lettered for a missing version" 0 \
    "$(psql_it -d ecst_quickstart -c "SELECT count(*) FROM ecst.dead_letters WHERE error_code = 'missing_version'")"
check "the stats row is the one the README shows" "$(grep -A3 '^SELECT \* FROM ecst.stats;' "$block" | sed -n 's/^--  address *| *entity_snapshot *| *\([0-9]*\) *| *\([0-9]*\) *| *\([0-9]*\) *| *\([0-9]*\) *| *\([0-9]*\) *| *\([0-9]*\).*/\1|\2|\3|\4|\5|\6/p')" \
    "$(psql_it -d ecst_quickstart -c "SELECT applied || '|' || duplicate || '|' || stale || '|' || skipped || '|' || conflicts || '|' || dead_lettered FROM ecst.stats WHERE stream = 'address'")"
it_done
