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
    on_conflict text DEFAULT 'apply'
) RETURNS void
LANGUAGE sql VOLATILE
AS $$ SELECT ecst._create_stream(name, target::oid, shape, key, state_path, columns, version, event_id, children, on_conflict) $$;
COMMENT ON FUNCTION ecst.create_stream(text, regclass, text, jsonb, text, jsonb, text, text, jsonb, text)
    IS 'Binds one kind of ECST event to a replica table (see README: Streams)';

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

COMMENT ON FUNCTION ecst.apply_batch(text, jsonb[]) IS 'Applies many events (in order per entity); returns the count per outcome';

CREATE VIEW ecst.stats AS
SELECT s.name                              AS stream,
       s.shape,
       coalesce(c.applied, 0)::bigint       AS applied,
       coalesce(c.duplicate, 0)::bigint     AS duplicate,
       coalesce(c.stale, 0)::bigint         AS stale,
       coalesce(c.skipped, 0)::bigint       AS skipped,
       coalesce(c.conflicts, 0)::bigint     AS conflicts,
       coalesce(c.dead_lettered, 0)::bigint AS dead_lettered,
       c.last_applied_at
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
) c ON c.stream_id = s.id;
COMMENT ON VIEW ecst.stats IS 'pg_ecst per-stream counters';

-- Folds the append-only counter rows into one row per stream (keeps ecst.stats cheap).
CREATE FUNCTION ecst.compact_counters() RETURNS bigint
LANGUAGE sql VOLATILE
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
COMMENT ON FUNCTION ecst.compact_counters() IS 'Folds ecst.stream_counters into one row per stream; returns rows removed';
