//! Parsing one raw event (the text exactly as received) into what a stream needs:
//! the entity key, the version, the event id, and the state mapped onto columns.
//! Anything wrong with the event is a [`Rejection`] naming what and where.

use crate::reject::{RejectCode, Rejection};
use crate::spec::{ChildSpec, Shape, StreamSpec, Table, Target};
use crate::version::{json_type, Version};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value as Json};
use std::collections::HashMap;
use std::fmt;

/// A column value as text for the column type's input function, or NULL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Text(String),
}

/// One JSON field mapped to one column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    /// Index into the table's writable [`Table::columns`].
    pub column: usize,
    /// The JSON field the value came from (the column name for fields a snapshot lacked).
    pub field: String,
    pub value: Value,
}

/// One element of an aggregate's child array: its key and every child column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildRow {
    pub key: Vec<String>,
    pub cells: Vec<Cell>,
}

/// The complete set of rows of one child table for one aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildSet {
    /// Index into [`StreamSpec::children`].
    pub child: usize,
    pub rows: Vec<ChildRow>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create or update. For snapshot shapes `cells` holds every column (NULL where absent);
    /// for deltas only the fields the event carries.
    Upsert {
        cells: Vec<Cell>,
        children: Vec<ChildSet>,
    },
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Key values as text, aligned with the stream's key fields.
    pub key: Vec<String>,
    pub version: Option<Version>,
    pub event_id: Option<String>,
    pub op: Op,
    /// The mapped fields of `oldState` (what the producer says the replica holds).
    pub old: Vec<Cell>,
}

/// Parses an event for `spec`.
pub fn parse(spec: &StreamSpec, text: &str) -> Result<Event, Rejection> {
    let root: Json = serde_json::from_str(text).map_err(|e| not_json(text, &e))?;
    parse_value(spec, &root)
}

/// `invalid_json`, in words a person reading the dead letter understands: what is wrong, where
/// (serde's line and column), and the text around that place.
pub(crate) fn not_json(text: &str, e: &serde_json::Error) -> Rejection {
    use serde_json::error::Category;
    let (line, column) = (e.line(), e.column());
    let serde_says = e.to_string();
    // serde's own phrase, without its " at line L column C" suffix.
    let phrase = serde_says.split(" at line ").next().unwrap_or(&serde_says);
    let what = match (e.classify(), phrase) {
        (Category::Eof, _) => "the text ends before the JSON value does".to_string(),
        (_, "recursion limit exceeded") => "it nests arrays or objects more than 128 levels deep".to_string(),
        (_, "expected ident") => "a word that is not true, false or null (strings need double quotes)".to_string(),
        (_, "expected value") if line == 1 && column == 1 => "it does not start with a JSON value".to_string(),
        (_, "expected value") => "a JSON value was expected here".to_string(),
        (_, "trailing characters") => "more text follows the JSON value".to_string(),
        (_, "key must be a string") => "an object key that is not a double-quoted string".to_string(),
        _ => phrase.to_string(),
    };
    let near = text
        .lines()
        .nth(line.saturating_sub(1))
        .map(|l| {
            // serde's column counts bytes; show up to 20 characters from just before it.
            let start = l.char_indices().map(|(i, _)| i).take_while(|&i| i + 1 < column).last().unwrap_or(0);
            let start = l[..start].char_indices().rev().nth(9).map(|(i, _)| i).unwrap_or(0);
            l[start..].chars().take(20).collect::<String>()
        })
        .filter(|n| !n.is_empty())
        .map(|n| format!(", near {n:?}"))
        .unwrap_or_default();
    Rejection::new(
        RejectCode::InvalidJson,
        format!("payload is not valid JSON: {what} (line {line}, column {column}{near}; the parser says: {phrase})"),
    )
}

