//! From an AsyncAPI 3.x document to replicas: which messages the service receives, each
//! message's payload schema with its local `$ref`s inlined, and for each a plan — the inferred
//! shape, the key, and the SQL that creates the replica (and child) tables and the stream.
//! Nothing here runs SQL: the plan is text for a person to review and run.
//!
//! Inference, for a payload with `oldState`/`newState` (the state read from `newState`, else
//! `oldState`, at `x-ecst-state-path` when given):
//! - a state property holding an array of objects with an id property → `aggregate_snapshot`,
//!   each such array a child table;
//! - otherwise every state property optional → `delta`, every one required → `entity_snapshot`,
//!   a mix → no guess (the error names the properties that decide it; `x-ecst-shape` settles it);
//! - the key: `x-ecst-key`, else the one root property named `id` or ending in `Id`/`_id`.
//!
//! Extensions read (on the message, or on its payload): `x-ecst-shape`, `x-ecst-key` (a field or
//! an array of fields), `x-ecst-state-path`, `x-ecst-version`, `x-ecst-event-id`,
//! `x-ecst-event-path`; `x-ecst-key` on a child array's item schema names the child key.

use crate::spec::{column_name, Shape};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// What went wrong, for the shell to map to a SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Not an AsyncAPI document, or not one pg_ecst can read (22023).
    NotAsyncApi,
    /// An AsyncAPI version other than 3.x (0A000).
    UnsupportedVersion,
    /// A `$ref` outside the document, or a payload in a schema format other than JSON Schema (0A000).
    Unsupported,
    /// A `$ref` that points to nothing, or a recursive one (22023).
    BadRef,
    /// No such channel or message (42704).
    NotFound,
    /// A message whose shape, key or columns cannot be inferred (22023).
    CannotInfer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

fn error(kind: ErrorKind, message: impl Into<String>, hint: Option<&str>) -> Error {
    Error { kind, message: message.into(), hint: hint.map(str::to_string) }
}

const MARK_SHAPE: &str =
    "Mark the message (or its payload) with \"x-ecst-shape\": \"delta\", \"entity_snapshot\" or \"aggregate_snapshot\".";

/// An AsyncAPI 3.x document.
pub struct Document<'a> {
    root: &'a Value,
}

/// A message the service receives.
struct Received {
    name: String,
    message: Value,
}

impl<'a> Document<'a> {
    pub fn new(root: &'a Value) -> Result<Document<'a>, Error> {
        let hint = Some("pg_ecst reads AsyncAPI 3.x documents (JSON): an object with \"asyncapi\": \"3.0.0\".");
        let Some(obj) = root.as_object() else {
            return Err(error(ErrorKind::NotAsyncApi, "the document is not a JSON object", hint));
        };
        let version = match obj.get("asyncapi") {
            Some(Value::String(v)) => v,
            Some(_) => {
                return Err(error(ErrorKind::NotAsyncApi, "the document's \"asyncapi\" is not a version string", hint))
            }
            None if obj.contains_key("openapi") || obj.contains_key("swagger") => {
                return Err(error(ErrorKind::NotAsyncApi, "this is an OpenAPI document, not an AsyncAPI one", hint))
            }
            None => return Err(error(ErrorKind::NotAsyncApi, "the document has no \"asyncapi\" version field", hint)),
        };
        if version.starts_with("2.") {
            return Err(error(
                ErrorKind::UnsupportedVersion,
                format!("this is an AsyncAPI {version} document; pg_ecst reads AsyncAPI 3.x"),
                Some("Convert it with the AsyncAPI CLI: asyncapi convert <file> --target-version=3.0.0"),
            ));
        }
        if !version.starts_with("3.") {
            return Err(error(
                ErrorKind::UnsupportedVersion,
                format!("AsyncAPI version {version:?} is not supported; pg_ecst reads AsyncAPI 3.x"),
                None,
            ));
        }
        Ok(Document { root })
    }

    /// The object a local reference points to.
    fn lookup(&self, reference: &str, at: &str) -> Result<&'a Value, Error> {
        if !reference.starts_with('#') {
            return Err(error(
                ErrorKind::Unsupported,
                format!(
                    "{at} refers to {reference:?}, outside the document: pg_ecst reads one self-contained document"
                ),
                Some("Bundle the document first (asyncapi bundle), so that every $ref starts with \"#/\"."),
            ));
        }
        let pointer = percent_decode(&reference[1..]);
        self.root.pointer(&pointer).ok_or_else(|| {
            error(ErrorKind::BadRef, format!("{at} refers to {reference:?}, which is not in the document"), None)
        })
    }

