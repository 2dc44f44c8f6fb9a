use super::*;
use crate::examples::{address_delta, address_snapshot, customer_aggregate};
use crate::reject::RejectCode;
use crate::spec::{Path, StreamSpec};
use crate::version::Version;

const SNAPSHOT: &str = include_str!("../../../tests/fixtures/fine_grained_snapshot.json");
const DELTA: &str = include_str!("../../../tests/fixtures/fine_grained_delta.json");
const AGGREGATE: &str = include_str!("../../../tests/fixtures/aggregate_snapshot.json");

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn code(spec: &StreamSpec, payload: &str) -> RejectCode {
    parse(spec, payload).unwrap_err().code
}

#[test]
fn fixture_snapshot_maps_every_column() {
    let ev = parse(&address_snapshot(), SNAPSHOT).unwrap();
    assert_eq!(ev.key, vec!["12366"]);
    assert_eq!(ev.version, Some(Version::from_i64(1572134205)));
    let Op::Upsert { cells, children } = &ev.op else { panic!("expected an upsert") };
    assert!(children.is_empty());
    let values: Vec<(&str, &Value)> = cells.iter().map(|c| (c.field.as_str(), &c.value)).collect();
    assert_eq!(
        values,
        vec![
            ("addressPurpose", &text("billing")),
            ("addressLine1", &text("48 Baker Street")),
            ("addressLine2", &text("London, UK, E1 7AE")),
            ("addressTS", &text("1572134205")),
        ]
    );
    assert_eq!(ev.old.len(), 4, "oldState cells are kept for the conflict check");
}

#[test]
fn fixture_delta_keeps_only_changed_fields() {
    let mut spec = address_delta();
    spec.version = None;
    let ev = parse(&spec, DELTA).unwrap();
    let Op::Upsert { cells, .. } = &ev.op else { panic!() };
    assert_eq!(cells.len(), 1);
    assert_eq!(cells[0].column, 1);
    assert_eq!(cells[0].value, text("48 Baker Street"));
    assert_eq!(ev.old[0].value, text("84 Baker Street"));
}

#[test]
fn fixture_aggregate_with_repeated_child_key_is_rejected_naming_the_key() {
    let err = parse(&customer_aggregate(), AGGREGATE).unwrap_err();
    assert_eq!(err.code, RejectCode::DuplicateChildKey);
    assert!(err.message.contains("addressId=\"123124\""), "{}", err.message);
    assert!(err.message.contains("elements 2, 3, 4"), "{}", err.message);
}

#[test]
fn aggregate_children_are_full_rows() {
    let payload = r#"{"customerId": 7, "newState": {"name": "Ada", "addressContent": {"addresses": [
        {"addressId": "a", "addressLine1": "x", "addressTS": 3},
        {"addressId": "b", "addressPurpose": "shipping"}]}}}"#;
    let ev = parse(&customer_aggregate(), payload).unwrap();
    assert_eq!(ev.key, vec!["7"]);
    let Op::Upsert { cells, children } = &ev.op else { panic!() };
    assert_eq!(cells, &vec![Cell { column: 0, field: "name".into(), value: text("Ada") }]);
    assert_eq!(children[0].rows.len(), 2);
    assert_eq!(children[0].rows[1].key, vec!["b"]);
    assert_eq!(children[0].rows[1].cells.len(), 4, "absent child fields are NULL cells");
    assert_eq!(children[0].rows[1].cells[1].value, Value::Null);
}

