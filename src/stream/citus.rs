//! Replicas as Citus distributed tables: what `ecst.create_stream` checks of them. Citus is
//! optional: without it (no `pg_dist_partition`) every table is local and nothing is checked.
//!
//! An entity's rows must live on one node: a hash-distributed replica's key must include its
//! distribution column (every event of the entity then goes to one shard), and an aggregate's
//! child tables must be co-located with the aggregate's table and distributed by the child column
//! that holds the aggregate's distribution column (an aggregate and its children in one shard
//! group, so that one event's writes stay on one node).

use crate::pg::spi;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgSqlErrorCode as Code;

/// Why a definition is refused: SQLSTATE, message, hint.
pub type Invalid = (Code, String, Option<String>);

/// A table of a stream: its OID, its qualified name, and the columns that hold the stream's key
/// (for a child table: the columns holding the aggregate's key, in the aggregate's key order).
pub struct Placed<'a> {
    pub oid: pg_sys::Oid,
    pub name: &'a str,
    pub keys: Vec<&'a str>,
}

/// How Citus distributes a table.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Distribution {
    /// Not a Citus table (or no Citus in this database).
    Local,
    /// A reference table (a copy on every node) or a single-shard table: no column decides.
    Whole,
    /// Hash-distributed by this column, in this co-location group.
    Hash { column: String, colocation: i32 },
}

/// The boolean a query returns (false without a row or for NULL).
fn flag(client: &mut SpiClient, sql: &'static str) -> bool {
    spi::internal::run_once(client, sql, &[]).first().get::<bool>(1).ok().flatten().unwrap_or(false)
}

/// Whether Citus is installed in this database (its metadata tables are there).
fn installed(client: &mut SpiClient) -> bool {
    flag(client, "SELECT to_regclass('pg_catalog.pg_dist_partition') IS NOT NULL")
}

fn distribution(table: pg_sys::Oid) -> Distribution {
    Spi::connect_mut(|client| {
        if !installed(client) {
            return Distribution::Local;
        }
        let row = spi::internal::run_once(
            client,
            "SELECT partmethod::text, CASE WHEN partmethod = 'h' THEN column_to_column_name(logicalrelid, partkey) END,
                    colocationid
               FROM pg_catalog.pg_dist_partition WHERE logicalrelid = $1",
            &[table.into()],
        );
        let Some(row) = row.into_iter().next() else { return Distribution::Local };
        let method: Option<String> = row.get(1).ok().flatten();
        match (method.as_deref(), row.get::<String>(2).ok().flatten()) {
            (Some("h"), Some(column)) => {
                Distribution::Hash { column, colocation: row.get::<i32>(3).ok().flatten().unwrap_or(0) }
            }
            _ => Distribution::Whole,
        }
    })
}

/// Whether this database is a Citus worker node (Citus is there and this node's group is not the
/// coordinator's): pg_ecst's streams are defined on the coordinator, so a call that reaches a
/// worker (a trigger on a distributed table fires on the shards' nodes) finds none.
pub fn on_worker_node() -> bool {
    Spi::connect_mut(|client| {
        installed(client) && flag(client, "SELECT groupid <> 0 FROM pg_catalog.pg_dist_local_group")
    })
}

/// The column by which Citus hash-distributes the table (`None`: not hash-distributed).
pub fn distribution_column(table: pg_sys::Oid) -> Option<String> {
    match distribution(table) {
        Distribution::Hash { column, .. } => Some(column),
        _ => None,
    }
}

/// The shard of stream `stream_id`'s stage table (`ecst.stage_<id>`) that `relation` is, on this
/// node (`None`: it is not one).
pub fn stage_shard(stream_id: i32, relation: pg_sys::Oid) -> Option<i64> {
    Spi::connect_mut(|client| {
        if !installed(client) {
            return None;
        }
        spi::internal::run_once(
            client,
            "SELECT s.shardid FROM pg_catalog.pg_dist_shard s
              WHERE s.logicalrelid = pg_catalog.to_regclass('ecst.stage_' || $1)
                AND pg_catalog.to_regclass(pg_catalog.shard_name(s.logicalrelid, s.shardid)) = $2::oid::regclass",
            &[stream_id.into(), relation.into()],
        )
        .first()
        .get::<i64>(1)
        .ok()
        .flatten()
    })
}

