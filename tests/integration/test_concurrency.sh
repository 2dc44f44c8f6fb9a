#!/usr/bin/env bash
# Four sessions at once apply shuffled, duplicated copies of overlapping events — through
# ecst.apply (one event per transaction), ecst.apply_batch (two sessions), and the inbox with two
# workers. No error may reach a session, and the replicas must equal in-order application.
cd "$(dirname "$0")/../.."
. scripts/lib.sh
. tests/integration/common.sh
IT_DIR=/tmp/pg_ecst-it-conc IT_PORT=54333
it_start "ecst.database = 'conc'" "ecst.workers = 2" "ecst.naptime = 100" "deadlock_timeout = '100ms'"
DB=conc
q() { psql_it -d $DB -c "$1"; }
psql_it -d postgres -c "CREATE DATABASE conc" >/dev/null
create_differs $DB
work=$IT_DIR/work
mkdir -p "$work"

psql_it -d $DB >/dev/null <<'SQL'
CREATE EXTENSION pg_ecst;
-- 150 entities x 12 versions: snapshots with deletes, and deltas touching 1-3 fields.
CREATE TABLE ev_snap AS
SELECT e, v, CASE WHEN (e + v) % 9 = 0 THEN format('{"id": "e%s", "ts": %s, "oldState": {}}', e, v)
                  ELSE format('{"id": "e%s", "ts": %s, "newState": {"a": "a%s", "b": %s}}', e, v, v, e * v) END AS payload
FROM generate_series(1, 150) e, generate_series(1, 12) v;
CREATE TABLE ev_delta AS
SELECT e, v, CASE WHEN (e * v) % 13 = 0 THEN format('{"id": "e%s", "ts": %s, "oldState": {}}', e, v)
                  ELSE format('{"id": "e%s", "ts": %s, "newState": {%s}}', e, v,
                       concat_ws(', ', CASE WHEN v % 2 = 0 THEN format('"a": "a%s"', v) END,
                                       CASE WHEN v % 3 <> 0 THEN format('"b": %s', v) END,
                                       CASE WHEN v % 2 = 1 OR v % 3 = 0 THEN format('"c": "c%s"', v) END)) END AS payload
FROM generate_series(1, 150) e, generate_series(1, 12) v;
-- Row-version snapshots (the version is a mapped integer column, so it lives in the row).
CREATE TABLE ev_snapv AS
SELECT e, v, format('{"id": "e%s", "newState": {"a": "a%s", "b": %s, "ts": %s}}', e, v, e * v, v) AS payload
FROM generate_series(1, 150) e, generate_series(1, 12) v;
CREATE TABLE snapv_ref (id text PRIMARY KEY, a text, b bigint, ts bigint);
CREATE TABLE snapv (LIKE snapv_ref INCLUDING ALL);
SELECT ecst.create_stream(n, n::regclass, 'entity_snapshot', '{"id": "id"}', version => 'newState.ts') FROM unnest(ARRAY['snapv_ref', 'snapv']) n;
SELECT count(*) FROM (SELECT ecst.apply('snapv_ref', payload) FROM ev_snapv ORDER BY e, v) x;
CREATE TABLE snap_ref (id text PRIMARY KEY, a text, b bigint);
CREATE TABLE snap (LIKE snap_ref INCLUDING ALL);
CREATE TABLE delta_ref (id text PRIMARY KEY, a text, b bigint, c text);
CREATE TABLE delta (LIKE delta_ref INCLUDING ALL);
SELECT ecst.create_stream(n, n::regclass, 'entity_snapshot', '{"id": "id"}', version => 'ts') FROM unnest(ARRAY['snap_ref', 'snap']) n;
SELECT ecst.create_stream(n, n::regclass, 'delta', '{"id": "id"}', version => 'ts') FROM unnest(ARRAY['delta_ref', 'delta']) n;
SELECT count(*) FROM (SELECT ecst.apply('snap_ref', payload) FROM ev_snap ORDER BY e, v) x;
SELECT count(*) FROM (SELECT ecst.apply('delta_ref', payload) FROM ev_delta ORDER BY e, v) x;
SQL
wait_for $DB "two workers run" "SELECT count(*) FROM ecst.workers WHERE backend_type = 'pg_ecst worker'" 2