#[test]
fn create_update_delete_are_inferred() {
    let spec = address_delta();
    let ev = parse(&spec, r#"{"addressId":"1","ts":1,"newState":{"addressLine1":"a"}}"#).unwrap();
    assert!(matches!(ev.op, Op::Upsert { .. }) && ev.old.is_empty());
    let ev = parse(&spec, r#"{"addressId":"1","ts":2,"oldState":{"line1":"a"},"newState":{"line1":"b"}}"#).unwrap();
    assert!(matches!(ev.op, Op::Upsert { .. }) && ev.old.len() == 1);
    let ev = parse(&spec, r#"{"addressId":"1","ts":3,"oldState":{"line1":"b"}}"#).unwrap();
    assert_eq!(ev.op, Op::Delete);
    let ev = parse(&spec, r#"{"addressId":"1","ts":3,"oldState":{"line1":"b"},"newState":null}"#).unwrap();
    assert_eq!(ev.op, Op::Delete);
    assert_eq!(code(&spec, r#"{"addressId":"1","ts":4}"#), RejectCode::NoState);
    assert_eq!(code(&spec, r#"{"addressId":"1","ts":4,"oldState":null,"newState":null}"#), RejectCode::NoState);
}

#[test]
fn explicit_null_is_kept_and_unmapped_fields_are_dropped() {
    let ev =
        parse(&address_delta(), r#"{"addressId":"1","ts":1,"newState":{"addressLine2":null,"ssn":"123"}}"#).unwrap();
    let Op::Upsert { cells, .. } = ev.op else { panic!() };
    assert_eq!(cells, vec![Cell { column: 2, field: "addressLine2".into(), value: Value::Null }]);
}

#[test]
fn values_become_input_text() {
    let ev = parse(
        &address_delta(),
        r#"{"addressId":"1","ts":1,"newState":{"addressPurpose":true,"addressLine2":{"a":[1,2]},"addressTS":12345678901234567890123}}"#,
    )
    .unwrap();
    let Op::Upsert { cells, .. } = ev.op else { panic!() };
    assert_eq!(cells[0].value, text("true"));
    assert_eq!(cells[1].value, text(r#"{"a":[1,2]}"#));
    assert_eq!(cells[2].value, text("12345678901234567890123"), "big numbers keep every digit");
}

#[test]
fn text_that_is_not_json_is_explained_in_words() {
    let spec = address_delta();
    let message = |text: &str| parse(&spec, text).unwrap_err().message;
    assert_eq!(
        message("this is not json"),
        "payload is not valid JSON: a word that is not true, false or null (strings need double quotes) \
         (line 1, column 2, near \"this is not json\"; the parser says: expected ident)"
    );
    assert_eq!(
        message("hello"),
        "payload is not valid JSON: it does not start with a JSON value (line 1, column 1, near \"hello\"; \
         the parser says: expected value)"
    );
    assert!(message(r#"{"addressId": "1", "newState": "#).starts_with("payload is not valid JSON: the text ends"));
    assert!(message(r#"{"a": 1} x"#).contains("more text follows the JSON value"));
    assert!(message(r#"{a: 1}"#).contains("an object key that is not a double-quoted string"));
    let line2 = message("{\"a\": 1,\n \"b\": nope}");
    assert!(line2.contains("(line 2, column 8, near \" \\\"b\\\": nope}\""), "{line2}");
}

#[test]
fn bad_input_is_rejected_with_a_reason() {
    let spec = address_delta();
    assert_eq!(code(&spec, "not json"), RejectCode::InvalidJson);
    assert_eq!(code(&spec, "[1,2]"), RejectCode::NotAnObject);
    assert_eq!(code(&spec, r#"{"ts":1,"newState":{}}"#), RejectCode::MissingKey);
    assert_eq!(code(&spec, r#"{"addressId":null,"ts":1,"newState":{}}"#), RejectCode::MissingKey);
    assert_eq!(code(&spec, r#"{"addressId":["a"],"ts":1,"newState":{}}"#), RejectCode::InvalidKey);
    assert_eq!(code(&spec, r#"{"addressId":{"a":1},"ts":1,"newState":{}}"#), RejectCode::InvalidKey);
    assert_eq!(code(&spec, r#"{"addressId":"a\u0000","ts":1,"newState":{}}"#), RejectCode::InvalidKey);
    assert_eq!(code(&spec, r#"{"addressId":"1","ts":1,"newState":"x"}"#), RejectCode::InvalidState);
    assert_eq!(code(&spec, r#"{"addressId":"1","ts":1,"oldState":[1],"newState":{}}"#), RejectCode::InvalidState);
    assert_eq!(code(&spec, r#"{"addressId":"1","newState":{}}"#), RejectCode::MissingVersion);
    assert_eq!(code(&spec, r#"{"addressId":"1","ts":"soon","newState":{}}"#), RejectCode::InvalidVersion);
    assert_eq!(code(&spec, r#"{"addressId":"1","ts":1e400000,"newState":{}}"#), RejectCode::InvalidVersion);
    assert_eq!(code(&spec, r#"{"addressId":"1","ts":1,"newState":{"line1":"a\u0000"}}"#), RejectCode::InvalidValue);
    let with_ids = StreamSpec { event_id: Some(Path::parse("eid").unwrap()), ..address_delta() };
    assert_eq!(
        code(&with_ids, r#"{"addressId":"1","ts":1,"eid":"x\u0000one","newState":{}}"#),
        RejectCode::InvalidEventId
    );
    assert_eq!(
        code(&spec, r#"{"addressId":"1","ts":1,"newState":{"line1":"a","addressLine1":"b"}}"#),
        RejectCode::FieldCollision
    );
    let deep =
        format!(r#"{{"addressId":"1","ts":1,"newState":{{"x":{}1{}}}}}"#, "[".repeat(10_000), "]".repeat(10_000));
    assert_eq!(code(&spec, &deep), RejectCode::InvalidJson);
    let snap = address_snapshot();
    assert_eq!(code(&snap, r#"{"addressId":"1","newState":{"addressTS":1}}"#), RejectCode::MissingVersion);
    assert_eq!(code(&snap, r#"{"addressId":"1","newState":{"x":1}}"#), RejectCode::MissingVersion);
    let mut unversioned = address_snapshot();
    unversioned.version = None;
    assert_eq!(code(&unversioned, r#"{"addressId":"1","newState":{"x":1}}"#), RejectCode::InvalidState);
    assert_eq!(code(&unversioned, r#"{"addressId":"1","newState":{"addressContent":7}}"#), RejectCode::InvalidState);
    let agg = customer_aggregate();
    assert_eq!(
        code(&agg, r#"{"customerId":"1","newState":{"addressContent":{"addresses":{}}}}"#),
        RejectCode::InvalidChildren
    );
    assert_eq!(
        code(&agg, r#"{"customerId":"1","newState":{"addressContent":{"addresses":[1]}}}"#),
        RejectCode::InvalidChildren
    );
    assert_eq!(
        code(&agg, r#"{"customerId":"1","newState":{"addressContent":{"addresses":[{"line1":"x"}]}}}"#),
        RejectCode::MissingKey
    );
}

#[test]
fn event_ids_and_rfc3339_versions() {
    let mut spec = address_delta();
    spec.event_id = Some(crate::spec::Path::parse("meta.id").unwrap());
    let ev = parse(&spec, r#"{"addressId":"1","ts":"2024-05-01T12:00:00Z","meta":{"id":42},"newState":{}}"#).unwrap();
    assert_eq!(ev.event_id.as_deref(), Some("42"));
    assert_eq!(ev.version, Some(Version::parse_timestamp("2024-05-01T14:00:00+02:00").unwrap()));
    assert_eq!(code(&spec, r#"{"addressId":"1","ts":1,"meta":{"id":[1]},"newState":{}}"#), RejectCode::InvalidEventId);
}

#[test]
fn parse_key_gives_the_key_parse_gives() {
    let mut unversioned_delta = address_delta();
    unversioned_delta.version = None;
    for (spec, fixture) in [(address_snapshot(), SNAPSHOT), (unversioned_delta, DELTA)] {
        assert_eq!(parse_key(&spec, fixture).unwrap(), parse(&spec, fixture).unwrap().key);
    }
    // The aggregate fixture repeats a child key (rejected where it is applied), under its key.
    assert_eq!(parse(&customer_aggregate(), AGGREGATE).unwrap_err().code, RejectCode::DuplicateChildKey);
    assert_eq!(parse_key(&customer_aggregate(), AGGREGATE).unwrap(), vec!["911000100".to_string()]);
    let spec = address_delta();
    for (payload, key) in [
        // A repeated field: the last one counts, as in parse.
        (r#"{"addressId":"a","ts":1,"addressId":"b","newState":{}}"#, "b"),
        // An escaped field name is the same name.
        (r#"{"addr\u0065ssId":"c","ts":1,"newState":{}}"#, "c"),
        (r#"{"addressId":12345678901234567890123,"ts":1,"newState":{}}"#, "12345678901234567890123"),
        (r#"{"addressId":1.50,"ts":1,"newState":{}}"#, "1.50"),
        (r#"{"addressId":true,"ts":1,"newState":{}}"#, "true"),
        (r#"{"x":{"addressId":"no"},"addressId":"d\"e","ts":1,"newState":{"addressId":"no"}}"#, "d\"e"),
    ] {
        assert_eq!(parse(&spec, payload).unwrap().key, vec![key.to_string()], "{payload}");
        assert_eq!(parse_key(&spec, payload).unwrap(), vec![key.to_string()], "{payload}");
    }
}

#[test]
fn parse_key_rejects_what_parse_rejects_about_the_key_or_the_json() {
    let spec = address_delta();
    for payload in [
        "not json",
        "[1,2]",
        "7",
        r#"{"addressId":"1","ts":1,"newState":{}} trailing"#,
        r#"{"addressId":"1","ts":1,"newState":{"x":[1,}}"#,
        r#"{"ts":1,"newState":{}}"#,
        r#"{"addressId":null,"ts":1,"newState":{}}"#,
        r#"{"addressId":["a"],"ts":1,"newState":{}}"#,
        r#"{"addressId":"a\u0000","ts":1,"newState":{}}"#,
    ] {
        let expected = parse(&spec, payload).unwrap_err();
        let got = parse_key(&spec, payload).unwrap_err();
        assert_eq!((got.code, got.message), (expected.code, expected.message), "{payload}");
    }
    // Invalid elsewhere: the key is still known (the event is dead-lettered where it is applied).
    let bad_state = r#"{"addressId":"1","ts":1,"newState":"x"}"#;
    assert_eq!(parse(&spec, bad_state).unwrap_err().code, RejectCode::InvalidState);
    assert_eq!(parse_key(&spec, bad_state).unwrap(), vec!["1".to_string()]);
}

#[test]
fn parse_key_of_json_nested_deeper_than_parse_takes() {
    let spec = address_delta();
    let deep =
        format!(r#"{{"addressId":"1","ts":1,"newState":{{"x":{}1{}}}}}"#, "[".repeat(10_000), "]".repeat(10_000));
    assert_eq!(code(&spec, &deep), RejectCode::InvalidJson);
    // Only the key is decoded: what is skipped is checked for syntax, not for depth. The event is
    // dead-lettered by the worker that owns entity "1".
    assert_eq!(parse_key(&spec, &deep).unwrap(), vec!["1".to_string()]);
}

/// The stream of the envelope example: CloudEvents structured mode, the ECST event under `data`,
/// the version and the event id the envelope's `time` and `id`.
fn cloudevents() -> StreamSpec {
    StreamSpec {
        event_path: Some(Path::parse("data").unwrap()),
        version: Some(Path::parse("time").unwrap()),
        event_id: Some(Path::parse("id").unwrap()),
        ..address_snapshot()
    }
}

const CLOUDEVENT: &str = r#"{"specversion":"1.0","id":"e1","type":"com.acme.address.changed","source":"/addresses",
    "time":"2024-05-01T12:00:00Z","data":{"addressId":"12366","newState":{"addressContent":{"addressLine1":"48 Baker Street"}}}}"#;

#[test]
fn an_envelope_event_is_read_at_its_event_path_and_the_envelope_gives_version_and_id() {
    let spec = cloudevents();
    let ev = parse(&spec, CLOUDEVENT).unwrap();
    assert_eq!(ev.key, vec!["12366"]);
    assert_eq!(ev.version, Some(Version::parse_timestamp("2024-05-01T12:00:00Z").unwrap()));
    assert_eq!(ev.event_id.as_deref(), Some("e1"));
    let Op::Upsert { cells, .. } = &ev.op else { panic!("expected an upsert") };
    assert!(cells.iter().any(|c| c.field == "addressLine1" && c.value == text("48 Baker Street")));
    assert_eq!(parse_key(&spec, CLOUDEVENT).unwrap(), ev.key);
    // A version path may reach into the event too.
    let inner =
        StreamSpec { version: Some(Path::parse("data.newState.addressContent.addressTS").unwrap()), ..cloudevents() };
    let payload = r#"{"id":"e2","data":{"addressId":"1","newState":{"addressContent":{"addressTS":7}}}}"#;
    assert_eq!(parse(&inner, payload).unwrap().version, Some(Version::from_i64(7)));
    assert_eq!(inner.version_column(), Some(3));
}

#[test]
fn an_event_held_as_a_json_string_in_the_envelope_is_accepted() {
    let spec = cloudevents();
    let event = r#"{"addressId":"12366","newState":{"addressContent":{"addressLine1":"x"}}}"#;
    let payload = serde_json::json!({"id": "e1", "time": "2024-05-01T12:00:00Z", "data": event}).to_string();
    let ev = parse(&spec, &payload).unwrap();
    assert_eq!(ev.key, vec!["12366"]);
    assert_eq!(parse_key(&spec, &payload).unwrap(), ev.key);
}

#[test]
fn an_envelope_without_its_event_is_a_dead_letter_naming_the_path() {
    let spec = cloudevents();
    for (payload, code_, words) in [
        (r#"{"id":"e1","time":"2024-05-01T12:00:00Z"}"#, RejectCode::NotAnObject, "no event at data"),
        (r#"{"id":"e1","time":"2024-05-01T12:00:00Z","data":null}"#, RejectCode::NotAnObject, "no event at data"),
        (r#"{"id":"e1","time":"2024-05-01T12:00:00Z","data":[1]}"#, RejectCode::NotAnObject, "at data"),
        (r#"{"id":"e1","time":"2024-05-01T12:00:00Z","data":"{not json"}"#, RejectCode::InvalidJson, "at data"),
        (r#"{"id":"e1","time":"2024-05-01T12:00:00Z","data":"[1]"}"#, RejectCode::NotAnObject, "at data"),
    ] {
        let r = parse(&spec, payload).unwrap_err();
        assert_eq!(r.code, code_, "{payload}");
        assert!(r.message.contains(words), "{payload}: {}", r.message);
    }
    // The bare event, without its envelope, is missing it too.
    assert_eq!(code(&spec, SNAPSHOT), RejectCode::NotAnObject);
}