/// The shard of `table` in the shard group of `shard`, as a local relation of this node (`None`:
/// there is none here, or `table` is no longer co-located with it).
pub fn colocated_shard(table: pg_sys::Oid, shard: i64) -> Option<pg_sys::Oid> {
    Spi::connect_mut(|client| {
        spi::internal::run_once(
            client,
            // shard_name leaves a shard in schema public unqualified.
            "SELECT pg_catalog.to_regclass(CASE WHEN n.nspname = 'public' THEN 'public.' ELSE '' END
                                           || pg_catalog.shard_name(o.logicalrelid, o.shardid))::oid
               FROM pg_catalog.pg_dist_shard s
               JOIN pg_catalog.pg_dist_shard o ON o.shardminvalue = s.shardminvalue
               JOIN pg_catalog.pg_dist_partition ps ON ps.logicalrelid = s.logicalrelid
               JOIN pg_catalog.pg_dist_partition po ON po.logicalrelid = o.logicalrelid AND po.colocationid = ps.colocationid
               JOIN pg_catalog.pg_class c ON c.oid = o.logicalrelid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE s.shardid = $1 AND o.logicalrelid = $2::oid::regclass",
            &[shard.into(), table.into()],
        )
        .first()
        .get::<pg_sys::Oid>(1)
        .ok()
        .flatten()
    })
}

/// Whether Citus manages the table (distributed, reference or Citus-local). Its rows then live in
/// shards that only SQL reaches — Citus routes statements and `COPY` through its hooks — while the
/// table itself, on the coordinator, is an empty shell: the executor's row API or `CopyFrom`
/// would write rows there that no query sees.
pub fn managed(table: pg_sys::Oid) -> bool {
    distribution(table) != Distribution::Local
}

/// Whether the stream's tables are distributed so that each entity's rows live on one node.
pub fn check(table: &Placed, children: &[Placed]) -> Result<(), Invalid> {
    let parent = distribution(table.oid);
    let parent_column = match &parent {
        Distribution::Hash { column, .. } => {
            if !table.keys.iter().any(|k| k == column) {
                return Err((
                    Code::ERRCODE_INVALID_TABLE_DEFINITION,
                    format!(
                        "{} is distributed by column \"{column}\", which is not part of the stream's key ({})",
                        table.name,
                        table.keys.join(", "),
                    ),
                    Some(format!(
                        "Distribute the replica by a key column: SELECT undistribute_table('{0}'); SELECT create_distributed_table('{0}', '{1}');",
                        table.name.replace('\'', "''"),
                        table.keys[0].replace('\'', "''"),
                    )),
                ));
            }
            Some(column.clone())
        }
        _ => None,
    };
    for child in children {
        let placed = distribution(child.oid);
        // The child column holding the aggregate's distribution column.
        let holding = parent_column
            .as_ref()
            .and_then(|pc| table.keys.iter().position(|k| k == pc))
            .and_then(|i| child.keys.get(i))
            .map(|c| c.to_string());
        let ok = match (&parent, &placed) {
            (Distribution::Local, Distribution::Local) => true,
            (Distribution::Hash { colocation: a, .. }, Distribution::Hash { column, colocation: b }) => {
                a == b && holding.as_ref() == Some(column)
            }
            (Distribution::Whole, Distribution::Whole) => true,
            _ => false,
        };
        if !ok {
            let hint = match (&parent, &holding) {
                (Distribution::Hash { .. }, Some(holding)) => format!(
                    "Distribute it with the aggregate's table: SELECT create_distributed_table('{}', '{}', colocate_with => '{}');",
                    child.name.replace('\'', "''"),
                    holding.replace('\'', "''"),
                    table.name.replace('\'', "''"),
                ),
                _ => "An aggregate's table and its child tables must be all local, all reference tables, or \
                      distributed and co-located by the aggregate's key."
                    .to_string(),
            };
            return Err((
                Code::ERRCODE_INVALID_TABLE_DEFINITION,
                format!(
                    "child table {} is not placed with {}: {} against {}",
                    child.name,
                    table.name,
                    describe(&placed),
                    describe(&parent),
                ),
                Some(hint),
            ));
        }
    }
    Ok(())
}

fn describe(d: &Distribution) -> String {
    match d {
        Distribution::Local => "a local table".into(),
        Distribution::Whole => "a reference (or single-shard) table".into(),
        Distribution::Hash { column, colocation } => {
            format!("distributed by \"{column}\" in co-location group {colocation}")
        }
    }
}
