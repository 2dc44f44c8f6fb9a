//! A stream's definition as the core sees it: the shape, where the key, state, version and
//! event id sit in an event, and how JSON fields resolve to replica columns.

use heck::{ToLowerCamelCase, ToSnakeCase};
use serde_json::Value;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Fine-grained: `newState` holds only the fields that changed.
    Delta,
    /// `newState` holds the whole entity.
    EntitySnapshot,
    /// `newState` holds a whole aggregate, with arrays mapped to child tables.
    AggregateSnapshot,
}

impl Shape {
    pub const NAMES: &'static str = "'delta', 'entity_snapshot' or 'aggregate_snapshot'";

    pub fn as_str(self) -> &'static str {
        match self {
            Shape::Delta => "delta",
            Shape::EntitySnapshot => "entity_snapshot",
            Shape::AggregateSnapshot => "aggregate_snapshot",
        }
    }

    /// Snapshots carry the whole entity: an absent field means NULL.
    pub fn is_snapshot(self) -> bool {
        !matches!(self, Shape::Delta)
    }
}

impl FromStr for Shape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "delta" => Ok(Shape::Delta),
            "entity_snapshot" => Ok(Shape::EntitySnapshot),
            "aggregate_snapshot" => Ok(Shape::AggregateSnapshot),
            other => Err(format!("unknown shape {other:?}")),
        }
    }
}

/// What to do when a fresh event's `oldState` disagrees with the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    Apply,
    Skip,
    DeadLetter,
    Error,
}

impl OnConflict {
    pub const NAMES: &'static str = "'apply', 'skip', 'dead_letter' or 'error'";

    pub fn as_str(self) -> &'static str {
        match self {
            OnConflict::Apply => "apply",
            OnConflict::Skip => "skip",
            OnConflict::DeadLetter => "dead_letter",
            OnConflict::Error => "error",
        }
    }
}

impl FromStr for OnConflict {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "apply" => Ok(OnConflict::Apply),
            "skip" => Ok(OnConflict::Skip),
            "dead_letter" => Ok(OnConflict::DeadLetter),
            "error" => Ok(OnConflict::Error),
            other => Err(format!("unknown on_conflict policy {other:?}")),
        }
    }
}

/// A dotted path into a JSON document, e.g. `newState.addressContent.addressTS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path(Vec<String>);

impl Path {
    pub fn parse(text: &str) -> Result<Path, String> {
        let segments: Vec<String> = text.split('.').map(str::to_string).collect();
        if segments.iter().any(|s| s.is_empty()) {
            return Err(format!("{text:?} is not a dotted path (like \"a.b.c\")"));
        }
        Ok(Path(segments))
    }

    pub fn segments(&self) -> &[String] {
        &self.0
    }

