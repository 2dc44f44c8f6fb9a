-- SQL-level wrappers and views that depend on the Rust functions.

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

COMMENT ON FUNCTION ecst.set_stream_schema(text, jsonb)
    IS 'Replaces (NULL: removes) the JSON Schema a stream checks every payload against';
COMMENT ON FUNCTION ecst.asyncapi_plan(jsonb, text)
    IS 'The replica tables and streams an AsyncAPI 3.x document''s received messages need, as SQL to review and run';
COMMENT ON FUNCTION ecst.asyncapi_message_schema(jsonb, text)
    IS 'One message''s payload schema from an AsyncAPI 3.x document, $refs inlined (for create_stream''s schema)';

CREATE FUNCTION ecst.apply(stream text, event text) RETURNS ecst.outcome
LANGUAGE sql VOLATILE
AS $$ SELECT ecst._apply(stream, event)::ecst.outcome $$;
COMMENT ON FUNCTION ecst.apply(text, text) IS 'Applies one event given as text (kept verbatim if dead-lettered)';

CREATE FUNCTION ecst.apply(stream text, event jsonb) RETURNS ecst.outcome
LANGUAGE sql VOLATILE
AS $$ SELECT ecst._apply(stream, event::text)::ecst.outcome $$;
COMMENT ON FUNCTION ecst.apply(text, jsonb) IS 'Applies one event; returns applied, duplicate, stale, skipped or dead_lettered';

CREATE FUNCTION ecst.apply_batch(stream text, events jsonb[])
RETURNS TABLE (outcome ecst.outcome, count bigint)
LANGUAGE sql VOLATILE
AS $$ SELECT b.outcome::ecst.outcome, b.count FROM ecst._apply_batch(stream, events::text[]) b $$;
CREATE FUNCTION ecst.apply_batch(stream text, events text[])
RETURNS TABLE (outcome ecst.outcome, count bigint)
LANGUAGE sql VOLATILE
AS $$ SELECT b.outcome::ecst.outcome, b.count FROM ecst._apply_batch(stream, events) b $$;
COMMENT ON FUNCTION ecst.apply_batch(text, text[]) IS 'Applies many events given as text; returns the count per outcome';

CREATE FUNCTION ecst.retry_dead_letters(stream text DEFAULT NULL)
RETURNS TABLE (outcome ecst.outcome, count bigint)
LANGUAGE sql VOLATILE
AS $$ SELECT r.outcome::ecst.outcome, r.count FROM ecst._retry_dead_letters(stream) r $$;
COMMENT ON FUNCTION ecst.retry_dead_letters(text) IS 'Puts dead letters (of one stream, or all) back through the pipeline; returns the count per outcome';