# Session scripts: each a shuffled copy (with duplicates) of both streams' events.
for s in 1 2 3 4; do
    q "SELECT stream || E'\\t' || payload FROM (SELECT 'snap' AS stream, payload FROM ev_snap UNION ALL SELECT 'delta', payload FROM ev_delta
       UNION ALL SELECT 'snapv', payload FROM ev_snapv UNION ALL (SELECT 'snapv', payload FROM ev_snapv ORDER BY random() LIMIT 300)
       UNION ALL (SELECT 'snap', payload FROM ev_snap ORDER BY random() LIMIT 300)) x ORDER BY random()" > "$work/s$s.tsv"
done
# s1: one ecst.apply per transaction
awk -F'\t' '{ gsub(/\x27/, "\x27\x27", $2); printf "SELECT ecst.apply(\x27%s\x27, \x27%s\x27);\n", $1, $2 }' "$work/s1.tsv" > "$work/s1.sql"
# s2, s4: apply_batch in chunks of 100 (one transaction each), per stream
for s in 2 4; do
    awk -F'\t' -v s=$s '{ gsub(/\x27/, "\x27\x27", $2); print $2 > ("'"$work"'/s" s "_" $1 ".txt") }' "$work/s$s.tsv"
    : > "$work/s$s.sql"
    for stream in snap delta snapv; do
        split -l 100 "$work/s${s}_$stream.txt" "$work/s${s}_${stream}_chunk_"
        for c in "$work"/s${s}_${stream}_chunk_*; do
            printf "SELECT count(*) FROM ecst.apply_batch('%s', ARRAY[%s]);\n" "$stream" "$(sed "s/.*/'&'/" "$c" | paste -sd,)" >> "$work/s$s.sql"
        done
    done
    shuf --random-source=<(yes) "$work/s$s.sql" -o "$work/s$s.sql"
done
run_session() { psql -X -q -h "$IT_DIR/sock" -p "$IT_PORT" -U postgres -d $DB -v ON_ERROR_STOP=0 -f "$1" > "$1.out" 2> "$1.err"; }
started=$SECONDS
run_session "$work/s1.sql" &
run_session "$work/s2.sql" &
psql_it -d $DB -c "\\copy ecst.inbox (stream, payload) FROM '$work/s3.tsv'" > "$work/s3.err" 2>&1 &
run_session "$work/s4.sql" &
wait
wait_for $DB "the inbox drains" "SELECT count(*) FROM ecst.inbox" 0 120
echo "  4 sessions, $(wc -l < "$work/s1.tsv") events each, done in $((SECONDS - started)) s"
check "no error reached any session" 0 "$(cat "$work"/s*.err | grep -c . || true)"
check "no dead letters" 0 "$(q "SELECT count(*) FROM ecst.dead_letters")"
check "snapshot replica = in-order" 0 "$(q "SELECT differs('snap_ref', 'snap')")"
check "delta replica = in-order" 0 "$(q "SELECT differs('delta_ref', 'delta')")"
check "row-version replica = in-order" 0 "$(q "SELECT differs('snapv_ref', 'snapv')")"
check "... its versions stayed in the rows (no state rows)" 0 "$(q "SELECT count(*) FROM ecst.entity_state s JOIN ecst.streams x ON x.id = s.stream_id WHERE x.name LIKE 'snapv%'")"
check "no deadlocks logged" 0 "$(grep -c 'deadlock detected' "$IT_DIR/server.log" || true)"

