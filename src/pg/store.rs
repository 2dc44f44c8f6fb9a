//! Where a stream keeps its version state and event ids, and the statements that reach them.
//!
//! - **Shared** (every stream on a local replica): `ecst.entity_state` and `ecst.applied_events`,
//!   rows keyed by stream id.
//! - **Sharded** (a stream on a hash-distributed Citus table): tables of the stream's own,
//!   `ecst.entity_state_<id>` and `ecst.applied_events_<id>`, with the same columns plus `dist`
//!   (the replica's distribution column's value, computed from the entity key), distributed by it
//!   and co-located with the replica: an entity's state lives in the shard group of its rows and
//!   moves with them. On the coordinator they are the distributed tables; where a shard's events
//!   are applied (on the node that holds it), the shards of that group.
//!
//! Each statement is written once, as a template over the shared tables' columns: `{state}`
//! and `{ids}` name the tables, `{+dist}` adds `, dist` to a sharded table's column list and
//! `{+dist_of:E}` adds `, <the distribution value of the entity key E>` to its values. Only this
//! module renders them, from names it derives from integers and the catalog of its own tables,
//! so nothing a caller says can become part of a statement run as the extension's owner
//! ([`Store::run`]).

use crate::pg::owner::as_owner;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, SpiClient, SpiTupleTable};
use std::borrow::Cow;

/// Where a stream's version state and event ids are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    Shared,
    Sharded(Sharded),
}

/// A sharded stream's tables (see the module's comment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sharded {
    pub stream_id: i32,
    /// Quoted, qualified names of the state and event-id tables (distributed tables, or shards).
    state: String,
    ids: String,
    stage: String,
    /// The distribution column's type as SQL (`format_type`, with its collation if not the type's).
    dist_type: String,
    /// Where the distribution column's text sits in an entity key of several columns (the key's
    /// JSON array, `ecst_core::spec::entity_key`); `None` for a key of one column.
    pub part: Option<usize>,
    /// On the node of a shard group: its shards, written directly (no routing).
    pub shard: Option<i64>,
}

/// The names of a sharded stream's tables, relative to schema `ecst`.
pub fn state_table(stream_id: i32) -> String {
    format!("entity_state_{stream_id}")
}

pub fn ids_table(stream_id: i32) -> String {
    format!("applied_events_{stream_id}")
}

/// The table through which the coordinator hands a batch's events to the shards' nodes: rows
/// inserted (and routed by Citus) and consumed in the same transaction.
pub fn stage_table(stream_id: i32) -> String {
    format!("stage_{stream_id}")
}

fn qualified(name: &str) -> String {
    format!("ecst.{}", quote_identifier(name))
}

impl Store {
    /// The store of stream `stream_id` on the coordinator: sharded if its tables exist.
    /// `part`: the distribution column's place in a key of several columns.
    pub fn of_stream(client: &mut SpiClient, stream_id: i32, part: Option<usize>) -> Store {
        let oid = crate::pg::syscache::own_relation(&std::ffi::CString::new(state_table(stream_id)).expect("no NUL"));
        match oid.and_then(|oid| column_type(client, oid, "dist")) {
            Some(dist_type) => Store::Sharded(Sharded {
                stream_id,
                state: qualified(&state_table(stream_id)),
                ids: qualified(&ids_table(stream_id)),
                stage: qualified(&stage_table(stream_id)),
                dist_type,
                part,
                shard: None,
            }),
            None => Store::Shared,
        }
    }

    /// The store of stream `stream_id` on the node holding a shard group: the group's shards of
    /// its state, event-id and stage tables (`shards`, as Citus's metadata names them).
    pub fn of_shard(
        client: &mut SpiClient,
        stream_id: i32,
        part: Option<usize>,
        shard: i64,
        shards: [pg_sys::Oid; 3],
    ) -> Store {
        let names: Vec<String> = shards
            .iter()
            .map(|&oid| {
                crate::pg::spi::internal::run(
                    client,
                    "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname)
                       FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                      WHERE c.oid = $1 AND n.nspname = 'ecst'",
                    &[oid.into()],
                )
                .first()
                .get::<String>(1)
                .ok()
                .flatten()
                .expect("a shard of pg_ecst's tables, in schema ecst")
            })
            .collect();
        Store::Sharded(Sharded {
            stream_id,
            state: names[0].clone(),
            ids: names[1].clone(),
            stage: names[2].clone(),
            dist_type: column_type(client, shards[0], "dist").expect("a sharded state table has dist"),
            part,
            shard: Some(shard),
        })
    }

