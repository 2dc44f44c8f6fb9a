//! `#[pg_test]`s of stream definitions and privileges: what `create_stream` refuses, keys whose
//! text depends on session settings, identifiers, and whose code runs with whose rights.

#[pgrx::pg_schema]
mod tests {
    #[allow(unused_imports)]
    use crate::testing::*;
    use pgrx::prelude::*;

    #[pg_test]
    fn keys_whose_text_depends_on_the_session_are_refused() {
        run("CREATE TYPE pair AS (a int, b text)");
        run("CREATE TABLE kc (k pair PRIMARY KEY, v text)");
        assert_eq!(
            sqlstate(r#"SELECT ecst.create_stream('kc', 'kc', 'entity_snapshot', '{"k": "k"}')"#).as_deref(),
            Some("0A000")
        );
        run("CREATE TABLE kr (k regclass PRIMARY KEY, v text)");
        assert_eq!(
            sqlstate(r#"SELECT ecst.create_stream('kr', 'kr', 'entity_snapshot', '{"k": "k"}')"#).as_deref(),
            Some("0A000")
        );
        run("CREATE TABLE ka (k regtype[] PRIMARY KEY, v text)");
        assert_eq!(
            sqlstate(r#"SELECT ecst.create_stream('ka', 'ka', 'entity_snapshot', '{"k": "k"}')"#).as_deref(),
            Some("0A000")
        );
        run("CREATE TABLE ok (k text PRIMARY KEY, r regclass)");
        assert_eq!(
            sqlstate(r#"SELECT ecst.create_stream('ok', 'ok', 'entity_snapshot', '{"k": "k"}')"#),
            None,
            "reg* outside the key is fine"
        );
    }

    #[pg_test]
    fn another_roles_code_does_not_run_with_the_drainers_privileges() {
        // A plain role's table, with a trigger of its own: a superuser's process_inbox and
        // retry of every letter leave its events in the dead letters (42501) instead of running
        // the trigger as superuser; the role itself applies them.
        run("CREATE ROLE ecst_test_mallory");
        run("GRANT CREATE ON SCHEMA public TO ecst_test_mallory");
        run("SET LOCAL ROLE ecst_test_mallory");
        run("CREATE TABLE m (id text PRIMARY KEY, v text, who text)");
        run("CREATE FUNCTION m_who() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.who := current_user; RETURN NEW; END $$");
        run("CREATE TRIGGER m_who BEFORE INSERT OR UPDATE ON m FOR EACH ROW EXECUTE FUNCTION m_who()");
        run(r#"SELECT ecst.create_stream('m', 'm', 'entity_snapshot', '{"id": "id"}', retain_events => true)"#);
        // Code of hers elsewhere (a CHECK on another table of hers) concerns only that table.
        run("CREATE FUNCTION m_ok(v text) RETURNS boolean LANGUAGE sql AS $$ SELECT true $$");
        run("CREATE TABLE m_checked (id text PRIMARY KEY, v text CHECK (m_ok(v)))");
        run("RESET ROLE");
        run("CREATE TABLE trusted (id text PRIMARY KEY, v text)");
        run(r#"SELECT ecst.create_stream('trusted', 'trusted', 'entity_snapshot', '{"id": "id"}')"#);
        run(r#"INSERT INTO ecst.inbox (stream, payload) VALUES ('m', '{"id": "1", "newState": {"v": "x"}}'),
                                                          ('trusted', '{"id": "1", "newState": {"v": "y"}}')"#);
        assert_eq!(one::<i64>("SELECT ecst.process_inbox()"), Some(2));
        assert_eq!(count("SELECT * FROM m"), 0, "not applied as superuser");
        assert_eq!(count("SELECT * FROM trusted"), 1, "a superuser's own table is applied");
        assert_eq!(
            text("SELECT error_code || ':' || sqlstate FROM ecst.dead_letters WHERE stream = 'm'"),
            "write_failed:42501"
        );
        assert!(text("SELECT message FROM ecst.dead_letters WHERE stream = 'm'").contains("ecst_test_mallory"));
        assert_eq!(one::<i64>("SELECT dead_lettered FROM ecst.stats WHERE stream = 'm'"), Some(1), "counted");
        assert_eq!(count("SELECT * FROM ecst.retry_dead_letters()"), 0, "a retry of every letter keeps it");
        assert_eq!(sqlstate("SELECT * FROM ecst.retry_dead_letters('m')").as_deref(), Some("42501"));
        assert_eq!(sqlstate("SELECT * FROM ecst.rebuild('m')").as_deref(), Some("42501"));
        run("CREATE TABLE snap_m (payload text)");
        assert_eq!(sqlstate("SELECT * FROM ecst.load_snapshot('m', 'snap_m')").as_deref(), Some("42501"));
        run("SET LOCAL ROLE ecst_test_mallory");
        assert_eq!(
            text("SELECT string_agg(outcome || '=' || count, ',') FROM ecst.retry_dead_letters('m')"),
            "applied=1"
        );
        assert_eq!(text("SELECT who FROM m"), "ecst_test_mallory", "applied with the owner's own privileges");
        run("RESET ROLE");
        // A superuser's table whose default calls a plain role's function is that role's code too.
        run("SET LOCAL ROLE ecst_test_mallory");
        run("CREATE FUNCTION m_default() RETURNS text LANGUAGE sql AS $$ SELECT current_user::text $$");
        run("RESET ROLE");
        run("CREATE TABLE su (id text PRIMARY KEY, v text, who text DEFAULT m_default())");
        run(r#"SELECT ecst.create_stream('su', 'su', 'entity_snapshot', '{"id": "id"}')"#);
        run(r#"INSERT INTO ecst.inbox (stream, payload) VALUES ('su', '{"id": "1", "newState": {}}')"#);
        assert_eq!(one::<i64>("SELECT ecst.process_inbox()"), Some(1));
        assert_eq!(count("SELECT * FROM su"), 0);
        assert_eq!(text("SELECT sqlstate FROM ecst.dead_letters WHERE stream = 'su'"), "42501");
    }

    #[pg_test]
    fn create_stream_checks_everything_up_front() {
        run("CREATE TABLE t (id text PRIMARY KEY, other text, g text GENERATED ALWAYS AS (other || '!') STORED, plain text)");
        run("CREATE TABLE nokey (id text, v text)");
        run("CREATE VIEW v AS SELECT * FROM t");
        let create = |args: &str| sqlstate(&format!("SELECT ecst.create_stream({args})"));
        assert_eq!(create(r#"'s', 'missing_table', 'delta', '{"id": "id"}'"#).as_deref(), Some("42P01"));
        assert_eq!(create(r#"'s', 'v', 'delta', '{"id": "id"}'"#).as_deref(), Some("42809"));
        assert_eq!(create(r#"'s', 't', 'snapshot', '{"id": "id"}'"#).as_deref(), Some("22023"));
        assert_eq!(create(r#"'s', 't', 'delta', '{"id": "nope"}'"#).as_deref(), Some("42703"));
        assert_eq!(create(r#"'s', 't', 'delta', '{}'"#).as_deref(), Some("22023"));
        assert_eq!(create(r#"'s', 't', 'delta', '["id"]'"#).as_deref(), Some("22023"));
        assert_eq!(create(r#"'s', 't', 'delta', '{"id": "other"}'"#).as_deref(), Some("42P10"));
        assert_eq!(create(r#"'s', 'nokey', 'delta', '{"id": "id"}'"#).as_deref(), Some("42P10"));
        assert_eq!(
            create(r#"'s', 't', 'delta', '{"id": "id"}', columns => '{"a": "nope"}'"#).as_deref(),
            Some("42703")
        );
        assert_eq!(create(r#"'s', 't', 'delta', '{"id": "id"}', columns => '{"a": "g"}'"#).as_deref(), Some("428C9"));
        assert_eq!(create(r#"'s', 't', 'delta', '{"id": "id"}', version => 'a..b'"#).as_deref(), Some("22023"));
        assert_eq!(create(r#"'s', 't', 'delta', '{"id": "id"}', on_conflict => 'ignore'"#).as_deref(), Some("22023"));
        assert_eq!(create(r#"'s', 't', 'delta', '{"id": "id"}', children => '{"c": {}}'"#).as_deref(), Some("22023"));
        assert_eq!(create(r#"'s', 't', 'aggregate_snapshot', '{"id": "id"}', children => '{"c": {"path": "x", "table": "nope", "key": {"a": "b"}, "parent_key": "id"}}'"#).as_deref(), Some("42P01"));
        assert_eq!(create(r#"'s', 't', 'aggregate_snapshot', '{"id": "id"}', children => '{"c": {"path": "x", "table": "nokey", "key": {"v": "v"}, "parent_key": "id"}}'"#).as_deref(), Some("42P10"));
        assert_eq!(create(r#"'', 't', 'delta', '{"id": "id"}'"#).as_deref(), Some("22023"));
        assert_eq!(create(r#"'s', 't', 'delta', '{"id": "id"}'"#), None);
        assert_eq!(create(r#"'s', 't', 'delta', '{"id": "id"}'"#).as_deref(), Some("42710"));
        assert_eq!(sqlstate("SELECT ecst.apply('nope', '{}')").as_deref(), Some("42704"));
        // Not the owner.
        run("CREATE ROLE ecst_test_stranger");
        run("GRANT USAGE ON SCHEMA ecst TO ecst_test_stranger");
        run("GRANT SELECT, INSERT ON ecst.streams TO ecst_test_stranger");
        run("SET ROLE ecst_test_stranger");
        let state = create(r#"'s2', 't', 'delta', '{"id": "id"}'"#);
        run("RESET ROLE");
        assert_eq!(state.as_deref(), Some("42501"));
    }

    /// A child's `parent_key` as an object names, for each of the aggregate's key columns, the
    /// child column holding it, whatever the order of the key's fields (here the array form
    /// would be `["c", "t"]`: `id` sorts before `tenant`); an object that misses a key column, or
    /// names a field instead of a column, is refused.
    #[pg_test]
    fn parent_key_as_an_object_maps_each_key_column() {
        run("CREATE TABLE tc (tenant_id text, x_customer text, PRIMARY KEY (tenant_id, x_customer))");
        run("CREATE TABLE tc_a (t text, c text, address_id text, line1 text, PRIMARY KEY (t, c, address_id))");
        let children = |parent: &str| {
            format!(
                r#"children => '{{"a": {{"path": "addresses", "table": "tc_a", "key": {{"addressId": "address_id"}},
                     "parent_key": {parent}}}}}'"#
            )
        };
        let stream = |parent: &str| {
            format!(
                r#"SELECT ecst.create_stream('tc', 'tc', 'aggregate_snapshot', '{{"tenant": "tenant_id", "id": "x_customer"}}', {})"#,
                children(parent)
            )
        };
        assert_eq!(sqlstate(&stream(r#"{"tenant_id": "t"}"#)).as_deref(), Some("22023"));
        assert_eq!(sqlstate(&stream(r#"{"tenant_id": "t", "id": "c"}"#)).as_deref(), Some("22023"));
        // The object's own order (tenant_id, x_customer) is not the key's (x_customer, tenant_id).
        run(&stream(r#"{"tenant_id": "t", "x_customer": "c"}"#));
        assert_eq!(
            apply(
                "tc",
                r#"{"tenant": "acme", "id": "c1", "newState": {"addresses": [{"addressId": "a1", "line1": "x"}]}}"#
            ),
            "applied"
        );
        assert_eq!(text("SELECT t || '/' || c || '/' || address_id FROM tc_a"), "acme/c1/a1");
    }

    #[pg_test]
    fn drop_stream_keeps_the_replica() {
        address_stream();
        apply("address", SNAPSHOT);
        assert_eq!(one::<bool>("SELECT ecst.drop_stream('address')"), Some(true));
        assert_eq!(one::<bool>("SELECT ecst.drop_stream('address')"), Some(false));
        assert_eq!(count("SELECT * FROM address"), 1);
        assert_eq!(count("SELECT * FROM ecst.entity_state"), 0);
        assert_eq!(sqlstate(&format!("SELECT ecst.apply('address', '{}')", SNAPSHOT)).as_deref(), Some("42704"));
    }

    #[pg_test]
    fn quoted_identifiers_are_safe() {
        run(r#"CREATE TABLE "we""ird; DROP TABLE x" ("my key" text PRIMARY KEY, "Col; DROP TABLE y" text)"#);
        run(r#"SELECT ecst.create_stream('w', '"we""ird; DROP TABLE x"', 'delta', '{"k": "my key"}',
                columns => '{"c": "Col; DROP TABLE y"}')"#);
        assert_eq!(apply("w", r#"{"k": "1", "newState": {"c": "v"}}"#), "applied");
        assert_eq!(text(r#"SELECT "Col; DROP TABLE y" FROM "we""ird; DROP TABLE x""#), "v");
    }

    #[pg_test]
    fn rules_and_read_only_transactions_are_not_bypassed() {
        run("CREATE TABLE ru (id int PRIMARY KEY, v text, ts bigint)");
        run("CREATE TABLE ru_audit (id int, v text)");
        run("CREATE RULE ru_log AS ON UPDATE TO ru DO ALSO INSERT INTO ru_audit (id, v) VALUES (NEW.id, NEW.v)");
        run(r#"SELECT ecst.create_stream('ru', 'ru', 'entity_snapshot', '{"id": "id"}', version => 'newState.ts')"#);
        // SQL refuses an upsert into a table with rules; the row API must not write it silently.
        assert_eq!(
            sqlstate(r#"SELECT ecst.apply('ru', '{"id": 1, "newState": {"v": "a", "ts": 1}}')"#).as_deref(),
            Some("0A000")
        );
        assert_eq!(count("SELECT * FROM ru"), 0);
        // Nor does a snapshot loaded into the empty table (COPY would skip the rule).
        run(r#"CREATE TABLE ru_src AS SELECT '{"id": 1, "newState": {"v": "a", "ts": 1}}'::text AS payload"#);
        let loaded = sqlstate("SELECT * FROM ecst.load_snapshot('ru', 'ru_src')");
        assert_eq!(count("SELECT * FROM ru"), 0, "{loaded:?}");

        run("CREATE TABLE ro (id int PRIMARY KEY, v text, ts bigint)");
        run(r#"SELECT ecst.create_stream('ro', 'ro', 'entity_snapshot', '{"id": "id"}', version => 'newState.ts')"#);
        // (Last: the test's transaction stays read-only.)
        run("SET LOCAL transaction_read_only = on");
        let refused = sqlstate(r#"SELECT ecst.apply('ro', '{"id": 7, "newState": {"v": "ro", "ts": 1}}')"#);
        assert_eq!(refused.as_deref(), Some("25006"));
    }

    #[pg_test]
    fn a_key_column_events_cannot_write_is_refused() {
        run("CREATE TABLE ib (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, a text)");
        assert_eq!(
            sqlstate(r#"SELECT ecst.create_stream('ib', 'ib', 'entity_snapshot', '{"id": "id"}')"#).as_deref(),
            Some("428C9")
        );
        run("CREATE TABLE ig (code text, id text GENERATED ALWAYS AS (upper(code)) STORED PRIMARY KEY)");
        assert_eq!(
            sqlstate(r#"SELECT ecst.create_stream('ig', 'ig', 'entity_snapshot', '{"id": "id"}')"#).as_deref(),
            Some("428C9")
        );
    }

    #[pg_test]
    fn definitions_that_could_never_apply_are_refused() {
        run("CREATE TABLE agg (id text PRIMARY KEY)");
        run("CREATE TABLE agg_kids (id text, k text, v text, PRIMARY KEY (id, k))");
        assert_eq!(
            sqlstate(
                r#"SELECT ecst.create_stream('agg', 'agg', 'aggregate_snapshot', '{"id": "id"}', children => '{
                    "x": {"path": "x", "table": "agg_kids", "key": {"k": "k"}, "parent_key": "id"},
                    "y": {"path": "y", "table": "agg_kids", "key": {"k": "k"}, "parent_key": "id"}}')"#
            )
            .as_deref(),
            Some("22023")
        );
    }

    #[pg_test]
    fn date_and_timestamp_keys_do_not_depend_on_session_settings() {
        run("CREATE TABLE dk (day date PRIMARY KEY, v text)");
        run(r#"SELECT ecst.create_stream('dk', 'dk', 'entity_snapshot', '{"day": "day"}', version => 'eventTime')"#);
        run("CREATE TABLE tk (at timestamptz PRIMARY KEY, v text)");
        run(r#"SELECT ecst.create_stream('tk', 'tk', 'entity_snapshot', '{"at": "at"}', version => 'eventTime')"#);
        assert_eq!(apply("dk", r#"{"day": "2024-01-02", "eventTime": 2, "newState": {"v": "new"}}"#), "applied");
        assert_eq!(
            apply("tk", r#"{"at": "2024-01-02T10:00:00+02:00", "eventTime": 2, "newState": {"v": "new"}}"#),
            "applied"
        );
        run("SET LOCAL DateStyle = 'SQL, DMY'");
        run("SET LOCAL TimeZone = 'America/New_York'");
        assert_eq!(apply("dk", r#"{"day": "2024-01-02", "eventTime": 1, "newState": {"v": "old"}}"#), "stale");
        assert_eq!(apply("tk", r#"{"at": "2024-01-02T08:00:00Z", "eventTime": 1, "newState": {"v": "old"}}"#), "stale");
        assert_eq!(
            batch(
                "dk",
                &[
                    r#"{"day": "2024-01-02", "eventTime": 1, "newState": {"v": "old"}}"#,
                    r#"{"day": "2024-01-03", "eventTime": 1, "newState": {"v": "x"}}"#
                ]
            ),
            "applied=1,stale=1"
        );
        assert_eq!(text("SELECT v FROM dk WHERE day = '2024-01-02'::date"), "new");
        assert_eq!(text("SELECT v FROM tk"), "new");
        assert_eq!(count("SELECT * FROM ecst.entity_state s JOIN ecst.streams t ON t.id = s.stream_id WHERE t.name IN ('dk', 'tk')"), 3);
        // A range of dates is such a key too.
        run("CREATE TABLE rk (span daterange PRIMARY KEY, v text)");
        run(r#"SELECT ecst.create_stream('rk', 'rk', 'entity_snapshot', '{"span": "span"}', version => 'eventTime')"#);
        assert_eq!(
            apply("rk", r#"{"span": "[2024-01-02,2024-01-05)", "eventTime": 2, "newState": {"v": "new"}}"#),
            "applied"
        );
        run("SET LOCAL DateStyle = 'ISO, MDY'");
        assert_eq!(
            apply("rk", r#"{"span": "[2024-01-02,2024-01-05)", "eventTime": 1, "newState": {"v": "old"}}"#),
            "stale"
        );
        run("SET LOCAL DateStyle = 'SQL, DMY'");
        // The session's settings are back after each call.
        assert_eq!(text("SHOW DateStyle"), "SQL, DMY");
        assert_eq!(text("SHOW TimeZone"), "America/New_York");
    }
}
