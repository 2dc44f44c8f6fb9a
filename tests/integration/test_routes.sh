#!/usr/bin/env bash
# One topic of several event types through a route: a mixed CloudEvents feed COPYed into the
# inbox under the route's name, drained by two workers, lands in three streams' tables exactly as
# the same events sent bare to each stream; a type the route does not know is an `unrouted` dead
# letter, counted in ecst.route_stats, and applies after the route is extended and retried.
cd "$(dirname "$0")/../.."
. scripts/lib.sh
. tests/integration/common.sh
IT_DIR=/tmp/pg_ecst-it-routes IT_PORT=54342
it_start "ecst.workers = 2" "ecst.naptime = 200"

q() { psql_it -d postgres -c "$1"; }
q "CREATE EXTENSION pg_ecst" >/dev/null
for p in r b; do
    q "CREATE TABLE ${p}_address (address_id text PRIMARY KEY, address_line1 text, address_ts numeric);
       CREATE TABLE ${p}_customer (customer_id text PRIMARY KEY, name text);
       CREATE TABLE ${p}_order (order_id text PRIMARY KEY, total numeric, status text);" >/dev/null
    for t in address customer order; do
        key=$([ $t = address ] && echo addressId || ([ $t = customer ] && echo customerId || echo orderId))
        col=$([ $t = address ] && echo address_id || ([ $t = customer ] && echo customer_id || echo order_id))
        q "SELECT ecst.create_stream(name => '${p}_$t', target => '${p}_$t', shape => 'entity_snapshot',
             key => '{\"$key\": \"$col\"}', event_path => 'data', version => 'time', event_id => 'id')" >/dev/null
    done
done
q "SELECT ecst.create_route('acme', 'type', '{\"com.acme.address.changed\": \"r_address\",
     \"com.acme.customer.snapshot\": \"r_customer\", \"com.acme.order.placed\": \"r_order\"}')" >/dev/null

# 6,000 events of three types over 300 entities each, shuffled, 10% delivered twice, some as a
# JSON string in data; and 20 events of a fourth type the route does not know.
python3 - "$IT_DIR" <<'PY'
import csv, json, random, sys
d = sys.argv[1]
rng = random.Random(7)
types = {"address": ("com.acme.address.changed", "addressId"), "customer": ("com.acme.customer.snapshot", "customerId"),
         "order": ("com.acme.order.placed", "orderId")}
events = []
for i in range(6000):
    kind = rng.choice(list(types))
    t, key = types[kind]
    state = {"address": {"addressLine1": f"line {i}"}, "customer": {"name": f"name {i}"},
             "order": {"total": rng.randint(1, 999) / 10, "status": rng.choice(["new", "paid"])}}[kind]
    data = {key: f"{kind[0]}{rng.randrange(300)}", "newState": state}
    ev = {"specversion": "1.0", "id": f"e{i}", "type": t, "source": "/acme", "time": i + 1,
          "data": json.dumps(data) if i % 7 == 0 else data}
    events.append((kind, json.dumps(ev)))
events += rng.sample(events, 600)
rng.shuffle(events)
unknown = [json.dumps({"id": f"s{i}", "type": "com.acme.shipment.sent", "time": 10000 + i,
                       "data": {"orderId": f"s{i}", "newState": {"status": "shipped"}}}) for i in range(20)]
with open(f"{d}/routed.csv", "w", newline="") as f:
    w = csv.writer(f)
    for _, payload in events:
        w.writerow(["acme", payload])
    for payload in unknown:
        w.writerow(["acme", payload])
with open(f"{d}/bare.csv", "w", newline="") as f:
    w = csv.writer(f)
    for kind, payload in events:
        w.writerow([f"b_{kind}", payload])
PY
as_root chmod a+r "$IT_DIR"/*.csv
q "\\copy ecst.inbox (stream, payload) FROM '$IT_DIR/routed.csv' WITH (FORMAT csv)"
q "\\copy ecst.inbox (stream, payload) FROM '$IT_DIR/bare.csv' WITH (FORMAT csv)"
wait_for postgres "the two workers drain the inbox" "SELECT count(*) FROM ecst.inbox" 0 180

for t in address customer order; do
    check "$t: the routed replica equals the bare one" "0|0" \
        "$(q "SELECT (SELECT count(*) FROM (TABLE r_$t EXCEPT TABLE b_$t) x) || '|' || (SELECT count(*) FROM (TABLE b_$t EXCEPT TABLE r_$t) x)")"
    check "$t: it is not empty" 1 "$(q "SELECT (count(*) > 0)::int FROM r_$t")"
    check "$t: the same outcomes counted" \
        "$(q "SELECT applied || '|' || duplicate || '|' || stale FROM ecst.stats WHERE stream = 'b_$t'")" \
        "$(q "SELECT applied || '|' || duplicate || '|' || stale FROM ecst.stats WHERE stream = 'r_$t'")"
done
check "no dead letters but the unknown type's" "acme:unrouted:20" \
    "$(q "SELECT string_agg(stream || ':' || error_code || ':' || n, ',') FROM (SELECT stream, error_code, count(*) AS n FROM ecst.dead_letters GROUP BY 1, 2) d")"
check "route_stats counts them by value" "com.acme.shipment.sent|20|0" \
    "$(q "SELECT value || '|' || unrouted || '|' || pending FROM ecst.route_stats WHERE route = 'acme'")"

# Extended, the route sends the fourth type to the orders; a retry applies the letters.
q "SELECT ecst.create_route('acme', 'type', '{\"com.acme.address.changed\": \"r_address\",
     \"com.acme.customer.snapshot\": \"r_customer\", \"com.acme.order.placed\": \"r_order\",
     \"com.acme.shipment.sent\": \"r_order\"}')" >/dev/null
check "a retry after the route was extended applies them" "applied=20" \
    "$(q "SELECT string_agg(outcome || '=' || count, ',') FROM ecst.retry_dead_letters('acme')")"
check "the shipments are orders now" 20 "$(q "SELECT count(*) FROM r_order WHERE status = 'shipped'")"
check "no dead letters are left" 0 "$(q "SELECT count(*) FROM ecst.dead_letters")"
check "no worker failed" 0 "$(failed_workers)"
it_done