# Row mode's guard: an older event read the entity as absent while a newer one was uncommitted;
# its insert waits, finds the newer row, writes nothing and is retried: stale.
ev_v() { printf '{"id": "%s", "newState": {"a": "%s", "ts": %s}}' "$1" "$2" "$2"; }
psql_it -d $DB -c "BEGIN" -c "SELECT ecst.apply('snapv', '$(ev_v x 5)')" -c "SELECT pg_sleep(1.5)" -c "COMMIT" >/dev/null 2> "$work/g.err" &
sleep 0.5
check "row mode: an older event racing a newer uncommitted one is stale" "stale" "$(q "SELECT ecst.apply('snapv', '$(ev_v x 3)')")"
wait
check "... the newer one stays" "5:5" "$(q "SELECT a || ':' || ts FROM snapv WHERE id = 'x'")"
# Outside READ COMMITTED an entity gets a state row (and keeps it up to date afterwards).
check "REPEATABLE READ keeps a state row" "applied|7" "$(psql_it -d $DB -c "BEGIN ISOLATION LEVEL REPEATABLE READ" -c "SELECT ecst.apply('snapv', '$(ev_v x 7)')" -c "SELECT live_version FROM ecst.entity_state WHERE entity_key = 'x'" -c "COMMIT" | paste -sd'|')"
check "... which READ COMMITTED then updates" "stale|applied|8|8" "$(q "SELECT ecst.apply('snapv', '$(ev_v x 6)')")|$(q "SELECT ecst.apply('snapv', '$(ev_v x 8)')")|$(q "SELECT live_version FROM ecst.entity_state WHERE entity_key = 'x'")|$(q "SELECT ts FROM snapv WHERE id = 'x'")"
check "... no error" "" "$(cat "$work/g.err")"

# REPEATABLE READ: a replica row changed after the transaction's snapshot (here by hand) is not
# written over; the write fails with a serialization failure, as the SQL upsert does.
ev_s() { printf '{"id": "%s", "ts": %s, "newState": {"a": "a%s", "b": %s}}' "$1" "$2" "$2" "$2"; }
q "SELECT ecst.apply('snap', '$(ev_s rr 1)')" >/dev/null
for call in "ecst.apply('snap', '$(ev_s rr 2)')" "count(*) FROM ecst.apply_batch('snap', ARRAY['$(ev_s rr 3)', '$(ev_s rr 4)']::jsonb[])"; do
    name=ecst.apply; [[ $call == *apply_batch* ]] && name=ecst.apply_batch
    q "UPDATE snap SET b = 1 WHERE id = 'rr'" >/dev/null
    psql_it -d $DB -c "BEGIN ISOLATION LEVEL REPEATABLE READ" -c "SELECT count(*) FROM snap" -c "SELECT pg_sleep(1)" \
        -c "\\set VERBOSITY verbose" -c "SELECT $call" -c "COMMIT" >/dev/null 2> "$work/rr.err" &
    sleep 0.3
    q "UPDATE snap SET b = -1 WHERE id = 'rr'" >/dev/null
    wait || true  # the session fails (ON_ERROR_STOP)
    check "REPEATABLE READ, $name: a row changed after the snapshot raises 40001" "1" "$(grep -c '40001: could not serialize access due to concurrent update' "$work/rr.err")"
    check "... and is not written over" "a1|-1|1" "$(q "SELECT a, b FROM snap WHERE id = 'rr'")|$(q "SELECT live_version FROM ecst.entity_state s JOIN ecst.streams x ON x.id = s.stream_id WHERE x.name = 'snap' AND entity_key = 'rr'")"
done

# Row mode updates an existing row without locking it first: an event racing an uncommitted
# update of the row waits for it, reads the row again and decides on what was committed.
q "SELECT ecst.apply('snapv', '$(ev_v y 10)')" >/dev/null
psql_it -d $DB -c "BEGIN" -c "SELECT ecst.apply('snapv', '$(ev_v y 20)')" -c "SELECT pg_sleep(1.5)" -c "COMMIT" >/dev/null 2> "$work/r.err" &
sleep 0.5
check "row mode: an older event racing an uncommitted newer update waits, then is stale" "stale" "$(q "SELECT ecst.apply('snapv', '$(ev_v y 15)')")"
wait
psql_it -d $DB -c "BEGIN" -c "SELECT ecst.apply('snapv', '$(ev_v y 30)')" -c "SELECT pg_sleep(1.5)" -c "COMMIT" >/dev/null 2>> "$work/r.err" &
sleep 0.5
check "... a newer one waits, then applies over it" "applied" "$(q "SELECT ecst.apply('snapv', '$(ev_v y 40)')")"
wait
check "... the newest stays" "40:40" "$(q "SELECT a || ':' || ts FROM snapv WHERE id = 'y'")"
check "... no error" "" "$(cat "$work/r.err")"