    pub fn sharded(&self) -> Option<&Sharded> {
        match self {
            Store::Shared => None,
            Store::Sharded(s) => Some(s),
        }
    }

    /// Whether the stream's events must be sent to its shards' nodes to be applied.
    pub fn routed(&self) -> bool {
        matches!(self, Store::Sharded(Sharded { shard: None, .. }))
    }

    /// Runs a statement on the stream's version state or event ids, wherever this store keeps
    /// them: the template rendered ([`Store::render`], names this module derives itself) and run
    /// as the extension's owner, like every statement on pg_ecst's own tables
    /// ([`crate::pg::spi::internal`]) — except on the coordinator's tables of a sharded stream
    /// ([`Store::context`]); through a cached plan.
    pub fn run<'c>(
        &self,
        client: &mut SpiClient<'c>,
        template: &'static str,
        args: &[DatumWithOid<'_>],
    ) -> SpiTupleTable<'c> {
        self.context(|| crate::pg::spi::run(client, &self.render(template), args))
    }

    /// Whose statements these are. On the coordinator, a sharded stream's tables are Citus's:
    /// Citus reaches their shards through connections of the current role, and refuses to use
    /// another role's for shards that one of the transaction's connections has written (the
    /// routed batches run as the caller). So they are read and written as the caller, with
    /// `search_path` pinned, and row security lets a role reach the rows only of a stream whose
    /// replica it may apply (or, for reading, read): see `create_sharded`. Everywhere else (the
    /// shared tables, a shard group on its node), as the extension's owner.
    fn context<R>(&self, work: impl FnOnce() -> R) -> R {
        if self.routed() {
            // Row security on, whatever the session says: with it off, a query its policies would
            // filter fails instead.
            let _rls = crate::pg::gucs::Override::enter(&[(c"row_security", c"on")]);
            crate::pg::owner::pinned(work)
        } else {
            as_owner(work)
        }
    }

    /// [`Store::run`], planned for these arguments.
    pub fn run_once<'c>(
        &self,
        client: &mut SpiClient<'c>,
        template: &'static str,
        args: &[DatumWithOid<'_>],
    ) -> SpiTupleTable<'c> {
        self.context(|| crate::pg::spi::run_once(client, &self.render(template), args))
    }

    /// A statement template made concrete for this store (see the module's comment).
    pub fn render(&self, template: &'static str) -> Cow<'static, str> {
        let Store::Sharded(s) = self else {
            if !template.contains('{') {
                return Cow::Borrowed(template);
            }
            return Cow::Owned(
                strip_dist(template)
                    .replace("{state}", "ecst.entity_state")
                    .replace("{ids}", "ecst.applied_events")
                    .replace("{for_update}", "FOR UPDATE"),
            );
        };
        let mut out = String::with_capacity(template.len() + 64);
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let close = rest[open..].find('}').expect("a closed placeholder") + open;
            let inner = &rest[open + 1..close];
            match inner {
                "state" => out.push_str(&s.state),
                "ids" => out.push_str(&s.ids),
                "stage" => out.push_str(&s.stage),
                "+dist" => out.push_str(", dist"),
                // Citus locks no rows of several shards: replace mode's writes re-check instead.
                "for_update" => {}
                _ if inner.starts_with("+dist_of:") => {
                    out.push_str(", ");
                    out.push_str(&s.dist_of(&inner["+dist_of:".len()..]));
                }
                _ => {
                    let expr = inner.strip_prefix("dist:").expect("a known placeholder");
                    out.push_str(&format!("({expr})::{}", s.dist_type));
                }
            }
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        Cow::Owned(out)
    }
}