    /// `v` with every `$ref` inlined (a `$ref` object is replaced by its target, as AsyncAPI's
    /// draft-07 schemas read it). `at` names where `v` is, for errors.
    pub fn inline(&self, v: &Value, at: &str) -> Result<Value, Error> {
        self.inline_in(v, at, &mut Vec::new())
    }

    fn inline_in(&self, v: &Value, at: &str, through: &mut Vec<String>) -> Result<Value, Error> {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    if through.contains(r) {
                        return Err(error(
                            ErrorKind::BadRef,
                            format!(
                                "{at}: the $ref {r:?} refers to itself (through {}); a recursive schema cannot be inlined",
                                through.join(" → ")
                            ),
                            Some("Describe the recursive part as an object without a $ref (it becomes a jsonb column)."),
                        ));
                    }
                    let target = self.lookup(r, at)?;
                    through.push(r.clone());
                    let out = self.inline_in(target, r, through);
                    through.pop();
                    return out;
                }
                let mut out = Map::new();
                for (k, item) in map {
                    // Values of these keywords are data, never schemas.
                    let data = matches!(k.as_str(), "enum" | "const" | "examples" | "default" | "example");
                    let item = if data { item.clone() } else { self.inline_in(item, &format!("{at}/{k}"), through)? };
                    out.insert(k.clone(), item);
                }
                Ok(Value::Object(out))
            }
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| self.inline_in(item, &format!("{at}/{i}"), through))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            other => Ok(other.clone()),
        }
    }

    fn channels(&self) -> BTreeMap<&'a str, &'a Value> {
        self.root
            .get("channels")
            .and_then(Value::as_object)
            .map(|m| m.iter().map(|(k, v)| (k.as_str(), v)).collect())
            .unwrap_or_default()
    }

    /// The channel key a `{"$ref": "#/channels/<key>"}` names.
    fn channel_key(&self, channel_ref: &Value, at: &str) -> Result<String, Error> {
        let r = channel_ref.get("$ref").and_then(Value::as_str).ok_or_else(|| {
            error(ErrorKind::NotAsyncApi, format!("{at}: \"channel\" must be a {{\"$ref\": \"#/channels/...\"}}"), None)
        })?;
        self.lookup(r, at)?;
        match r.strip_prefix("#/channels/") {
            Some(key) if !key.contains('/') => Ok(unescape(&percent_decode(key))),
            _ => {
                Err(error(ErrorKind::NotAsyncApi, format!("{at}: \"channel\" refers to {r:?}, not to a channel"), None))
            }
        }
    }

    /// The messages the document's `receive` operations take, on `channel` (a channel's key or
    /// address) or on every channel, in channel then message order, each once.
    fn received(&self, channel: Option<&str>) -> Result<Vec<Received>, Error> {
        let channels = self.channels();
        let wanted = match channel {
            None => None,
            Some(name) => {
                let key = channels
                    .iter()
                    .find(|(k, _)| **k == name)
                    .or_else(|| channels.iter().find(|(_, c)| c.get("address").and_then(Value::as_str) == Some(name)))
                    .map(|(k, _)| k.to_string());
                let known: Vec<&str> = channels.keys().copied().collect();
                Some(key.ok_or_else(|| {
                    error(
                        ErrorKind::NotFound,
                        format!("the document has no channel {name:?}"),
                        Some(&format!(
                            "Its channels: {}.",
                            if known.is_empty() { "none".into() } else { known.join(", ") }
                        )),
                    )
                })?)
            }
        };
        let operations = self.root.get("operations").and_then(Value::as_object);
        // channel key → the message keys its receive operations take (None: all of them).
        let mut taken: BTreeMap<String, Option<BTreeSet<String>>> = BTreeMap::new();
        for (op_name, op) in operations.into_iter().flatten() {
            let at = format!("operation {op_name:?}");
            let op = match op.get("$ref") {
                Some(_) => self.inline(op, &at)?,
                None => op.clone(),
            };
            if op.get("action").and_then(Value::as_str) != Some("receive") {
                continue;
            }
            let Some(channel_ref) = op.get("channel") else {
                return Err(error(ErrorKind::NotAsyncApi, format!("{at} has no \"channel\""), None));
            };
            let key = self.channel_key(channel_ref, &at)?;
            if wanted.as_ref().is_some_and(|w| *w != key) {
                continue;
            }
            let subset = match op.get("messages").and_then(Value::as_array) {
                None => None,
                Some(refs) => Some(
                    refs.iter()
                        .map(|m| {
                            let r = m.get("$ref").and_then(Value::as_str).unwrap_or_default();
                            let prefix = format!("#/channels/{key}/messages/");
                            r.strip_prefix(&prefix).map(|k| unescape(&percent_decode(k))).ok_or_else(|| {
                                error(
                                    ErrorKind::NotAsyncApi,
                                    format!("{at}: its messages must refer to messages of its channel ({prefix}...), not {r:?}"),
                                    None,
                                )
                            })
                        })
                        .collect::<Result<BTreeSet<_>, _>>()?,
                ),
            };
            let entry = taken.entry(key).or_insert_with(|| Some(BTreeSet::new()));
            match (entry.as_mut(), subset) {
                (_, None) => *entry = None,
                (Some(all), Some(more)) => all.extend(more),
                (None, Some(_)) => {}
            }
        }
        if taken.is_empty() {
            let on = channel.map(|c| format!(" on channel {c:?}")).unwrap_or_default();
            return Err(error(
                ErrorKind::NotFound,
                format!("no operation of the document receives messages{on}"),
                Some("pg_ecst builds replicas of the events a service receives: the document needs an operation with \"action\": \"receive\"."),
            ));
        }
        let mut out: Vec<Received> = Vec::new();
        for (key, subset) in taken {
            let channel = channels[key.as_str()];
            let channel = self.inline(channel, &format!("channel {key:?}"))?;
            let messages = channel.get("messages").and_then(Value::as_object).cloned().unwrap_or_default();
            for (name, message) in messages {
                if subset.as_ref().is_some_and(|s| !s.contains(&name)) {
                    continue;
                }
                if !out.iter().any(|r| r.name == name && r.message == message) {
                    out.push(Received { name, message });
                }
            }
        }
        Ok(out)
    }

    /// A message's payload schema, every `$ref` inlined. `name` is a message's key under a
    /// channel or under `components.messages`, or its `name`.
    pub fn message_schema(&self, name: &str) -> Result<Value, Error> {
        let mut candidates: Vec<(String, &String, &Value)> = Vec::new();
        for (key, channel) in self.channels() {
            if let Some(messages) = channel.get("messages").and_then(Value::as_object) {
                candidates.extend(messages.iter().map(|(k, m)| (format!("channel {key:?}, message {k:?}"), k, m)));
            }
        }
        let components = self.root.pointer("/components/messages").and_then(Value::as_object);
        candidates
            .extend(components.into_iter().flatten().map(|(k, m)| (format!("message {k:?} of components"), k, m)));
        let mut known = BTreeSet::new();
        for (at, key, m) in candidates {
            let key = key.clone();
            let message = self.inline(m, &at)?;
            let named = message.get("name").and_then(Value::as_str);
            if key == name || named == Some(name) {
                return payload_of(&message, name).cloned();
            }
            known.insert(named.map(str::to_string).unwrap_or(key));
        }
        let known: Vec<String> = known.into_iter().collect();
        Err(error(
            ErrorKind::NotFound,
            format!("the document has no message {name:?}"),
            Some(&format!("Its messages: {}.", if known.is_empty() { "none".into() } else { known.join(", ") })),
        ))
    }

    /// One plan per message the document's receive operations take (on `channel`, or all).
    /// `quote` quotes an identifier for SQL (the shell passes PostgreSQL's own).
    pub fn plan(&self, channel: Option<&str>, quote: &dyn Fn(&str) -> String) -> Result<Vec<Plan>, Error> {
        let received = self.received(channel)?;
        let mut taken: BTreeMap<String, String> = BTreeMap::new();
        received.iter().map(|r| plan_message(r, &mut taken, quote)).collect()
    }
}

