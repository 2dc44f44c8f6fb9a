-- pg_ecst 0.1.0 -> 0.2.0 (ALTER EXTENSION pg_ecst UPDATE). What a fresh 0.2.0 install creates
-- and 0.1.0 lacked; tests/integration/test_upgrade.sh checks that an updated database has exactly
-- the objects of a fresh install.

-- Discarding dead letters that will never apply.
CREATE FUNCTION ecst."_discard_dead_letters"(
	"stream" TEXT,
	"error_code" TEXT,
	"older_than" interval
) RETURNS bigint
LANGUAGE c
AS 'MODULE_PATHNAME', 'discard_dead_letters_wrapper';

CREATE FUNCTION ecst.discard_dead_letters(stream text DEFAULT NULL, error_code text DEFAULT NULL,
                                          older_than interval DEFAULT NULL)
RETURNS bigint
LANGUAGE sql VOLATILE
AS $$ SELECT ecst._discard_dead_letters(stream, error_code, older_than) $$;
COMMENT ON FUNCTION ecst.discard_dead_letters(text, text, interval)
    IS 'Removes the dead letters matching every given filter (stream, error code, last failed longer ago than older_than) that the caller may discard; returns how many';

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
GRANT SELECT ON ecst.dead_letter_summary TO ecst_reader;

-- load_snapshot's as_of as a number or a timestamp.
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

COMMENT ON FUNCTION ecst.create_stream(text, regclass, text, jsonb, text, jsonb, text, text, jsonb, text, boolean)
    IS 'Binds one kind of ECST event to a replica table (see docs/reference.md)';

-- The background workers now serve every database with the extension: tell the launcher.
CREATE FUNCTION ecst."_extension_created"() RETURNS void
STRICT
LANGUAGE c
AS 'MODULE_PATHNAME', '_extension_created_wrapper';
SELECT ecst._extension_created();