impl Sharded {
    /// SQL for the distribution column's value of the entity whose key text is `expr`.
    fn dist_of(&self, expr: &str) -> String {
        match self.part {
            None => format!("({expr})::{}", self.dist_type),
            Some(i) => format!("(({expr})::jsonb ->> {i})::{}", self.dist_type),
        }
    }
}

/// A shared-store rendering: the `{+...}` placeholders dropped.
fn strip_dist(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{+") {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').expect("a closed placeholder") + open;
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// A column's SQL type (`format_type`, with its collation if not the type's): a replica's
/// distribution column, or the `dist` column of one of pg_ecst's sharded tables.
fn column_type(client: &mut SpiClient, table: pg_sys::Oid, column: &str) -> Option<String> {
    crate::pg::spi::internal::run(
        client,
        "SELECT pg_catalog.format_type(a.atttypid, a.atttypmod)
                || CASE WHEN a.attcollation <> t.typcollation
                        THEN ' COLLATE ' || pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.collname)
                        ELSE '' END
           FROM pg_catalog.pg_attribute a
           JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
           LEFT JOIN pg_catalog.pg_collation c ON c.oid = a.attcollation
           LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.collnamespace
          WHERE a.attrelid = $1 AND a.attname = $2 AND NOT a.attisdropped",
        &[table.into(), column.into()],
    )
    .first()
    .get::<String>(1)
    .ok()
    .flatten()
}

/// Creates a sharded stream's tables, typed and collated as the replica's distribution column
/// `column`, distributed by `dist` and co-located with `replica` (the caller has checked that
/// Citus hash-distributes it). Run as the extension's owner: the tables are pg_ecst's; only the
/// stage table takes rows from the applying roles (`INSERT`, `SELECT`; consumed by pg_ecst in
/// the same transaction).
pub fn create_sharded(stream_id: i32, replica: pg_sys::Oid, column: &str) {
    let state = qualified(&state_table(stream_id));
    let ids = qualified(&ids_table(stream_id));
    let stage = qualified(&stage_table(stream_id));
    as_owner(|| {
        Spi::connect_mut(|client| {
            let ty = column_type(client, replica, column).expect("the distribution column exists");
            // The replica by its qualified name (each node has its own OIDs), quoted as a literal.
            let replica_name: String = client
                .select(
                    "SELECT pg_catalog.quote_literal(pg_catalog.format('%I.%I', n.nspname, c.relname))
                       FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                      WHERE c.oid = $1",
                    None,
                    &[replica.into()],
                )
                .expect("reading the replica's name")
                .first()
                .get(1)
                .expect("a name")
                .expect("the replica exists");
            let may = |privilege: &str| format!("pg_catalog.has_table_privilege({replica_name}, '{privilege}')");
            let may_read = may("SELECT");
            let may_apply = format!("{} AND {} AND {}", may("INSERT"), may("UPDATE"), may("DELETE"));
            let statements = [
                format!(
                    "CREATE TABLE {state} (stream_id integer NOT NULL, entity_key text NOT NULL, live_version numeric,
                        tomb_version numeric, field_versions jsonb, dist {ty} NOT NULL,
                        PRIMARY KEY (stream_id, entity_key, dist)) WITH (fillfactor = 80)"
                ),
                format!(
                    "CREATE TABLE {ids} (stream_id integer NOT NULL, event_id text NOT NULL,
                        applied_at timestamptz NOT NULL DEFAULT now(), dist {ty} NOT NULL,
                        PRIMARY KEY (stream_id, event_id, dist))"
                ),
                // Unlogged: its rows never outlive the transaction that stages them.
                format!(
                    "CREATE UNLOGGED TABLE {stage} (dist {ty} NOT NULL, token text NOT NULL, seq integer NOT NULL, payload text)"
                ),
                // The calling role stages its events and reads them back through Citus.
                format!("GRANT SELECT, INSERT ON {stage} TO PUBLIC"),
                // Read and written as the caller on the coordinator (`Store::context`): every role
                // may try, and row security lets through only those that may apply the stream's
                // replica (its INSERT, UPDATE and DELETE privileges) or, to read, select from it.
                // The extension's owner, who writes them on the nodes, owns them: row security
                // does not apply to it.
                format!("GRANT SELECT, INSERT, UPDATE, DELETE ON {state}, {ids} TO PUBLIC"),
                format!("ALTER TABLE {state} ENABLE ROW LEVEL SECURITY"),
                format!("ALTER TABLE {ids} ENABLE ROW LEVEL SECURITY"),
                format!("CREATE POLICY readers ON {state} FOR SELECT USING ({may_read})"),
                format!("CREATE POLICY appliers ON {state} USING ({may_apply}) WITH CHECK ({may_apply})"),
                format!("CREATE POLICY readers ON {ids} FOR SELECT USING ({may_read})"),
                format!("CREATE POLICY appliers ON {ids} USING ({may_apply}) WITH CHECK ({may_apply})"),
                format!("COMMENT ON TABLE {state} IS 'pg_ecst per-entity versions and tombstones of stream {stream_id}, co-located with its replica'"),
                format!("COMMENT ON TABLE {ids} IS 'pg_ecst event ids applied by stream {stream_id}, co-located with its replica'"),
                format!("COMMENT ON TABLE {stage} IS 'pg_ecst events of stream {stream_id} on their way to the shards'' nodes (rows live only inside the transaction that applies them)'"),
            ];
            for sql in &statements {
                client.update(sql, None, &[]).unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
            for table in [&state, &ids, &stage] {
                client
                    .update(
                        "SELECT create_distributed_table($1::regclass, 'dist', colocate_with => $2::regclass::text)",
                        None,
                        &[table.as_str().into(), replica.into()],
                    )
                    .unwrap_or_else(|e| panic!("distributing {table}: {e}"));
            }
        })
    })
}

