//! Helpers of the `#[pg_test]`s (`src/*/tests.rs`): SQL shortcuts and the fixture streams.

use pgrx::prelude::*;

pub(crate) const SNAPSHOT: &str = include_str!("../tests/fixtures/fine_grained_snapshot.json");
pub(crate) const DELTA: &str = include_str!("../tests/fixtures/fine_grained_delta.json");
pub(crate) const AGGREGATE: &str = include_str!("../tests/fixtures/aggregate_snapshot.json");

pub(crate) fn run(sql: &str) {
    Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
}

pub(crate) fn one<T: pgrx::FromDatum + pgrx::IntoDatum>(sql: &str) -> Option<T> {
    Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
}

pub(crate) fn text(sql: &str) -> String {
    one::<String>(sql).unwrap_or_else(|| panic!("{sql} returned NULL"))
}

pub(crate) fn count(sql: &str) -> i64 {
    one::<i64>(&format!("SELECT count(*) FROM ({sql}) q")).unwrap()
}

pub(crate) fn apply(stream: &str, event: &str) -> String {
    Spi::get_one_with_args::<String>("SELECT ecst.apply($1, $2)::text", &[stream.into(), event.into()])
        .unwrap()
        .unwrap()
}

/// The SQLSTATE a statement fails with (None if it succeeds).
pub(crate) fn sqlstate(sql: &str) -> Option<String> {
    if one::<bool>("SELECT to_regprocedure('pg_temp.sqlstate_of(text)') IS NULL") == Some(true) {
        run("CREATE FUNCTION pg_temp.sqlstate_of(q text) RETURNS text LANGUAGE plpgsql AS
             $f$ BEGIN EXECUTE q; RETURN NULL; EXCEPTION WHEN OTHERS THEN RAISE WARNING 'sqlstate_of: % %', SQLSTATE, SQLERRM; RETURN SQLSTATE; END $f$");
    }
    Spi::get_one_with_args::<String>("SELECT pg_temp.sqlstate_of($1)", &[sql.into()]).unwrap()
}

/// The (error_code, message) of the newest dead letter.
pub(crate) fn last_dead_letter() -> (String, String) {
    let code = text("SELECT error_code FROM ecst.dead_letters ORDER BY id DESC LIMIT 1");
    let message = text("SELECT message FROM ecst.dead_letters ORDER BY id DESC LIMIT 1");
    (code, message)
}

pub(crate) fn address_table(name: &str) {
    run(&format!(
        "CREATE TABLE {name} (address_id text PRIMARY KEY, address_purpose text, line1 text,
                              address_line2 text, address_ts bigint)"
    ));
}

/// The fixture snapshot's stream: entity snapshots under addressContent, versioned by addressTS.
pub(crate) fn address_stream() {
    address_table("address");
    run(r#"SELECT ecst.create_stream(name => 'address', target => 'address'::regclass, shape => 'entity_snapshot',
            key => '{"addressId": "address_id"}', state_path => 'addressContent',
            columns => '{"addressLine1": "line1"}', version => 'newState.addressContent.addressTS')"#);
}

pub(crate) fn delta_stream(name: &str, version: Option<&str>, on_conflict: &str) {
    address_table(name);
    let version = version.map(|v| format!("'{v}'")).unwrap_or("NULL".into());
    run(&format!(
        r#"SELECT ecst.create_stream(name => '{name}', target => '{name}'::regclass, shape => 'delta',
            key => '{{"addressId": "address_id"}}', columns => '{{"addressLine1": "line1"}}',
            version => {version}, on_conflict => '{on_conflict}')"#
    ));
}

pub(crate) fn customer_stream() {
    run("CREATE TABLE customer (customer_id text PRIMARY KEY, name text)");
    run("CREATE TABLE customer_address (customer_id text NOT NULL REFERENCES customer, address_id text NOT NULL,
            address_purpose text, line1 text, address_line2 text, address_ts bigint,
            PRIMARY KEY (customer_id, address_id))");
    run(
        r#"SELECT ecst.create_stream(name => 'customer', target => 'customer'::regclass, shape => 'aggregate_snapshot',
            key => '{"customerId": "customer_id"}',
            children => '{"addresses": {"path": "addressContent.addresses", "table": "customer_address",
                          "key": {"addressId": "address_id"}, "parent_key": "customer_id",
                          "columns": {"addressLine1": "line1"}}}')"#,
    );
}

pub(crate) fn row(table: &str, key: &str) -> String {
    text(&format!(
        "SELECT concat_ws('|', address_id, coalesce(address_purpose, '-'), coalesce(line1, '-'),
                coalesce(address_line2, '-'), coalesce(address_ts::text, '-'))
         FROM {table} WHERE address_id = '{key}'"
    ))
}

pub(crate) fn batch(stream: &str, events: &[&str]) -> String {
    let events: Vec<String> = events.iter().map(|e| e.to_string()).collect();
    Spi::get_one_with_args::<String>(
        "SELECT string_agg(outcome || '=' || count, ',' ORDER BY outcome) FROM ecst.apply_batch($1, $2::text[])",
        &[stream.into(), events.into()],
    )
    .unwrap()
    .unwrap_or_default()
}
