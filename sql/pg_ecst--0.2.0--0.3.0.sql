-- pg_ecst 0.2.0 -> 0.3.0 (ALTER EXTENSION pg_ecst UPDATE): envelopes (event_path) and routes. What a fresh 0.3.0 install creates
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

-- Routes: a name that stands for several streams, each event going to the one its field selects.
CREATE TABLE ecst.routes (
    name       text PRIMARY KEY CHECK (name <> ''),
    field      text NOT NULL,
    streams    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by name NOT NULL DEFAULT current_user
);
COMMENT ON TABLE ecst.routes IS 'pg_ecst routes (managed by ecst.create_route / ecst.drop_route)';
SELECT pg_catalog.pg_extension_config_dump('ecst.routes', '');

CREATE FUNCTION ecst."create_route"(
	"name" TEXT,
	"field" TEXT,
	"streams" jsonb
) RETURNS void
STRICT
LANGUAGE c
AS 'MODULE_PATHNAME', 'create_route_wrapper';

CREATE FUNCTION ecst."drop_route"(
	"name" TEXT
) RETURNS bool
STRICT
LANGUAGE c
AS 'MODULE_PATHNAME', 'drop_route_wrapper';

CREATE FUNCTION ecst."_route_value"(
	"payload" TEXT,
	"field" TEXT
) RETURNS TEXT
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'route_value_wrapper';

COMMENT ON FUNCTION ecst.create_route(text, text, jsonb)
    IS 'Creates (or replaces) a route: events fed under its name go to the stream that the value at field selects (see docs/reference.md)';
COMMENT ON FUNCTION ecst.drop_route(text) IS 'Drops a route (its dead letters stay); false if there was none';

CREATE VIEW ecst.route_stats AS
SELECT r.name AS route,
       r.field,
       v.value,
       coalesce(v.unrouted, 0)::bigint AS unrouted,
       (SELECT count(*) FROM ecst.inbox i WHERE i.stream = r.name)::bigint AS pending
FROM ecst.routes r
LEFT JOIN LATERAL (
    SELECT ecst._route_value(d.payload, r.field) AS value, count(*) AS unrouted
    FROM ecst.dead_letters d
    WHERE d.stream = r.name AND d.error_code = 'unrouted'
    GROUP BY 1
) v ON true;
COMMENT ON VIEW ecst.route_stats IS 'pg_ecst routes: per route and value, the events no stream is mapped for (dead letters unrouted), and the inbox rows waiting under the route name';
GRANT SELECT ON ecst.routes, ecst.route_stats TO ecst_reader;
