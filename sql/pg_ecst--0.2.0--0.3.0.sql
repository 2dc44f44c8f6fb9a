-- pg_ecst 0.2.0 -> 0.3.0 (ALTER EXTENSION pg_ecst UPDATE). What a fresh 0.3.0 install creates
-- and 0.2.0 lacked; tests/integration/test_upgrade.sh checks that an updated database has exactly
-- the objects of a fresh install.

-- Envelopes: where the ECST event sits inside the payload (create_stream's event_path).
ALTER TABLE ecst.streams ADD COLUMN event_path text;

DROP FUNCTION ecst.create_stream(text, regclass, text, jsonb, text, jsonb, text, text, jsonb, text, boolean);
DROP FUNCTION ecst."_create_stream"(text, oid, text, jsonb, text, jsonb, text, text, jsonb, text, boolean);

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
	"event_path" TEXT
) RETURNS void
LANGUAGE c
AS 'MODULE_PATHNAME', 'create_stream_with_event_path_wrapper';

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
    event_path  text DEFAULT NULL
) RETURNS void
LANGUAGE sql VOLATILE
AS $$ SELECT ecst._create_stream(name, target::oid, shape, key, state_path, columns, version, event_id, children, on_conflict, retain_events, event_path) $$;
COMMENT ON FUNCTION ecst.create_stream(text, regclass, text, jsonb, text, jsonb, text, text, jsonb, text, boolean, text)
    IS 'Binds one kind of ECST event to a replica table (see docs/reference.md)';
