//! Rendering a replica entity as the create event that would write it, in the stream's own format
//! (`ecst.export_snapshot`): key fields at the event's root (in the envelope at `event_path`), the state under `newState` (at `state_path`),
//! child arrays at their paths, and the entity's version at the version path. Parsing the rendered
//! event gives back the row's values and version (`tests/export.rs`).

use crate::spec::{ChildSpec, StreamSpec};
use crate::version::Version;
use serde_json::{Map, Value};

/// One replica row, each value already in the JSON an event must carry to write it again.
pub struct Row {
    /// Key columns, aligned with the stream's key fields.
    pub keys: Vec<Value>,
    /// The writable columns, aligned with the table's columns.
    pub columns: Vec<Value>,
    /// The entity's version, if the stream is versioned and pg_ecst remembers one.
    pub version: Option<Version>,
    /// Per child table (aligned with the spec's children), the rendered child elements.
    pub children: Vec<Vec<Value>>,
}

/// The create event of `row`. `temporal_version`: the version column (`StreamSpec::version_column`)
/// is a date/time column, whose version is rendered as an RFC 3339 timestamp.
pub fn event(spec: &StreamSpec, row: Row, temporal_version: bool) -> Value {
    let mut event = Map::new();
    for (field, value) in spec.key_fields.iter().zip(row.keys) {
        event.insert(field.clone(), value);
    }
    // An entity snapshot's version that is also a state field (`newState.<state>.<field>`, written
    // to a column) is rendered once, under the version path's own spelling, with the entity's
    // version: the column's own value where it names the version exactly (a text column keeps its
    // spelling), else a timestamp for a date/time column, else a number.
    let version_column =
        spec.version_column().and_then(|i| Some((i, spec.version.as_ref()?.segments().last()?.clone())));
    let mut entity = Map::new();
    for (i, own) in row.columns.into_iter().enumerate() {
        match &version_column {
            Some((column, field)) if *column == i => {
                let value = match &row.version {
                    Some(v) if Version::from_json(&own).ok().flatten().as_ref() == Some(v) => None,
                    Some(v) if temporal_version => v.to_rfc3339().map(Value::String),
                    Some(v) => Some(number(v)),
                    None => None,
                };
                entity.insert(field.clone(), value.unwrap_or(own));
            }
            _ => {
                entity.insert(spec.table.field_name(i), own);
            }
        }
    }
    let mut entity = Value::Object(entity);
    for (child, rows) in spec.children.iter().zip(row.children) {
        child.path.set_default(&mut entity, Value::Array(rows));
    }
    let new_state = match &spec.state_path {
        Some(path) => {
            let mut root = Value::Object(Map::new());
            path.set_default(&mut root, entity);
            root
        }
        None => entity,
    };
    event.insert("newState".into(), new_state);
    // An envelope stream's event goes under its `event_path`; the version path is the payload's.
    let mut event = match &spec.event_path {
        Some(path) => {
            let mut root = Value::Object(Map::new());
            path.set_default(&mut root, Value::Object(event));
            root
        }
        None => Value::Object(event),
    };
    if let (Some(path), Some(v)) = (&spec.version, &row.version) {
        path.set_default(&mut event, number(v));
    }
    event
}

/// One element of a child array: its key fields and columns (values as in [`Row`]).
pub fn child(spec: &ChildSpec, keys: Vec<Value>, columns: Vec<Value>) -> Value {
    let mut element = Map::new();
    for (field, value) in spec.key_fields.iter().zip(keys) {
        element.insert(field.clone(), value);
    }
    for (i, value) in columns.into_iter().enumerate() {
        element.insert(spec.table.field_name(i), value);
    }
    Value::Object(element)
}

/// A version as a JSON number (exact: the numeric text itself).
fn number(v: &Version) -> Value {
    serde_json::from_str(&v.to_numeric_string()).expect("a version's numeric text is a JSON number")
}