    /// The value at this path, if every step is an object holding the next segment.
    pub fn lookup<'v>(&self, root: &'v Value) -> Option<&'v Value> {
        self.0.iter().try_fold(root, |v, seg| v.as_object()?.get(seg))
    }

    /// The value at this path inside the object `root` (paths are never empty).
    pub fn lookup_in<'v>(&self, root: &'v serde_json::Map<String, Value>) -> Option<&'v Value> {
        let (first, rest) = self.0.split_first()?;
        rest.iter().try_fold(root.get(first)?, |v, seg| v.as_object()?.get(seg))
    }

    /// The object at this path inside `root`, created (as empty objects) where missing.
    /// `None` if something on the way is not an object.
    pub fn object_mut<'v>(&self, root: &'v mut Value) -> Option<&'v mut serde_json::Map<String, Value>> {
        let mut cur = root;
        for seg in &self.0 {
            let obj = cur.as_object_mut()?;
            cur = obj.entry(seg.clone()).or_insert_with(|| Value::Object(serde_json::Map::new()));
        }
        cur.as_object_mut()
    }

    /// Sets the value at this path (creating objects on the way; nothing if something on the way
    /// is not an object).
    pub fn set(&self, root: &mut Value, value: Value) {
        let Some((last, parents)) = self.0.split_last() else { return };
        if let Some(obj) = Path(parents.to_vec()).object_mut(root) {
            obj.insert(last.clone(), value);
        }
    }

    /// Sets the value at this path unless one is there already (creating objects on the way).
    pub fn set_default(&self, root: &mut Value, value: Value) {
        let Some((last, parents)) = self.0.split_last() else { return };
        if let Some(obj) = Path(parents.to_vec()).object_mut(root) {
            obj.entry(last.clone()).or_insert(value);
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// The column a JSON field lands in when nothing maps it explicitly and no column has its exact
/// name: its snake_case (`addressLine1` → `address_line1`, `addressTS` → `address_ts`).
pub fn column_name(field: &str) -> String {
    field.to_snake_case()
}

/// Where a JSON field lands in a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The writable column at this index of [`Table::columns`].
    Column(usize),
    /// A key column: keys come from the event root, never from the state.
    Key,
    /// Not stored (the replica keeps only what it declared).
    Unmapped,
}

/// A replica table as the core sees it: its key columns and its writable columns.
#[derive(Debug, Clone)]
pub struct Table {
    /// Key columns, in the order of the stream's key fields.
    pub key_columns: Vec<String>,
    /// Writable non-key columns (not generated, not identity-always), in table order.
    pub columns: Vec<String>,
    explicit: HashMap<String, String>,
    index: HashMap<String, usize>,
    keys: HashSet<String>,
    /// Field → target, memoised: the snake_case rule costs more than parsing the field.
    resolved: RefCell<HashMap<String, Target>>,
}

impl Table {
    /// `explicit` maps JSON field → column name (the stream's `columns` option).
    pub fn new(key_columns: Vec<String>, columns: Vec<String>, explicit: Vec<(String, String)>) -> Table {
        let index = columns.iter().enumerate().map(|(i, c)| (c.clone(), i)).collect();
        let keys = key_columns.iter().cloned().collect();
        Table {
            key_columns,
            columns,
            explicit: explicit.into_iter().collect(),
            index,
            keys,
            resolved: RefCell::new(HashMap::new()),
        }
    }

    /// Resolves a JSON field: the explicit mapping first, then a column of the same name,
    /// then its snake_case (`addressLine1` → `address_line1`).
    pub fn resolve(&self, field: &str) -> Target {
        if let Some(t) = self.resolved.borrow().get(field) {
            return *t;
        }
        let t = self.resolve_uncached(field);
        let mut memo = self.resolved.borrow_mut();
        if memo.len() < 10_000 {
            memo.insert(field.to_string(), t);
        }
        t
    }

    fn resolve_uncached(&self, field: &str) -> Target {
        if let Some(col) = self.explicit.get(field) {
            return self.target_of(col);
        }
        match self.target_of(field) {
            Target::Unmapped => self.target_of(&column_name(field)),
            found => found,
        }
    }

    /// The JSON field to write a column under when exporting: the explicitly mapped field, else
    /// the lowerCamelCase name if it resolves back to this column (`address_line2` →
    /// `addressLine2`), else the column name itself (which always resolves back).
    pub fn field_name(&self, column: usize) -> String {
        let name = &self.columns[column];
        let mut explicit: Vec<&String> = self.explicit.iter().filter(|(_, c)| *c == name).map(|(f, _)| f).collect();
        explicit.sort();
        if let Some(f) = explicit.first() {
            return (*f).clone();
        }
        let camel = name.to_lower_camel_case();
        if self.resolve(&camel) == Target::Column(column) {
            camel
        } else {
            name.clone()
        }
    }

    fn target_of(&self, column: &str) -> Target {
        if let Some(&i) = self.index.get(column) {
            Target::Column(i)
        } else if self.keys.contains(column) {
            Target::Key
        } else {
            Target::Unmapped
        }
    }
}

/// A child table of an aggregate snapshot.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    /// The name under `children` (e.g. `addresses`).
    pub name: String,
    /// Where the array sits, relative to the entity state (after `state_path`).
    pub path: Path,
    /// The child table; its `key_columns` are the child key columns and its `columns`
    /// exclude the parent key columns.
    pub table: Table,
    /// JSON fields of an element that form the child key, aligned with `table.key_columns`.
    pub key_fields: Vec<String>,
    /// Columns of the child table that hold the parent's key, aligned with the parent key.
    pub parent_columns: Vec<String>,
}

/// Everything the core needs to know about a stream.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub name: String,
    pub shape: Shape,
    /// Fields of the event object forming the entity key, aligned with `table.key_columns`.
    pub key_fields: Vec<String>,
    pub table: Table,
    /// Where the ECST event (key fields, `oldState`/`newState`) sits inside an envelope (`data`
    /// for CloudEvents, `payload` for Kafka Connect JSON); `None`: the payload is the event.
    pub event_path: Option<Path>,
    pub state_path: Option<Path>,
    /// Relative to the payload's root (an envelope's attribute, or a path into the event).
    pub version: Option<Path>,
    /// Relative to the payload's root, like `version`.
    pub event_id: Option<Path>,
    pub on_conflict: OnConflict,
    pub children: Vec<ChildSpec>,
    /// Checked against each payload (envelope and all) before anything else is read.
    pub schema: Option<crate::schema::Schema>,
}

impl StreamSpec {
    pub fn is_versioned(&self) -> bool {
        self.version.is_some()
    }