# Many calls in one transaction, each its own subtransaction, writing the same rows again and
# again (5 entities x 40 versions, interleaved): no MultiXact is made (a row lock taken before
# each update would leave one behind per repeat).
multixacts() { q "CHECKPOINT" >/dev/null; q "SELECT next_multixact_id FROM pg_control_checkpoint()"; }
before=$(multixacts)
check "200 calls in one transaction over 5 entities apply" "200" "$(q "SELECT count(*) FILTER (WHERE r = 'applied') FROM (
    SELECT ecst.apply('snapv', format('{\"id\": \"m%s\", \"newState\": {\"a\": \"v%s\", \"ts\": %s}}', e, v, v)) AS r
    FROM generate_series(1, 40) v, generate_series(1, 5) e ORDER BY v, e) x")"
check "... and make no MultiXact" "$before" "$(multixacts)"

# Unversioned deltas: two batches writing the same two rows in opposite column-set groups (x gets
# {a} and y {b} in one, the reverse in the other). Set-based writes go one group at a time; a
# trigger pauses after the first group's row lock so both batches hold one row and want the
# other. Entity locks taken in key order up front make the second batch wait instead.
psql_it -d $DB >/dev/null <<'SQL'
CREATE TABLE unv (id text PRIMARY KEY, a text, b text);
INSERT INTO unv VALUES ('x', '', ''), ('y', '', '');
SELECT ecst.create_stream('unv', 'unv', 'delta', '{"id": "id"}');
CREATE FUNCTION unv_pause() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    IF NEW.a IS DISTINCT FROM OLD.a THEN PERFORM pg_sleep(1); END IF;
    RETURN NEW;
END $f$;
CREATE TRIGGER unv_pause BEFORE UPDATE ON unv FOR EACH ROW EXECUTE FUNCTION unv_pause();
SQL
ev_u() { printf '{"id": "%s", "newState": {"%s": "%s"}}' "$1" "$2" "$3"; }
psql_it -d $DB -c "SELECT count(*) FROM ecst.apply_batch('unv', ARRAY['$(ev_u x a 1)', '$(ev_u y b 1)'])" > "$work/u1.out" 2> "$work/u1.err" &
sleep 0.3
psql_it -d $DB -c "SELECT count(*) FROM ecst.apply_batch('unv', ARRAY['$(ev_u y a 2)', '$(ev_u x b 2)'])" > "$work/u2.out" 2> "$work/u2.err" &
wait
check "crossed column-set groups: no error (no deadlock)" "" "$(cat "$work/u1.err" "$work/u2.err")"
check "... both batches applied" "x:1:2,y:2:1" "$(q "SELECT string_agg(id || ':' || a || ':' || b, ',' ORDER BY id) FROM unv")"

# A large unversioned batch locks the whole stream rather than 50,000 entities (each lock takes a
# slot in the shared lock table, which that many overflow: "out of shared memory").
q "DROP TRIGGER unv_pause ON unv" >/dev/null
big="SELECT string_agg(outcome || ':' || count, ',') FROM ecst.apply_batch('unv', (SELECT array_agg(format('{\"id\": \"w%s\", \"newState\": {\"a\": \"big\"}}', i)) FROM generate_series(1, 50000) i))"
check "an unversioned batch of 50,000 entities applies" "applied:50000" "$(q "$big")"
# While it is uncommitted, a single event of the stream waits for it (and then applies).
psql_it -d $DB -c "BEGIN" -c "$big" -c "SELECT pg_sleep(1.5)" -c "COMMIT" >/dev/null 2> "$work/big.err" &
sleep 0.8
t0=$(date +%s%3N)
check "... a concurrent single event waits for the large batch, then applies" "applied" "$(q "SELECT ecst.apply('unv', '$(ev_u w7 b waited)')")"
waited=$(( $(date +%s%3N) - t0 >= 300 ? 1 : 0 ))
wait
check "... it did wait (>= 0.3 s)" "1" "$waited"
check "... the batch had no error" "" "$(cat "$work/big.err")"
check "... both writes are there" "big:waited" "$(q "SELECT a || ':' || b FROM unv WHERE id = 'w7'")"
it_done
