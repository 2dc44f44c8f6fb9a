-- pg_ecst catalog: stream definitions, per-entity version state, applied event ids,
-- dead letters and counters. Every table is registered with pg_extension_config_dump so
-- pg_dump/restore keeps its rows.

-- What happened to an event.
CREATE TYPE ecst.outcome AS ENUM ('applied', 'duplicate', 'stale', 'skipped', 'dead_lettered');

CREATE SEQUENCE ecst.streams_id_seq AS integer;

-- One row per stream: the user's definition, exactly as given to ecst.create_stream.
CREATE TABLE ecst.streams (
    id          integer PRIMARY KEY DEFAULT nextval('ecst.streams_id_seq'),
    name        text NOT NULL UNIQUE CHECK (name <> ''),
    target      regclass NOT NULL,
    shape       text NOT NULL CHECK (shape IN ('delta', 'entity_snapshot', 'aggregate_snapshot')),
    key         jsonb NOT NULL,
    state_path  text,
    columns     jsonb NOT NULL DEFAULT '{}',
    version     text,
    event_id    text,
    on_conflict text NOT NULL DEFAULT 'apply'
                CHECK (on_conflict IN ('apply', 'skip', 'dead_letter', 'error')),
    retain_events boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  name NOT NULL DEFAULT current_user,
    -- Where the ECST event sits inside an envelope (0.3.0; last, as ALTER TABLE ADD COLUMN put it).
    event_path  text,
    -- The JSON Schema every payload is checked against (0.4.0).
    schema      jsonb
);
ALTER SEQUENCE ecst.streams_id_seq OWNED BY ecst.streams.id;
COMMENT ON TABLE ecst.streams IS 'pg_ecst stream definitions (managed by ecst.create_stream / ecst.drop_stream)';

-- Child tables of aggregate_snapshot streams (the `children` argument of create_stream).
CREATE TABLE ecst.stream_children (
    stream_id   integer NOT NULL REFERENCES ecst.streams (id) ON DELETE CASCADE,
    name        text NOT NULL,
    path        text NOT NULL,
    target      regclass NOT NULL,
    key         jsonb NOT NULL,
    parent_key  jsonb NOT NULL,
    columns     jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (stream_id, name)
);
COMMENT ON TABLE ecst.stream_children IS 'pg_ecst child tables of aggregate_snapshot streams';

-- Applied events of streams created with retain_events => true, in application order, for
-- ecst.rebuild; ecst.compact_events flattens it.
CREATE SEQUENCE ecst.event_log_seq AS bigint;
CREATE TABLE ecst.event_log (
    stream_id integer NOT NULL REFERENCES ecst.streams (id) ON DELETE CASCADE,
    seq       bigint NOT NULL DEFAULT nextval('ecst.event_log_seq'),
    payload   text NOT NULL,
    logged_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, seq)
);
COMMENT ON TABLE ecst.event_log IS 'pg_ecst retained events (streams with retain_events), replayed by ecst.rebuild';

-- What pg_ecst remembers per entity: the highest create/update version (live), the highest
-- delete version (tombstone) and, for delta streams, the version of each column's last write.
CREATE TABLE ecst.entity_state (
    stream_id      integer NOT NULL REFERENCES ecst.streams (id) ON DELETE CASCADE,
    entity_key     text NOT NULL,
    live_version   numeric,
    tomb_version   numeric,
    field_versions jsonb,
    PRIMARY KEY (stream_id, entity_key)
) WITH (fillfactor = 80);
COMMENT ON TABLE ecst.entity_state IS 'pg_ecst per-entity versions and tombstones';

-- Event ids already applied (streams created with event_id => ...).
CREATE TABLE ecst.applied_events (
    stream_id  integer NOT NULL REFERENCES ecst.streams (id) ON DELETE CASCADE,
    event_id   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, event_id)
);
COMMENT ON TABLE ecst.applied_events IS 'pg_ecst event ids already applied, for deduplication';

CREATE SEQUENCE ecst.dead_letters_id_seq AS bigint;

