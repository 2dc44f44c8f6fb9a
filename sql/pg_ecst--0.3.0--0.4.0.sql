-- pg_ecst 0.3.0 -> 0.4.0 (ALTER EXTENSION pg_ecst UPDATE): AsyncAPI contracts. What a fresh 0.4.0
-- install creates and 0.3.0 lacked; tests/integration/test_upgrade.sh checks that an updated
-- database has exactly the objects of a fresh install.

-- The JSON Schema every payload of a stream is checked against (create_stream's schema).
ALTER TABLE ecst.streams ADD COLUMN schema jsonb;

DROP FUNCTION ecst.create_stream(text, regclass, text, jsonb, text, jsonb, text, text, jsonb, text, boolean, text);
DROP FUNCTION ecst."_create_stream"(text, oid, text, jsonb, text, jsonb, text, text, jsonb, text, boolean, text);

CREATE FUNCTION ecst."_create_stream"(
	"name" TEXT,
	"target" oid,
	"shape" TEXT,
	"key" jsonb,
	"state_path" TEXT,
	"columns" jsonb,
	"version" TEXT,
	"event_id" TEXT,
	"children" jsonb,
	"on_conflict" TEXT,
	"retain_events" bool,
	"event_path" TEXT,
	"schema" jsonb
) RETURNS void
LANGUAGE c
AS 'MODULE_PATHNAME', 'create_stream_with_schema_wrapper';

CREATE FUNCTION ecst.create_stream(
    name        text,
    target      regclass,
    shape       text,
    key         jsonb,
    state_path  text DEFAULT NULL,
    columns     jsonb DEFAULT NULL,
    version     text DEFAULT NULL,
    event_id    text DEFAULT NULL,
    children    jsonb DEFAULT NULL,
    on_conflict text DEFAULT 'apply',
    retain_events boolean DEFAULT false,
    event_path  text DEFAULT NULL,
    schema      jsonb DEFAULT NULL
) RETURNS void
LANGUAGE sql VOLATILE
AS $$ SELECT ecst._create_stream(name, target::oid, shape, key, state_path, columns, version, event_id, children, on_conflict, retain_events, event_path, schema) $$;
COMMENT ON FUNCTION ecst.create_stream(text, regclass, text, jsonb, text, jsonb, text, text, jsonb, text, boolean, text, jsonb)
    IS 'Binds one kind of ECST event to a replica table (see docs/reference.md)';

CREATE FUNCTION ecst."set_stream_schema"(
	"stream" TEXT,
	"schema" jsonb
) RETURNS void
LANGUAGE c
AS 'MODULE_PATHNAME', 'set_stream_schema_wrapper';
COMMENT ON FUNCTION ecst.set_stream_schema(text, jsonb)
    IS 'Replaces (NULL: removes) the JSON Schema a stream checks every payload against';

-- AsyncAPI: plans of replicas and streams, and one message's schema.
CREATE FUNCTION ecst."asyncapi_plan"(
	"doc" jsonb,
	"channel" TEXT DEFAULT NULL
) RETURNS TABLE (
	"message" TEXT,
	"shape" TEXT,
	"key" TEXT,
	"sql" TEXT
)
STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'asyncapi_plan_wrapper';
COMMENT ON FUNCTION ecst.asyncapi_plan(jsonb, text)
    IS 'The replica tables and streams an AsyncAPI 3.x document''s received messages need, as SQL to review and run';

CREATE FUNCTION ecst."asyncapi_message_schema"(
	"doc" jsonb,
	"message" TEXT
) RETURNS jsonb
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'asyncapi_message_schema_wrapper';
COMMENT ON FUNCTION ecst.asyncapi_message_schema(jsonb, text)
    IS 'One message''s payload schema from an AsyncAPI 3.x document, $refs inlined (for create_stream''s schema)';

-- The feed: events applied within the statement that inserts them (COPY ecst.feed ... FROM STDIN).
CREATE FUNCTION ecst."_feed_begin"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_feed_begin_wrapper';
CREATE FUNCTION ecst."_feed_row"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_feed_row_wrapper';
CREATE FUNCTION ecst."_feed_end"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_feed_end_wrapper';
CREATE VIEW ecst.feed AS SELECT NULL::text AS stream, NULL::text AS payload WHERE false;
COMMENT ON VIEW ecst.feed IS 'COPY or INSERT (stream, payload) here: the events are applied in the same statement, nothing of them stored';
CREATE TRIGGER feed_begin BEFORE INSERT ON ecst.feed FOR EACH STATEMENT EXECUTE FUNCTION ecst._feed_begin();
CREATE TRIGGER feed_row INSTEAD OF INSERT ON ecst.feed FOR EACH ROW EXECUTE FUNCTION ecst._feed_row();
CREATE TRIGGER feed_end AFTER INSERT ON ecst.feed FOR EACH STATEMENT EXECUTE FUNCTION ecst._feed_end();
GRANT INSERT ON ecst.feed TO PUBLIC;
