//! A stream's JSON Schema (`create_stream(..., schema => ...)`): compiled once, checked against
//! every payload (as received: an envelope's too, as an AsyncAPI message payload describes what
//! travels) before the event is read. A failing event is a `schema_violation` rejection
//! whose message names each violation by its path in the event.
//!
//! Validation is `jsonschema`'s (drafts 4 to 2020-12, chosen by `$schema`, 2020-12 otherwise),
//! with `format` asserted: a `date-time` that is not one is a violation here, not a value error
//! later in a column. References must be local (`#/...`): a stream never fetches anything.

use crate::reject::{RejectCode, Rejection};
use serde_json::Value;
use std::fmt;
use std::sync::Arc;

/// How many violations a dead letter's message spells out (the rest are counted).
pub const SHOWN: usize = 5;
/// Violations are counted up to this many (an event can violate a schema without bound).
const COUNTED: usize = 1000;

/// A compiled JSON Schema. Cloning shares the compiled form.
#[derive(Clone)]
pub struct Schema {
    validator: Arc<jsonschema::Validator>,
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Schema(..)")
    }
}

/// Why a schema does not compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Schema {
    /// Compiles `schema`.
    pub fn compile(schema: &Value) -> Result<Schema, SchemaError> {
        if !matches!(schema, Value::Object(_) | Value::Bool(_)) {
            return Err(SchemaError {
                message: format!(
                    "a JSON Schema is an object (or true/false), not {}",
                    crate::version::json_type(schema)
                ),
                hint: None,
            });
        }
        if schema.get("asyncapi").is_some() {
            return Err(SchemaError {
                message: "this is an AsyncAPI document, not the JSON Schema of one message".into(),
                hint: Some("Take one message's schema with ecst.asyncapi_message_schema(doc, message).".into()),
            });
        }
        if let Some(r) = first_external_ref(schema) {
            return Err(SchemaError {
                message: format!("the schema refers to {r:?}, outside itself: pg_ecst never fetches schemas"),
                hint: Some(
                    "Inline the referenced schema, or put it under \"$defs\" and refer to it as \"#/$defs/...\"."
                        .into(),
                ),
            });
        }
        if let Some(r) = first_dangling_ref(schema) {
            return Err(SchemaError {
                message: format!("the schema's $ref {r:?} points to nothing in the schema"),
                hint: Some(
                    "A schema taken from an AsyncAPI document refers to the document's components: \
                     ecst.asyncapi_message_schema(doc, message) returns it with those references resolved."
                        .into(),
                ),
            });
        }
        let validator = jsonschema::options().should_validate_formats(true).build(schema).map_err(|e| {
            let at = e.schema_path().as_str();
            let at = if at.is_empty() { String::new() } else { format!(" (at {at})") };
            let message = e.to_string();
            let hint =
                (message.contains("$ref") || message.contains("registry") || message.contains("pointer")).then(|| {
                    "A schema taken from an AsyncAPI document refers to the document's components: \
                     ecst.asyncapi_message_schema(doc, message) returns it with those references resolved."
                        .to_string()
                });
            SchemaError { message: format!("the schema is not valid JSON Schema: {message}{at}"), hint }
        })?;
        Ok(Schema { validator: Arc::new(validator) })
    }

    /// `Ok` if `payload` (the whole payload, envelope and all) satisfies the schema; otherwise a `schema_violation` naming the first
    /// [`SHOWN`] violations by path, and how many there are.
    pub fn check(&self, payload: &Value) -> Result<(), Rejection> {
        if self.validator.is_valid(payload) {
            return Ok(());
        }
        let mut shown = Vec::new();
        let mut count = 0usize;
        for e in self.validator.iter_errors(payload).take(COUNTED) {
            count += 1;
            if shown.len() < SHOWN {
                shown.push(self.describe(&e));
            }
        }
        let more = if count > shown.len() {
            format!("; and {}{} more", count - shown.len(), if count == COUNTED { " or" } else { "" })
        } else {
            String::new()
        };
        let n = if count == 1 {
            "1 violation".to_string()
        } else {
            format!("{count}{} violations", if count == COUNTED { "+" } else { "" })
        };
        Err(Rejection::new(
            RejectCode::SchemaViolation,
            format!("the event does not match the stream's schema ({n}): {}{more}", shown.join("; ")),
        ))
    }

    fn describe(&self, e: &jsonschema::ValidationError<'_>) -> String {
        let mut path = String::new();
        for segment in e.instance_path().iter() {
            match segment {
                jsonschema::paths::LocationSegment::Property(p) => push_property(&mut path, &p),
                jsonschema::paths::LocationSegment::Index(i) => path.push_str(&format!("[{i}]")),
            }
        }
        match e.kind() {
            jsonschema::error::ValidationErrorKind::Required { property } => {
                push_property(&mut path, property.as_str().unwrap_or_default());
                format!("{path}: required, missing")
            }
            _ if path.is_empty() => format!("(the payload): {e}"),
            _ => format!("{path}: {e}"),
        }
    }
}

/// Appends `.name` (or `["name"]` where a dot would be ambiguous) to a dotted path.
fn push_property(path: &mut String, name: &str) {
    let plain = !name.is_empty() && !name.contains(['.', '[', ']', '"', ' ']);
    match (plain, path.is_empty()) {
        (true, true) => path.push_str(name),
        (true, false) => {
            path.push('.');
            path.push_str(name);
        }
        (false, _) => path.push_str(&format!("[{}]", Value::String(name.to_string()))),
    }
}