-- Events that could not be applied, kept exactly as received.
CREATE TABLE ecst.dead_letters (
    id          bigint PRIMARY KEY DEFAULT nextval('ecst.dead_letters_id_seq'),
    stream      text,
    payload     text,
    error_code  text NOT NULL,
    message     text NOT NULL,
    sqlstate    text,
    received_at timestamptz NOT NULL DEFAULT now(),
    failed_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempts    integer NOT NULL DEFAULT 1
);
ALTER SEQUENCE ecst.dead_letters_id_seq OWNED BY ecst.dead_letters.id;
CREATE INDEX dead_letters_stream_idx ON ecst.dead_letters (stream, id);
COMMENT ON TABLE ecst.dead_letters IS 'pg_ecst events that could not be applied: payload exactly as received, a stable error_code and a message';

-- Append-only counter deltas (one row per committing transaction and stream); ecst.stats sums them.
-- Append-only keeps concurrent appliers from contending on a counter row.
CREATE TABLE ecst.stream_counters (
    stream_id       integer NOT NULL REFERENCES ecst.streams (id) ON DELETE CASCADE,
    applied         bigint NOT NULL DEFAULT 0,
    duplicate       bigint NOT NULL DEFAULT 0,
    stale           bigint NOT NULL DEFAULT 0,
    skipped         bigint NOT NULL DEFAULT 0,
    conflicts       bigint NOT NULL DEFAULT 0,
    dead_lettered   bigint NOT NULL DEFAULT 0,
    last_applied_at timestamptz
);
CREATE INDEX stream_counters_stream_idx ON ecst.stream_counters (stream_id);
COMMENT ON TABLE ecst.stream_counters IS 'pg_ecst counter deltas behind ecst.stats';

-- The inbox: pipelines COPY/INSERT raw events here and the workers (or ecst.process_inbox)
-- apply and delete them. Built for ingestion speed: payload is text (any line is accepted; a
-- bad one becomes a dead letter when processed), no primary key, one index on seq (inbox order).
-- The sequence caches values per session so concurrent writers do not contend on it; within
-- one session (one pipeline) seq grows with insertion order.
CREATE SEQUENCE ecst.inbox_seq AS bigint CACHE 1000;
CREATE TABLE ecst.inbox (
    stream      text,
    payload     text,
    seq         bigint NOT NULL DEFAULT nextval('ecst.inbox_seq'),
    received_at timestamptz NOT NULL DEFAULT now()
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
        autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 100000);
CREATE INDEX inbox_seq_idx ON ecst.inbox (seq);
COMMENT ON TABLE ecst.inbox IS 'pg_ecst inbox: COPY ecst.inbox (stream, payload) FROM STDIN, one JSON event per line';

SELECT pg_catalog.pg_extension_config_dump('ecst.inbox', '');
SELECT pg_catalog.pg_extension_config_dump('ecst.inbox_seq', '');
SELECT pg_catalog.pg_extension_config_dump('ecst.streams', '');
SELECT pg_catalog.pg_extension_config_dump('ecst.streams_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('ecst.stream_children', '');
SELECT pg_catalog.pg_extension_config_dump('ecst.entity_state', '');
SELECT pg_catalog.pg_extension_config_dump('ecst.applied_events', '');
SELECT pg_catalog.pg_extension_config_dump('ecst.dead_letters', '');
SELECT pg_catalog.pg_extension_config_dump('ecst.dead_letters_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('ecst.stream_counters', '');
SELECT pg_catalog.pg_extension_config_dump('ecst.event_log', '');
SELECT pg_catalog.pg_extension_config_dump('ecst.event_log_seq', '');

-- Routes (0.3.0): a name that stands for several streams; each event fed under it goes to the
-- stream that the value at `field` selects (`streams`: value -> stream name).
CREATE TABLE ecst.routes (
    name       text PRIMARY KEY CHECK (name <> ''),
    field      text NOT NULL,
    streams    jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by name NOT NULL DEFAULT current_user
);
COMMENT ON TABLE ecst.routes IS 'pg_ecst routes (managed by ecst.create_route / ecst.drop_route)';
SELECT pg_catalog.pg_extension_config_dump('ecst.routes', '');