    /// For an entity snapshot whose version is one of the mapped state fields
    /// (`newState.<state_path>.<field>`), the column that field is written to: a replica row then
    /// carries its entity's version, which is what lets a bulk load skip the version-state write.
    pub fn version_column(&self) -> Option<usize> {
        if self.shape != Shape::EntitySnapshot {
            return None;
        }
        let version = self.version.as_ref()?.segments();
        let state: Vec<&str> = self
            .event_path
            .iter()
            .flat_map(|p| p.segments().iter().map(String::as_str))
            .chain(std::iter::once("newState"))
            .chain(self.state_path.iter().flat_map(|p| p.segments().iter().map(String::as_str)))
            .collect();
        let (field, prefix) = version.split_last()?;
        if prefix.len() != state.len() || prefix.iter().zip(&state).any(|(a, b)| a != b) {
            return None;
        }
        match self.table.resolve(field) {
            Target::Column(i) => Some(i),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table() -> Table {
        Table::new(
            vec!["address_id".into()],
            vec!["purpose".into(), "address_line1".into(), "line2".into()],
            vec![("addressPurpose".into(), "purpose".into())],
        )
    }

    #[test]
    fn fields_resolve_explicitly_then_by_name_then_snake_case() {
        let t = table();
        assert_eq!(t.resolve("addressPurpose"), Target::Column(0));
        assert_eq!(t.resolve("address_line1"), Target::Column(1));
        assert_eq!(t.resolve("addressLine1"), Target::Column(1));
        assert_eq!(t.resolve("line2"), Target::Column(2));
        assert_eq!(t.resolve("addressLine2"), Target::Unmapped);
        assert_eq!(t.resolve("addressId"), Target::Key);
        assert_eq!(t.resolve("socialSecurityNumber"), Target::Unmapped);
    }

    #[test]
    fn export_field_names_resolve_back_to_their_column() {
        let t = table();
        assert_eq!(t.field_name(0), "addressPurpose", "explicit mapping");
        assert_eq!(t.field_name(1), "addressLine1", "camelCase resolves back by snake_case");
        assert_eq!(t.field_name(2), "line2");
        for i in 0..t.columns.len() {
            assert_eq!(t.resolve(&t.field_name(i)), Target::Column(i));
        }
        let odd = Table::new(vec![], vec!["Weird Name".into(), "a__b".into()], vec![]);
        assert_eq!(odd.field_name(0), "Weird Name");
        assert_eq!(odd.resolve(&odd.field_name(1)), Target::Column(1));
    }

    #[test]
    fn paths_parse_and_look_up() {
        let p = Path::parse("newState.addressContent.addressTS").unwrap();
        let doc = json!({"newState": {"addressContent": {"addressTS": 5}}});
        assert_eq!(p.lookup(&doc), Some(&json!(5)));
        assert_eq!(Path::parse("newState.nope").unwrap().lookup(&doc), None);
        assert!(Path::parse("a..b").is_err());
        assert!(Path::parse("").is_err());
        assert_eq!(p.to_string(), "newState.addressContent.addressTS");
    }

    #[test]
    fn the_version_column_is_the_mapped_version_field() {
        let spec = |shape: Shape, state_path: Option<&str>, version: &str| StreamSpec {
            event_path: None,
            name: "s".into(),
            shape,
            key_fields: vec!["addressId".into()],
            table: table(),
            state_path: state_path.map(|p| Path::parse(p).unwrap()),
            version: Some(Path::parse(version).unwrap()),
            event_id: None,
            on_conflict: OnConflict::Apply,
            children: vec![],
            schema: None,
        };
        let s = spec(Shape::EntitySnapshot, Some("content"), "newState.content.addressLine1");
        assert_eq!(s.version_column(), Some(1));
        assert_eq!(spec(Shape::EntitySnapshot, None, "newState.line2").version_column(), Some(2));
        assert_eq!(spec(Shape::EntitySnapshot, Some("content"), "newState.line2").version_column(), None);
        assert_eq!(spec(Shape::EntitySnapshot, None, "newState.unmapped").version_column(), None);
        assert_eq!(spec(Shape::EntitySnapshot, None, "meta.line2").version_column(), None);
        assert_eq!(spec(Shape::EntitySnapshot, None, "line2").version_column(), None);
        assert_eq!(spec(Shape::Delta, None, "newState.line2").version_column(), None, "deltas keep field versions");
        let mut unversioned = spec(Shape::EntitySnapshot, None, "newState.line2");
        unversioned.version = None;
        assert_eq!(unversioned.version_column(), None);
    }

    #[test]
    fn names_parse() {
        assert_eq!("delta".parse::<Shape>().unwrap(), Shape::Delta);
        assert!("snapshot".parse::<Shape>().is_err());
        assert_eq!("dead_letter".parse::<OnConflict>().unwrap(), OnConflict::DeadLetter);
        assert!("ignore".parse::<OnConflict>().is_err());
    }
}

/// The text an entity's version state is kept under, from its key columns' canonical texts (each
/// type's output of its input): a single column's text, or the JSON array of a composite key's.
/// The SQL that reads keys back from replica rows (`snapshot::key_expr`) computes the same.
pub fn entity_key(mut canonical: Vec<String>) -> String {
    if canonical.len() == 1 {
        canonical.pop().expect("one key")
    } else {
        serde_json::to_string(&canonical).expect("strings serialise")
    }
}

/// The key columns' canonical texts back from an entity's text ([`entity_key`]'s inverse) for a key
/// of `columns` columns; `None` if the text is not one that `entity_key` makes.
pub fn entity_key_parts(key: &str, columns: usize) -> Option<Vec<String>> {
    if columns == 1 {
        return Some(vec![key.to_string()]);
    }
    serde_json::from_str::<Vec<String>>(key).ok().filter(|parts| parts.len() == columns)
}