/// The entity key of an event for `spec`, as [`parse`] would give it — for every event `parse`
/// accepts, the same key — without building the rest of the event: only the key fields are
/// decoded, everything else is checked for JSON syntax (not for `parse`'s nesting limit) and
/// skipped. An event that is invalid elsewhere (a bad version, say) still has its key here. Errors
/// of the key or of the JSON syntax are `parse`'s own. For routing an event to the worker that
/// owns its entity: every worker looks at every inbox row.
pub fn parse_key(spec: &StreamSpec, text: &str) -> Result<Vec<String>, Rejection> {
    if spec.event_path.is_some() {
        // The key sits inside the envelope (perhaps in a JSON string): decode the payload.
        let root: Json = serde_json::from_str(text).map_err(|e| not_json(text, &e))?;
        let event = event_object(spec, &root)?;
        let obj = event.as_object().expect("event_object returns objects");
        return spec
            .key_fields
            .iter()
            .map(|field| key_text(obj.get(field), || format!("key field {field:?}")))
            .collect();
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let found = match KeyFields(&spec.key_fields).deserialize(&mut de).and_then(|found| de.end().map(|_| found)) {
        Ok(found) => found,
        // Not JSON, or not an object: `parse` says which, in its own words.
        Err(_) => return parse(spec, text).map(|ev| ev.key),
    };
    spec.key_fields
        .iter()
        .zip(&found)
        .map(|(field, value)| key_text(value.as_ref(), || format!("key field {field:?}")))
        .collect()
}

/// Decodes the values of these root fields of an event object (the last of repeated ones, as
/// `serde_json::Map` keeps it), skipping every other field.
struct KeyFields<'s>(&'s [String]);

impl<'de> DeserializeSeed<'de> for KeyFields<'_> {
    type Value = Vec<Option<Json>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for KeyFields<'_> {
    type Value = Vec<Option<Json>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = vec![None; self.0.len()];
        while let Some(field) = map.next_key_seed(FieldIndex(self.0))? {
            match field {
                Some(i) => found[i] = Some(map.next_value::<Json>()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(found)
    }
}

/// Which of these field names a key is (borrowed from the text where it can be: no allocation).
struct FieldIndex<'s>(&'s [String]);

impl<'de> DeserializeSeed<'de> for FieldIndex<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FieldIndex<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|f| f == name))
    }
}

/// Parses an already-decoded event for `spec`.
pub fn parse_value(spec: &StreamSpec, root: &Json) -> Result<Event, Rejection> {
    if !root.is_object() {
        return Err(Rejection::new(
            RejectCode::NotAnObject,
            format!("an event must be a JSON object, not {}", json_type(root)),
        ));
    }
    if let Some(schema) = &spec.schema {
        schema.check(root)?;
    }
    let event = event_object(spec, root)?;
    let obj = event.as_object().expect("event_object returns objects");

    let key = spec
        .key_fields
        .iter()
        .map(|field| key_text(obj.get(field), || format!("key field {field:?}")))
        .collect::<Result<Vec<_>, _>>()?;

    let old_state = state_object(obj, "oldState")?;
    let new_state = state_object(obj, "newState")?;
    if old_state.is_none() && new_state.is_none() {
        return Err(Rejection::new(
            RejectCode::NoState,
            "the event has neither oldState nor newState (one of them must be an object)",
        ));
    }

    let version = match &spec.version {
        None => None,
        Some(path) => {
            let found = path.lookup(root).unwrap_or(&Json::Null);
            let v = Version::from_json(found)
                .map_err(|e| Rejection::new(RejectCode::InvalidVersion, format!("{e} (at {path})")))?;
            Some(v.ok_or_else(|| {
                Rejection::new(
                    RejectCode::MissingVersion,
                    format!("stream {:?} is versioned but the event has no version at {path}", spec.name),
                )
            })?)
        }
    };

    let event_id = match &spec.event_id {
        None => None,
        Some(path) => match path.lookup(root) {
            None | Some(Json::Null) => None,
            Some(Json::String(s)) if s.contains('\0') => {
                return Err(Rejection::new(
                    RejectCode::InvalidEventId,
                    format!(
                        "the event id at {path} contains a NUL character (\\u0000), which PostgreSQL text cannot hold"
                    ),
                ))
            }
            Some(Json::String(s)) => Some(s.clone()),
            Some(Json::Number(n)) => Some(n.to_string()),
            Some(other) => {
                return Err(Rejection::new(
                    RejectCode::InvalidEventId,
                    format!("the event id at {path} must be a string or a number, not {}", json_type(other)),
                ))
            }
        },
    };

    let old = match (old_state, spec.shape) {
        // oldState only feeds the conflict check: without the state_path object it has no cells.
        (Some(state), Shape::Delta | Shape::EntitySnapshot) => match entity_state(spec, state, "oldState")? {
            Some(entity) => map_fields(&spec.table, entity, false, "oldState")?,
            None => Vec::new(),
        },
        _ => Vec::new(),
    };

    let op = match new_state {
        None => Op::Delete,
        Some(state) => {
            let entity = entity_state(spec, state, "newState")?.ok_or_else(|| {
                Rejection::new(
                    RejectCode::InvalidState,
                    format!(
                        "newState has no \"{}\" object (the stream's state_path)",
                        spec.state_path.as_ref().unwrap()
                    ),
                )
            })?;
            let full = spec.shape.is_snapshot();
            let cells = map_fields(&spec.table, entity, full, "newState")?;
            let children = spec
                .children
                .iter()
                .enumerate()
                .map(|(i, child)| child_set(i, child, entity))
                .collect::<Result<Vec<_>, _>>()?;
            Op::Upsert { cells, children }
        }
    };

    Ok(Event { key, version, event_id, op, old })
}

