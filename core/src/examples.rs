//! Stream specs for the three fixture events (`tests/fixtures/`), as the SQL layer would
//! build them for the demo tables. Used by tests, property tests and fuzz targets.

use crate::spec::{ChildSpec, OnConflict, Path, Shape, StreamSpec, Table};

fn address_table() -> Table {
    Table::new(
        vec!["address_id".into()],
        vec!["address_purpose".into(), "line1".into(), "address_line2".into(), "address_ts".into()],
        vec![("addressLine1".into(), "line1".into())],
    )
}

/// `fine_grained_snapshot.json`: entity snapshots under `addressContent`, versioned by `addressTS`.
pub fn address_snapshot() -> StreamSpec {
    StreamSpec {
        name: "address".into(),
        shape: Shape::EntitySnapshot,
        key_fields: vec!["addressId".into()],
        table: address_table(),
        event_path: None,
        state_path: Some(Path::parse("addressContent").unwrap()),
        version: Some(Path::parse("newState.addressContent.addressTS").unwrap()),
        event_id: None,
        on_conflict: OnConflict::Apply,
        children: Vec::new(),
        schema: None,
    }
}

/// `fine_grained_delta.json`: deltas at the root of old/newState, versioned by a root `ts`.
pub fn address_delta() -> StreamSpec {
    StreamSpec {
        name: "address_delta".into(),
        shape: Shape::Delta,
        state_path: None,
        version: Some(Path::parse("ts").unwrap()),
        ..address_snapshot()
    }
}

/// `aggregate_snapshot.json`: a customer whose `addressContent.addresses` are child rows.
pub fn customer_aggregate() -> StreamSpec {
    let child_table = Table::new(
        vec!["address_id".into()],
        vec!["address_purpose".into(), "line1".into(), "address_line2".into(), "address_ts".into()],
        vec![("addressLine1".into(), "line1".into())],
    );
    StreamSpec {
        name: "customer".into(),
        shape: Shape::AggregateSnapshot,
        key_fields: vec!["customerId".into()],
        table: Table::new(vec!["customer_id".into()], vec!["name".into()], Vec::new()),
        event_path: None,
        state_path: None,
        version: None,
        event_id: None,
        on_conflict: OnConflict::Apply,
        children: vec![ChildSpec {
            name: "addresses".into(),
            path: Path::parse("addressContent.addresses").unwrap(),
            table: child_table,
            key_fields: vec!["addressId".into()],
            parent_columns: vec!["customer_id".into()],
        }],
        schema: None,
    }
}