/// The plan for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub message: String,
    pub shape: Shape,
    /// The key field(s), comma-separated.
    pub key: String,
    /// `CREATE TABLE` statements and the `ecst.create_stream` call, ready to run.
    pub sql: String,
}

/// A message's payload: the JSON Schema, also inside a multi-format schema object.
fn payload_of<'v>(message: &'v Value, name: &str) -> Result<&'v Value, Error> {
    let payload = message
        .get("payload")
        .ok_or_else(|| error(ErrorKind::CannotInfer, format!("message {name:?} has no payload schema"), None))?;
    match (payload.get("schemaFormat").and_then(Value::as_str), payload.get("schema")) {
        (Some(format), Some(schema)) => {
            let json_schema = format.starts_with("application/vnd.aai.asyncapi")
                || format.starts_with("application/schema+json")
                || format.starts_with("application/schema+yaml");
            if json_schema {
                Ok(schema)
            } else {
                Err(error(
                    ErrorKind::Unsupported,
                    format!(
                        "message {name:?}'s payload is in schema format {format:?}; pg_ecst reads JSON Schema payloads"
                    ),
                    None,
                ))
            }
        }
        _ => Ok(payload),
    }
}

/// An object schema flattened: its properties (with `allOf` merged in, and `oneOf`/`anyOf`
/// alternatives united) and the properties every alternative requires.
#[derive(Default)]
struct Object {
    properties: BTreeMap<String, Value>,
    required: BTreeSet<String>,
}

