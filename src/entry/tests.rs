//! `#[pg_test]`s of the AsyncAPI entrances and of streams with a JSON Schema: a contract's plan
//! runs in a fresh database and its streams apply (and check) events.

#[pgrx::pg_schema]
mod tests {
    #[allow(unused_imports)]
    use crate::testing::*;
    use pgrx::prelude::*;
    use serde_json::{json, Value};

    const DOC: &str = include_str!("../../tests/fixtures/asyncapi.json");

    fn doc_with(change: impl FnOnce(&mut Value)) -> String {
        let mut doc: Value = serde_json::from_str(DOC).unwrap();
        change(&mut doc);
        doc.to_string()
    }

    fn plan_rows(doc: &str) -> Vec<(String, String, String, String)> {
        Spi::connect(|client| {
            client
                .select("SELECT message, shape, key, sql FROM ecst.asyncapi_plan($1::jsonb)", None, &[doc.into()])
                .unwrap()
                .map(|r| {
                    (
                        r.get(1).unwrap().unwrap(),
                        r.get(2).unwrap().unwrap(),
                        r.get(3).unwrap().unwrap(),
                        r.get(4).unwrap().unwrap(),
                    )
                })
                .collect()
        })
    }

    /// The fixture event with its states' `addressContent` wrapper removed: the document puts
    /// the state properties directly under oldState/newState.
    fn unwrapped(event: &str) -> String {
        let mut v: Value = serde_json::from_str(event).unwrap();
        for state in ["oldState", "newState"] {
            if let Some(inner) = v[state].get("addressContent").cloned() {
                v[state] = inner;
            }
        }
        v.to_string()
    }

    fn sqlstate_with(sql: &str, arg: &str) -> Option<String> {
        sqlstate(&format!("SELECT * FROM {}", sql.replace("$1", &format!("'{}'", arg.replace('\'', "''")))))
    }

