-- pg_ecst 0.4.0 -> 0.5.0 (ALTER EXTENSION pg_ecst UPDATE): streams on Citus distributed replicas
-- are applied on the nodes that hold their shards. What a fresh 0.5.0 install creates and 0.4.0
-- lacked; tests/integration/test_upgrade.sh checks that an updated database has exactly the
-- objects of a fresh install. (A stream's co-located tables and ecst.sharded_streams are created
-- by ecst.create_stream, not here.)

CREATE FUNCTION ecst."_apply_shard"(
	"stream_id" INT,
	"stage" oid,
	"token" TEXT,
	"policy" TEXT
) RETURNS TEXT
STRICT
LANGUAGE c
AS 'MODULE_PATHNAME', 'apply_shard_wrapper';