CREATE FUNCTION ecst.discard_dead_letters(stream text DEFAULT NULL, error_code text DEFAULT NULL,
                                          older_than interval DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE
AS $$ SELECT ecst._discard_dead_letters(stream, error_code, older_than) $$;
COMMENT ON FUNCTION ecst.discard_dead_letters(text, text, interval)
    IS 'Removes the dead letters matching every given filter (stream, error code, last failed longer ago than older_than) that the caller may discard; returns how many';

-- Dead letters per stream name and error code, also of names no stream has (so that events sent
-- to a stream nobody created cannot go unnoticed).
CREATE VIEW ecst.dead_letter_summary AS
SELECT d.stream,
       d.error_code,
       count(*)           AS letters,
       min(d.received_at) AS oldest,
       max(d.failed_at)   AS newest,
       (s.id IS NOT NULL) AS stream_exists
FROM ecst.dead_letters d
LEFT JOIN ecst.streams s ON s.name = d.stream
GROUP BY d.stream, d.error_code, s.id;
COMMENT ON VIEW ecst.dead_letter_summary IS 'pg_ecst dead letters per stream name and error code (stream_exists: false for names no stream has)';

COMMENT ON FUNCTION ecst.apply_batch(text, jsonb[]) IS 'Applies many events (in order per entity); returns the count per outcome';

-- The pg_ecst background processes of this server.
CREATE VIEW ecst.workers AS
SELECT pid, backend_type, application_name, datname AS database, state, query AS activity, backend_start
FROM pg_catalog.pg_stat_activity
WHERE backend_type IN ('pg_ecst worker', 'pg_ecst launcher');
COMMENT ON VIEW ecst.workers IS 'pg_ecst background launcher and workers (from pg_stat_activity)';

CREATE VIEW ecst.stats AS
SELECT s.name                              AS stream,
       s.shape,
       coalesce(c.applied, 0)::bigint       AS applied,
       coalesce(c.duplicate, 0)::bigint     AS duplicate,
       coalesce(c.stale, 0)::bigint         AS stale,
       coalesce(c.skipped, 0)::bigint       AS skipped,
       coalesce(c.conflicts, 0)::bigint     AS conflicts,
       coalesce(c.dead_lettered, 0)::bigint AS dead_lettered,
       coalesce(i.pending, 0)::bigint       AS pending,
       now() - i.oldest                     AS oldest_pending_age,
       c.last_applied_at,
       (SELECT count(*) FROM ecst.workers w WHERE w.backend_type = 'pg_ecst worker'
          AND w.database = current_database())::int AS workers_running
FROM ecst.streams s
LEFT JOIN (
    SELECT u.stream_id,
           sum(u.applied) AS applied, sum(u.duplicate) AS duplicate, sum(u.stale) AS stale,
           sum(u.skipped) AS skipped, sum(u.conflicts) AS conflicts,
           sum(u.dead_lettered) AS dead_lettered, max(u.last_applied_at) AS last_applied_at
    FROM (
        SELECT stream_id, applied, duplicate, stale, skipped, conflicts, dead_lettered, last_applied_at
        FROM ecst.stream_counters
        UNION ALL
        SELECT stream_id, applied, duplicate, stale, skipped, conflicts, dead_lettered, last_applied_at
        FROM ecst._unflushed_counters()
    ) u
    GROUP BY u.stream_id
) c ON c.stream_id = s.id
LEFT JOIN (
    SELECT stream, count(*) AS pending, min(received_at) AS oldest FROM ecst.inbox GROUP BY stream
) i ON i.stream = s.name;
COMMENT ON VIEW ecst.stats IS 'pg_ecst per-stream counters, inbox backlog and worker status';

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

-- Wake the background workers when rows arrive in the inbox (at commit).
CREATE TRIGGER inbox_wake AFTER INSERT ON ecst.inbox
    FOR EACH STATEMENT EXECUTE FUNCTION ecst._inbox_wake();

-- The feed: COPY ecst.feed (stream, payload) FROM STDIN (or INSERT INTO ecst.feed ... SELECT)
-- applies the events within the statement's own transaction; nothing of them is stored but dead
-- letters and retained events. The triggers buffer the rows and apply them by chunk.
CREATE VIEW ecst.feed AS SELECT NULL::text AS stream, NULL::text AS payload WHERE false;
COMMENT ON VIEW ecst.feed IS 'COPY or INSERT (stream, payload) here: the events are applied in the same statement, nothing of them stored';
CREATE TRIGGER feed_begin BEFORE INSERT ON ecst.feed FOR EACH STATEMENT EXECUTE FUNCTION ecst._feed_begin();
CREATE TRIGGER feed_row INSTEAD OF INSERT ON ecst.feed FOR EACH ROW EXECUTE FUNCTION ecst._feed_row();
CREATE TRIGGER feed_end AFTER INSERT ON ecst.feed FOR EACH STATEMENT EXECUTE FUNCTION ecst._feed_end();
GRANT INSERT ON ecst.feed TO PUBLIC;

-- Trigger mode: AFTER INSERT ... FOR EACH ROW EXECUTE FUNCTION ecst.apply_trigger('stream', 'payload_column')
-- applies the row's event in the same transaction (the payload column may be text, json or jsonb).
CREATE FUNCTION ecst.apply_trigger() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    payload text;
    col text := coalesce(TG_ARGV[1], 'payload');
BEGIN
    IF TG_NARGS < 1 OR TG_LEVEL <> 'ROW' OR TG_WHEN <> 'AFTER' OR TG_OP NOT IN ('INSERT', 'UPDATE') THEN
        RAISE EXCEPTION 'ecst.apply_trigger() must be an AFTER INSERT (or UPDATE) ... FOR EACH ROW trigger with the stream name as its first argument'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'CREATE TRIGGER t AFTER INSERT ON my_events FOR EACH ROW EXECUTE FUNCTION ecst.apply_trigger(''my_stream'', ''payload'');';
    END IF;
    -- Qualified: no function a caller's schema holds may stand in for it (this runs as the
    -- inserting role, possibly a superuser, whatever its search_path).
    EXECUTE pg_catalog.format('SELECT ($1).%I::text', col) INTO payload USING NEW;
    PERFORM ecst.apply(TG_ARGV[0], payload);
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION ecst.apply_trigger() IS 'Row trigger applying each inserted event: ecst.apply_trigger(stream [, payload_column])';

