use super::*;
use crate::schema::Schema;
use serde_json::json;

const FIXTURE: &str = include_str!("../../../tests/fixtures/asyncapi.json");

fn fixture() -> Value {
    serde_json::from_str(FIXTURE).unwrap()
}

/// Quotes like PostgreSQL's quote_ident for the names these tests use.
fn quote(name: &str) -> String {
    if name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') && name != "order" {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

fn plan(doc: &Value, channel: Option<&str>) -> Result<Vec<Plan>, Error> {
    Document::new(doc)?.plan(channel, &quote)
}

/// A document receiving one message with this payload.
fn doc_with(messages: Value) -> Value {
    let refs: Map<String, Value> = messages
        .as_object()
        .unwrap()
        .keys()
        .map(|k| (k.clone(), json!({"$ref": format!("#/components/messages/{k}")})))
        .collect();
    json!({
        "asyncapi": "3.0.0",
        "info": {"title": "t", "version": "1"},
        "channels": {"c": {"address": "c", "messages": refs}},
        "operations": {"take": {"action": "receive", "channel": {"$ref": "#/channels/c"}}},
        "components": {"messages": messages}
    })
}

fn message(state: Value) -> Value {
    json!({"payload": {"type": "object", "properties": {"thingId": {"type": "string"}, "oldState": state.clone(), "newState": state}}})
}

#[test]
fn the_fixture_gives_three_shapes() {
    let rows = plan(&fixture(), None).unwrap();
    let got: Vec<(&str, &str, &str)> =
        rows.iter().map(|r| (r.message.as_str(), r.shape.as_str(), r.key.as_str())).collect();
    assert_eq!(
        got,
        [
            ("FineGrained", "delta", "addressId"),
            ("FineGrainedSnapshots", "entity_snapshot", "addressId"),
            ("Snapshots", "aggregate_snapshot", "customerId"),
        ]
    );
    let delta = &rows[0].sql;
    assert!(
        delta.starts_with(
            "CREATE TABLE fine_grained (\n    address_id text NOT NULL,\n    address_line1 text,\n    address_line2 text,\n    address_purpose text,\n    address_ts numeric,\n    PRIMARY KEY (address_id)\n);\n"
        ),
        "{delta}"
    );
    assert!(
        delta.contains("COMMENT ON TABLE fine_grained IS 'Fine grained ESCT pattern, notice the optional properties for the states';\n"),
        "{delta}"
    );
    assert!(delta.contains("name => 'fine_grained',\n    target => 'fine_grained',\n    shape => 'delta',\n    key => '{\"addressId\":\"address_id\"}'"), "{delta}");
    assert!(delta.contains("schema => '{"), "{delta}");
    let snapshot = &rows[1].sql;
    assert!(snapshot.contains("address_line1 text NOT NULL,"), "snapshots require every field: {snapshot}");
    let aggregate = &rows[2].sql;
    assert!(
        aggregate
            .contains("CREATE TABLE snapshots (\n    customer_id text NOT NULL,\n    PRIMARY KEY (customer_id)\n);"),
        "{aggregate}"
    );
    assert!(
        aggregate.contains("CREATE TABLE snapshots_addresses (\n    customer_id text NOT NULL,\n    address_id text NOT NULL,\n    address_line1 text NOT NULL,"),
        "{aggregate}"
    );
    assert!(aggregate.contains("PRIMARY KEY (customer_id, address_id)"), "{aggregate}");
    assert!(
        aggregate.contains(r#"children => '{"addresses":{"key":{"addressId":"address_id"},"parent_key":"customer_id","path":"addresses","table":"snapshots_addresses"}}'"#),
        "{aggregate}"
    );
}

#[test]
fn the_embedded_schema_is_the_message_schema() {
    let doc = fixture();
    let d = Document::new(&doc).unwrap();
    let schema = d.message_schema("FineGrainedSnapshots").unwrap();
    assert_eq!(schema.pointer("/properties/newState/required/0"), Some(&json!("addressPurpose")), "refs inlined");
    assert!(!schema.to_string().contains("$ref"));
    let sql = &d.plan(None, &quote).unwrap()[1].sql;
    assert!(sql.contains(&literal(&schema.to_string())), "{sql}");
    let s = Schema::compile(&schema).unwrap();
    let ok = json!({"addressId": "1", "newState": {"addressPurpose": "b", "addressLine1": "l1", "addressLine2": "l2", "addressTS": 5}});
    assert!(s.check(&ok).is_ok());
    let bad = json!({"addressId": "1", "newState": {"addressPurpose": "b", "addressLine1": "l1", "addressTS": "5"}});
    let r = s.check(&bad).unwrap_err();
    assert!(r.message.contains("newState.addressLine2: required, missing"), "{}", r.message);
    assert!(r.message.contains("newState.addressTS: \"5\" is not of type \"number\""), "{}", r.message);
    // By a channel's message key, by components key, or by name.
    let mut named = doc.clone();
    named["components"]["messages"]["Snapshots"]["name"] = json!("customerSnapshot");
    let d = Document::new(&named).unwrap();
    assert!(d.message_schema("customerSnapshot").is_ok());
    let e = d.message_schema("Nope").unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.hint.unwrap().contains("FineGrained"));
}

#[test]
fn channels_are_chosen_by_key_or_address() {
    let doc = fixture();
    assert_eq!(plan(&doc, Some("addressChanged")).unwrap().len(), 3);
    assert_eq!(plan(&doc, Some("/address")).unwrap().len(), 3);
    let e = plan(&doc, Some("orders")).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert_eq!(e.message, "the document has no channel \"orders\"");
    assert_eq!(e.hint.as_deref(), Some("Its channels: addressChanged."));
    let mut sends = doc.clone();
    sends["operations"]["addressChanged"]["action"] = json!("send");
    let e = plan(&sends, None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains("no operation of the document receives"), "{e}");
    // An operation may take only some of its channel's messages.
    let mut some = doc.clone();
    some["operations"]["addressChanged"]["messages"] =
        json!([{"$ref": "#/channels/addressChanged/messages/Snapshots"}]);
    let rows = plan(&some, None).unwrap();
    assert_eq!(rows.iter().map(|r| r.message.as_str()).collect::<Vec<_>>(), ["Snapshots"]);
}

#[test]
fn documents_that_are_not_asyncapi_3_are_refused() {
    let e = plan(&json!({"asyncapi": "2.6.0", "channels": {}}), None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::UnsupportedVersion);
    assert!(e.message.contains("AsyncAPI 2.6.0") && e.hint.unwrap().contains("asyncapi convert"));
    assert_eq!(plan(&json!({"openapi": "3.1.0"}), None).unwrap_err().kind, ErrorKind::NotAsyncApi);
    assert_eq!(plan(&json!([1, 2]), None).unwrap_err().kind, ErrorKind::NotAsyncApi);
    assert_eq!(plan(&json!({"info": {}}), None).unwrap_err().kind, ErrorKind::NotAsyncApi);
    assert_eq!(plan(&json!({"asyncapi": "4.0.0"}), None).unwrap_err().kind, ErrorKind::UnsupportedVersion);
}

#[test]
fn references_must_be_local_resolvable_and_finite() {
    let mut remote = fixture();
    remote["components"]["messages"]["FineGrained"]["payload"]["properties"]["newState"] =
        json!({"$ref": "https://schemas.example.com/address.json"});
    let e = plan(&remote, None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported);
    assert!(e.message.contains("https://schemas.example.com/address.json"), "{e}");
    assert!(e.hint.unwrap().contains("asyncapi bundle"));

    let mut dangling = fixture();
    dangling["components"]["messages"]["FineGrained"]["payload"]["properties"]["newState"] =
        json!({"$ref": "#/components/schemas/Missing"});
    let e = plan(&dangling, None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::BadRef);
    assert!(e.message.contains("#/components/schemas/Missing"), "{e}");

    let mut recursive = fixture();
    recursive["components"]["schemas"]["PartialAddress"]["properties"]["parent"] =
        json!({"$ref": "#/components/schemas/PartialAddress"});
    let e = plan(&recursive, None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::BadRef);
    assert!(e.message.contains("refers to itself"), "{e}");

    let mut escaped = fixture();
    let partial = escaped["components"]["schemas"]["PartialAddress"].clone();
    escaped["components"]["schemas"]["Partial Address/v1"] = partial;
    escaped["components"]["messages"]["FineGrained"]["payload"]["properties"]["newState"] =
        json!({"$ref": "#/components/schemas/Partial%20Address~1v1"});
    assert_eq!(plan(&escaped, None).unwrap()[0].shape, Shape::Delta);
}

#[test]
fn an_undecidable_shape_names_the_properties_that_decide_it() {
    let state =
        json!({"type": "object", "required": ["a"], "properties": {"a": {"type": "string"}, "b": {"type": "string"}}});
    let e = plan(&doc_with(json!({"M": message(state.clone())})), None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::CannotInfer);
    assert!(e.message.contains("requires a but not b"), "{e}");
    assert!(e.hint.unwrap().contains("x-ecst-shape"));
    let mut marked = message(state);
    marked["x-ecst-shape"] = json!("entity_snapshot");
    let rows = plan(&doc_with(json!({"M": marked})), None).unwrap();
    assert_eq!(rows[0].shape, Shape::EntitySnapshot);
    assert!(rows[0].sql.contains("    a text NOT NULL,\n    b text,\n"), "{}", rows[0].sql);

    let e = plan(&doc_with(json!({"M": message(json!({"type": "object"}))})), None).unwrap_err();
    assert!(e.message.contains("declares no properties"), "{e}");
    let e = plan(&doc_with(json!({"M": {"payload": {"type": "object", "properties": {"thingId": {}}}}})), None)
        .unwrap_err();
    assert!(e.message.contains("no newState or oldState"), "{e}");
}

#[test]
fn keys_are_inferred_or_marked() {
    let state = json!({"type": "object", "properties": {"a": {"type": "string"}}});
    let mut two = message(state.clone());
    two["payload"]["properties"]["ownerId"] = json!({"type": "string"});
    let e = plan(&doc_with(json!({"M": two.clone()})), None).unwrap_err();
    assert!(e.message.contains("several root properties could be its key (ownerId, thingId)"), "{e}");
    two["x-ecst-key"] = json!(["ownerId", "thingId"]);
    let rows = plan(&doc_with(json!({"M": two})), None).unwrap();
    assert_eq!(rows[0].key, "ownerId, thingId");
    assert!(rows[0].sql.contains("PRIMARY KEY (owner_id, thing_id)"), "{}", rows[0].sql);
    let none = json!({"payload": {"properties": {"newState": state}}});
    let e = plan(&doc_with(json!({"M": none})), None).unwrap_err();
    assert!(e.hint.unwrap().contains("x-ecst-key"));
}

#[test]
fn json_schema_types_map_to_columns() {
    let state = json!({"type": "object", "properties": {
        "at": {"type": "string", "format": "date-time"},
        "born": {"type": "string", "format": "date"},
        "ref": {"type": "string", "format": "uuid"},
        "count": {"type": "integer"},
        "price": {"type": "number"},
        "active": {"type": "boolean"},
        "meta": {"type": "object"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "notes": {"type": ["string", "null"]},
        "kind": {"enum": ["a", "b"]},
        "anything": {}
    }});
    let mut m = message(state);
    m["payload"]["properties"]["thingId"] = json!({"type": "string", "format": "uuid"});
    m["x-ecst-version"] = json!("newState.at");
    m["x-ecst-event-id"] = json!("eventId");
    let sql = &plan(&doc_with(json!({"M": m})), None).unwrap()[0].sql;
    for want in [
        "thing_id uuid NOT NULL",
        "at timestamptz,",
        "born date,",
        "ref uuid,",
        "count bigint,",
        "price numeric,",
        "active boolean,",
        "meta jsonb,",
        "tags jsonb,",
        "notes text,",
        "kind text,",
        "anything jsonb,",
        "version => 'newState.at'",
        "event_id => 'eventId'",
    ] {
        assert!(sql.contains(want), "{want} in {sql}");
    }
}

#[test]
fn every_shape_of_a_message_must_guarantee_not_null() {
    let full = json!({"type": "object", "required": ["a", "b"], "properties": {"a": {"type": "string"}, "b": {"type": "string"}}});
    let other = json!({"type": "object", "required": ["a", "c"], "properties": {"a": {"type": "string"}, "c": {"type": "string"}}});
    let mut m = message(json!({"oneOf": [full, other, {"type": "null"}]}));
    m["x-ecst-shape"] = json!("entity_snapshot");
    let sql = &plan(&doc_with(json!({"M": m})), None).unwrap()[0].sql;
    assert!(sql.contains("    a text NOT NULL,\n    b text,\n    c text,\n"), "{sql}");
    let nullable = json!({"type": "object", "required": ["a"], "properties": {"a": {"type": ["string", "null"]}}});
    let sql = &plan(&doc_with(json!({"M": message(nullable)})), None).unwrap()[0].sql;
    assert!(sql.contains("    a text,\n"), "a nullable type is never NOT NULL: {sql}");
}

#[test]
fn name_collisions_are_resolved_visibly() {
    let state = json!({"type": "object", "properties": {"a": {"type": "string"}}});
    let rows =
        plan(&doc_with(json!({"FineGrained": message(state.clone()), "fine_grained": message(state)})), None).unwrap();
    assert!(rows[0].sql.starts_with("CREATE TABLE fine_grained ("), "{}", rows[0].sql);
    assert!(
        rows[1].sql.starts_with("-- \"fine_grained\" is taken by message FineGrained: this one is named \"fine_grained_2\".\nCREATE TABLE fine_grained_2 ("),
        "{}",
        rows[1].sql
    );
    assert!(rows[1].sql.contains("name => 'fine_grained_2'"));
    let long = "A".repeat(70);
    let rows =
        plan(&doc_with(json!({long.clone(): message(json!({"type": "object", "properties": {"a": {}}}))})), None)
            .unwrap();
    assert!(rows[0].sql.contains("longer than PostgreSQL's 63-byte names"), "{}", rows[0].sql);
}

#[test]
fn extensions_place_the_event_and_its_state() {
    let inner = json!({"type": "object", "properties": {
        "thingId": {"type": "string"},
        "newState": {"type": "object", "properties": {"content": {"type": "object", "properties": {"a": {"type": "string"}}}}}
    }});
    let m = json!({
        "x-ecst-event-path": "data",
        "x-ecst-state-path": "content",
        "x-ecst-version": "time",
        "payload": {"type": "object", "properties": {"time": {"type": "string", "format": "date-time"}, "data": inner}}
    });
    let sql = &plan(&doc_with(json!({"M": m})), None).unwrap()[0].sql;
    assert!(sql.contains("    thing_id text NOT NULL,\n    a text,\n"), "{sql}");
    assert!(
        sql.contains("state_path => 'content'")
            && sql.contains("event_path => 'data'")
            && sql.contains("version => 'time'"),
        "{sql}"
    );
}

#[test]
fn other_schema_formats_are_refused() {
    let m =
        json!({"payload": {"schemaFormat": "application/vnd.apache.avro;version=1.9.0", "schema": {"type": "record"}}});
    let e = plan(&doc_with(json!({"M": m})), None).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unsupported);
    let m = json!({"payload": {"schemaFormat": "application/schema+json;version=draft-07", "schema": message(json!({"properties": {"a": {}}}))["payload"].clone()}});
    assert_eq!(plan(&doc_with(json!({"M": m})), None).unwrap()[0].shape, Shape::Delta);
}

#[test]
fn literals_are_quoted_as_postgresql_does() {
    assert_eq!(literal("it's"), "'it''s'");
    assert_eq!(literal(r"a\b"), r"E'a\\b'");
}

#[test]
fn names_without_letters_are_handled() {
    let rows = plan(&doc_with(json!({"---": message(json!({"properties": {"a": {}}}))})), None).unwrap();
    assert!(rows[0].sql.starts_with("-- message \"---\" has no letter or digit"), "{}", rows[0].sql);
    assert!(rows[0].sql.contains("CREATE TABLE message ("), "{}", rows[0].sql);
    let e = plan(&doc_with(json!({"M": message(json!({"properties": {"--": {}}}))})), None).unwrap_err();
    assert!(e.message.contains("no letter or digit"), "{e}");
}

#[test]
fn an_aggregate_with_a_key_of_several_fields_names_its_parent_key_columns() {
    // x-ecst-key not in name order: the plan must not rely on an order create_stream reads otherwise.
    let items = json!({"type": "array", "items": {"type": "object", "properties": {"itemId": {"type": "string"}}}});
    let state = json!({"type": "object", "properties": {"items": items}});
    let mut m = message(state);
    m["payload"]["properties"]["ownerId"] = json!({"type": "string"});
    m["x-ecst-key"] = json!(["thingId", "ownerId"]);
    m["x-ecst-shape"] = json!("aggregate_snapshot");
    let rows = plan(&doc_with(json!({"M": m})), None).unwrap();
    let sql = &rows[0].sql;
    assert!(sql.contains(r#""parent_key":{"owner_id":"owner_id","thing_id":"thing_id"}"#), "{sql}");
}