    #[pg_test]
    fn the_fixture_contract_plans_three_replicas_that_apply_its_events() {
        let rows = plan_rows(DOC);
        let summary: Vec<(&str, &str, &str)> =
            rows.iter().map(|r| (r.0.as_str(), r.1.as_str(), r.2.as_str())).collect();
        assert_eq!(
            summary,
            [
                ("FineGrained", "delta", "addressId"),
                ("FineGrainedSnapshots", "entity_snapshot", "addressId"),
                ("Snapshots", "aggregate_snapshot", "customerId")
            ]
        );
        for (_, _, _, sql) in &rows {
            Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        assert_eq!(
            text("SELECT string_agg(name || ':' || shape || ':' || (schema IS NOT NULL), ',' ORDER BY name) FROM ecst.streams"),
            "fine_grained:delta:true,fine_grained_snapshots:entity_snapshot:true,snapshots:aggregate_snapshot:true"
        );
        assert_eq!(
            text("SELECT string_agg(column_name || ' ' || data_type || ' ' || is_nullable, ', ' ORDER BY ordinal_position)
                  FROM information_schema.columns WHERE table_name = 'fine_grained_snapshots'"),
            "address_id text NO, address_line1 text NO, address_line2 text NO, address_purpose text NO, address_ts numeric NO"
        );

        // The delta fixture matches the document as it is.
        assert_eq!(apply("fine_grained", DELTA), "applied");
        assert_eq!(
            text("SELECT concat_ws('|', address_id, address_line1, address_purpose) FROM fine_grained"),
            "12366|48 Baker Street"
        );
        // The snapshot fixtures wrap their states in addressContent, which the document does not:
        // the contract catches it.
        assert_eq!(apply("fine_grained_snapshots", SNAPSHOT), "dead_lettered");
        let (code, message) = last_dead_letter();
        assert_eq!(code, "schema_violation");
        assert!(message.contains("newState.addressPurpose: required, missing"), "{message}");
        assert_eq!(apply("snapshots", AGGREGATE), "dead_lettered");
        assert!(last_dead_letter().1.contains("newState.addresses: required, missing"));
        // Shaped as the document says, they apply.
        assert_eq!(apply("fine_grained_snapshots", &unwrapped(SNAPSHOT)), "applied");
        assert_eq!(
            text("SELECT concat_ws('|', address_id, address_purpose, address_line1, address_line2, address_ts) FROM fine_grained_snapshots"),
            "12366|billing|48 Baker Street|London, UK, E1 7AE|1572134205"
        );
        // The aggregate fixture repeats child key 123124: a whole dead letter, as without a contract.
        assert_eq!(apply("snapshots", &unwrapped(AGGREGATE)), "dead_lettered");
        assert_eq!(last_dead_letter().0, "duplicate_child_key");
        let mut distinct: Value = serde_json::from_str(&unwrapped(AGGREGATE)).unwrap();
        for (i, a) in distinct["newState"]["addresses"].as_array_mut().unwrap().iter_mut().enumerate() {
            a["addressId"] = json!(format!("a{i}"));
        }
        assert_eq!(apply("snapshots", &distinct.to_string()), "applied");
        assert_eq!(text("SELECT customer_id FROM snapshots"), "911000100");
        assert_eq!(
            text("SELECT string_agg(address_id || ':' || address_line1, ',' ORDER BY address_id) FROM snapshots_addresses"),
            "a0:48 Baker Street,a1:44 Infinite Loop,a2:500 George Street,a3:15 Karl-Liebknecht-Str"
        );
    }

    #[pg_test]
    fn schema_violations_are_dead_letters_naming_each_path() {
        let sql = &plan_rows(DOC)[1].3;
        Spi::run(sql).unwrap();
        let missing = r#"{"addressId": "1", "newState": {"addressPurpose": "billing", "addressLine1": "1 Road", "addressTS": 5}}"#;
        assert_eq!(apply("fine_grained_snapshots", missing), "dead_lettered");
        let (code, message) = last_dead_letter();
        assert_eq!(code, "schema_violation");
        assert_eq!(
            message,
            "the event does not match the stream's schema (1 violation): newState.addressLine2: required, missing"
        );
        assert_eq!(text("SELECT payload FROM ecst.dead_letters ORDER BY id DESC LIMIT 1"), missing, "kept verbatim");
        let wrong = r#"{"addressId": 12, "newState": {"addressPurpose": "billing", "addressLine1": "1 Road", "addressLine2": "x", "addressTS": "five"}}"#;
        assert_eq!(apply("fine_grained_snapshots", wrong), "dead_lettered");
        let (code, message) = last_dead_letter();
        assert_eq!(code, "schema_violation");
        assert!(message.contains("(2 violations)"), "{message}");
        assert!(message.contains("addressId: 12 is not of type \"string\""), "{message}");
        assert!(message.contains("newState.addressTS: \"five\" is not of type \"number\""), "{message}");
        assert_eq!(count("SELECT * FROM fine_grained_snapshots"), 0, "nothing written");
        // Every entrance checks: a batch, and the inbox.
        let good = r#"{"addressId": "2", "newState": {"addressPurpose": "b", "addressLine1": "l1", "addressLine2": "l2", "addressTS": 1}}"#;
        assert_eq!(
            text(&format!(
                "SELECT string_agg(outcome || '=' || count, ',' ORDER BY outcome) FROM ecst.apply_batch('fine_grained_snapshots', ARRAY['{missing}', '{good}']::text[])"
            )),
            "applied=1,dead_lettered=1"
        );
        run(&format!("INSERT INTO ecst.inbox (stream, payload) VALUES ('fine_grained_snapshots', '{wrong}')"));
        run("SELECT ecst.process_inbox()");
        assert_eq!(count("SELECT * FROM ecst.dead_letters WHERE error_code = 'schema_violation'"), 4);
        // A delete has no newState: the schema allows it (with its oldState complete).
        let delete = r#"{"addressId": "2", "oldState": {"addressPurpose": "b", "addressLine1": "l1", "addressLine2": "l2", "addressTS": 1}}"#;
        assert_eq!(apply("fine_grained_snapshots", delete), "applied");
        assert_eq!(count("SELECT * FROM fine_grained_snapshots"), 0);
    }

    #[pg_test]
    fn a_stream_takes_a_message_schema_and_forgets_it_when_recreated() {
        run("CREATE TABLE addr (address_id text PRIMARY KEY, address_line1 text, address_ts numeric)");
        let create = |schema: &str| {
            run(&format!(
                r#"SELECT ecst.create_stream('addr', 'addr', 'delta', '{{"addressId": "address_id"}}', schema => {schema})"#
            ))
        };
        create(&format!("ecst.asyncapi_message_schema('{}', 'FineGrained')", DOC.replace('\'', "''")));
        assert_eq!(
            text("SELECT schema->'properties'->'newState'->'properties'->'addressTS'->>'type' FROM ecst.streams WHERE name = 'addr'"),
            "number",
            "stored with its references inlined"
        );
        let text_ts = r#"{"addressId": "1", "newState": {"addressTS": "yesterday"}}"#;
        assert_eq!(apply("addr", text_ts), "dead_lettered");
        run("SELECT ecst.drop_stream('addr')");
        create("NULL");
        assert_eq!(apply("addr", r#"{"addressId": "1", "newState": {"addressLine1": "x"}}"#), "applied");
        assert_eq!(apply("addr", text_ts), "dead_lettered");
        assert_eq!(last_dead_letter().0, "invalid_value", "without a schema the column refuses it");

        // A schema set on a live stream: its version state stays, the next event is checked.
        run(r#"SELECT ecst.set_stream_schema('addr', '{"required": ["v"]}')"#);
        assert_eq!(apply("addr", r#"{"addressId": "1", "newState": {"addressLine1": "y"}}"#), "dead_lettered");
        assert_eq!(
            last_dead_letter().1,
            "the event does not match the stream's schema (1 violation): v: required, missing"
        );
        run("SELECT ecst.set_stream_schema('addr', NULL)");
        assert_eq!(apply("addr", r#"{"addressId": "1", "newState": {"addressLine1": "y"}}"#), "applied");
        assert_eq!(sqlstate("SELECT ecst.set_stream_schema('nope', NULL)").as_deref(), Some("42704"));
        assert_eq!(sqlstate(r#"SELECT ecst.set_stream_schema('addr', '{"type": 5}')"#).as_deref(), Some("22023"));
        run("CREATE ROLE stranger");
        run("SET LOCAL ROLE stranger");
        assert_eq!(sqlstate("SELECT ecst.set_stream_schema('addr', NULL)").as_deref(), Some("42501"));
        run("RESET ROLE");
    }

    #[pg_test]
    fn a_hostile_document_yields_only_its_own_tables() {
        run("CREATE TABLE victim (id int)");
        let doc = doc_with(|d| {
            let m = d["components"]["messages"]["FineGrained"].clone();
            let mut evil = m.clone();
            evil["description"] = json!("x'); DROP TABLE victim; --");
            evil["payload"]["properties"]["newState"]["properties"] = json!({
                "a\"); DROP TABLE victim; --": {"type": "string"},
                "back\\slash'": {"type": "string"}
            });
            d["components"]["messages"]["Order\"; DROP TABLE victim; --"] = evil;
            d["channels"]["addressChanged"]["messages"] = json!({
                "Order\"; DROP TABLE victim; --": {"$ref": "#/components/messages/Order\"; DROP TABLE victim; --"}
            });
        });
        let rows = plan_rows(&doc);
        assert_eq!(rows.len(), 1);
        Spi::run(&rows[0].3).unwrap_or_else(|e| panic!("{}: {e}", rows[0].3));
        assert_eq!(count("SELECT * FROM victim"), 0, "the victim table is still there");
        assert_eq!(count("SELECT * FROM ecst.streams"), 1);
        let table = text("SELECT target::text FROM ecst.streams");
        assert_eq!(
            text(&format!("SELECT obj_description('{}'::regclass, 'pg_class')", table.replace('\'', "''"))),
            "x'); DROP TABLE victim; --"
        );
    }

    #[pg_test]
    fn contract_errors_have_sqlstates() {
        let plan = "ecst.asyncapi_plan($1::jsonb)";
        assert_eq!(sqlstate_with(plan, r#"{"asyncapi": "2.6.0"}"#).as_deref(), Some("0A000"));
        assert_eq!(sqlstate_with(plan, r#"{"openapi": "3.0.0"}"#).as_deref(), Some("22023"));
        assert_eq!(sqlstate("SELECT * FROM ecst.asyncapi_plan(NULL)").as_deref(), Some("22004"));
        assert_eq!(
            sqlstate(&format!("SELECT * FROM ecst.asyncapi_plan('{}', 'orders')", DOC.replace('\'', "''"))).as_deref(),
            Some("42704")
        );
        let remote = doc_with(|d| {
            d["components"]["messages"]["FineGrained"]["payload"]["properties"]["newState"] =
                json!({"$ref": "https://example.com/address.json"})
        });
        assert_eq!(sqlstate_with(plan, &remote).as_deref(), Some("0A000"));
        let dangling = doc_with(|d| {
            d["components"]["messages"]["FineGrained"]["payload"]["properties"]["newState"] =
                json!({"$ref": "#/components/schemas/Nope"})
        });
        assert_eq!(sqlstate_with(plan, &dangling).as_deref(), Some("22023"));
        let mixed = doc_with(|d| d["components"]["schemas"]["PartialAddress"]["required"] = json!(["addressTS"]));
        assert_eq!(sqlstate_with(plan, &mixed).as_deref(), Some("22023"));
        let message = "ecst.asyncapi_message_schema($1::jsonb, 'Nope')";
        assert_eq!(sqlstate_with(message, DOC).as_deref(), Some("42704"));

        run("CREATE TABLE t (id text PRIMARY KEY)");
        let create = |schema: &str| {
            sqlstate(&format!(
                r#"SELECT ecst.create_stream('t', 't', 'delta', '{{"id": "id"}}', schema => '{}')"#,
                schema.replace('\'', "''")
            ))
        };
        assert_eq!(create(r#"{"type": "nope"}"#).as_deref(), Some("22023"));
        assert_eq!(create(r##"{"$ref": "#/components/schemas/A"}"##).as_deref(), Some("22023"));
        assert_eq!(create(r#"{"$ref": "https://example.com/s.json"}"#).as_deref(), Some("22023"));
        assert_eq!(create(DOC).as_deref(), Some("22023"), "a whole document is not a message schema");
        assert_eq!(create(r#"{"type": "object"}"#), None);
    }
}