fn object_of(schema: &Value) -> Object {
    let mut out = Object::default();
    let Some(map) = schema.as_object() else { return out };
    if let Some(Value::Object(props)) = map.get("properties") {
        for (k, v) in props {
            out.properties.insert(k.clone(), v.clone());
        }
    }
    if let Some(Value::Array(req)) = map.get("required") {
        out.required.extend(req.iter().filter_map(Value::as_str).map(str::to_string));
    }
    for part in map.get("allOf").and_then(Value::as_array).into_iter().flatten() {
        let o = object_of(part);
        for (k, v) in o.properties {
            out.properties.entry(k).or_insert(v);
        }
        out.required.extend(o.required);
    }
    for key in ["oneOf", "anyOf"] {
        let alternatives: Vec<Object> = map
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|alt| !is_null_schema(alt))
            .map(object_of)
            .collect();
        if alternatives.is_empty() {
            continue;
        }
        let common: BTreeSet<String> = alternatives
            .iter()
            .map(|a| a.required.clone())
            .reduce(|a, b| a.intersection(&b).cloned().collect())
            .unwrap_or_default();
        for alt in alternatives {
            for (k, v) in alt.properties {
                out.properties.entry(k).or_insert(v);
            }
        }
        out.required.extend(common);
    }
    out
}

fn is_null_schema(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str) == Some("null")
}

/// The JSON types a schema allows (`type` as a string or an array), and whether null is one.
fn types_of(schema: &Value) -> (Vec<String>, bool) {
    let mut types: Vec<String> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.clone()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        _ => Vec::new(),
    };
    if types.is_empty() {
        for key in ["oneOf", "anyOf"] {
            for alt in schema.get(key).and_then(Value::as_array).into_iter().flatten() {
                for t in types_of(alt).0 {
                    if !types.contains(&t) {
                        types.push(t);
                    }
                }
                if is_null_schema(alt) && !types.contains(&"null".to_string()) {
                    types.push("null".into());
                }
            }
        }
    }
    if types.is_empty() {
        let values: Vec<&Value> = match (schema.get("enum"), schema.get("const")) {
            (Some(Value::Array(vs)), _) => vs.iter().collect(),
            (_, Some(c)) => vec![c],
            _ => Vec::new(),
        };
        for v in values {
            let t = match v {
                Value::String(_) => "string",
                Value::Bool(_) => "boolean",
                Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
                Value::Number(_) => "number",
                Value::Null => "null",
                _ => "object",
            };
            if !types.iter().any(|x| x == t) {
                types.push(t.to_string());
            }
        }
    }
    let nullable = types.iter().any(|t| t == "null");
    types.retain(|t| t != "null");
    (types, nullable)
}