/// The first `#/...` reference that does not resolve in `root` (not checked when a nested `$id`
/// makes references relative to a part of it: the validator's compiler then judges).
fn first_dangling_ref(root: &Value) -> Option<String> {
    fn refs<'v>(v: &'v Value, out: &mut Vec<&'v str>, nested_id: &mut bool, depth: usize) {
        match v {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    out.push(r);
                }
                if depth > 0 && map.contains_key("$id") {
                    *nested_id = true;
                }
                for (k, v) in map {
                    if !matches!(k.as_str(), "enum" | "const" | "examples" | "default") {
                        refs(v, out, nested_id, depth + 1);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| refs(v, out, nested_id, depth + 1)),
            _ => {}
        }
    }
    let (mut found, mut nested_id) = (Vec::new(), false);
    refs(root, &mut found, &mut nested_id, 0);
    if nested_id {
        return None;
    }
    found
        .into_iter()
        .find(|r| r.starts_with("#/") && !r.contains('%') && root.pointer(&r[1..]).is_none())
        .map(str::to_string)
}

/// The first `$ref` that does not point inside the schema itself.
fn first_external_ref(schema: &Value) -> Option<String> {
    match schema {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                if !r.starts_with('#') {
                    return Some(r.clone());
                }
            }
            // Values of `enum`/`const`/`examples`/`default` are data, not schemas.
            map.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "enum" | "const" | "examples" | "default"))
                .find_map(|(_, v)| first_external_ref(v))
        }
        Value::Array(items) => items.iter().find_map(first_external_ref),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn full_address() -> Value {
        json!({
            "type": "object",
            "properties": {
                "addressId": {"type": "string"},
                "newState": {
                    "type": "object",
                    "required": ["addressLine1", "addressTS"],
                    "properties": {
                        "addressLine1": {"type": "string"},
                        "addressTS": {"type": "number"},
                        "since": {"type": "string", "format": "date"}
                    }
                }
            }
        })
    }

    #[test]
    fn valid_events_pass() {
        let s = Schema::compile(&full_address()).unwrap();
        assert!(s.check(&json!({"addressId": "1", "newState": {"addressLine1": "x", "addressTS": 3}})).is_ok());
        assert!(s.check(&json!({"addressId": "1", "oldState": {}})).is_ok(), "a delete has no newState");
    }

    #[test]
    fn violations_are_named_by_path() {
        let s = Schema::compile(&full_address()).unwrap();
        let r = s.check(&json!({"addressId": 7, "newState": {"addressTS": "soon", "since": "yesterday"}})).unwrap_err();
        assert_eq!(r.code, RejectCode::SchemaViolation);
        assert!(r.message.contains("(4 violations)"), "{}", r.message);
        assert!(r.message.contains("newState.addressLine1: required, missing"), "{}", r.message);
        assert!(r.message.contains("newState.addressTS: \"soon\" is not of type \"number\""), "{}", r.message);
        assert!(r.message.contains("addressId: 7 is not of type \"string\""), "{}", r.message);
        assert!(r.message.contains("newState.since: "), "formats are asserted: {}", r.message);
    }

    #[test]
    fn many_violations_are_counted_not_listed() {
        let props: serde_json::Map<String, Value> =
            (0..12).map(|i| (format!("f{i}"), json!({"type": "string"}))).collect();
        let s = Schema::compile(&json!({"type": "object", "properties": props})).unwrap();
        let event: serde_json::Map<String, Value> = (0..12).map(|i| (format!("f{i}"), json!(i))).collect();
        let r = s.check(&Value::Object(event)).unwrap_err();
        assert!(r.message.contains("(12 violations)"), "{}", r.message);
        assert!(r.message.ends_with("; and 7 more"), "{}", r.message);
        assert_eq!(r.message.matches("is not of type").count(), SHOWN);
        assert!(r.message.contains("f1: 1 is not"), "{}", r.message);
    }

    #[test]
    fn odd_property_names_are_bracketed() {
        let s = Schema::compile(&json!({"required": ["a.b"]})).unwrap();
        let r = s.check(&json!({})).unwrap_err();
        assert!(r.message.contains("[\"a.b\"]: required, missing"), "{}", r.message);
    }

    #[test]
    fn bad_schemas_are_explained() {
        let e = Schema::compile(&json!({"type": "nope"})).unwrap_err();
        assert!(e.message.starts_with("the schema is not valid JSON Schema"), "{e}");
        let e = Schema::compile(&json!({"$ref": "https://example.com/a.json"})).unwrap_err();
        assert!(e.message.contains("https://example.com/a.json"), "{e}");
        let e = Schema::compile(&json!({"properties": {"a": {"$ref": "common.json#/A"}}})).unwrap_err();
        assert!(e.message.contains("common.json#/A"), "{e}");
        let e = Schema::compile(&json!({"$ref": "#/components/schemas/A"})).unwrap_err();
        assert!(e.hint.unwrap_or_default().contains("asyncapi_message_schema"));
        let e = Schema::compile(&json!({"asyncapi": "3.0.0"})).unwrap_err();
        assert!(e.hint.unwrap().contains("asyncapi_message_schema"));
        assert!(Schema::compile(&json!([1])).is_err());
        assert!(Schema::compile(&json!({"$defs": {"A": {"type": "string"}}, "$ref": "#/$defs/A"})).is_ok());
        assert!(Schema::compile(&json!({"enum": [{"$ref": "x.json"}]})).is_ok(), "enum values are data");
    }

    #[test]
    fn big_numbers_are_numbers() {
        let s = Schema::compile(&json!({"properties": {"n": {"type": "integer"}}})).unwrap();
        let v: Value = serde_json::from_str(r#"{"n": 123456789012345678901234567890}"#).unwrap();
        assert!(s.check(&v).is_ok());
        let v: Value = serde_json::from_str(r#"{"n": 1.5}"#).unwrap();
        assert!(s.check(&v).is_err());
    }
}
