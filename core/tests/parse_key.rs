//! `event::parse_key` gives, for any JSON object, the key `event::parse` gives when it accepts
//! the event, and the same rejection when `parse` rejects the event for its key or its JSON.

use ecst_core::event::{parse, parse_key};
use ecst_core::examples::{address_delta, address_snapshot, customer_aggregate};
use ecst_core::reject::RejectCode;
use ecst_core::spec::{Path, StreamSpec};
use proptest::prelude::*;
use serde_json::Value;

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "[a-z0-9 \"\\\\\u{e9}]{0,6}".prop_map(Value::String),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((field(), inner), 0..5).prop_map(|f| Value::Object(f.into_iter().collect())),
        ]
    })
}

/// Field names that hit the specs' keys, states and versions often.
fn field() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("addressId".to_string()),
        Just("customerId".to_string()),
        Just("newState".to_string()),
        Just("oldState".to_string()),
        Just("addressContent".to_string()),
        Just("addressTS".to_string()),
        Just("ts".to_string()),
        "[a-z]{1,3}",
    ]
}

/// Root fields of an event that all three specs may accept: a key, a version, a state.
fn plausible_fields() -> impl Strategy<Value = Vec<(String, Value)>> {
    (scalar(), 0i64..100, prop::collection::vec((field(), scalar()), 0..4)).prop_map(|(key, ts, state)| {
        let content: serde_json::Map<String, Value> =
            state.into_iter().chain([("addressTS".into(), ts.into())]).collect();
        let state = serde_json::json!({ "addressContent": content });
        vec![
            ("addressId".into(), key.clone()),
            ("customerId".into(), key),
            ("ts".into(), ts.into()),
            ("newState".into(), state),
        ]
    })
}

/// An event object as text, with some root fields repeated (the last one counts).
fn event_text() -> impl Strategy<Value = String> {
    (
        prop_oneof![plausible_fields(), Just(Vec::new())],
        prop::collection::vec((field(), json()), 0..6),
        prop::collection::vec((field(), json()), 0..2),
    )
        .prop_map(|(plausible, fields, repeats)| {
            let fields: Vec<(String, Value)> = plausible.into_iter().chain(fields).collect();
            let mut parts: Vec<String> =
                fields.iter().chain(&repeats).map(|(k, v)| format!("{}:{}", Value::String(k.clone()), v)).collect();
            if parts.is_empty() {
                parts.push(r#""x":1"#.into());
            }
            format!("{{{}}}", parts.join(","))
        })
}

fn key_related(code: RejectCode) -> bool {
    matches!(code, RejectCode::InvalidJson | RejectCode::NotAnObject | RejectCode::MissingKey | RejectCode::InvalidKey)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]
    #[test]
    fn parse_key_agrees_with_parse(text in event_text(), envelope in 0u8..3) {
        // The same event bare, or as an envelope's `data` (an object, or a JSON string).
        let (text, event_path) = match envelope {
            0 => (text, None),
            1 => (format!(r#"{{"id":"e","data":{text}}}"#), Some(Path::parse("data").unwrap())),
            _ => (serde_json::json!({"id": "e", "data": text}).to_string(), Some(Path::parse("data").unwrap())),
        };
        for spec in [address_snapshot(), address_delta(), customer_aggregate()] {
            let spec = StreamSpec { event_path: event_path.clone(), ..spec };
            match parse(&spec, &text) {
                Ok(ev) => prop_assert_eq!(parse_key(&spec, &text).unwrap(), ev.key),
                Err(r) if r.code == RejectCode::MissingKey || r.code == RejectCode::InvalidKey => {
                    // Child keys are rejected with the same codes; only the root key must agree.
                    if let Err(k) = parse_key(&spec, &text) {
                        prop_assert!(key_related(k.code));
                    }
                }
                Err(r) if key_related(r.code) => {
                    let k = parse_key(&spec, &text).unwrap_err();
                    prop_assert_eq!((k.code, k.message), (r.code, r.message));
                }
                Err(_) => {}
            }
        }
    }
}

proptest! {
    /// An entity's text gives back the key columns' texts it was made of, whatever they hold
    /// (quotes, brackets, commas, text that looks like a JSON array).
    #[test]
    fn an_entity_key_splits_back_into_its_columns(parts in prop::collection::vec("[\\[\\]\",a-z0-9 \\\\\u{e9}]{0,8}", 1..4)) {
        let key = ecst_core::spec::entity_key(parts.clone());
        prop_assert_eq!(ecst_core::spec::entity_key_parts(&key, parts.len()), Some(parts));
    }
}