/// Why a distribution column cannot key a sharded stream's tables (its type's name), if it cannot:
/// its values are
/// cast from text, and written, in statements run as the extension's owner on the nodes, so its
/// input must be a built-in's (a base type's, created by a superuser, or an enum's) — not a
/// domain's, whose checks are code anyone may write, nor an array or range of one.
pub fn unshardable(replica: pg_sys::Oid, column: &str) -> Option<String> {
    as_owner(|| {
        Spi::connect_mut(|client| {
            client
                .select(
                    "SELECT CASE WHEN t.typtype IN ('b', 'e') AND t.typcategory <> 'A' THEN NULL
                                 ELSE pg_catalog.format_type(t.oid, NULL) END
                       FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
                      WHERE a.attrelid = $1 AND a.attname = $2 AND NOT a.attisdropped",
                    None,
                    &[replica.into(), column.into()],
                )
                .expect("reading the distribution column's type")
                .first()
                .get::<String>(1)
                .ok()
                .flatten()
        })
    })
}

/// Drops a sharded stream's tables and shared definition (if it had them), and
/// `ecst.sharded_streams` with the last one.
pub fn drop_sharded(stream_id: i32) {
    if !has_shared_definitions() {
        return;
    }
    as_owner(|| {
        Spi::connect_mut(|client| {
            for table in [state_table(stream_id), ids_table(stream_id), stage_table(stream_id)] {
                let sql = format!("DROP TABLE IF EXISTS {}", qualified(&table));
                client.update(&sql, None, &[]).unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
        })
    });
    let left = Spi::connect_mut(|client| {
        crate::pg::spi::internal::run_once(
            client,
            "DELETE FROM ecst.sharded_streams WHERE stream_id = $1",
            &[stream_id.into()],
        );
        crate::pg::spi::internal::run_once(client, "SELECT EXISTS (SELECT 1 FROM ecst.sharded_streams)", &[])
            .first()
            .get::<bool>(1)
            .ok()
            .flatten()
            .unwrap_or(true)
    });
    // The last one gone, nothing of pg_ecst's is left outside the extension (DROP EXTENSION works).
    if !left {
        as_owner(|| Spi::run("DROP TABLE ecst.sharded_streams").expect("dropping ecst.sharded_streams"));
    }
}

/// Whether this database has `ecst.sharded_streams` (a sharded stream was created here, or on
/// the coordinator of this Citus worker node).
fn has_shared_definitions() -> bool {
    crate::pg::syscache::own_relation(c"sharded_streams").is_some()
}

/// Stores (or replaces) stream `stream_id`'s definition in `ecst.sharded_streams`, a Citus
/// reference table (a copy on every node, written through the coordinator), created the first
/// time. Only the extension's owner writes it: a node applies a shard's events by the definition
/// found there, never by one a caller passes.
pub fn share_definition(stream_id: i32, definition: &serde_json::Value) {
    if !has_shared_definitions() {
        as_owner(|| {
            Spi::connect_mut(|client| {
                for sql in [
                    "CREATE TABLE ecst.sharded_streams (stream_id integer PRIMARY KEY, definition jsonb NOT NULL)",
                    "COMMENT ON TABLE ecst.sharded_streams IS 'pg_ecst definitions of the streams on distributed replicas, on every node'",
                    "SELECT create_reference_table('ecst.sharded_streams')",
                ] {
                    client.update(sql, None, &[]).unwrap_or_else(|e| panic!("{sql}: {e}"));
                }
            })
        });
    }
    Spi::connect_mut(|client| {
        crate::pg::spi::internal::run_once(
            client,
            "INSERT INTO ecst.sharded_streams (stream_id, definition) VALUES ($1, $2)
             ON CONFLICT (stream_id) DO UPDATE SET definition = EXCLUDED.definition",
            &[stream_id.into(), pgrx::JsonB(definition.clone()).into()],
        );
    });
}

/// Stream `stream_id`'s shared definition, if this node has one. Read from this node's copy (the
/// reference table's shard): a query on the reference table itself would be a distributed query,
/// which Citus refuses inside a query on a shard (where `_apply_shard` runs).
pub fn shared_definition(stream_id: i32) -> Option<serde_json::Value> {
    if !has_shared_definitions() {
        return None;
    }
    as_owner(|| {
        Spi::connect_mut(|client| {
            // Both planned once per session: a node reads it for every batch it applies.
            let copy: Option<String> = crate::pg::spi::run(
                client,
                "SELECT pg_catalog.shard_name(s.logicalrelid, s.shardid) FROM pg_catalog.pg_dist_shard s
                  WHERE s.logicalrelid = 'ecst.sharded_streams'::pg_catalog.regclass
                    AND pg_catalog.to_regclass(pg_catalog.shard_name(s.logicalrelid, s.shardid)) IS NOT NULL",
                &[],
            )
            .first()
            .get(1)
            .ok()
            .flatten();
            let sql = format!(
                "SELECT definition FROM {} WHERE stream_id = $1",
                copy.as_deref().unwrap_or("ecst.sharded_streams")
            );
            crate::pg::spi::run(client, &sql, &[stream_id.into()])
                .first()
                .get::<pgrx::JsonB>(1)
                .ok()
                .flatten()
                .map(|j| j.0)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sharded(part: Option<usize>) -> Store {
        Store::Sharded(Sharded {
            stream_id: 7,
            state: "ecst.entity_state_7".into(),
            ids: "ecst.applied_events_7".into(),
            stage: "ecst.stage_7".into(),
            dist_type: "integer".into(),
            part,
            shard: None,
        })
    }

    #[test]
    fn templates_render_for_each_store() {
        let t = "INSERT INTO {state} (stream_id, entity_key{+dist}) SELECT $1, u.k{+dist_of:u.k} FROM x";
        assert_eq!(
            Store::Shared.render(t),
            "INSERT INTO ecst.entity_state (stream_id, entity_key) SELECT $1, u.k FROM x"
        );
        assert_eq!(
            sharded(None).render(t),
            "INSERT INTO ecst.entity_state_7 (stream_id, entity_key, dist) SELECT $1, u.k, (u.k)::integer FROM x"
        );
        assert_eq!(
            sharded(Some(1)).render("DELETE FROM {ids} WHERE {+dist}"),
            "DELETE FROM ecst.applied_events_7 WHERE , dist"
        );
        assert_eq!(sharded(Some(1)).render("VALUES ($2{+dist_of:$2})"), "VALUES ($2, (($2)::jsonb ->> 1)::integer)");
        assert!(matches!(Store::Shared.render("SELECT 1"), Cow::Borrowed(_)));
    }
}
