//! `#[pg_test]`s of the apply engine inside a real backend (each test runs in a rolled-back
//! transaction): the three shapes, versions and tombstones, row mode and the row API, conflicts,
//! bad input, batches, and convergence in SQL (one by one, shuffled with duplicates, and set-based
//! in random chunks). Worker, COPY, crash and concurrency behaviour are tested against a running
//! server in `tests/integration/`.

#[pgrx::pg_schema]
mod tests {
    #[allow(unused_imports)]
    use crate::testing::*;
    use pgrx::prelude::*;

    /// A row the executor's row API inserts gets what SQL would give the columns it leaves out:
    /// a domain's default, or a NOT NULL domain's refusal (the event is a dead letter); and an
    /// event that sets nothing leaves an existing row as it is (no new row version).
    #[pg_test]
    fn rows_written_without_sql_get_what_sql_gives_left_out_columns() {
        run("CREATE DOMAIN dflt AS text DEFAULT 'from the domain'");
        run("CREATE DOMAIN required AS text NOT NULL");
        run("CREATE TABLE dm (id text PRIMARY KEY, a text, d dflt)");
        run("CREATE TABLE dn (id text PRIMARY KEY, a text, n required)");
        for t in ["dm", "dn"] {
            run(&format!(r#"SELECT ecst.create_stream('{t}', '{t}', 'delta', '{{"id": "id"}}')"#));
        }
        // Batches of two entities: the set-based path, which writes through the row API.
        let batch = |stream: &str, events: [&str; 2]| {
            text(&format!(
                "SELECT string_agg(outcome || ':' || count, ',' ORDER BY outcome) FROM ecst.apply_batch('{stream}', ARRAY['{}', '{}']::text[])",
                events[0], events[1]
            ))
        };
        let (one, two) = (r#"{"id": "1", "newState": {"a": "x"}}"#, r#"{"id": "2", "newState": {"a": "y"}}"#);
        assert_eq!(batch("dm", [one, two]), "applied:2");
        assert_eq!(
            text("SELECT string_agg(id || '=' || d, ',' ORDER BY id) FROM dm"),
            "1=from the domain,2=from the domain"
        );
        assert_eq!(batch("dn", [one, two]), "dead_lettered:2");
        assert_eq!(
            text("SELECT string_agg(DISTINCT sqlstate, ',') FROM ecst.dead_letters WHERE stream = 'dn'"),
            "23502"
        );
        assert_eq!(count("SELECT * FROM dn"), 0);
        let before = text("SELECT ctid::text FROM dm WHERE id = '1'");
        assert_eq!(
            batch("dm", [r#"{"id": "1", "newState": {"unmapped": 1}}"#, r#"{"id": "3", "newState": {"a": "z"}}"#]),
            "applied:2"
        );
        assert_eq!(text("SELECT ctid::text FROM dm WHERE id = '1'"), before);
    }

    #[pg_test]
    fn fixture_entity_snapshot_applies_once() {
        address_stream();
        assert_eq!(apply("address", SNAPSHOT), "applied");
        assert_eq!(row("address", "12366"), "12366|billing|48 Baker Street|London, UK, E1 7AE|1572134205");
        assert_eq!(
            text("SELECT conflicts::text FROM ecst.stats WHERE stream = 'address'"),
            "0",
            "oldState of an entity the replica never had is no conflict"
        );
        assert_eq!(apply("address", SNAPSHOT), "duplicate");
        let jsonb =
            Spi::get_one_with_args::<String>("SELECT ecst.apply('address', $1::jsonb)::text", &[SNAPSHOT.into()]);
        assert_eq!(jsonb.unwrap().as_deref(), Some("duplicate"), "the jsonb overload applies the same event");
    }

    #[pg_test]
    fn snapshot_absent_field_means_null() {
        address_stream();
        apply("address", SNAPSHOT);
        let partial = r#"{"addressId": "12366", "newState": {"addressContent": {"addressLine1": "1 New Road", "addressTS": 1572134300}}}"#;
        assert_eq!(apply("address", partial), "applied");
        assert_eq!(row("address", "12366"), "12366|-|1 New Road|-|1572134300");
    }

    #[pg_test]
    fn fixture_delta_updates_only_the_changed_field() {
        delta_stream("address_d", None, "apply");
        run("INSERT INTO address_d VALUES ('12366', 'billing', '84 Baker Street', 'London, UK, E1 7AE', 1)");
        assert_eq!(apply("address_d", DELTA), "applied");
        assert_eq!(row("address_d", "12366"), "12366|billing|48 Baker Street|London, UK, E1 7AE|1");
        assert_eq!(text("SELECT conflicts::text FROM ecst.stats WHERE stream = 'address_d'"), "0");
        // Explicit null sets NULL; absent fields stay.
        assert_eq!(apply("address_d", r#"{"addressId": "12366", "newState": {"addressLine2": null}}"#), "applied");
        assert_eq!(row("address_d", "12366"), "12366|billing|48 Baker Street|-|1");
    }

    #[pg_test]
    fn fixture_aggregate_with_repeated_child_key_is_dead_lettered_whole() {
        customer_stream();
        assert_eq!(apply("customer", AGGREGATE), "dead_lettered");
        let (code, message) = last_dead_letter();
        assert_eq!(code, "duplicate_child_key");
        assert!(message.contains("123124"), "{message}");
        assert_eq!(count("SELECT * FROM customer"), 0, "nothing half-applied");
        assert_eq!(count("SELECT * FROM customer_address"), 0);
        assert_eq!(
            text("SELECT payload FROM ecst.dead_letters ORDER BY id DESC LIMIT 1"),
            AGGREGATE,
            "payload kept exactly as received"
        );
    }

    #[pg_test]
    fn aggregate_children_are_replaced_as_a_set() {
        customer_stream();
        let ev = |addresses: &str| {
            format!(
                r#"{{"customerId": "911000100", "newState": {{"name": "Ada", "addressContent": {{"addresses": [{addresses}]}}}}}}"#
            )
        };
        let a = r#"{"addressId": "a", "addressLine1": "1 A St", "addressTS": 1}"#;
        let b = r#"{"addressId": "b", "addressLine1": "2 B St", "addressTS": 1}"#;
        let b2 = r#"{"addressId": "b", "addressLine1": "22 B St", "addressPurpose": "billing", "addressTS": 2}"#;
        let c = r#"{"addressId": "c", "addressLine1": "3 C St", "addressTS": 1}"#;
        assert_eq!(apply("customer", &ev(&format!("{a}, {b}"))), "applied");
        assert_eq!(
            text("SELECT string_agg(address_id || ':' || line1, ',' ORDER BY address_id) FROM customer_address"),
            "a:1 A St,b:2 B St"
        );
        assert_eq!(apply("customer", &ev(&format!("{b2}, {c}"))), "applied");
        assert_eq!(
            text("SELECT string_agg(concat_ws(':', address_id, line1, address_purpose), ',' ORDER BY address_id) FROM customer_address"),
            "b:22 B St:billing,c:3 C St",
            "a deleted, b updated, c inserted"
        );
        assert_eq!(text("SELECT name FROM customer"), "Ada");
        assert_eq!(apply("customer", r#"{"customerId": "911000100", "oldState": {}}"#), "applied");
        assert_eq!(count("SELECT * FROM customer"), 0);
        assert_eq!(count("SELECT * FROM customer_address"), 0, "a deleted aggregate loses its children");
    }

    #[pg_test]
    fn create_update_delete_inferred_and_no_state_is_a_dead_letter() {
        delta_stream("addr", None, "apply");
        assert_eq!(apply("addr", r#"{"addressId": "1", "newState": {"addressLine1": "x"}}"#), "applied");
        assert_eq!(
            apply(
                "addr",
                r#"{"addressId": "1", "oldState": {"addressLine1": "x"}, "newState": {"addressLine1": "y"}}"#
            ),
            "applied"
        );
        assert_eq!(row("addr", "1"), "1|-|y|-|-");
        assert_eq!(apply("addr", r#"{"addressId": "1", "oldState": {"addressLine1": "y"}}"#), "applied");
        assert_eq!(count("SELECT * FROM addr"), 0);
        assert_eq!(apply("addr", r#"{"addressId": "1", "oldState": null, "newState": null}"#), "dead_lettered");
        assert_eq!(last_dead_letter().0, "no_state");
    }

    #[pg_test]
    fn unmapped_fields_are_not_stored_and_values_convert_by_column_type() {
        run("CREATE TABLE person (id bigint PRIMARY KEY, born date, score numeric(5,2), tags jsonb, nick varchar(5))");
        run(r#"SELECT ecst.create_stream('person', 'person', 'entity_snapshot', '{"id": "id"}')"#);
        let ok = r#"{"id": "042", "newState": {"born": "1990-02-03", "score": 12.5, "tags": {"a": [1]}, "nick": "ada", "ssn": "123-45-6789"}}"#;
        assert_eq!(apply("person", ok), "applied");
        assert_eq!(
            text("SELECT concat_ws('|', id, born, score, tags, nick) FROM person"),
            "42|1990-02-03|12.50|{\"a\": [1]}|ada"
        );
        assert_eq!(count("SELECT * FROM person WHERE row_to_json(person)::text LIKE '%123-45-6789%'"), 0);
        assert_eq!(apply("person", r#"{"id": 42, "newState": {"born": "not-a-date"}}"#), "dead_lettered");
        let (code, message) = last_dead_letter();
        assert_eq!(code, "invalid_value");
        assert!(message.contains("\"born\"") && message.contains("\"born\" (date)"), "{message}");
        assert_eq!(apply("person", r#"{"id": 42, "newState": {"nick": "much too long"}}"#), "dead_lettered");
        assert!(last_dead_letter().1.contains("character varying(5)"), "{}", last_dead_letter().1);
        assert_eq!(apply("person", r#"{"id": 42, "newState": {"score": 123456}}"#), "dead_lettered");
        assert_eq!(apply("person", r#"{"id": "x", "newState": {}}"#), "dead_lettered");
        assert_eq!(last_dead_letter().0, "invalid_key");
        assert_eq!(
            text("SELECT concat_ws('|', id, born, score, tags, nick) FROM person"),
            "42|1990-02-03|12.50|{\"a\": [1]}|ada"
        );
    }

    #[pg_test]
    fn keys_are_canonical_column_values() {
        run("CREATE TABLE thing (id bigint PRIMARY KEY, v text)");
        run(r#"SELECT ecst.create_stream('thing', 'thing', 'entity_snapshot', '{"id": "id"}', version => 'v')"#);
        assert_eq!(apply("thing", r#"{"id": "042", "v": 2, "newState": {"v": "two"}}"#), "applied");
        assert_eq!(
            apply("thing", r#"{"id": 42, "v": 1, "newState": {"v": "one"}}"#),
            "stale",
            "\"042\" and 42 are one entity"
        );
        assert_eq!(text("SELECT v FROM thing"), "two");
    }

    #[pg_test]
    fn versions_decide_and_tombstones_remain() {
        address_stream();
        let at = |ts: i64, line: &str| {
            format!(
                r#"{{"addressId": "7", "newState": {{"addressContent": {{"addressLine1": "{line}", "addressTS": {ts}}}}}}}"#
            )
        };
        assert_eq!(apply("address", &at(10, "ten")), "applied");
        assert_eq!(apply("address", &at(9, "nine")), "stale", "9 < 10 numerically");
        assert_eq!(apply("address", &at(10, "ten")), "duplicate");
        assert_eq!(apply("address", &at(11, "eleven")), "applied");
        assert_eq!(text("SELECT line1 FROM address"), "eleven");
        // A delete without a version is a dead letter (the version path is under newState).
        assert_eq!(apply("address", r#"{"addressId": "7", "oldState": {"addressContent": {}}}"#), "dead_lettered");
        assert_eq!(last_dead_letter().0, "missing_version");
        assert_eq!(text("SELECT line1 FROM address"), "eleven");
    }

    /// A stream whose version is a mapped integer column keeps each entity's version in its replica
    /// row (no version-state row) until a tombstone needs remembering; the row's version decides.
    #[pg_test]
    fn row_version_streams_keep_versions_in_the_row() {
        address_stream();
        let at = |id: i64, ts: i64| {
            format!(
                r#"{{"addressId": "{id}", "newState": {{"addressContent": {{"addressLine1": "l{ts}", "addressTS": {ts}}}}}}}"#
            )
        };
        let states = || count("SELECT * FROM ecst.entity_state");
        assert_eq!(apply("address", &at(7, 10)), "applied");
        assert_eq!(apply("address", &at(7, 9)), "stale");
        assert_eq!(apply("address", &at(7, 10)), "duplicate");
        assert_eq!(apply("address", &at(7, 11)), "applied");
        let batch: Vec<Option<String>> =
            [at(8, 20), at(8, 15), at(7, 30), at(8, 20), at(9, 1)].into_iter().map(Some).collect();
        let got = Spi::get_one_with_args::<String>(
            "SELECT string_agg(outcome || '=' || count, ',' ORDER BY outcome) FROM ecst.apply_batch('address', $1::text[])",
            &[batch.into()],
        );
        assert_eq!(got.unwrap().as_deref(), Some("applied=3,duplicate=1,stale=1"));
        assert_eq!(text("SELECT string_agg(address_id || ':' || line1 || ':' || address_ts, ',' ORDER BY address_id) FROM address"), "7:l30:30,8:l20:20,9:l1:1");
        assert_eq!(states(), 0, "the versions are in the rows");
        // Single events of entities written as if their row were older (no read first): the
        // guarded write tells stale and duplicate apart.
        let batch: Vec<Option<String>> = [at(7, 25), at(8, 20), at(10, 3)].into_iter().map(Some).collect();
        let got = Spi::get_one_with_args::<String>(
            "SELECT string_agg(outcome || '=' || count, ',' ORDER BY outcome) FROM ecst.apply_batch('address', $1::text[])",
            &[batch.into()],
        );
        assert_eq!(got.unwrap().as_deref(), Some("applied=1,duplicate=1,stale=1"));
        run("DELETE FROM address WHERE address_id = '10'");
        // The row's version is the entity's version: a row moved ahead by hand makes older events stale.
        run("UPDATE address SET address_ts = 100 WHERE address_id = '9'");
        assert_eq!(apply("address", &at(9, 50)), "stale");
        // A replace-mode snapshot without entity 7 deletes it and leaves a tombstone (a state row),
        // which then decides for that entity.
        run(&format!("CREATE TABLE src (payload text); INSERT INTO src VALUES ('{}'), ('{}')", at(8, 20), at(9, 100)));
        assert_eq!(
            text("SELECT deleted::text FROM ecst.load_snapshot('address', 'src', mode => 'replace', as_of => '40')"),
            "1"
        );
        assert_eq!(
            text("SELECT entity_key || ':' || live_version || ':' || tomb_version FROM ecst.entity_state"),
            "7:30:40"
        );
        assert_eq!(apply("address", &at(7, 35)), "stale", "older than the tombstone");
        assert_eq!(apply("address", &at(7, 45)), "applied");
        assert_eq!(
            text("SELECT live_version::text FROM ecst.entity_state"),
            "45",
            "a state row, once there, is kept up to date"
        );
        assert_eq!(apply("address", &at(7, 44)), "stale");
        assert_eq!(text("SELECT line1 FROM address WHERE address_id = '7'"), "l45");
    }

    /// Row mode in batches: entities with several events are written once, as if their row were
    /// older than their newest event, and their events' outcomes are decided from the version the
    /// write replaced. Outcomes and rows must equal those of the same events applied one by one,
    /// whatever the rows held before; half the seeds have a column default, so new rows are
    /// inserted through SQL.
    #[pg_test]
    fn row_mode_batches_decide_like_single_events() {
        let at = |id: u64, ts: u64| {
            format!(
                r#"{{"addressId": "{id}", "newState": {{"addressContent": {{"addressLine1": "l{ts}", "addressTS": {ts}}}}}}}"#
            )
        };
        let outcomes =
            |sql: &str| text(&format!("SELECT string_agg(outcome || '=' || n, ',' ORDER BY outcome) FROM ({sql}) o"));
        for seed in 1..=40u64 {
            let mut rng = Lcg(seed);
            let (single, batched) = (format!("rs_{seed}"), format!("rb_{seed}"));
            for name in [&single, &batched] {
                address_table(name);
                if seed % 2 == 0 {
                    run(&format!("ALTER TABLE {name} ADD COLUMN extra text DEFAULT 'x'"));
                }
                run(&format!(
                    r#"SELECT ecst.create_stream('{name}', '{name}', 'entity_snapshot', '{{"addressId": "address_id"}}',
                        state_path => 'addressContent', columns => '{{"addressLine1": "line1"}}',
                        version => 'newState.addressContent.addressTS')"#
                ));
                run(&format!("CREATE TEMP TABLE {name}_out (outcome text, n bigint) ON COMMIT DROP"));
            }
            // Rows some entities already have.
            for id in 0..4 {
                if rng.next(2) == 0 {
                    let ev = at(id, 10 * (1 + rng.next(6)));
                    apply(&single, &ev);
                    apply(&batched, &ev);
                }
            }
            let mut events: Vec<String> = Vec::new();
            for id in 0..4 {
                for _ in 0..(1 + rng.next(6)) {
                    events.push(at(id, 10 * (1 + rng.next(7))));
                }
            }
            for i in (1..events.len()).rev() {
                events.swap(i, rng.next(i as u64 + 1) as usize);
            }
            for ev in &events {
                let outcome = apply(&single, ev);
                run(&format!("INSERT INTO {single}_out VALUES ('{outcome}', 1)"));
            }
            let mut rest: &[String] = &events;
            while !rest.is_empty() {
                let n = (2 + rng.next(10) as usize).min(rest.len());
                let chunk: Vec<Option<String>> = rest[..n].iter().cloned().map(Some).collect();
                Spi::run_with_args(
                    &format!("INSERT INTO {batched}_out SELECT outcome, count FROM ecst.apply_batch('{batched}', $1::text[])"),
                    &[chunk.into()],
                )
                .unwrap();
                rest = &rest[n..];
            }
            assert_eq!(
                outcomes(&format!("SELECT outcome, sum(n) n FROM {batched}_out GROUP BY 1")),
                outcomes(&format!("SELECT outcome, sum(n) n FROM {single}_out GROUP BY 1")),
                "seed {seed}: outcomes"
            );
            let diff = count(&format!(
                "(SELECT * FROM {single} EXCEPT SELECT * FROM {batched}) UNION ALL (SELECT * FROM {batched} EXCEPT SELECT * FROM {single})"
            ));
            assert_eq!(diff, 0, "seed {seed}: rows");
        }
        assert_eq!(count("SELECT * FROM ecst.entity_state"), 0, "the versions are in the rows");
    }

    /// Row-mode writes go through the executor's row API (`direct.rs`) where it applies; what SQL
    /// would enforce holds there too, and tables it does not apply to go through SQL.
    #[pg_test]
    fn row_writes_without_sql_keep_what_sql_enforces() {
        run("CREATE TABLE r (id bigint PRIMARY KEY, v numeric, name text CHECK (name <> 'bad'),
                             shout text GENERATED ALWAYS AS (upper(name)) STORED, code text UNIQUE)");
        run(r#"SELECT ecst.create_stream('r', 'r', 'entity_snapshot', '{"id": "id"}', version => 'newState.v')"#);
        let ev = |id: i64, v: i64, name: &str, code: &str| {
            format!(r#"{{"id": {id}, "newState": {{"v": {v}, "name": "{name}", "code": "{code}"}}}}"#)
        };
        let row = |id: i64| text(&format!("SELECT concat_ws(':', v, name, shout, code) FROM r WHERE id = {id}"));
        assert_eq!(apply("r", &ev(1, 1, "a", "c1")), "applied");
        assert_eq!(row(1), "1:a:A:c1", "generated column computed on insert");
        assert_eq!(apply("r", &ev(1, 2, "b", "c1")), "applied");
        assert_eq!(row(1), "2:b:B:c1", "and on update");
        assert_eq!(apply("r", &ev(1, 1, "x", "c1")), "stale");
        assert_eq!(apply("r", &ev(1, 2, "b", "c1")), "duplicate");
        assert_eq!(apply("r", &ev(1, 3, "bad", "c1")), "dead_lettered", "CHECK constraint on update");
        assert_eq!(text("SELECT sqlstate FROM ecst.dead_letters ORDER BY id DESC LIMIT 1"), "23514");
        // Another unique index refuses the insert: first taken for a lost race, retried through
        // SQL, which fails the same way: a dead letter, not a retry loop.
        assert_eq!(apply("r", &ev(2, 1, "a", "c1")), "dead_lettered", "unique code");
        assert_eq!(text("SELECT sqlstate FROM ecst.dead_letters ORDER BY id DESC LIMIT 1"), "23505");
        assert_eq!(apply("r", &ev(2, 1, "a", "c2")), "applied");
        assert_eq!(row(1), "2:b:B:c1");
        assert_eq!(count("SELECT * FROM ecst.entity_state"), 0);

        // An identity column needs SQL's insert (its default); updates keep it.
        run("CREATE TABLE ri (id bigint PRIMARY KEY, n bigint GENERATED ALWAYS AS IDENTITY, v bigint, name text)");
        run(r#"SELECT ecst.create_stream('ri', 'ri', 'entity_snapshot', '{"id": "id"}', version => 'newState.v')"#);
        assert_eq!(apply("ri", r#"{"id": 5, "newState": {"v": 1, "name": "a"}}"#), "applied");
        assert_eq!(apply("ri", r#"{"id": 5, "newState": {"v": 2, "name": "b"}}"#), "applied");
        assert_eq!(text("SELECT concat_ws(':', n, v, name) FROM ri"), "1:2:b");

        // A table with triggers is written through SQL: its triggers fire.
        run("CREATE TABLE rt (id bigint PRIMARY KEY, v bigint, name text);
             CREATE TABLE rt_log (what text);
             CREATE FUNCTION rt_log() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO rt_log VALUES (TG_OP || ' ' || TG_LEVEL); RETURN NULL; END $$;
             CREATE TRIGGER rt_row AFTER UPDATE ON rt FOR EACH ROW EXECUTE FUNCTION rt_log();
             CREATE TRIGGER rt_stmt AFTER UPDATE ON rt FOR EACH STATEMENT EXECUTE FUNCTION rt_log();");
        run(r#"SELECT ecst.create_stream('rt', 'rt', 'entity_snapshot', '{"id": "id"}', version => 'newState.v')"#);
        assert_eq!(apply("rt", r#"{"id": 5, "newState": {"v": 1, "name": "a"}}"#), "applied");
        assert_eq!(apply("rt", r#"{"id": 5, "newState": {"v": 2, "name": "b"}}"#), "applied");
        assert_eq!(apply("rt", r#"{"id": 5, "newState": {"v": 1, "name": "c"}}"#), "stale");
        assert_eq!(
            text("SELECT string_agg(what, ',' ORDER BY what) FROM rt_log"),
            "UPDATE ROW,UPDATE STATEMENT,UPDATE STATEMENT,UPDATE STATEMENT"
        );
        assert_eq!(text("SELECT concat_ws(':', v, name) FROM rt"), "2:b");
    }

    #[pg_test]
    fn state_rows_read_locked_and_updated_through_the_row_api() {
        delta_stream("d", Some("ts"), "apply");
        let ev = |id: &str, ts: i64, fields: &str| {
            format!(r#"{{"addressId": "{id}", "ts": {ts}, "newState": {{{fields}}}}}"#)
        };
        assert_eq!(apply("d", &ev("a", 5, r#""addressPurpose": "home""#)), "applied");
        assert_eq!(apply("d", &ev("a", 7, r#""addressLine1": "x""#)), "applied");
        let id: i32 = one("SELECT id FROM ecst.streams WHERE name = 'd'").unwrap();
        let stored = || {
            text(&format!(
                "SELECT concat_ws('|', live_version, coalesce(tomb_version::text, '-'), field_versions)
                 FROM ecst.entity_state WHERE stream_id = {id} AND entity_key = 'a'"
            ))
        };
        assert_eq!(stored(), r#"7|-|{"line1": "7", "address_purpose": "5"}"#);

        let mut rows = crate::engine::direct::StateRows::open().expect("the row API is built for every major");
        assert!(rows.lock(id, "nobody").is_none(), "an entity without a state row");
        assert!(rows.lock(id + 1, "a").is_none(), "another stream's entity");
        let (locked, (live, tomb, fields)) = rows.lock(id, "a").expect("the state row");
        assert_eq!((live.as_deref(), tomb.as_deref()), (Some("7"), None));
        assert_eq!(fields.as_deref(), Some(r#"{"line1": "7", "address_purpose": "5"}"#));
        rows.update(locked, id, "a", Some("9"), Some("8"), Some(r#"{"line1": "9"}"#));
        rows.close();
        assert_eq!(stored(), r#"9|8|{"line1": "9"}"#);
        assert_eq!(count(&format!("SELECT * FROM ecst.entity_state WHERE stream_id = {id}")), 1);

        // A batch over existing state rows (the set-based path reads and writes them this way)
        // decides from them: field by field, older events are stale.
        let batch = format!(
            "SELECT ecst.apply_batch('d', ARRAY['{}', '{}', '{}']::text[])::text",
            ev("a", 8, r#""addressLine1": "old""#),
            ev("a", 10, r#""addressLine2": "new""#),
            ev("b", 1, r#""addressLine1": "b1""#)
        );
        run(&batch);
        assert_eq!(row("d", "a"), "a|home|x|new|-");
        assert_eq!(row("d", "b"), "b|-|b1|-|-");
        assert_eq!(stored(), r#"10|8|{"line1": "9", "address_line2": "10"}"#);
    }

    #[pg_test]
    fn tombstones_block_older_creates() {
        run("CREATE TABLE t (id text PRIMARY KEY, v text)");
        run(r#"SELECT ecst.create_stream('t', 't', 'entity_snapshot', '{"id": "id"}', version => 'at')"#);
        assert_eq!(apply("t", r#"{"id": "1", "at": "2024-05-01T12:00:00Z", "oldState": {"v": "a"}}"#), "applied");
        assert_eq!(
            apply("t", r#"{"id": "1", "at": "2024-05-01T13:00:00+02:00", "newState": {"v": "old"}}"#),
            "stale",
            "11:00Z is before the delete"
        );
        assert_eq!(count("SELECT * FROM t"), 0);
        assert_eq!(text("SELECT tomb_version::text FROM ecst.entity_state"), "1714564800");
        assert_eq!(apply("t", r#"{"id": "1", "at": "2024-05-01T12:00:00.5Z", "newState": {"v": "new"}}"#), "applied");
        assert_eq!(text("SELECT v FROM t"), "new");
        assert_eq!(apply("t", r#"{"id": "1", "at": "noon", "newState": {"v": "x"}}"#), "dead_lettered");
        assert_eq!(last_dead_letter().0, "invalid_version");
    }

    #[pg_test]
    fn event_ids_deduplicate() {
        run("CREATE TABLE t (id text PRIMARY KEY, v text)");
        run(r#"SELECT ecst.create_stream('t', 't', 'delta', '{"id": "id"}', event_id => 'meta.eventId')"#);
        assert_eq!(apply("t", r#"{"id": "1", "meta": {"eventId": "e1"}, "newState": {"v": "a"}}"#), "applied");
        assert_eq!(apply("t", r#"{"id": "1", "meta": {"eventId": "e2"}, "newState": {"v": "b"}}"#), "applied");
        assert_eq!(apply("t", r#"{"id": "1", "meta": {"eventId": "e1"}, "newState": {"v": "a"}}"#), "duplicate");
        assert_eq!(text("SELECT v FROM t"), "b");
    }

    #[pg_test]
    fn deltas_merge_per_field_and_deletes_keep_newer_fields() {
        delta_stream("d", Some("ts"), "apply");
        assert_eq!(
            apply("d", r#"{"addressId": "1", "ts": 1, "newState": {"addressLine1": "a", "addressPurpose": "p"}}"#),
            "applied"
        );
        assert_eq!(apply("d", r#"{"addressId": "1", "ts": 4, "newState": {"addressPurpose": "q"}}"#), "applied");
        assert_eq!(apply("d", r#"{"addressId": "1", "ts": 3, "oldState": {}}"#), "applied");
        assert_eq!(row("d", "1"), "1|q|-|-|-", "the delete at 3 cleared line1 (1), purpose (4) survived");
        assert_eq!(apply("d", r#"{"addressId": "1", "ts": 2, "newState": {"addressLine1": "late"}}"#), "stale");
        assert_eq!(apply("d", r#"{"addressId": "1", "ts": 6, "newState": {"addressLine2": "x"}}"#), "applied");
        assert_eq!(
            apply("d", r#"{"addressId": "1", "ts": 5, "newState": {"addressLine2": "y", "addressLine1": "z"}}"#),
            "applied"
        );
        assert_eq!(row("d", "1"), "1|q|z|x|-", "older delta still brings the field nobody newer wrote");
        assert_eq!(
            apply("d", r#"{"addressId": "1", "ts": 5, "newState": {"addressLine2": "y", "addressLine1": "z"}}"#),
            "duplicate"
        );
    }

    #[pg_test]
    fn conflicts_follow_on_conflict_and_are_counted() {
        for (policy, expected) in [("apply", "applied"), ("skip", "skipped"), ("dead_letter", "dead_lettered")] {
            let name = format!("c_{policy}");
            delta_stream(&name, Some("ts"), policy);
            run(&format!("INSERT INTO {name} (address_id, line1) VALUES ('1', 'actual')"));
            let ev = r#"{"addressId": "1", "ts": 2, "oldState": {"addressLine1": "expected"}, "newState": {"addressLine1": "next"}}"#;
            assert_eq!(apply(&name, ev), expected, "{policy}");
            assert_eq!(
                text(&format!("SELECT conflicts::text FROM ecst.stats WHERE stream = '{name}'")),
                "1",
                "{policy}"
            );
            let line1 = text(&format!("SELECT line1 FROM {name}"));
            assert_eq!(line1, if policy == "apply" { "next" } else { "actual" }, "{policy}");
        }
        assert_eq!(last_dead_letter().0, "conflict");
        delta_stream("c_error", Some("ts"), "error");
        run("INSERT INTO c_error (address_id, line1) VALUES ('1', 'actual')");
        let ev = r#"{"addressId": "1", "ts": 2, "oldState": {"addressLine1": "expected"}, "newState": {"addressLine1": "next"}}"#;
        assert_eq!(sqlstate(&format!("SELECT ecst.apply('c_error', '{ev}')")).as_deref(), Some("23000"));
        let matching = r#"{"addressId": "1", "ts": 3, "oldState": {"addressLine1": "actual"}, "newState": {"addressLine1": "next"}}"#;
        assert_eq!(apply("c_error", matching), "applied", "matching oldState is no conflict");
    }

    #[pg_test]
    fn batches_check_conflicts_against_the_evolving_row() {
        delta_stream("cb", Some("ts"), "dead_letter");
        run("INSERT INTO cb (address_id, line1) VALUES ('1', 'a')");
        let events: Vec<Option<String>> = [
            r#"{"addressId": "1", "ts": 1, "oldState": {"addressLine1": "a"}, "newState": {"addressLine1": "b"}}"#,
            r#"{"addressId": "1", "ts": 2, "oldState": {"addressLine1": "b"}, "newState": {"addressLine1": "c"}}"#,
            r#"{"addressId": "1", "ts": 3, "oldState": {"addressLine1": "zzz"}, "newState": {"addressLine1": "d"}}"#,
            r#"{"addressId": "2", "ts": 1, "oldState": {"addressLine1": "x"}, "newState": {"addressLine1": "y"}}"#,
        ]
        .iter()
        .map(|e| Some(e.to_string()))
        .collect();
        let got = Spi::get_one_with_args::<String>(
            "SELECT string_agg(outcome || '=' || count, ',' ORDER BY outcome) FROM ecst.apply_batch('cb', $1::text[])",
            &[events.into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(got, "applied=3,dead_lettered=1", "only ts 3 disagrees with the row ts 2 left");
        assert_eq!(row("cb", "1"), "1|-|c|-|-");
        assert_eq!(row("cb", "2"), "2|-|y|-|-", "no row, no conflict");
        assert_eq!(last_dead_letter().0, "conflict");
        assert_eq!(text("SELECT conflicts::text FROM ecst.stats WHERE stream = 'cb'"), "1");
    }

    #[pg_test]
    fn a_failing_write_in_a_batch_isolates_the_bad_event() {
        run("CREATE TABLE t (id text PRIMARY KEY, v text CHECK (v <> 'bad'))");
        run(r#"SELECT ecst.create_stream('t', 't', 'entity_snapshot', '{"id": "id"}', version => 'ts')"#);
        let events: Vec<Option<String>> = (1..=20)
            .map(|i| {
                let v = if i == 7 { "bad" } else { "ok" };
                Some(format!(r#"{{"id": "{i}", "ts": 1, "newState": {{"v": "{v}"}}}}"#))
            })
            .collect();
        let got = Spi::get_one_with_args::<String>(
            "SELECT string_agg(outcome || '=' || count, ',' ORDER BY outcome) FROM ecst.apply_batch('t', $1::text[])",
            &[events.into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(got, "applied=19,dead_lettered=1");
        assert_eq!(text("SELECT sqlstate FROM ecst.dead_letters"), "23514");
        assert_eq!(count("SELECT * FROM t"), 19);
        assert_eq!(count("SELECT * FROM ecst.entity_state"), 19, "the bad event left no version behind");
    }

    #[pg_test]
    fn bad_input_of_every_kind_is_dead_lettered_with_a_reason() {
        delta_stream("d", Some("ts"), "apply");
        let deep = format!(
            r#"{{"addressId": "1", "ts": 1, "newState": {{"x": {}1{}}}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let huge_number =
            format!(r#"{{"addressId": "1", "ts": 1, "newState": {{"addressTS": 1{}}}}}"#, "0".repeat(400));
        let cases: Vec<(String, &str)> = vec![
            ("not json at all".into(), "invalid_json"),
            ("".into(), "invalid_json"),
            ("[1, 2]".into(), "not_an_object"),
            (r#""a string""#.into(), "not_an_object"),
            (r#"{"ts": 1, "newState": {}}"#.into(), "missing_key"),
            (r#"{"addressId": null, "ts": 1, "newState": {}}"#.into(), "missing_key"),
            (r#"{"addressId": ["1"], "ts": 1, "newState": {}}"#.into(), "invalid_key"),
            (r#"{"addressId": {"a": 1}, "ts": 1, "newState": {}}"#.into(), "invalid_key"),
            (r#"{"addressId": "1", "ts": 1, "newState": 5}"#.into(), "invalid_state"),
            (r#"{"addressId": "1", "ts": 1, "oldState": "x", "newState": {}}"#.into(), "invalid_state"),
            (r#"{"addressId": "1", "ts": 1}"#.into(), "no_state"),
            (r#"{"addressId": "1", "newState": {}}"#.into(), "missing_version"),
            (r#"{"addressId": "1", "ts": [1], "newState": {}}"#.into(), "invalid_version"),
            (r#"{"addressId": "1", "ts": 1e999999, "newState": {}}"#.into(), "invalid_version"),
            (r#"{"addressId": "1", "ts": 1, "newState": {"addressTS": "ten"}}"#.into(), "invalid_value"),
            (r#"{"addressId": "1", "ts": 1, "newState": {"addressTS": 1.5}}"#.into(), "invalid_value"),
            (r#"{"addressId": "1", "ts": 1, "newState": {"addressLine1": "a\u0000b"}}"#.into(), "invalid_value"),
            (
                r#"{"addressId": "1", "ts": 1, "newState": {"line1": "a", "addressLine1": "b"}}"#.into(),
                "field_collision",
            ),
            (deep, "invalid_json"),
            (huge_number, "invalid_value"),
            (r#"{"addressId": "1", "ts": 1, "newState": {"addressLine1": "\ud800"}}"#.into(), "invalid_json"),
            (r#"{"addressId": "1", "ts": 1, "newState": {"addressTS": 1e400}}"#.into(), "invalid_value"),
            (format!(r#"{{"addressId": "1", "ts": "{}", "newState": {{}}}}"#, "9".repeat(100)), "invalid_version"),
        ];
        for (payload, code) in &cases {
            assert_eq!(apply("d", payload), "dead_lettered", "{payload:.80}");
            let (got, message) = last_dead_letter();
            assert_eq!(&got, code, "{payload:.80}: {message}");
            assert!(!message.is_empty());
            assert_eq!(text("SELECT payload FROM ecst.dead_letters ORDER BY id DESC LIMIT 1"), *payload, "verbatim");
        }
        assert_eq!(count("SELECT * FROM d"), 0);
        assert_eq!(text("SELECT dead_lettered::text FROM ecst.stats WHERE stream = 'd'"), cases.len().to_string());
    }

    #[pg_test]
    fn big_payloads_and_duplicate_keys() {
        delta_stream("d", Some("ts"), "apply");
        let big =
            format!(r#"{{"addressId": "1", "ts": 1, "newState": {{"addressLine1": "{}"}}}}"#, "x".repeat(10 << 20));
        assert_eq!(apply("d", &big), "applied", "a 10 MB value fits a text column");
        assert_eq!(one::<i64>("SELECT length(line1)::bigint FROM d"), Some(10 << 20));
        let big_unmapped =
            format!(r#"{{"addressId": "2", "ts": 1, "newState": {{"blob": "{}"}}}}"#, "y".repeat(10 << 20));
        assert_eq!(apply("d", &big_unmapped), "applied");
        assert_eq!(text("SELECT concat_ws('|', address_id, line1) FROM d WHERE address_id = '2'"), "2", "not stored");
        assert_eq!(
            apply("d", r#"{"addressId": "3", "ts": 1, "newState": {"addressLine1": "first", "addressLine1": "last"}}"#),
            "applied"
        );
        assert_eq!(
            text("SELECT line1 FROM d WHERE address_id = '3'"),
            "last",
            "the last duplicate key wins, as in jsonb"
        );
    }

    #[pg_test]
    fn text_that_is_not_json_is_explained() {
        run("CREATE TABLE j (id text PRIMARY KEY)");
        run(r#"SELECT ecst.create_stream('j', 'j', 'entity_snapshot', '{"id": "id"}')"#);
        assert_eq!(apply("j", "this is not json"), "dead_lettered");
        let (code, message) = last_dead_letter();
        assert_eq!(code, "invalid_json");
        assert!(message.starts_with("payload is not valid JSON: a word that is not true, false or null"), "{message}");
        assert!(message.contains("line 1, column 2"), "{message}");
    }

    #[pg_test]
    fn failed_row_inserts_in_a_batch_leave_nothing_behind() {
        // A set-based run whose row-API insert fails (a CHECK) falls back to one event at a time;
        // the insert's "lost a race?" flag of that failure must not answer for a later event, and
        // every event gets its own outcome.
        run("CREATE TABLE ins (id text PRIMARY KEY, v text CHECK (v <> 'bad'), u text UNIQUE)");
        run(r#"SELECT ecst.create_stream('ins', 'ins', 'entity_snapshot', '{"id": "id"}')"#);
        let events = [
            r#"{"id": "1", "newState": {"v": "ok", "u": "a"}}"#,
            r#"{"id": "2", "newState": {"v": "bad", "u": "b"}}"#,
            r#"{"id": "3", "newState": {"v": "ok", "u": "a"}}"#,
            r#"{"id": "4", "newState": {"v": "ok", "u": "c"}}"#,
        ];
        let arr: Vec<Option<String>> = events.iter().map(|e| Some(e.to_string())).collect();
        let got = Spi::get_one_with_args::<String>(
            "SELECT string_agg(outcome || '=' || count, ',' ORDER BY outcome) FROM ecst.apply_batch('ins', $1::text[])",
            &[arr.into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(got, "applied=2,dead_lettered=2");
        assert_eq!(text("SELECT string_agg(id, ',' ORDER BY id) FROM ins"), "1,4");
        assert_eq!(text("SELECT string_agg(sqlstate, ',' ORDER BY id) FROM ecst.dead_letters"), "23514,23505");
    }

    #[pg_test]
    fn failed_events_of_a_huge_batch_do_not_grow_the_backends_memory() {
        // Each failing event of a batch is rolled back in its own subtransaction: whatever it set
        // up (executor state, slots, relations) goes with it. 20,000 failures must not take
        // much more memory than 2,000 (a leak of one executor state per event would be >100 MB).
        run("CREATE TABLE leak (id text PRIMARY KEY, v text CHECK (v <> 'bad'))");
        run(r#"SELECT ecst.create_stream('leak', 'leak', 'entity_snapshot', '{"id": "id"}')"#);
        let batch = |from: i64, n: i64| {
            run(&format!(
                r#"SELECT count(*) FROM ecst.apply_batch('leak',
                     ARRAY(SELECT format('{{"id": "%s", "newState": {{"v": "bad"}}}}', i) FROM generate_series({from}, {}) i))"#,
                from + n - 1
            ))
        };
        let memory = || one::<i64>("SELECT sum(total_bytes)::bigint FROM pg_backend_memory_contexts").unwrap();
        batch(1, 2_000);
        let small = memory();
        batch(10_001, 20_000);
        let large = memory();
        assert_eq!(count("SELECT * FROM ecst.dead_letters WHERE stream = 'leak'"), 22_000);
        assert!(
            large - small < 16 * 1024 * 1024,
            "20,000 failed events grew the backend by {} bytes more than 2,000 did",
            large - small
        );
    }

    #[pg_test]
    fn apply_batch_counts_outcomes_and_keeps_order_per_entity() {
        delta_stream("d", Some("ts"), "apply");
        let events = [
            r#"{"addressId": "2", "ts": 1, "newState": {"addressLine1": "b1"}}"#,
            r#"{"addressId": "1", "ts": 1, "newState": {"addressLine1": "a1"}}"#,
            r#"{"addressId": "1", "ts": 2, "newState": {"addressLine1": "a2"}}"#,
            r#"{"addressId": "1", "ts": 2, "newState": {"addressLine1": "a2"}}"#,
            r#"{"addressId": "2", "ts": 0, "newState": {"addressLine1": "b0"}}"#,
            "garbage",
        ];
        let arr: Vec<Option<String>> = events.iter().map(|e| Some(e.to_string())).collect();
        let got = Spi::get_one_with_args::<String>(
            "SELECT string_agg(outcome || '=' || count, ',' ORDER BY outcome) FROM ecst.apply_batch('d', $1::jsonb[]::text[])",
            &[arr[..5].to_vec().into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(got, "applied=3,duplicate=1,stale=1");
        assert_eq!(row("d", "1"), "1|-|a2|-|-");
        assert_eq!(row("d", "2"), "2|-|b1|-|-");
        let got = Spi::get_one_with_args::<String>(
            "SELECT string_agg(outcome || '=' || count, ',') FROM ecst.apply_batch('d', $1::text[])",
            &[arr[5..].to_vec().into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(got, "dead_lettered=1");
        assert_eq!(
            text("SELECT concat_ws(',', applied, duplicate, stale, skipped, conflicts, dead_lettered) FROM ecst.stats WHERE stream = 'd'"),
            "3,1,1,0,0,1"
        );
        assert!(one::<bool>("SELECT last_applied_at IS NOT NULL FROM ecst.stats WHERE stream = 'd'").unwrap());
    }

    /// A small deterministic generator (no RNG crate needed in the extension).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    fn random_events(rng: &mut Lcg, shape: &str) -> Vec<(String, i64, String)> {
        let fields = ["addressPurpose", "addressLine1", "addressLine2", "addressTS"];
        let mut events = Vec::new();
        for entity in 0..4 {
            for step in 0..(2 + rng.next(6)) {
                let version = (step as i64 + 1) * 10 + entity;
                let key = format!("e{entity}");
                let payload = if rng.next(5) == 0 {
                    format!(r#"{{"addressId": "{key}", "ts": {version}, "oldState": {{}}}}"#)
                } else {
                    let mut state = Vec::new();
                    for (i, f) in fields.iter().enumerate() {
                        match rng.next(3) {
                            0 => {}
                            1 if i == 3 => state.push(format!(r#""{f}": {}"#, rng.next(100))),
                            1 => state.push(format!(r#""{f}": "{f}-{}""#, rng.next(3))),
                            _ => state.push(format!(r#""{f}": null"#)),
                        }
                    }
                    format!(r#"{{"addressId": "{key}", "ts": {version}, "newState": {{{}}}}}"#, state.join(", "))
                };
                events.push((key, version, payload));
            }
        }
        let _ = shape;
        events
    }

    fn converges(shape: &str) {
        for seed in 1..=40u64 {
            let mut rng = Lcg(seed);
            let in_order = format!("io_{seed}");
            let shuffled = format!("sh_{seed}");
            let batched = format!("ba_{seed}");
            for name in [&in_order, &shuffled, &batched] {
                address_table(name);
                run(&format!(
                    r#"SELECT ecst.create_stream('{name}', '{name}', '{shape}', '{{"addressId": "address_id"}}',
                        columns => '{{"addressLine1": "line1"}}', version => 'ts')"#
                ));
            }
            let events = random_events(&mut rng, shape);
            deliver_three_ways(&mut rng, events, [&in_order, &shuffled, &batched], 2, 12);
            let diff = count(&format!(
                "(SELECT * FROM {in_order} EXCEPT SELECT * FROM {shuffled}) UNION ALL (SELECT * FROM {shuffled} EXCEPT SELECT * FROM {in_order})"
            ));
            assert_eq!(diff, 0, "{shape} seed {seed}: shuffled delivery differs from in-order");
            let diff = count(&format!(
                "(SELECT * FROM {in_order} EXCEPT SELECT * FROM {batched}) UNION ALL (SELECT * FROM {batched} EXCEPT SELECT * FROM {in_order})"
            ));
            assert_eq!(diff, 0, "{shape} seed {seed}: batched delivery differs from in-order");
            assert_eq!(count(&format!("SELECT * FROM {in_order}")), count(&format!("SELECT * FROM {shuffled}")));
        }
    }

    /// Applies `events` (entity key, version, payload) three ways: to stream `in_order` one by one
    /// in (key, version) order; to `shuffled` one by one, shuffled (Fisher–Yates) with
    /// `1/duplicate_share` of them repeated; and the same shuffled delivery to `batched` through
    /// `ecst.apply_batch` (set-based) in chunks of 1 to `max_chunk` events.
    fn deliver_three_ways(
        rng: &mut Lcg,
        mut events: Vec<(String, i64, String)>,
        [in_order, shuffled, batched]: [&str; 3],
        duplicate_share: usize,
        max_chunk: u64,
    ) {
        let mut ordered = events.clone();
        ordered.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        for (_, _, p) in &ordered {
            apply(in_order, p);
        }
        for i in (1..events.len()).rev() {
            events.swap(i, rng.next(i as u64 + 1) as usize);
        }
        let extra: Vec<_> = (0..events.len() / duplicate_share)
            .map(|_| events[rng.next(events.len() as u64) as usize].clone())
            .collect();
        events.extend(extra);
        for i in (1..events.len()).rev() {
            events.swap(i, rng.next(i as u64 + 1) as usize);
        }
        for (_, _, p) in &events {
            apply(shuffled, p);
        }
        let mut rest: &[(String, i64, String)] = &events;
        while !rest.is_empty() {
            let n = (1 + rng.next(max_chunk) as usize).min(rest.len());
            let chunk: Vec<Option<String>> = rest[..n].iter().map(|(_, _, p)| Some(p.clone())).collect();
            Spi::run_with_args(&format!("SELECT * FROM ecst.apply_batch('{batched}', $1::text[])"), &[chunk.into()])
                .unwrap();
            rest = &rest[n..];
        }
    }

    /// Random aggregate snapshots (and deletes) of 4 customers, each with a subset of 5 addresses
    /// whose values change; a few repeat an address (dead letters on every path).
    fn random_aggregates(rng: &mut Lcg) -> Vec<(String, i64, String)> {
        let mut events = Vec::new();
        for entity in 0..4 {
            for step in 0..(2 + rng.next(6)) {
                let version = (step as i64 + 1) * 10 + entity;
                let key = format!("c{entity}");
                let payload = if rng.next(5) == 0 {
                    format!(r#"{{"customerId": "{key}", "ts": {version}, "oldState": {{}}}}"#)
                } else {
                    let mut addresses = Vec::new();
                    for id in ["a", "b", "c", "d", "e"] {
                        if rng.next(2) == 0 {
                            addresses
                                .push(format!(r#"{{"addressId": "{id}", "addressLine1": "{id}-{}"}}"#, rng.next(3)));
                        }
                    }
                    if rng.next(10) == 0 && !addresses.is_empty() {
                        addresses.push(addresses[0].clone());
                    }
                    let name = if rng.next(4) == 0 { "null".to_string() } else { format!(r#""n{}""#, rng.next(3)) };
                    format!(
                        r#"{{"customerId": "{key}", "ts": {version}, "newState": {{"name": {name}, "addressContent": {{"addresses": [{}]}}}}}}"#,
                        addresses.join(", ")
                    )
                };
                events.push((key, version, payload));
            }
        }
        events
    }

    #[pg_test]
    fn aggregate_converges_in_sql() {
        run("CREATE TABLE child_inserts (tbl text)");
        run("CREATE FUNCTION count_insert() RETURNS trigger LANGUAGE plpgsql AS
             $$BEGIN INSERT INTO child_inserts VALUES (TG_TABLE_NAME); RETURN NULL; END$$");
        for seed in 1..=30u64 {
            let mut rng = Lcg(seed);
            let names = [format!("io_{seed}"), format!("sh_{seed}"), format!("ba_{seed}")];
            for name in &names {
                run(&format!("CREATE TABLE {name} (customer_id text PRIMARY KEY, name text)"));
                run(&format!(
                    "CREATE TABLE {name}_a (customer_id text NOT NULL REFERENCES {name}, address_id text NOT NULL,
                        line1 text, PRIMARY KEY (customer_id, address_id))"
                ));
                run(&format!(
                    r#"SELECT ecst.create_stream('{name}', '{name}', 'aggregate_snapshot', '{{"customerId": "customer_id"}}',
                        version => 'ts', children => '{{"addresses": {{"path": "addressContent.addresses",
                        "table": "{name}_a", "key": {{"addressId": "address_id"}}, "parent_key": "customer_id",
                        "columns": {{"addressLine1": "line1"}}}}}}')"#
                ));
                run(&format!(
                    "CREATE TRIGGER count_insert AFTER INSERT ON {name}_a FOR EACH STATEMENT EXECUTE FUNCTION count_insert()"
                ));
            }
            let [in_order, shuffled, batched] = &names;
            let events = random_aggregates(&mut rng);
            deliver_three_ways(&mut rng, events, [in_order, shuffled, batched], 3, 16);
            for suffix in ["", "_a"] {
                for other in [shuffled, batched] {
                    let diff = count(&format!(
                        "(SELECT * FROM {in_order}{suffix} EXCEPT SELECT * FROM {other}{suffix})
                         UNION ALL (SELECT * FROM {other}{suffix} EXCEPT SELECT * FROM {in_order}{suffix})"
                    ));
                    assert_eq!(diff, 0, "seed {seed}: {other}{suffix} differs from {in_order}{suffix}");
                }
            }
            assert!(count(&format!("SELECT * FROM {in_order}_a")) > 0, "seed {seed}: some children");
        }
        let dead = count("SELECT * FROM ecst.dead_letters WHERE error_code = 'duplicate_child_key'");
        assert!(dead > 0, "repeated child keys are dead letters ({dead})");
        // The batches were written set-based (one INSERT per run and child table), not event by
        // event after a failed set-based attempt.
        let statements = |prefix: &str| count(&format!("SELECT * FROM child_inserts WHERE tbl LIKE '{prefix}%'"));
        let (per_event, batched) = (statements("io_"), statements("ba_"));
        assert!(batched * 3 < per_event, "child INSERT statements: {batched} batched vs {per_event} per event");
    }

    #[pg_test]
    fn delta_converges_in_sql() {
        converges("delta");
    }

    #[pg_test]
    fn entity_snapshot_converges_in_sql() {
        converges("entity_snapshot");
    }

    #[pg_test]
    fn a_column_type_change_gets_new_plans_and_conversions() {
        // Through SQL (a trigger keeps the row API away): the cached plan was prepared for int.
        run("CREATE TABLE tc_sql (id int PRIMARY KEY, v int, ts bigint)");
        run("CREATE FUNCTION tc_noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$");
        run("CREATE TRIGGER tc_noop BEFORE INSERT OR UPDATE ON tc_sql FOR EACH ROW EXECUTE FUNCTION tc_noop()");
        run(
            r#"SELECT ecst.create_stream('tc_sql', 'tc_sql', 'entity_snapshot', '{"id": "id"}', version => 'newState.ts')"#,
        );
        // And through the row API.
        run("CREATE TABLE tc_row (id int PRIMARY KEY, v int, ts bigint)");
        run(
            r#"SELECT ecst.create_stream('tc_row', 'tc_row', 'entity_snapshot', '{"id": "id"}', version => 'newState.ts')"#,
        );
        for t in ["tc_sql", "tc_row"] {
            assert_eq!(apply(t, r#"{"id": 1, "newState": {"v": 1, "ts": 1}}"#), "applied");
            assert_eq!(
                batch(
                    t,
                    &[r#"{"id": 2, "newState": {"v": 2, "ts": 1}}"#, r#"{"id": 3, "newState": {"v": 3, "ts": 1}}"#]
                ),
                "applied=2"
            );
            run(&format!("ALTER TABLE {t} ALTER COLUMN v TYPE text"));
            assert_eq!(apply(t, r#"{"id": 4, "newState": {"v": "hello", "ts": 1}}"#), "applied");
            assert_eq!(
                batch(
                    t,
                    &[
                        r#"{"id": 5, "newState": {"v": "five", "ts": 1}}"#,
                        r#"{"id": 6, "newState": {"v": "six", "ts": 1}}"#
                    ]
                ),
                "applied=2"
            );
            assert_eq!(
                text(&format!("SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM {t}")),
                "1=1,2=2,3=3,4=hello,5=five,6=six",
                "{t}"
            );
        }
    }

    #[pg_test]
    fn a_row_version_no_event_can_carry_dead_letters_its_events() {
        run("CREATE TABLE nv (id int PRIMARY KEY, v text, ts numeric)");
        run(r#"SELECT ecst.create_stream('nv', 'nv', 'entity_snapshot', '{"id": "id"}', version => 'newState.ts')"#);
        run("INSERT INTO nv VALUES (1, 'manual', 'NaN'), (2, 'manual', 'Infinity')");
        assert_eq!(apply("nv", r#"{"id": 1, "newState": {"v": "ev", "ts": 5}}"#), "dead_lettered");
        let (code, message) = last_dead_letter();
        assert_eq!(code, "write_failed");
        assert!(message.contains("NaN"), "{message}");
        // In a batch the others go on.
        assert_eq!(
            batch(
                "nv",
                &[r#"{"id": 2, "newState": {"v": "w", "ts": 9}}"#, r#"{"id": 5, "newState": {"v": "w", "ts": 9}}"#]
            ),
            "applied=1,dead_lettered=1"
        );
        assert_eq!(text("SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM nv"), "1=manual,2=manual,5=w");
    }

    #[pg_test]
    fn a_domain_refusing_null_dead_letters_the_event() {
        run("CREATE DOMAIN dn_text AS text NOT NULL");
        run("CREATE DOMAIN dn_int AS int CHECK (VALUE IS NOT NULL)");
        run("CREATE TABLE dn (id int PRIMARY KEY, a dn_text, b dn_int, ts bigint)");
        run(r#"SELECT ecst.create_stream('dn', 'dn', 'entity_snapshot', '{"id": "id"}', version => 'newState.ts')"#);
        assert_eq!(apply("dn", r#"{"id": 1, "newState": {"a": "x", "b": 1, "ts": 1}}"#), "applied");
        assert_eq!(apply("dn", r#"{"id": 1, "newState": {"b": 2, "ts": 2}}"#), "dead_lettered");
        let (code, message) = last_dead_letter();
        assert_eq!(code, "invalid_value");
        assert!(message.contains("\"a\"") && message.contains("null"), "{message}");
        assert_eq!(apply("dn", r#"{"id": 1, "newState": {"a": "y", "b": null, "ts": 3}}"#), "dead_lettered");
        assert_eq!(
            batch(
                "dn",
                &[
                    r#"{"id": 2, "newState": {"a": null, "b": 1, "ts": 1}}"#,
                    r#"{"id": 3, "newState": {"a": "z", "b": 3, "ts": 1}}"#
                ]
            ),
            "applied=1,dead_lettered=1"
        );
        assert_eq!(text("SELECT string_agg(id || '=' || a || b, ',' ORDER BY id) FROM dn"), "1=x1,3=z3");
    }

    #[pg_test]
    fn null_arguments_are_named_and_a_null_event_is_a_dead_letter() {
        address_stream();
        assert_eq!(sqlstate("SELECT ecst.create_stream(NULL, 'address', 'delta', '{}')").as_deref(), Some("22004"));
        assert_eq!(sqlstate("SELECT ecst.apply(NULL, '{}'::text)").as_deref(), Some("22004"));
        assert_eq!(text("SELECT ecst.apply('address', NULL::text)::text"), "dead_lettered");
        assert_eq!(text("SELECT ecst.apply('address', NULL::jsonb)::text"), "dead_lettered");
        assert_eq!(count("SELECT * FROM ecst.dead_letters WHERE stream = 'address' AND payload IS NULL"), 2);
        run("CREATE TABLE snap_src (payload text)");
        assert_eq!(sqlstate("SELECT * FROM ecst.load_snapshot(NULL, 'snap_src')").as_deref(), Some("22004"));
    }

    #[pg_test]
    fn an_event_id_with_a_nul_character_is_a_dead_letter() {
        run("CREATE TABLE ev (id text PRIMARY KEY, name text)");
        run(r#"SELECT ecst.create_stream('ev', 'ev', 'delta', '{"id": "id"}', event_id => 'eid')"#);
        assert_eq!(apply("ev", r#"{"id": "a", "eid": "x\u0000one", "newState": {"name": "1"}}"#), "dead_lettered");
        let (code, message) = last_dead_letter();
        assert_eq!(code, "invalid_event_id", "{message}");
        assert_eq!(apply("ev", r#"{"id": "a", "eid": "x\u0000two", "newState": {"name": "2"}}"#), "dead_lettered");
    }

    #[pg_test]
    fn batches_keep_event_ids_as_one_call_at_a_time_does() {
        // A duplicate id in a batch where a delta delete must clear fields stays a duplicate.
        run("CREATE TABLE ei (id int PRIMARY KEY, a text, b text, c text, v numeric)");
        run(r#"SELECT ecst.create_stream('ei', 'ei', 'delta', '{"id": "id"}', version => 'v', event_id => 'eid')"#);
        assert_eq!(apply("ei", r#"{"id": 1, "v": 1, "eid": "P1", "newState": {"a": "old"}}"#), "applied");
        assert_eq!(apply("ei", r#"{"id": 1, "v": 2, "eid": "E", "newState": {"c": "first"}}"#), "applied");
        assert_eq!(
            batch(
                "ei",
                &[
                    r#"{"id": 1, "v": 7, "eid": "E", "newState": {"c": "REPLAYED"}}"#,
                    r#"{"id": 1, "v": 6, "eid": "Y", "newState": {"b": "two"}}"#,
                    r#"{"id": 1, "v": 1.5, "eid": "D", "oldState": {}}"#,
                ]
            ),
            "applied=2,duplicate=1"
        );
        assert_eq!(text("SELECT c FROM ei WHERE id = 1"), "first");
        // An id whose first event is dead-lettered is still fresh for the corrected event.
        run("CREATE TABLE ej (id int PRIMARY KEY, a text, v bigint)");
        run(
            r#"SELECT ecst.create_stream('ej', 'ej', 'delta', '{"id": "id"}', version => 'v', event_id => 'eid', on_conflict => 'dead_letter')"#,
        );
        assert_eq!(apply("ej", r#"{"id": 1, "v": 1, "eid": "e1", "newState": {"a": "x"}}"#), "applied");
        assert_eq!(
            batch(
                "ej",
                &[
                    r#"{"id": 1, "v": 2, "eid": "e2", "oldState": {"a": "WRONG"}, "newState": {"a": "y"}}"#,
                    r#"{"id": 1, "v": 2, "eid": "e2", "oldState": {"a": "x"}, "newState": {"a": "y"}}"#,
                ]
            ),
            "applied=1,dead_lettered=1"
        );
        assert_eq!(text("SELECT a FROM ej WHERE id = 1"), "y");
        // ... and stays recorded: redelivered, it is a duplicate.
        assert_eq!(
            apply("ej", r#"{"id": 1, "v": 2, "eid": "e2", "oldState": {"a": "x"}, "newState": {"a": "y"}}"#),
            "duplicate"
        );
    }

    #[pg_test]
    fn batch_conflict_checks_read_booleans_and_padded_chars_as_single_calls_do() {
        for (name, on) in [("cb", "batch"), ("cs", "single")] {
            run(&format!("CREATE TABLE {name} (id int PRIMARY KEY, active boolean, code char(4), v int)"));
            run(&format!(
                r#"SELECT ecst.create_stream('{name}', '{name}', 'delta', '{{"id": "id"}}', version => 'v', on_conflict => 'dead_letter')"#
            ));
            for id in [1, 2] {
                apply(name, &format!(r#"{{"id": {id}, "v": 1, "newState": {{"active": true, "code": "ab"}}}}"#));
            }
            let events = [
                r#"{"id": 1, "v": 2, "oldState": {"active": true}, "newState": {"active": false}}"#,
                r#"{"id": 2, "v": 2, "oldState": {"code": "ab"}, "newState": {"code": "cd"}}"#,
            ];
            if on == "batch" {
                assert_eq!(batch(name, &events), "applied=2");
            } else {
                for e in events {
                    assert_eq!(apply(name, e), "applied");
                }
            }
            assert_eq!(
                text(&format!("SELECT string_agg(id || '=' || active || trim(code), ',' ORDER BY id) FROM {name}")),
                "1=falseab,2=truecd"
            );
        }
    }

    #[pg_test]
    fn batch_conflict_checks_see_the_defaults_of_rows_the_batch_creates() {
        run("CREATE TABLE cdf (id int PRIMARY KEY, a text, b text DEFAULT 'dflt', v bigint)");
        run(
            r#"SELECT ecst.create_stream('cdf', 'cdf', 'delta', '{"id": "id"}', version => 'v', on_conflict => 'dead_letter')"#,
        );
        assert_eq!(
            batch(
                "cdf",
                &[
                    r#"{"id": 1, "v": 1, "newState": {"a": "x"}}"#,
                    r#"{"id": 1, "v": 2, "oldState": {"b": "dflt"}, "newState": {"b": "y"}}"#,
                ]
            ),
            "applied=2"
        );
        assert_eq!(text("SELECT a || b FROM cdf WHERE id = 1"), "xy");
    }

    #[pg_test]
    fn an_id_shared_with_an_entity_that_goes_one_by_one_stays_with_the_first_in_key_order() {
        // Entity 1's second event compares a column its first event left at a DEFAULT the batch
        // cannot know, so entity 1 goes one event at a time, after the batch's other entities
        // are written; entity 2's event carries the id of entity 1's second event. In key order,
        // one call at a time: entity 1's event takes the id, entity 2's is its duplicate.
        run("CREATE TABLE sid (id int PRIMARY KEY, a text, b text DEFAULT 'dflt', v bigint)");
        run(r#"SELECT ecst.create_stream('sid', 'sid', 'delta', '{"id": "id"}', version => 'v', event_id => 'eid')"#);
        assert_eq!(
            batch(
                "sid",
                &[
                    r#"{"id": 2, "v": 1, "eid": "shared", "newState": {"a": "two"}}"#,
                    r#"{"id": 1, "v": 1, "eid": "e1", "newState": {"a": "x"}}"#,
                    r#"{"id": 1, "v": 2, "eid": "shared", "oldState": {"b": "dflt"}, "newState": {"b": "y"}}"#,
                ]
            ),
            "applied=2,duplicate=1"
        );
        assert_eq!(text("SELECT a || b FROM sid WHERE id = 1"), "xy");
        assert_eq!(count("SELECT * FROM sid WHERE id = 2"), 0);
        assert_eq!(count("SELECT * FROM ecst.applied_events WHERE event_id IN ('e1', 'shared')"), 2);
    }

    #[pg_test]
    fn cloudevents_envelopes_apply_with_event_path() {
        // The example of the envelope issue, as written.
        run("CREATE TABLE address (address_id text PRIMARY KEY, address_line1 text, address_ts bigint)");
        run(r#"SELECT ecst.create_stream(name => 'address', target => 'address', shape => 'entity_snapshot',
                 key => '{"addressId": "address_id"}', event_path => 'data', state_path => 'addressContent',
                 version => 'time', event_id => 'id')"#);
        let event = r#"{"specversion":"1.0","id":"e1","type":"com.acme.address.changed","source":"/addresses",
            "time":"2024-05-01T12:00:00Z","data":{"addressId":"12366","newState":{"addressContent":{"addressLine1":"48 Baker Street"}}}}"#;
        assert_eq!(apply("address", event), "applied");
        assert_eq!(text("SELECT address_line1 FROM address WHERE address_id = '12366'"), "48 Baker Street");
        // The envelope's id deduplicates; its time orders.
        assert_eq!(apply("address", event), "duplicate");
        let older = r#"{"id":"e0","time":"2024-04-01T00:00:00Z","data":{"addressId":"12366","newState":{"addressContent":{"addressLine1":"old"}}}}"#;
        assert_eq!(apply("address", older), "stale");
        // The event as a JSON string inside the envelope (double encoding).
        let encoded = serde_json::json!({
            "id": "e2", "time": "2024-06-01T00:00:00Z",
            "data": r#"{"addressId":"12366","newState":{"addressContent":{"addressLine1":"221B Baker Street"}}}"#
        })
        .to_string();
        assert_eq!(apply("address", &encoded), "applied");
        assert_eq!(text("SELECT address_line1 FROM address WHERE address_id = '12366'"), "221B Baker Street");
        // An envelope without its event is a dead letter naming the path.
        assert_eq!(apply("address", r#"{"id":"e3","time":"2024-07-01T00:00:00Z"}"#), "dead_lettered");
        let (code, message) = last_dead_letter();
        assert_eq!(code, "not_an_object");
        assert!(message.contains("no event at data"), "{message}");
        // Batches, snapshots' export and load: the same envelopes.
        assert_eq!(
            batch(
                "address",
                &[
                    r#"{"id":"b1","time":"2024-08-01T00:00:00Z","data":{"addressId":"7","newState":{"addressContent":{"addressLine1":"a"}}}}"#,
                    r#"{"id":"b2","time":"2024-08-02T00:00:00Z","data":{"addressId":"7","newState":{"addressContent":{"addressLine1":"b"}}}}"#,
                ]
            ),
            "applied=2"
        );
        assert_eq!(text("SELECT address_line1 FROM address WHERE address_id = '7'"), "b");
        run("CREATE TABLE address_copy (LIKE address INCLUDING ALL)");
        run(r#"SELECT ecst.create_stream(name => 'address_copy', target => 'address_copy', shape => 'entity_snapshot',
                 key => '{"addressId": "address_id"}', event_path => 'data', state_path => 'addressContent',
                 version => 'time', event_id => 'id')"#);
        run("CREATE TABLE exported AS SELECT e AS payload FROM ecst.export_snapshot('address') e");
        assert_eq!(text("SELECT loaded::text FROM ecst.load_snapshot('address_copy', 'exported')"), "2");
        assert_eq!(count("SELECT * FROM (TABLE address EXCEPT TABLE address_copy) d"), 0);
        assert_eq!(count("SELECT * FROM (TABLE address_copy EXCEPT TABLE address) d"), 0);
        // Retention: an envelope stream's log rebuilds (and compacts to) the same replica.
        run("CREATE TABLE address_log (address_id text PRIMARY KEY, address_line1 text, address_ts bigint)");
        run(r#"SELECT ecst.create_stream(name => 'address_log', target => 'address_log', shape => 'entity_snapshot',
                 key => '{"addressId": "address_id"}', event_path => 'data', state_path => 'addressContent',
                 version => 'time', event_id => 'id', retain_events => true)"#);
        for e in [event, older, encoded.as_str()] {
            apply("address_log", e);
        }
        let before = text("SELECT string_agg(address_id || '=' || address_line1, ',' ORDER BY 1) FROM address_log");
        run("SELECT * FROM ecst.compact_events('address_log')");
        assert_eq!(text("SELECT replayed::text FROM ecst.rebuild('address_log')"), "1");
        assert_eq!(
            text("SELECT string_agg(address_id || '=' || address_line1, ',' ORDER BY 1) FROM address_log"),
            before
        );
        // A bad event_path is refused up front.
        assert_eq!(
            sqlstate(
                r#"SELECT ecst.create_stream(name => 'bad', target => 'address', shape => 'entity_snapshot',
                     key => '{"addressId": "address_id"}', event_path => 'data..x')"#
            )
            .as_deref(),
            Some("22023")
        );
    }

    #[pg_test]
    fn kafka_connect_json_envelopes_apply_with_event_path() {
        // docs/guides/kafka.md's Kafka Connect example: a delta inside `payload`, its version too.
        run("CREATE TABLE kc (address_id text PRIMARY KEY, address_line1 text, address_line2 text)");
        run(r#"SELECT ecst.create_stream(name => 'address_changes', target => 'kc', shape => 'delta',
                 key => '{"addressId": "address_id"}', event_path => 'payload', version => 'payload.ts')"#);
        let event = |ts: u32, field: &str, value: &str| {
            format!(
                r#"{{"schema": {{"type": "struct", "fields": []}}, "payload": {{"addressId": "12366", "ts": {ts}, "newState": {{"{field}": "{value}"}}}}}}"#
            )
        };
        assert_eq!(apply("address_changes", &event(17, "addressLine1", "48 Baker Street")), "applied");
        assert_eq!(apply("address_changes", &event(18, "addressLine2", "London")), "applied");
        assert_eq!(apply("address_changes", &event(16, "addressLine1", "older")), "stale");
        assert_eq!(text("SELECT address_line1 || ', ' || address_line2 FROM kc"), "48 Baker Street, London");
    }
}
