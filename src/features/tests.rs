//! `#[pg_test]`s of the features: dead letters (retry, discard), snapshots (load, export, replace
//! mode), the inbox drain's order, and event-log compaction.

#[pgrx::pg_schema]
mod tests {
    #[allow(unused_imports)]
    use crate::testing::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn write_failures_are_dead_letters_and_retry_puts_them_back() {
        run("CREATE TABLE t (id text PRIMARY KEY, v text NOT NULL CHECK (v <> 'bad'))");
        run(r#"SELECT ecst.create_stream('t', 't', 'entity_snapshot', '{"id": "id"}')"#);
        assert_eq!(apply("t", r#"{"id": "1", "newState": {}}"#), "dead_lettered");
        assert_eq!(text("SELECT sqlstate FROM ecst.dead_letters"), "23502");
        assert_eq!(last_dead_letter().0, "write_failed");
        assert_eq!(apply("t", r#"{"id": "2", "newState": {"v": "bad"}}"#), "dead_lettered");
        assert_eq!(apply("t", r#"{"id": "3", "newState": {"v": "good"}}"#), "applied");
        assert_eq!(text("SELECT string_agg(id, ',' ORDER BY id) FROM t"), "3");
        run("ALTER TABLE t ALTER COLUMN v DROP NOT NULL");
        assert_eq!(
            text("SELECT string_agg(outcome || '=' || count, ',' ORDER BY outcome) FROM ecst.retry_dead_letters('t')"),
            "applied=1,dead_lettered=1"
        );
        assert_eq!(text("SELECT string_agg(id, ',' ORDER BY id) FROM t"), "1,3");
        assert_eq!(text("SELECT attempts::text || ':' || error_code FROM ecst.dead_letters"), "2:write_failed");
        assert_eq!(count("SELECT * FROM ecst.retry_dead_letters('nope')"), 0, "no letters of that stream");
    }

    #[pg_test]
    fn discard_dead_letters_filters_counts_and_checks_privileges() {
        run("CREATE TABLE t (id text PRIMARY KEY, v text NOT NULL)");
        run(r#"SELECT ecst.create_stream('t', 't', 'entity_snapshot', '{"id": "id"}')"#);
        run("CREATE TABLE u (id text PRIMARY KEY, v text)");
        run(r#"SELECT ecst.create_stream('u', 'u', 'entity_snapshot', '{"id": "id"}')"#);
        assert_eq!(apply("t", "not json"), "dead_lettered");
        assert_eq!(apply("t", r#"{"id": "1", "newState": {}}"#), "dead_lettered"); // write_failed
        assert_eq!(apply("u", "[1]"), "dead_lettered");
        run("INSERT INTO ecst.inbox (stream, payload) VALUES ('nobody', '{}'), ('nobody', '{}')");
        assert_eq!(one::<i64>("SELECT ecst.process_inbox()"), Some(2));
        assert_eq!(
            text("SELECT string_agg(stream || ':' || error_code || '=' || letters || ':' || stream_exists, ',' ORDER BY stream, error_code)
                  FROM ecst.dead_letter_summary"),
            "nobody:unknown_stream=2:false,t:invalid_json=1:true,t:write_failed=1:true,u:not_an_object=1:true",
            "letters of a stream nobody created are visible"
        );
        assert_eq!(
            sqlstate("SELECT ecst.discard_dead_letters(error_code => 'no_such_code')").as_deref(),
            Some("22023")
        );
        assert_eq!(sqlstate("SELECT ecst.discard_dead_letters(older_than => '-1 day')").as_deref(), Some("22023"));
        assert_eq!(one::<i64>("SELECT ecst.discard_dead_letters(older_than => '1 day')"), Some(0), "none is that old");
        assert_eq!(one::<i64>("SELECT ecst.discard_dead_letters('t', 'invalid_json')"), Some(1));
        assert_eq!(
            text("SELECT string_agg(error_code, ',') FROM ecst.dead_letters WHERE stream = 't'"),
            "write_failed"
        );
        // A role that may apply u but not t discards u's letters only; not those of t, nor of
        // the stream nobody created (the extension owner's).
        run("CREATE ROLE ecst_test_discard");
        run("GRANT SELECT, INSERT, UPDATE, DELETE ON u TO ecst_test_discard");
        run("SET LOCAL ROLE ecst_test_discard");
        assert_eq!(sqlstate("SELECT ecst.discard_dead_letters('t')").as_deref(), Some("42501"));
        assert_eq!(one::<i64>("SELECT ecst.discard_dead_letters()"), Some(1));
        run("RESET ROLE");
        assert_eq!(
            text("SELECT string_agg(stream || ':' || error_code, ',' ORDER BY id) FROM ecst.dead_letters"),
            "t:write_failed,nobody:unknown_stream,nobody:unknown_stream"
        );
        assert_eq!(one::<i64>("SELECT ecst.discard_dead_letters('nobody')"), Some(2), "the owner discards them");
        assert_eq!(one::<i64>("SELECT ecst.discard_dead_letters()"), Some(1));
        assert_eq!(count("SELECT * FROM ecst.dead_letters"), 0);
    }

    #[pg_test]
    fn load_snapshot_takes_as_of_as_text_number_or_timestamp() {
        run("CREATE TABLE s (id text PRIMARY KEY, v text)");
        run(r#"SELECT ecst.create_stream('s', 's', 'entity_snapshot', '{"id": "id"}', version => 'ts')"#);
        run(r#"CREATE TABLE snap (payload text)"#);
        for (id, ts) in [("a", "5"), ("b", "20"), ("c", "\"2024-05-01T12:00:00Z\"")] {
            assert_eq!(apply("s", &format!(r#"{{"id": "{id}", "ts": {ts}, "newState": {{"v": "x"}}}}"#)), "applied");
        }
        // Replace mode with an empty snapshot deletes the entities not newer than as_of.
        assert_eq!(
            text("SELECT deleted::text FROM ecst.load_snapshot('s', 'snap', mode => 'replace', as_of => 10)"),
            "1",
            "a number (integer literal)"
        );
        assert_eq!(text("SELECT string_agg(id, ',' ORDER BY id) FROM s"), "b,c");
        assert_eq!(
            text("SELECT deleted::text FROM ecst.load_snapshot('s', 'snap', as_of => 20.5, mode => 'replace')"),
            "1",
            "a numeric"
        );
        assert_eq!(
            text("SELECT deleted::text FROM ecst.load_snapshot('s', 'snap', mode => 'replace', as_of => timestamptz '2024-05-01 14:00:00+02')"),
            "1",
            "a timestamptz (the same instant as the version)"
        );
        assert_eq!(count("SELECT * FROM s"), 0);
        assert_eq!(text("SELECT loaded::text FROM ecst.load_snapshot('s', 'snap')"), "0", "no as_of: the text version");
        assert_eq!(
            text("SELECT loaded::text FROM ecst.load_snapshot('s', 'snap', 'replace', '30')"),
            "0",
            "positional text as before"
        );
    }

    #[pg_test]
    fn process_inbox_applies_a_row_that_appears_with_an_older_seq_before_newer_ones() {
        // ecst.batch_size is 5000 here: 10,000 rows are two claims in one transaction. The stream
        // is unversioned: inbox order decides.
        run("CREATE TABLE pi (id text PRIMARY KEY, v text)");
        run(r#"SELECT ecst.create_stream('pi', 'pi', 'entity_snapshot', '{"id": "id"}')"#);
        run(r#"INSERT INTO ecst.inbox (stream, payload)
               SELECT 'pi', format('{"id": "e%s", "newState": {"v": "in order"}}', i) FROM generate_series(1, 10000) i"#);
        // While the first claim is applied, a row for e9000 appears with an older seq than any
        // (as another session's cached sequence values would): it comes before the e9000 row of
        // the second claim, which must win.
        run(r#"CREATE FUNCTION pi_late() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                 IF NEW.id = 'e2000' THEN
                   INSERT INTO ecst.inbox (stream, payload, seq) VALUES ('pi', '{"id": "e9000", "newState": {"v": "late"}}', 0);
                 END IF;
                 RETURN NULL;
               END $$"#);
        run("CREATE TRIGGER pi_late AFTER INSERT ON pi FOR EACH ROW EXECUTE FUNCTION pi_late()");
        assert_eq!(one::<i64>("SELECT ecst.process_inbox()"), Some(10_001));
        assert_eq!(count("SELECT * FROM ecst.inbox"), 0);
        assert_eq!(text("SELECT v FROM pi WHERE id = 'e9000'"), "in order", "the late row was applied first");
        assert_eq!(text("SELECT applied::text FROM ecst.stats WHERE stream = 'pi'"), "10001");
    }

    #[pg_test]
    fn a_backlog_batch_applies_each_entity_in_inbox_order() {
        // 30,000 rows of 100 entities, in one transaction: the first claim takes ecst.batch_size
        // (5000) rows and comes back full, so the next is a backlog batch of the other 25,000,
        // sorted by entity. The stream is unversioned: the last row of each entity in inbox order
        // must win, across the two claims and through the sort.
        run("CREATE TABLE pb (id text PRIMARY KEY, v integer)");
        run(r#"SELECT ecst.create_stream('pb', 'pb', 'entity_snapshot', '{"id": "id"}')"#);
        run(r#"INSERT INTO ecst.inbox (stream, payload)
               SELECT CASE WHEN i = 17000 THEN 'nobody' ELSE 'pb' END,
                      CASE WHEN i = 12000 THEN '{"id": ' ELSE format('{"id": "e%s", "newState": {"v": %s}}', (i * 7919) % 100, i) END
               FROM generate_series(1, 30000) i ORDER BY i"#);
        assert_eq!(one::<i64>("SELECT ecst.process_inbox()"), Some(30_000));
        assert_eq!(count("SELECT * FROM ecst.inbox"), 0);
        assert_eq!(count("SELECT * FROM pb"), 100);
        let wrong = count(
            "SELECT * FROM pb JOIN (SELECT format('e%s', (i * 7919) % 100) AS id, max(i) AS v
                                 FROM generate_series(1, 30000) i WHERE i NOT IN (12000, 17000) GROUP BY 1) last
                          USING (id) WHERE pb.v <> last.v",
        );
        assert_eq!(wrong, 0, "every entity holds its last event in inbox order");
        assert_eq!(text("SELECT applied::text || '/' || dead_lettered FROM ecst.stats WHERE stream = 'pb'"), "29998/1");
        assert_eq!(
            text("SELECT string_agg(coalesce(stream, '') || ':' || error_code, ',' ORDER BY error_code) FROM ecst.dead_letters"),
            "pb:invalid_json,nobody:unknown_stream"
        );
    }

    #[pg_test]
    fn compaction_keeps_what_a_rebuild_needs() {
        // A skipped (conflicting) event is not kept: after compaction it would replay as applied.
        run("CREATE TABLE ck (id text PRIMARY KEY, line1 text, ts bigint)");
        run(r#"SELECT ecst.create_stream('ck', 'ck', 'entity_snapshot', '{"id": "id"}', version => 'newState.ts',
               on_conflict => 'skip', retain_events => true)"#);
        assert_eq!(apply("ck", r#"{"id": "a", "newState": {"line1": "a1", "ts": 1}}"#), "applied");
        assert_eq!(
            apply("ck", r#"{"id": "a", "oldState": {"line1": "zzz"}, "newState": {"line1": "a2", "ts": 2}}"#),
            "skipped"
        );
        run("SELECT ecst.compact_events('ck')");
        run("SELECT ecst.rebuild('ck')");
        assert_eq!(text("SELECT line1 FROM ck WHERE id = 'a'"), "a1");
        // Deltas without fields still make their entity live at their version.
        run("CREATE TABLE cd (id text PRIMARY KEY, a text, b text, v bigint)");
        run(r#"SELECT ecst.create_stream('cd', 'cd', 'delta', '{"id": "id"}', version => 'v', retain_events => true)"#);
        for e in [
            r#"{"id": "x", "v": 1, "newState": {}}"#,
            r#"{"id": "y", "v": 1, "newState": {"a": "a", "b": "b"}}"#,
            r#"{"id": "y", "v": 3, "newState": {}}"#,
        ] {
            assert_eq!(apply("cd", e), "applied");
        }
        run("SELECT ecst.compact_events('cd')");
        run("SELECT ecst.rebuild('cd')");
        assert_eq!(
            text("SELECT string_agg(id || ':' || coalesce(a, '-') || coalesce(b, '-'), ',' ORDER BY id) FROM cd"),
            "x:--,y:ab"
        );
        // A late delete older than the empty update leaves y live, as without compaction.
        apply("cd", r#"{"id": "y", "v": 2, "oldState": {}}"#);
        assert_eq!(count("SELECT * FROM cd WHERE id = 'y'"), 1);
    }

    #[pg_test]
    fn export_then_load_reproduces_the_quickstart_replica_and_odd_values() {
        address_stream();
        apply("address", SNAPSHOT);
        address_table("address2");
        run(
            r#"SELECT ecst.create_stream(name => 'address2', target => 'address2'::regclass, shape => 'entity_snapshot',
                key => '{"addressId": "address_id"}', state_path => 'addressContent',
                columns => '{"addressLine1": "line1"}', version => 'newState.addressContent.addressTS')"#,
        );
        run("CREATE TABLE address_export AS SELECT p AS payload FROM ecst.export_snapshot('address') p");
        assert_eq!(
            text("SELECT loaded || '/' || dead_lettered FROM ecst.load_snapshot('address2', 'address_export')"),
            "1/0"
        );
        assert_eq!(count("(SELECT * FROM address EXCEPT SELECT * FROM address2) UNION ALL (SELECT * FROM address2 EXCEPT SELECT * FROM address)"), 0);

        // Arrays, json strings and nulls, timestamps as versions.
        for t in ["ov", "ov2"] {
            run(&format!("CREATE TABLE {t} (id int PRIMARY KEY, tags int[], meta jsonb, doc json, at timestamptz)"));
            run(&format!(
                r#"SELECT ecst.create_stream('{t}', '{t}', 'entity_snapshot', '{{"id": "id"}}', version => 'newState.at')"#
            ));
        }
        for e in [
            r#"{"id": 1, "newState": {"tags": "{1,2}", "meta": "\"quoted\"", "doc": "null", "at": "2024-01-01T00:00:00.1234567Z"}}"#,
            r#"{"id": 2, "newState": {"tags": "{}", "meta": {"a": [1, "x"]}, "doc": 5, "at": "2024-01-02T10:00:00+02:00"}}"#,
        ] {
            assert_eq!(apply("ov", e), "applied");
        }
        run("CREATE TABLE ov_export AS SELECT p AS payload FROM ecst.export_snapshot('ov') p");
        assert_eq!(text("SELECT loaded || '/' || dead_lettered FROM ecst.load_snapshot('ov2', 'ov_export')"), "2/0");
        assert_eq!(
            count("(SELECT id, tags, meta, doc::text, at FROM ov EXCEPT SELECT id, tags, meta, doc::text, at FROM ov2)
                   UNION ALL (SELECT id, tags, meta, doc::text, at FROM ov2 EXCEPT SELECT id, tags, meta, doc::text, at FROM ov)"),
            0
        );
        // A text version column keeps its own spelling; a domain over timestamptz is a timestamp.
        run("CREATE DOMAIN ts_dom AS timestamptz");
        for t in ["tv", "tv2"] {
            run(&format!("CREATE TABLE {t} (id int PRIMARY KEY, at text, d ts_dom)"));
            run(&format!(
                r#"SELECT ecst.create_stream('{t}', '{t}', 'entity_snapshot', '{{"id": "id"}}', version => 'newState.at')"#
            ));
        }
        assert_eq!(
            apply("tv", r#"{"id": 1, "newState": {"at": "2019-10-26T23:56:45+02:00", "d": "2020-01-01T00:00:00Z"}}"#),
            "applied"
        );
        assert_eq!(apply("tv", r#"{"id": 2, "newState": {"at": 1572134205}}"#), "applied");
        run("CREATE TABLE tv_export AS SELECT p AS payload FROM ecst.export_snapshot('tv') p");
        assert_eq!(text("SELECT loaded || '/' || dead_lettered FROM ecst.load_snapshot('tv2', 'tv_export')"), "2/0");
        assert_eq!(
            count("(SELECT * FROM tv EXCEPT SELECT * FROM tv2) UNION ALL (SELECT * FROM tv2 EXCEPT SELECT * FROM tv)"),
            0
        );
        // The versions came along exactly: an event between the two is stale on both.
        for t in ["ov", "ov2"] {
            assert_eq!(apply(t, r#"{"id": 1, "newState": {"at": "2024-01-01T00:00:00.1234566Z"}}"#), "stale", "{t}");
            assert_eq!(apply(t, r#"{"id": 1, "newState": {"at": "2024-01-01T00:00:00.1234568Z"}}"#), "applied", "{t}");
        }
    }

    #[pg_test]
    fn a_replica_row_with_a_null_key_is_neither_exported_nor_deleted() {
        run("CREATE TABLE uk (id text UNIQUE, a text)");
        run(r#"SELECT ecst.create_stream('uk', 'uk', 'entity_snapshot', '{"id": "id"}')"#);
        assert_eq!(apply("uk", r#"{"id": "k", "newState": {"a": "x"}}"#), "applied");
        run("INSERT INTO uk VALUES (NULL, 'manual')");
        assert_eq!(count("SELECT * FROM ecst.export_snapshot('uk')"), 1);
        run(r#"CREATE TABLE uk_src AS SELECT '{"id": "j", "newState": {"a": "y"}}'::text AS payload"#);
        assert_eq!(text("SELECT deleted::text FROM ecst.load_snapshot('uk', 'uk_src', 'replace')"), "1");
        assert_eq!(
            text("SELECT string_agg(coalesce(id, 'NULL') || '=' || a, ',' ORDER BY id) FROM uk"),
            "j=y,NULL=manual"
        );
    }

    /// Replace mode deletes absent entities by their key columns' values (not by a text of each
    /// row): a two-column key of an integer and a timestamptz, in a session whose `DateStyle` and
    /// `TimeZone` print them otherwise, and the children of the deleted aggregates by their
    /// two parent columns.
    #[pg_test]
    fn replace_mode_deletes_absent_entities_by_typed_composite_keys_with_their_children() {
        run("SET DateStyle = 'SQL, DMY'");
        run("SET TimeZone = 'America/New_York'");
        run("CREATE TABLE ck (n int, at timestamptz, v bigint, PRIMARY KEY (n, at))");
        run("CREATE TABLE ck_item (n int, at timestamptz, item text, x text, PRIMARY KEY (n, at, item))");
        run(r#"SELECT ecst.create_stream('ck', 'ck', 'aggregate_snapshot', '{"n": "n", "t": "at"}', version => 'v',
               children => '{"items": {"path": "items", "table": "ck_item", "key": {"item": "item"},
                             "parent_key": ["n", "at"]}}')"#);
        for (n, t) in [(1, "2024-05-01T12:00:00Z"), (1, "2024-05-02T12:00:00Z"), (2, "2024-05-01T12:00:00.5Z")] {
            let event = format!(
                r#"{{"n": {n}, "t": "{t}", "v": 1, "newState": {{"items": [{{"item": "a", "x": "{n}{t}"}}, {{"item": "b"}}]}}}}"#
            );
            assert_eq!(apply("ck", &event), "applied");
        }
        run(
            r#"CREATE TABLE ck_src AS SELECT '{"n": 1, "t": "2024-05-02T14:00:00+02:00", "v": 2, "newState": {"items": []}}'::text AS payload"#,
        );
        assert_eq!(
            text("SELECT loaded || '/' || deleted FROM ecst.load_snapshot('ck', 'ck_src', 'replace', '5')"),
            "1/2"
        );
        run("SET TimeZone = 'UTC'");
        assert_eq!(text("SELECT string_agg(n || ' ' || at, ',') FROM ck"), "1 02/05/2024 12:00:00 UTC");
        assert_eq!(count("SELECT * FROM ck_item"), 0);
    }

    /// The inbox has no replica identity: a publication of its deletes makes its claim fail as
    /// SQL's DELETE does (55000), rather than delete rows its subscribers never hear of.
    #[pg_test]
    fn a_published_inbox_is_not_claimed_behind_the_publication() {
        run(r#"INSERT INTO ecst.inbox (stream, payload) VALUES ('nope', '{"id": 1}')"#);
        run("CREATE PUBLICATION ecst_test_inbox FOR TABLE ecst.inbox");
        assert_eq!(sqlstate("SELECT ecst.process_inbox()").as_deref(), Some("55000"));
        assert_eq!(count("SELECT * FROM ecst.inbox"), 1);
    }

    #[pg_test]
    fn replace_mode_keeps_the_entity_of_a_snapshot_row_that_failed() {
        run("CREATE TABLE rp (id text PRIMARY KEY, n int, v bigint)");
        run(r#"SELECT ecst.create_stream('rp', 'rp', 'entity_snapshot', '{"id": "id"}', version => 'v')"#);
        for id in ["a", "b", "c"] {
            assert_eq!(apply("rp", &format!(r#"{{"id": "{id}", "v": 1, "newState": {{"n": 1}}}}"#)), "applied");
        }
        run(r#"CREATE TABLE rp_src (payload text)"#);
        run(r#"INSERT INTO rp_src VALUES ('{"id": "a", "v": 4, "newState": {"n": 4}}'),
                                         ('{"id": "b", "newState": {"n": 4}}'),
                                         ('{"id": "c", "v": 4, "newState": {"n": "not a number"}}')"#);
        assert_eq!(
            text("SELECT loaded || '/' || deleted || '/' || dead_lettered FROM ecst.load_snapshot('rp', 'rp_src', 'replace', '5')"),
            "1/0/2"
        );
        assert_eq!(text("SELECT string_agg(id || '=' || n, ',' ORDER BY id) FROM rp"), "a=4,b=1,c=1");
        // A row that names no entity at all stops the deletions (with a warning).
        run(r#"INSERT INTO rp_src VALUES ('not json')"#);
        run(r#"DELETE FROM rp_src WHERE payload LIKE '%"b"%' OR payload LIKE '%"c"%'"#);
        assert_eq!(text("SELECT deleted::text FROM ecst.load_snapshot('rp', 'rp_src', 'replace', '5')"), "0");
        assert_eq!(count("SELECT * FROM rp"), 3);
    }

    /// One feed of three event types through a route: each event lands in its type's stream as if
    /// sent there bare; a type with no stream is a dead letter `unrouted` under the route's name,
    /// counted per value in `ecst.route_stats`, and retried once the route is extended.
    #[pg_test]
    fn a_route_sends_each_event_to_the_stream_of_its_type() {
        run("CREATE TABLE r_address (address_id text PRIMARY KEY, address_line1 text)");
        run("CREATE TABLE r_customer (customer_id text PRIMARY KEY, name text)");
        run("CREATE TABLE r_order (order_id text PRIMARY KEY, total numeric)");
        run(r#"SELECT ecst.create_stream(name => 'r_address', target => 'r_address', shape => 'entity_snapshot',
                 key => '{"addressId": "address_id"}', event_path => 'data', version => 'time', event_id => 'id')"#);
        run(r#"SELECT ecst.create_stream(name => 'r_customer', target => 'r_customer', shape => 'entity_snapshot',
                 key => '{"customerId": "customer_id"}', event_path => 'data', version => 'time')"#);
        run(r#"SELECT ecst.create_stream(name => 'r_order', target => 'r_order', shape => 'entity_snapshot',
                 key => '{"orderId": "order_id"}', event_path => 'data', version => 'time')"#);
        run(r#"SELECT ecst.create_route('acme', 'type', '{"com.acme.address.changed": "r_address",
                 "com.acme.customer.snapshot": "r_customer"}')"#);
        let address = |id: &str, t: u32, line: &str| {
            format!(
                r#"{{"type": "com.acme.address.changed", "id": "{id}", "time": {t}, "data": {{"addressId": "a1", "newState": {{"addressLine1": "{line}"}}}}}}"#
            )
        };
        let customer = r#"{"type": "com.acme.customer.snapshot", "time": 1, "data": {"customerId": "c1", "newState": {"name": "Ada"}}}"#;
        let order =
            r#"{"type": "com.acme.order.placed", "time": 1, "data": {"orderId": "o1", "newState": {"total": 12.5}}}"#;
        // ecst.apply with the route's name.
        assert_eq!(apply("acme", &address("e1", 1, "first")), "applied");
        assert_eq!(apply("acme", &address("e1", 1, "first")), "duplicate");
        assert_eq!(apply("acme", customer), "applied");
        assert_eq!(apply("acme", order), "dead_lettered");
        let (code, message) = last_dead_letter();
        assert_eq!(code, "unrouted");
        assert!(message.contains("com.acme.order.placed"), "{message}");
        assert_eq!(text("SELECT stream FROM ecst.dead_letters ORDER BY id DESC LIMIT 1"), "acme");
        // apply_batch: per stream in array order (a1 ends at "third"), unrouted counted.
        assert_eq!(
            batch("acme", &[&address("e2", 3, "third"), order, &address("e3", 2, "second"), customer]),
            "applied=1,duplicate=1,stale=1,dead_lettered=1"
        );
        assert_eq!(text("SELECT address_line1 FROM r_address WHERE address_id = 'a1'"), "third");
        assert_eq!(text("SELECT name FROM r_customer WHERE customer_id = 'c1'"), "Ada");
        // Trigger mode with the route's name.
        run("CREATE TABLE r_feed (payload jsonb)");
        run("CREATE TRIGGER r_feed AFTER INSERT ON r_feed FOR EACH ROW EXECUTE FUNCTION ecst.apply_trigger('acme')");
        run(&format!("INSERT INTO r_feed VALUES ('{}')", address("e4", 4, "fourth")));
        assert_eq!(text("SELECT address_line1 FROM r_address WHERE address_id = 'a1'"), "fourth");
        // The inbox, under the route's name.
        run(&format!(
            "INSERT INTO ecst.inbox (stream, payload) VALUES ('acme', '{}'), ('acme', '{}')",
            address("e5", 5, "fifth"),
            order
        ));
        assert_eq!(one::<i64>("SELECT ecst.process_inbox()"), Some(2));
        assert_eq!(text("SELECT address_line1 FROM r_address WHERE address_id = 'a1'"), "fifth");
        // Unrouted events counted per value; extend the route, retry, and they apply.
        assert_eq!(
            text("SELECT value || '=' || unrouted FROM ecst.route_stats WHERE route = 'acme'"),
            "com.acme.order.placed=3"
        );
        run(r#"SELECT ecst.create_route('acme', 'type', '{"com.acme.address.changed": "r_address",
                 "com.acme.customer.snapshot": "r_customer", "com.acme.order.placed": "r_order"}')"#);
        assert_eq!(
            text("SELECT string_agg(outcome || '=' || count, ',') FROM ecst.retry_dead_letters('acme')"),
            "applied=1,duplicate=2"
        );
        assert_eq!(text("SELECT total::text FROM r_order WHERE order_id = 'o1'"), "12.5");
        assert_eq!(count("SELECT * FROM ecst.dead_letters WHERE stream = 'acme'"), 0);
        // Streams and routes share one namespace; bad definitions are refused up front.
        assert_eq!(
            sqlstate("SELECT ecst.create_route('r_order', 'type', '{\"x\": \"r_order\"}')").as_deref(),
            Some("42710")
        );
        assert_eq!(
            sqlstate("SELECT ecst.create_stream('acme', 'r_order', 'entity_snapshot', '{\"orderId\": \"order_id\"}')")
                .as_deref(),
            Some("42710")
        );
        assert_eq!(sqlstate("SELECT ecst.create_route('x', 'type', '{\"v\": \"nope\"}')").as_deref(), Some("42704"));
        assert_eq!(sqlstate("SELECT ecst.create_route('x', 'a..b', '{\"v\": \"r_order\"}')").as_deref(), Some("22023"));
        assert_eq!(sqlstate("SELECT ecst.create_route('x', 'type', '[]')").as_deref(), Some("22023"));
        assert_eq!(one::<bool>("SELECT ecst.drop_route('acme')"), Some(true));
        assert_eq!(one::<bool>("SELECT ecst.drop_route('acme')"), Some(false));
    }

    /// Feeds `(stream, payload)` rows with one INSERT INTO ecst.feed; returns the command's row count.
    fn feed(rows: &[(&str, Option<&str>)]) -> i64 {
        let streams: Vec<String> = rows.iter().map(|r| r.0.to_string()).collect();
        let payloads: Vec<Option<String>> = rows.iter().map(|r| r.1.map(str::to_string)).collect();
        Spi::connect_mut(|client| {
            client
                .update(
                    "INSERT INTO ecst.feed (stream, payload) SELECT NULLIF(s, ''), p FROM unnest($1::text[], $2::text[]) AS u(s, p)",
                    None,
                    &[streams.into(), payloads.into()],
                )
                .unwrap()
                .len() as i64
        })
    }

    #[pg_test]
    fn the_feed_applies_within_the_statement_and_keeps_only_dead_letters() {
        address_stream();
        delta_stream("address_d", Some("ts"), "apply");
        customer_stream();
        let older = SNAPSHOT.replace("1572134205", "1572134100").replace("48 Baker", "Old Baker");
        let n = feed(&[
            ("address", Some(SNAPSHOT)),
            ("address", Some("this is not json")),
            ("address", Some(&older)),
            ("address", None),
            ("nowhere", Some("{}")),
            ("", Some("{}")),
            (
                "address_d",
                Some(r#"{"addressId": "d1", "ts": 1, "newState": {"addressPurpose": "home", "addressLine1": "1 A"}}"#),
            ),
            ("address_d", Some(r#"{"addressId": "d1", "ts": 2, "newState": {"addressLine1": "2 A"}}"#)),
            (
                "customer",
                Some(
                    r#"{"customerId": "c1", "newState": {"name": "Ada", "addressContent": {"addresses": [{"addressId": "x", "addressLine1": "X St"}]}}}"#,
                ),
            ),
        ]);
        assert_eq!(n, 9, "the command counts every row fed");
        assert_eq!(row("address", "12366"), "12366|billing|48 Baker Street|London, UK, E1 7AE|1572134205");
        assert_eq!(row("address_d", "d1"), "d1|home|2 A|-|-");
        assert_eq!(text("SELECT name || ':' || (SELECT line1 FROM customer_address) FROM customer"), "Ada:X St");
        assert_eq!(
            text("SELECT string_agg(coalesce(stream, '(null)') || ':' || error_code, ',' ORDER BY stream NULLS FIRST, error_code) FROM ecst.dead_letters"),
            "(null):unknown_stream,address:invalid_json,address:invalid_json,nowhere:unknown_stream"
        );
        assert_eq!(
            text("SELECT payload FROM ecst.dead_letters WHERE payload IS NOT NULL AND stream = 'address'"),
            "this is not json",
            "kept verbatim"
        );
        assert_eq!(
            text("SELECT string_agg(concat_ws('/', stream, applied, stale, dead_lettered), ',' ORDER BY stream) FROM ecst.stats"),
            "address/1/1/2,address_d/2/0/0,customer/1/0/0"
        );
        assert_eq!(count("SELECT * FROM ecst.inbox"), 0, "nothing of the events is stored");
    }

    #[pg_test]
    fn the_feed_applies_in_chunks_in_row_order() {
        delta_stream("address_d", Some("ts"), "apply");
        run("SET LOCAL ecst.feed_buffer = '64kB'");
        // 3,000 events of 10 entities (about 300 kB): several chunks. Each event sets one field,
        // so the replica shows the last value fed per field and entity.
        let events: Vec<String> = (0..3000)
            .map(|i| {
                let field = ["addressPurpose", "addressLine1", "addressLine2"][i % 3];
                format!(
                    r#"{{"addressId": "e{}", "ts": {}, "newState": {{"{field}": "v{i}"}}, "padding": "{}"}}"#,
                    i % 10,
                    i,
                    "x".repeat(60)
                )
            })
            .collect();
        let rows: Vec<(&str, Option<&str>)> = events.iter().map(|e| ("address_d", Some(e.as_str()))).collect();
        assert_eq!(feed(&rows), 3000);
        assert_eq!(row("address_d", "e0"), "e0|v2970|v2980|v2990|-");
        assert_eq!(row("address_d", "e9"), "e9|v2979|v2989|v2999|-");
        assert_eq!(text("SELECT applied::text FROM ecst.stats WHERE stream = 'address_d'"), "3000");
    }

    #[pg_test]
    fn a_failed_feed_statement_leaves_nothing_and_the_next_one_works() {
        address_stream();
        run("CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'boom' USING ERRCODE = 'XX001'; END $$");
        run("CREATE TRIGGER boom AFTER INSERT ON address FOR EACH ROW WHEN (NEW.address_id = 'boom') EXECUTE FUNCTION boom()");
        let boom = SNAPSHOT.replace("12366", "boom");
        // XX001 is not an event's error: it fails the statement, inside a savepoint here.
        let caught = text(&format!(
            "DO $$ BEGIN INSERT INTO ecst.feed VALUES ('address', '{SNAPSHOT}'), ('address', '{boom}');
                  EXCEPTION WHEN others THEN RAISE NOTICE 'caught %', SQLERRM; END $$; SELECT 'done'"
        ));
        assert_eq!(caught, "done");
        assert_eq!(count("SELECT * FROM address"), 0, "rolled back with its statement");
        assert_eq!(count("SELECT * FROM ecst.dead_letters"), 0);
        assert_eq!(feed(&[("address", Some(SNAPSHOT))]), 1);
        assert_eq!(count("SELECT * FROM address"), 1, "the next statement applies");
    }

    #[pg_test]
    fn a_replica_trigger_may_feed_while_a_chunk_applies() {
        address_stream();
        delta_stream("audit", None, "apply");
        run(r#"CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                 INSERT INTO ecst.feed VALUES ('audit', json_build_object('addressId', NEW.address_id,
                   'newState', json_build_object('addressLine1', 'seen ' || NEW.line1))::text);
                 RETURN NULL; END $$"#);
        run("CREATE TRIGGER audit AFTER INSERT OR UPDATE ON address FOR EACH ROW EXECUTE FUNCTION audit()");
        assert_eq!(feed(&[("address", Some(SNAPSHOT)), ("address", Some(&SNAPSHOT.replace("12366", "2")))]), 2);
        assert_eq!(
            text("SELECT string_agg(address_id || '=' || line1, ',' ORDER BY address_id) FROM audit"),
            "12366=seen 48 Baker Street,2=seen 48 Baker Street"
        );
    }

    #[pg_test]
    fn the_feed_takes_routes_and_envelopes() {
        run("CREATE TABLE r_address (address_id text PRIMARY KEY, address_line1 text)");
        run(r#"SELECT ecst.create_stream('r_address', 'r_address', 'entity_snapshot', '{"addressId": "address_id"}',
                 event_path => 'data', version => 'time', event_id => 'id')"#);
        run(r#"SELECT ecst.create_route('acme', 'type', '{"com.acme.address.changed": "r_address"}')"#);
        let ev = |id: &str, time: i32, line: &str| {
            format!(
                r#"{{"id": "{id}", "type": "com.acme.address.changed", "time": {time}, "data": {{"addressId": "a1", "newState": {{"addressLine1": "{line}"}}}}}}"#
            )
        };
        let (a, b, c) = (ev("e1", 1, "first"), ev("e2", 2, "second"), ev("e1", 3, "again"));
        let other = r#"{"id": "o1", "type": "com.acme.order.placed", "data": {}}"#;
        assert_eq!(feed(&[("acme", Some(&a)), ("acme", Some(&b)), ("acme", Some(&c)), ("acme", Some(other))]), 4);
        assert_eq!(text("SELECT address_line1 FROM r_address"), "second");
        assert_eq!(text("SELECT concat_ws('/', applied, duplicate) FROM ecst.stats WHERE stream = 'r_address'"), "2/1");
        assert_eq!(text("SELECT stream || ':' || error_code FROM ecst.dead_letters"), "acme:unrouted");
    }
}