/// The column type for a property's schema.
pub fn sql_type(schema: &Value) -> &'static str {
    let (types, _) = types_of(schema);
    let format = schema.get("format").and_then(Value::as_str);
    match types.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["string"] => match format {
            Some("date-time") => "timestamptz",
            Some("date") => "date",
            Some("uuid") => "uuid",
            _ => "text",
        },
        ["integer"] => "bigint",
        ["number"] | ["integer", "number"] | ["number", "integer"] => "numeric",
        ["boolean"] => "boolean",
        _ => "jsonb",
    }
}

fn extension<'v>(sources: &[&'v Value], name: &str) -> Option<&'v Value> {
    sources.iter().find_map(|s| s.get(name))
}

fn extension_text(sources: &[&Value], name: &str, message: &str) -> Result<Option<String>, Error> {
    match extension(sources, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(error(ErrorKind::CannotInfer, format!("message {message:?}: {name} must be a string"), None)),
    }
}

/// The schema at a dotted path of properties.
fn descend<'v>(schema: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.').try_fold(schema, |s, seg| s.get("properties")?.get(seg))
}

fn is_id_name(field: &str) -> bool {
    field == "id" || field.ends_with("Id") || field.ends_with("_id") || field.ends_with("ID")
}

struct Column {
    name: String,
    ty: &'static str,
    not_null: bool,
}

/// Non-child columns of a state object; errors on two fields that land in one column.
fn columns_of(
    state: &Object,
    skip_fields: &BTreeSet<String>,
    skip_columns: &[String],
    not_null: bool,
    message: &str,
) -> Result<Vec<Column>, Error> {
    let mut out: Vec<Column> = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for (field, schema) in &state.properties {
        if skip_fields.contains(field) {
            continue;
        }
        let name = column_name(field);
        if name.is_empty() {
            return Err(error(
                ErrorKind::CannotInfer,
                format!("message {message:?}: the state field {field:?} has no letter or digit to name a column after"),
                Some("Rename it in the document, or create the table by hand with a \"columns\" mapping."),
            ));
        }
        if skip_columns.contains(&name) {
            continue;
        }
        if let Some(other) = seen.insert(name.clone(), field.clone()) {
            return Err(error(
                ErrorKind::CannotInfer,
                format!(
                    "message {message:?}: the state fields {other:?} and {field:?} would both land in column {name:?}"
                ),
                Some("Rename one of them in the document, or create the table by hand with a \"columns\" mapping."),
            ));
        }
        let (_, nullable) = types_of(schema);
        out.push(Column {
            name,
            ty: sql_type(schema),
            not_null: not_null && state.required.contains(field) && !nullable,
        });
    }
    Ok(out)
}

struct Child {
    field: String,
    key_field: String,
    items: Object,
}

/// The state's arrays of objects with an id property: child tables of an aggregate.
fn children_of(state: &Object, message: &str) -> Result<Vec<Child>, Error> {
    let mut out = Vec::new();
    for (field, schema) in &state.properties {
        let (types, _) = types_of(schema);
        if types != ["array"] {
            continue;
        }
        let Some(items) = schema.get("items") else { continue };
        let item = object_of(items);
        if item.properties.is_empty() {
            continue;
        }
        let key_field = match items.get("x-ecst-key") {
            Some(Value::String(k)) => k.clone(),
            Some(_) => {
                return Err(error(
                    ErrorKind::CannotInfer,
                    format!("message {message:?}: x-ecst-key of {field}'s items must be one field name"),
                    None,
                ))
            }
            None => {
                let ids: Vec<&String> = item.properties.keys().filter(|k| is_id_name(k)).collect();
                // `addresses` → `addressId` first, when several ids are there.
                let singular =
                    field.strip_suffix("es").filter(|s| s.ends_with("ss")).or_else(|| field.strip_suffix('s'));
                let preferred = singular.map(|s| format!("{s}Id"));
                match (ids.as_slice(), preferred) {
                    ([], _) => continue,
                    ([one], _) => (*one).clone(),
                    (many, Some(p)) if many.iter().any(|k| **k == p) => p,
                    (many, _) => {
                        let names: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
                        return Err(error(
                            ErrorKind::CannotInfer,
                            format!(
                                "message {message:?}: the items of {field:?} have several id properties ({}); which one keys a child is not clear",
                                names.join(", ")
                            ),
                            Some("Mark the item schema with \"x-ecst-key\": \"<field>\"."),
                        ));
                    }
                }
            }
        };
        if !item.properties.contains_key(&key_field) {
            return Err(error(
                ErrorKind::CannotInfer,
                format!("message {message:?}: the child key {key_field:?} is not a property of {field:?}'s items"),
                None,
            ));
        }
        out.push(Child { field: field.clone(), key_field, items: item });
    }
    Ok(out)
}

