//! Export's promise, as a property: parsing the event `export::event` renders for a replica row
//! gives back the row — its key, every column's value, the child rows and the entity's version —
//! for all three fixture shapes, with and without a version, NULLs and odd strings included.

use ecst_core::event::{parse, ChildRow, Op, Value as Cell};
use ecst_core::examples::{address_delta, address_snapshot, customer_aggregate};
use ecst_core::export::{child, event, Row};
use ecst_core::spec::StreamSpec;
use ecst_core::version::Version;
use proptest::prelude::*;
use serde_json::Value;

/// Child rows as (key, [(column, value)]).
type ChildCells = Vec<(Vec<String>, Vec<(usize, Cell)>)>;

fn value() -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(0.8, "[a-z0-9 \"\\\\é{}]{0,6}")
}

fn json(v: &Option<String>) -> Value {
    v.as_ref().map_or(Value::Null, |s| Value::String(s.clone()))
}

fn cell(v: &Option<String>) -> Cell {
    v.as_ref().map_or(Cell::Null, |s| Cell::Text(s.clone()))
}

fn check(
    spec: StreamSpec,
    key: String,
    columns: Vec<Option<String>>,
    version: Option<u32>,
    children: Vec<(u8, Vec<Option<String>>)>,
) -> Result<(), TestCaseError> {
    let width = spec.table.columns.len();
    let columns: Vec<Option<String>> = columns.into_iter().take(width).collect();
    // A versioned stream's entities have a version (from their state, or their row).
    let version = spec.is_versioned().then(|| Version::from_i64(version.unwrap_or(1) as i64));
    let mut child_rows: Vec<(String, Vec<Option<String>>)> = Vec::new();
    if !spec.children.is_empty() {
        for (k, values) in children {
            let k = format!("c{k}");
            if !child_rows.iter().any(|(existing, _)| *existing == k) {
                child_rows.push((k, values.into_iter().take(spec.children[0].table.columns.len()).collect()));
            }
        }
    }
    let rendered_children: Vec<Vec<Value>> = spec
        .children
        .iter()
        .map(|c| {
            child_rows
                .iter()
                .map(|(k, vals)| child(c, vec![Value::String(k.clone())], vals.iter().map(json).collect()))
                .collect()
        })
        .collect();
    let row = Row {
        keys: vec![Value::String(key.clone())],
        columns: columns.iter().map(json).collect(),
        version: version.clone(),
        children: rendered_children,
    };
    let text = event(&spec, row, false).to_string();
    let ev = parse(&spec, &text).map_err(|r| TestCaseError::fail(format!("{text}: {}", r.message)))?;
    prop_assert_eq!(&ev.key, &vec![key]);
    prop_assert_eq!(&ev.version, &version);
    let Op::Upsert { cells, children } = ev.op else { return Err(TestCaseError::fail("not an upsert")) };
    for (i, expected) in columns.iter().enumerate() {
        let got = cells.iter().find(|c| c.column == i).map(|c| c.value.clone()).unwrap_or(Cell::Null);
        match (&version, spec.version_column()) {
            // The version column carries the entity's version.
            (Some(v), Some(column)) if column == i => prop_assert_eq!(got, Cell::Text(v.to_numeric_string())),
            _ => prop_assert_eq!(got, cell(expected)),
        }
    }
    if !spec.children.is_empty() {
        let expected: Vec<ChildRow> = child_rows
            .iter()
            .map(|(k, vals)| ChildRow {
                key: vec![k.clone()],
                cells: vals
                    .iter()
                    .enumerate()
                    .map(|(i, v)| ecst_core::event::Cell {
                        column: i,
                        field: spec.children[0].table.field_name(i),
                        value: cell(v),
                    })
                    .collect(),
            })
            .collect();
        let got: Vec<ChildCells> = children
            .iter()
            .map(|s| {
                s.rows
                    .iter()
                    .map(|r| (r.key.clone(), r.cells.iter().map(|c| (c.column, c.value.clone())).collect()))
                    .collect()
            })
            .collect();
        let want: ChildCells = expected
            .iter()
            .map(|r| (r.key.clone(), r.cells.iter().map(|c| (c.column, c.value.clone())).collect()))
            .collect();
        prop_assert_eq!(got, vec![want]);
    }
    Ok(())
}

fn versioned(mut spec: StreamSpec) -> StreamSpec {
    if spec.version.is_none() {
        spec.version = Some(ecst_core::spec::Path::parse("ts").unwrap());
    }
    spec
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn an_exported_row_parses_back_to_itself(
        shape in 0u8..3,
        with_version in prop::bool::ANY,
        enveloped in prop::bool::ANY,
        key in "[a-z0-9]{1,4}",
        columns in prop::collection::vec(value(), 4),
        version in prop::option::of(1u32..1_000_000),
        children in prop::collection::vec((0u8..5, prop::collection::vec(value(), 4)), 0..4),
    ) {
        let spec = match shape { 0 => address_snapshot(), 1 => address_delta(), _ => customer_aggregate() };
        let spec = if with_version { versioned(spec) } else { StreamSpec { version: None, ..spec } };
        // An envelope stream: the event under `data` (the version path stays the payload's).
        let spec = if enveloped { StreamSpec { event_path: Some(ecst_core::spec::Path::parse("data").unwrap()), ..spec } } else { spec };
        check(spec, key, columns, version, children)?;
    }
}
