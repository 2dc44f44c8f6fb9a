//! `#[pg_test]`s: SPEC §1–3 inside a real backend (each test runs in a rolled-back transaction).

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    const SNAPSHOT: &str = include_str!("../../shared/fixtures/fine_grained_snapshot.json");

    fn run(sql: &str) {
        Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn one<T: pgrx::FromDatum + pgrx::IntoDatum>(sql: &str) -> Option<T> {
        Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    fn apply(stream: &str, event: &str) -> String {
        Spi::get_one_with_args::<String>(
            "SELECT ecst.apply($1, $2)::text",
            &[stream.into(), event.into()],
        )
        .unwrap()
        .unwrap()
    }

    fn address_stream() {
        run(
            "CREATE TABLE address (address_id text PRIMARY KEY, address_purpose text, line1 text,
                                   address_line2 text, address_ts bigint)",
        );
        run("SELECT ecst.create_stream(name => 'address', target => 'address'::regclass, shape => 'entity_snapshot',
                key => '{\"addressId\": \"address_id\"}', state_path => 'addressContent',
                columns => '{\"addressLine1\": \"line1\"}', version => 'newState.addressContent.addressTS')");
    }

    #[pg_test]
    fn fixture_snapshot_applies_once() {
        address_stream();
        assert_eq!(apply("address", SNAPSHOT), "applied");
        assert_eq!(
            one::<String>("SELECT concat_ws('|', address_id, address_purpose, line1, address_line2, address_ts) FROM address"),
            Some("12366|billing|48 Baker Street|London, UK, E1 7AE|1572134205".into())
        );
        assert_eq!(apply("address", SNAPSHOT), "duplicate");
    }
}