/// A table name for `wanted` not taken yet (PostgreSQL truncates identifiers to 63 bytes).
fn unique_name(wanted: &str, owner: &str, taken: &mut BTreeMap<String, String>, notes: &mut Vec<String>) -> String {
    let truncate = |s: &str, max: usize| {
        let mut end = s.len().min(max);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].to_string()
    };
    let base = truncate(wanted, 63);
    let mut name = base.clone();
    let mut n = 2;
    while taken.contains_key(&name) {
        let suffix = format!("_{n}");
        name = format!("{}{suffix}", truncate(&base, 63 - suffix.len()));
        n += 1;
    }
    if name != wanted {
        let why = match taken.get(&base) {
            Some(other) => format!("{base:?} is taken by {other}"),
            None => format!("{wanted:?} is longer than PostgreSQL's 63-byte names"),
        };
        notes.push(format!("-- {why}: this one is named {name:?}."));
    }
    taken.insert(name.clone(), owner.to_string());
    name
}

/// A SQL string literal (as PostgreSQL's `quote_literal` writes it).
pub fn literal(s: &str) -> String {
    let body = s.replace('\'', "''");
    if body.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

fn create_table(name: &str, columns: &[Column], primary_key: &[String], quote: &dyn Fn(&str) -> String) -> String {
    let mut lines: Vec<String> = columns
        .iter()
        .map(|c| format!("    {} {}{}", quote(&c.name), c.ty, if c.not_null { " NOT NULL" } else { "" }))
        .collect();
    let pk: Vec<String> = primary_key.iter().map(|c| quote(c)).collect();
    lines.push(format!("    PRIMARY KEY ({})", pk.join(", ")));
    format!("CREATE TABLE {} (\n{}\n);\n", quote(name), lines.join(",\n"))
}

fn plan_message(
    r: &Received,
    taken: &mut BTreeMap<String, String>,
    quote: &dyn Fn(&str) -> String,
) -> Result<Plan, Error> {
    let name = r.name.as_str();
    let payload = payload_of(&r.message, name)?;
    let sources = [&r.message, payload];
    let event_path = extension_text(&sources, "x-ecst-event-path", name)?;
    let event_schema = match &event_path {
        None => payload,
        Some(p) => descend(payload, p).ok_or_else(|| {
            error(
                ErrorKind::CannotInfer,
                format!("message {name:?}: its payload has no property at x-ecst-event-path {p:?}"),
                None,
            )
        })?,
    };
    let event = object_of(event_schema);
    let state_schema = ["newState", "oldState"].iter().find_map(|s| event.properties.get(*s)).ok_or_else(|| {
        error(
            ErrorKind::CannotInfer,
            format!("message {name:?}: its payload has no newState or oldState property, so it is not an ECST event"),
            Some("Give the payload oldState/newState properties, or point x-ecst-event-path at the event inside an envelope."),
        )
    })?;
    let state_path = extension_text(&sources, "x-ecst-state-path", name)?;
    let entity_schema = match &state_path {
        None => state_schema,
        Some(p) => descend(state_schema, p).ok_or_else(|| {
            error(
                ErrorKind::CannotInfer,
                format!("message {name:?}: its state has no property at x-ecst-state-path {p:?}"),
                None,
            )
        })?,
    };
    let entity = object_of(entity_schema);

    // The key.
    let key_fields: Vec<String> = match extension(&sources, "x-ecst-key") {
        Some(Value::String(k)) => vec![k.clone()],
        Some(Value::Array(ks)) if !ks.is_empty() && ks.iter().all(Value::is_string) => {
            ks.iter().filter_map(Value::as_str).map(str::to_string).collect()
        }
        Some(_) => {
            return Err(error(
                ErrorKind::CannotInfer,
                format!("message {name:?}: x-ecst-key must be a field name or an array of them"),
                None,
            ))
        }
        None => {
            let ids: Vec<&String> = event
                .properties
                .keys()
                .filter(|k| is_id_name(k) && !matches!(k.as_str(), "oldState" | "newState"))
                .collect();
            match ids.as_slice() {
                [one] => vec![(*one).clone()],
                [] => {
                    return Err(error(
                        ErrorKind::CannotInfer,
                        format!(
                            "message {name:?}: no root property of its payload is named like a key (\"id\", \"...Id\")"
                        ),
                        Some("Mark the message with \"x-ecst-key\": \"<field>\" (or an array of fields)."),
                    ))
                }
                many => {
                    let names: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
                    return Err(error(
                        ErrorKind::CannotInfer,
                        format!("message {name:?}: several root properties could be its key ({})", names.join(", ")),
                        Some("Mark the message with \"x-ecst-key\": \"<field>\" (or an array of fields)."),
                    ));
                }
            }
        }
    };
    let key_columns: Vec<String> = key_fields.iter().map(|f| column_name(f)).collect();

    // The shape.
    let children = children_of(&entity, name)?;
    let shape = match extension_text(&sources, "x-ecst-shape", name)? {
        Some(s) => s.parse::<Shape>().map_err(|e| {
            error(ErrorKind::CannotInfer, format!("message {name:?}: x-ecst-shape: {e}; use {}", Shape::NAMES), None)
        })?,
        None if !children.is_empty() => Shape::AggregateSnapshot,
        None => {
            if entity.properties.is_empty() {
                return Err(error(
                    ErrorKind::CannotInfer,
                    format!("message {name:?}: its state declares no properties, so neither its columns nor its shape can be told"),
                    Some(MARK_SHAPE),
                ));
            }
            let required: Vec<&str> =
                entity.properties.keys().filter(|k| entity.required.contains(*k)).map(String::as_str).collect();
            let optional: Vec<&str> =
                entity.properties.keys().filter(|k| !entity.required.contains(*k)).map(String::as_str).collect();
            match (required.is_empty(), optional.is_empty()) {
                (true, _) => Shape::Delta,
                (false, true) => Shape::EntitySnapshot,
                (false, false) => {
                    return Err(error(
                        ErrorKind::CannotInfer,
                        format!(
                            "message {name:?}: its state requires {} but not {}: a delta makes every property optional, a snapshot requires them all",
                            required.join(", "),
                            optional.join(", ")
                        ),
                        Some(MARK_SHAPE),
                    ))
                }
            }
        }
    };
    let children = if shape == Shape::AggregateSnapshot { children } else { Vec::new() };

    // Tables.
    let mut notes = Vec::new();
    let mut snake = column_name(name);
    if snake.is_empty() {
        notes.push(format!("-- message {name:?} has no letter or digit to name a table after."));
        snake = "message".into();
    }
    let table = unique_name(&snake, &format!("message {name}"), taken, &mut notes);
    let key_schema = |f: &str| event.properties.get(f).cloned().unwrap_or(Value::Null);
    let mut columns: Vec<Column> = key_fields
        .iter()
        .zip(&key_columns)
        .map(|(f, c)| Column { name: c.clone(), ty: sql_type(&key_schema(f)), not_null: true })
        .collect();
    let child_fields: BTreeSet<String> = children.iter().map(|c| c.field.clone()).collect();
    columns.extend(columns_of(&entity, &child_fields, &key_columns, shape.is_snapshot(), name)?);
    let mut sql = notes.join("\n");
    if !sql.is_empty() {
        sql.push('\n');
    }
    sql.push_str(&create_table(&table, &columns, &key_columns, quote));
    let described = ["description", "summary"].iter().find_map(|k| r.message.get(*k).and_then(Value::as_str));
    if let Some(description) = described {
        sql.push_str(&format!("COMMENT ON TABLE {} IS {};\n", quote(&table), literal(description)));
    }

    let mut child_defs = Map::new();
    for child in &children {
        let mut notes = Vec::new();
        let child_table = unique_name(
            &format!("{table}_{}", column_name(&child.field)),
            &format!("message {name}'s {}", child.field),
            taken,
            &mut notes,
        );
        let child_key = column_name(&child.key_field);
        // The parent's key columns come first; a child field of the same name is the parent key.
        let mut cols: Vec<Column> = key_fields
            .iter()
            .zip(&key_columns)
            .map(|(f, c)| Column { name: c.clone(), ty: sql_type(&key_schema(f)), not_null: true })
            .collect();
        if key_columns.contains(&child_key) {
            return Err(error(
                ErrorKind::CannotInfer,
                format!(
                    "message {name:?}: the child key {:?} of {:?} has the name of the parent's key column",
                    child.key_field, child.field
                ),
                Some("Mark the item schema with \"x-ecst-key\": \"<another field>\"."),
            ));
        }
        cols.push(Column {
            name: child_key.clone(),
            ty: sql_type(child.items.properties.get(&child.key_field).unwrap_or(&Value::Null)),
            not_null: true,
        });
        let skip: Vec<String> = key_columns.iter().chain([&child_key]).cloned().collect();
        cols.extend(columns_of(&child.items, &BTreeSet::new(), &skip, true, name)?);
        let pk: Vec<String> = key_columns.iter().chain([&child_key]).cloned().collect();
        for n in notes {
            sql.push_str(&n);
            sql.push('\n');
        }
        sql.push_str(&create_table(&child_table, &cols, &pk, quote));
        let mut def = Map::new();
        // Relative to the entity state (after state_path), as create_stream reads it.
        def.insert("path".into(), Value::String(child.field.clone()));
        def.insert("table".into(), Value::String(quote(&child_table)));
        def.insert("key".into(), serde_json::json!({ child.key_field.clone(): child_key }));
        // The child holds the aggregate's key in columns of the same names: by name, since an
        // array would be matched to the key's fields sorted by name, not in this order.
        def.insert(
            "parent_key".into(),
            if key_columns.len() == 1 {
                Value::String(key_columns[0].clone())
            } else {
                Value::Object(key_columns.iter().map(|c| (c.clone(), Value::String(c.clone()))).collect())
            },
        );
        child_defs.insert(child.field.clone(), Value::Object(def));
    }

    // The stream.
    let key_map: Map<String, Value> =
        key_fields.iter().zip(&key_columns).map(|(f, c)| (f.clone(), Value::String(c.clone()))).collect();
    let mut args = vec![
        format!("name => {}", literal(&table)),
        format!("target => {}", literal(&quote(&table))),
        format!("shape => {}", literal(shape.as_str())),
        format!("key => {}", literal(&Value::Object(key_map).to_string())),
    ];
    if let Some(p) = &state_path {
        args.push(format!("state_path => {}", literal(p)));
    }
    if let Some(p) = extension_text(&sources, "x-ecst-version", name)? {
        args.push(format!("version => {}", literal(&p)));
    }
    if let Some(p) = extension_text(&sources, "x-ecst-event-id", name)? {
        args.push(format!("event_id => {}", literal(&p)));
    }
    if !child_defs.is_empty() {
        args.push(format!("children => {}", literal(&Value::Object(child_defs).to_string())));
    }
    if let Some(p) = &event_path {
        args.push(format!("event_path => {}", literal(p)));
    }
    args.push(format!("schema => {}", literal(&payload.to_string())));
    sql.push_str(&format!("SELECT ecst.create_stream(\n    {}\n);\n", args.join(",\n    ")));
    Ok(Plan { message: name.to_string(), shape, key: key_fields.join(", "), sql })
}

/// `%XX` escapes of a URI fragment decoded (JSON pointers in `$ref`s are URI fragments).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A JSON pointer segment's `~1`/`~0` escapes undone.
fn unescape(segment: &str) -> String {
    segment.replace("~1", "/").replace("~0", "~")
}

#[cfg(test)]
mod tests;