-- Folds the append-only counter rows into one row per stream (keeps ecst.stats cheap). It keeps
-- every total, so it runs as the extension's owner for whoever may execute it (ecst_reader).
CREATE FUNCTION ecst.compact_counters() RETURNS bigint
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (DELETE FROM ecst.stream_counters RETURNING *),
    folded AS (
        INSERT INTO ecst.stream_counters
        SELECT stream_id, sum(applied), sum(duplicate), sum(stale), sum(skipped), sum(conflicts),
               sum(dead_lettered), max(last_applied_at)
        FROM gone GROUP BY stream_id
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone) - (SELECT count(*) FROM folded)
$$;
COMMENT ON FUNCTION ecst.process_inbox(bigint) IS 'Applies pending inbox events now, in this transaction; returns rows processed';

COMMENT ON FUNCTION ecst.compact_counters() IS 'Folds ecst.stream_counters into one row per stream; returns rows removed';

CREATE FUNCTION ecst.load_snapshot(stream text, source regclass, mode text DEFAULT 'merge', as_of text DEFAULT NULL)
RETURNS TABLE (loaded bigint, stale bigint, deleted bigint, dead_lettered bigint)
LANGUAGE sql VOLATILE
AS $$ SELECT * FROM ecst._load_snapshot(stream, source::oid, mode, as_of) $$;
COMMENT ON FUNCTION ecst.load_snapshot(text, regclass, text, text)
    IS 'Bulk-loads snapshot events from source.payload under the version rules; replace mode deletes absent entities not newer than as_of';
-- as_of as a number or a timestamp, as users pass it (by name: as_of => 100, as_of => now()).
CREATE FUNCTION ecst.load_snapshot(stream text, source regclass, as_of numeric, mode text DEFAULT 'merge')
RETURNS TABLE (loaded bigint, stale bigint, deleted bigint, dead_lettered bigint)
LANGUAGE sql VOLATILE
AS $$ SELECT * FROM ecst._load_snapshot(stream, source::oid, mode, as_of::text) $$;
COMMENT ON FUNCTION ecst.load_snapshot(text, regclass, numeric, text)
    IS 'ecst.load_snapshot with as_of given as a number (a version)';
CREATE FUNCTION ecst.load_snapshot(stream text, source regclass, as_of timestamptz, mode text DEFAULT 'merge')
RETURNS TABLE (loaded bigint, stale bigint, deleted bigint, dead_lettered bigint)
LANGUAGE sql VOLATILE
AS $$ SELECT * FROM ecst._load_snapshot(stream, source::oid, mode,
                                        pg_catalog.to_char(as_of AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')) $$;
COMMENT ON FUNCTION ecst.load_snapshot(text, regclass, timestamptz, text)
    IS 'ecst.load_snapshot with as_of given as a timestamp (an RFC 3339 version)';
COMMENT ON FUNCTION ecst.export_snapshot(text) IS 'The replica as create events in the stream''s own format, with versions';

-- Privileges (docs/operations/security.md). pg_ecst's functions check the caller's privileges on the
-- replica tables themselves and reach pg_ecst's own tables as the extension's owner, so anyone may
-- call them; the tables themselves are granted to nobody. Two group roles (created once per
-- cluster, NOLOGIN) carry the direct access a pipeline or a monitor needs.
GRANT USAGE ON SCHEMA ecst TO PUBLIC;
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'ecst_writer') THEN
        CREATE ROLE ecst_writer NOLOGIN;
        COMMENT ON ROLE ecst_writer IS 'pg_ecst: may COPY/INSERT events into ecst.inbox';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'ecst_reader') THEN
        CREATE ROLE ecst_reader NOLOGIN;
        COMMENT ON ROLE ecst_reader IS 'pg_ecst: may read streams, dead letters, counters and the inbox backlog';
    END IF;
END
$roles$;
-- Only the event columns: `seq` (inbox order) and `received_at` are the inbox's to set.
GRANT INSERT (stream, payload) ON ecst.inbox TO ecst_writer;
GRANT USAGE ON SEQUENCE ecst.inbox_seq TO ecst_writer;
GRANT SELECT ON ecst.streams, ecst.stream_children, ecst.dead_letters, ecst.stream_counters, ecst.inbox,
    ecst.stats, ecst.workers, ecst.dead_letter_summary, ecst.routes, ecst.route_stats TO ecst_reader;
REVOKE EXECUTE ON FUNCTION ecst.compact_counters() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ecst.compact_counters() TO ecst_reader;

-- The background workers serve every database with the extension: the launcher probes this one
-- when the transaction that installs the extension commits.
SELECT ecst._extension_created();