/// `oldState`/`newState`: absent or null is `None`; anything but an object is invalid.
fn state_object<'a>(obj: &'a Map<String, Json>, name: &str) -> Result<Option<&'a Map<String, Json>>, Rejection> {
    match obj.get(name) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Object(m)) => Ok(Some(m)),
        Some(other) => Err(Rejection::new(
            RejectCode::InvalidState,
            format!("{name} must be an object or null, not {}", json_type(other)),
        )),
    }
}

/// The entity object of a raw event's `newState` (at the stream's `state_path`), if there is one.
/// `raw` is the event object itself (see [`event_object`] for an envelope's).
pub fn new_state_object<'a>(spec: &StreamSpec, raw: &'a Json) -> Option<&'a Map<String, Json>> {
    let state = raw.get("newState")?.as_object()?;
    entity_state(spec, state, "newState").ok().flatten()
}

/// The ECST event inside a payload: the payload itself, or the object at the stream's
/// `event_path` — also when the envelope holds it as a JSON string (double encoding).
pub fn event_object<'a>(spec: &StreamSpec, root: &'a Json) -> Result<std::borrow::Cow<'a, Json>, Rejection> {
    use std::borrow::Cow;
    let Some(path) = &spec.event_path else { return Ok(Cow::Borrowed(root)) };
    match path.lookup(root) {
        Some(event @ Json::Object(_)) => Ok(Cow::Borrowed(event)),
        Some(Json::String(text)) => match serde_json::from_str::<Json>(text) {
            Ok(event @ Json::Object(_)) => Ok(Cow::Owned(event)),
            Ok(other) => Err(Rejection::new(
                RejectCode::NotAnObject,
                format!("the event at {path} (a JSON string) must hold a JSON object, not {}", json_type(&other)),
            )),
            Err(e) => {
                let inner = not_json(text, &e);
                Err(Rejection::new(
                    RejectCode::InvalidJson,
                    format!("the event at {path} is a string that is not JSON: {}", inner.message),
                ))
            }
        },
        None | Some(Json::Null) => Err(Rejection::new(
            RejectCode::NotAnObject,
            format!("the envelope has no event at {path} (the stream's event_path)"),
        )),
        Some(other) => Err(Rejection::new(
            RejectCode::NotAnObject,
            format!("the event at {path} (the stream's event_path) must be a JSON object, not {}", json_type(other)),
        )),
    }
}

/// The entity's fields: the state itself, or the object at `state_path` inside it
/// (`None` when the state lacks that path).
fn entity_state<'a>(
    spec: &StreamSpec,
    state: &'a Map<String, Json>,
    name: &str,
) -> Result<Option<&'a Map<String, Json>>, Rejection> {
    let Some(path) = &spec.state_path else {
        return Ok(Some(state));
    };
    let mut cur = state;
    for seg in path.segments() {
        cur = match cur.get(seg) {
            Some(Json::Object(m)) => m,
            None | Some(Json::Null) => return Ok(None),
            Some(other) => {
                return Err(Rejection::new(
                    RejectCode::InvalidState,
                    format!("{name}.{path} must be an object, not {}", json_type(other)),
                ))
            }
        };
    }
    Ok(Some(cur))
}

/// Maps an object's fields onto the table's columns. With `full`, every column gets a cell
/// (NULL for fields the object lacks). Fields that map to no column are dropped.
fn map_fields(table: &Table, obj: &Map<String, Json>, full: bool, what: &str) -> Result<Vec<Cell>, Rejection> {
    let mut slots: Vec<Option<Cell>> = vec![None; table.columns.len()];
    for (field, json) in obj {
        let Target::Column(column) = table.resolve(field) else {
            continue;
        };
        if let Some(prev) = &slots[column] {
            return Err(Rejection::new(
                RejectCode::FieldCollision,
                format!("{what} fields {:?} and {field:?} both map to column {:?}", prev.field, table.columns[column]),
            ));
        }
        let value = json_value(json, || format!("{what}.{field}"))?;
        slots[column] = Some(Cell { column, field: field.clone(), value });
    }
    Ok(slots
        .into_iter()
        .enumerate()
        .filter_map(|(column, cell)| match cell {
            Some(c) => Some(c),
            None if full => Some(Cell { column, field: table.columns[column].clone(), value: Value::Null }),
            None => None,
        })
        .collect())
}

fn child_set(index: usize, child: &ChildSpec, entity: &Map<String, Json>) -> Result<ChildSet, Rejection> {
    let elements = match child.path.lookup_in(entity) {
        None | Some(Json::Null) => return Ok(ChildSet { child: index, rows: Vec::new() }),
        Some(Json::Array(a)) => a,
        Some(other) => {
            return Err(Rejection::new(
                RejectCode::InvalidChildren,
                format!("child {:?} at {} must be an array, not {}", child.name, child.path, json_type(other)),
            ))
        }
    };
    let mut rows = Vec::with_capacity(elements.len());
    for (i, element) in elements.iter().enumerate() {
        let Json::Object(obj) = element else {
            return Err(Rejection::new(
                RejectCode::InvalidChildren,
                format!("child {:?} element {} must be an object, not {}", child.name, i + 1, json_type(element)),
            ));
        };
        let key = child
            .key_fields
            .iter()
            .map(|f| key_text(obj.get(f), || format!("child {:?} element {} key field {f:?}", child.name, i + 1)))
            .collect::<Result<Vec<_>, _>>()?;
        let cells = map_fields(&child.table, obj, true, &format!("{} element {}", child.name, i + 1))?;
        rows.push(ChildRow { key, cells });
    }
    let set = ChildSet { child: index, rows };
    check_unique_child_keys(child, &set)?;
    Ok(set)
}

/// A snapshot whose array repeats a child key is invalid: it names the key and where it repeats.
/// The shell calls this again after canonicalising keys through the column types.
pub fn check_unique_child_keys(child: &ChildSpec, set: &ChildSet) -> Result<(), Rejection> {
    let mut seen: HashMap<&[String], Vec<usize>> = HashMap::new();
    for (i, row) in set.rows.iter().enumerate() {
        seen.entry(row.key.as_slice()).or_default().push(i + 1);
    }
    let mut repeated: Vec<(&[String], Vec<usize>)> = seen.into_iter().filter(|(_, at)| at.len() > 1).collect();
    if repeated.is_empty() {
        return Ok(());
    }
    repeated.sort_by_key(|(_, at)| at[0]);
    let described: Vec<String> = repeated
        .iter()
        .map(|(key, at)| {
            let named: Vec<String> =
                child.key_fields.iter().zip(key.iter()).map(|(f, v)| format!("{f}={v:?}")).collect();
            let at: Vec<String> = at.iter().map(usize::to_string).collect();
            format!("{} at elements {}", named.join(", "), at.join(", "))
        })
        .collect();
    Err(Rejection::new(
        RejectCode::DuplicateChildKey,
        format!("child {:?} repeats a child key: {}", child.name, described.join("; ")),
    ))
}

fn key_text(value: Option<&Json>, what: impl Fn() -> String) -> Result<String, Rejection> {
    match value {
        None | Some(Json::Null) => {
            Err(Rejection::new(RejectCode::MissingKey, format!("{} is missing or null", what())))
        }
        Some(Json::String(s)) if s.contains('\0') => {
            Err(Rejection::new(RejectCode::InvalidKey, format!("{} contains a NUL character", what())))
        }
        Some(Json::String(s)) => Ok(s.clone()),
        Some(Json::Number(n)) => Ok(n.to_string()),
        Some(Json::Bool(b)) => Ok(b.to_string()),
        Some(other) => Err(Rejection::new(
            RejectCode::InvalidKey,
            format!("{} must be a string or a number, not {}", what(), json_type(other)),
        )),
    }
}

fn json_value(json: &Json, what: impl Fn() -> String) -> Result<Value, Rejection> {
    Ok(match json {
        Json::Null => Value::Null,
        Json::String(s) if s.contains('\0') => {
            return Err(Rejection::new(
                RejectCode::InvalidValue,
                format!("{} contains a NUL character (\\u0000), which PostgreSQL text cannot hold", what()),
            ))
        }
        Json::String(s) => Value::Text(s.clone()),
        Json::Number(n) => Value::Text(n.to_string()),
        Json::Bool(b) => Value::Text(b.to_string()),
        nested => Value::Text(nested.to_string()),
    })
}

#[cfg(test)]
mod tests;
