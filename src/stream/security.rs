//! Whose privileges pg_ecst acts with.
//!
//! - Replica tables (and a snapshot's source) are read and written as the **calling role**: its
//!   privileges, row-level security policies and triggers apply, exactly as for its own SQL.
//!   Before applying, pg_ecst checks up front that the caller may maintain the stream's tables
//!   (`INSERT`, `UPDATE`, `DELETE`), so a role that may not write a replica can neither write it
//!   nor leave traces in the stream's state, dead letters or counters.
//! - pg_ecst's own tables in schema `ecst` (version state, event ids, dead letters, counters,
//!   inbox claims, event log, catalog) are only reached through pg_ecst's functions, which run
//!   those statements — and only those — as the extension's owner, with `search_path` pinned
//!   to `pg_catalog, pg_temp` so that no caller-created operator or function can be resolved
//!   while the owner's privileges are in effect ([`internal`]). One exception: on a Citus
//!   coordinator, the version state and event ids of a stream on a distributed replica are read
//!   and written as the caller (Citus's connections are per role), and row security on them lets
//!   a role reach only the rows of streams whose replica it may apply, or read (`pg::store`).
//! - Operations on a whole stream (`drop_stream`, `rebuild`, `compact_events`) need ownership
//!   of its replica table, like `ALTER TABLE` would ([`require_owner`]).

use crate::pg::errors::raise;
use crate::pg::owner::{current_user, pinned, role_name};
use crate::pg::syscache::with_pg_class;
use crate::stream::catalog::{Stream, TableInfo};
use pgrx::pg_sys;
use pgrx::PgSqlErrorCode as Code;

/// The privileges applying a stream needs on each of its tables.
const APPLY: [(u32, &str); 3] =
    [(pg_sys::ACL_INSERT, "INSERT"), (pg_sys::ACL_UPDATE, "UPDATE"), (pg_sys::ACL_DELETE, "DELETE")];

fn tables(stream: &Stream) -> impl Iterator<Item = &TableInfo> {
    std::iter::once(&stream.table).chain(stream.children.iter().map(|c| &c.table))
}

/// The apply privileges (`APPLY`) `user` lacks on a table, by name.
fn missing_privileges(table: pg_sys::Oid, user: pg_sys::Oid) -> Vec<&'static str> {
    APPLY
        .iter()
        // SAFETY: an ACL check by OID (of a relation that exists: callers make sure).
        .filter(|(mode, _)| unsafe {
            pg_sys::pg_class_aclcheck(table, user, *mode as pg_sys::AclMode) != pg_sys::AclResult::ACLCHECK_OK
        })
        .map(|(_, name)| *name)
        .collect()
}

/// Whether the current role has the apply privileges on one table, read without locking it (for
/// deciding not to look at a stream at all: building one locks its tables). A table that is gone
/// has none.
pub fn may_apply_table(table: pg_sys::Oid) -> bool {
    with_pg_class(table, |_| ()).is_some() && missing_privileges(table, current_user()).is_empty()
}

/// Why the current role may not apply `stream`'s events (`None`: it may).
pub fn apply_denied(stream: &Stream) -> Option<String> {
    let user = current_user();
    tables(stream).find_map(|table| {
        let missing = missing_privileges(table.oid, user);
        (!missing.is_empty()).then(|| {
            format!(
                "permission denied: role \"{}\" lacks {} on table {} (stream \"{}\")",
                role_name(user),
                missing.join(", "),
                table.qualified,
                stream.spec.name
            )
        })
    })
}

const APPLY_HINT: &str =
    "Applying a stream needs INSERT, UPDATE and DELETE on its replica tables: GRANT them to the role.";

/// Raises 42501 unless the current role may apply `stream`'s events.
pub fn require_apply(stream: &Stream) {
    if let Some(message) = apply_denied(stream) {
        raise(Code::ERRCODE_INSUFFICIENT_PRIVILEGE, message, Some(APPLY_HINT));
    }
}

/// The hint for [`apply_denied`]'s message (for dead letters written by the worker).
pub fn apply_hint() -> &'static str {
    APPLY_HINT
}

/// Raises 42501 unless the current role may read every table of `stream`.
pub fn require_select(stream: &Stream) {
    let user = current_user();
    for table in tables(stream) {
        // SAFETY: an ACL check against a validated relation.
        let ok = unsafe {
            pg_sys::pg_class_aclcheck(table.oid, user, pg_sys::ACL_SELECT as pg_sys::AclMode)
                == pg_sys::AclResult::ACLCHECK_OK
        };
        if !ok {
            raise(
                Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("permission denied for table {} (stream \"{}\")", table.qualified, stream.spec.name),
                Some("Exporting a stream needs SELECT on its replica tables."),
            );
        }
    }
}

/// The roles owning the code that writing `tables` runs — the tables themselves (whose owner
/// decides their triggers, defaults, constraints, indexes, policies and rules), and every function
/// those call: trigger functions, functions in column defaults and generated columns, check
/// constraints, index expressions and predicates, policies, rules, and the check constraints of
/// the columns' domains (a domain, the domain it is over, and arrays of a domain).
const CODE_OWNERS: &str = "
WITH rel AS (SELECT r FROM pg_catalog.unnest($1::pg_catalog.oid[]) AS r),
objects AS (
    SELECT 'pg_catalog.pg_trigger'::pg_catalog.regclass AS c, t.oid AS o
    FROM pg_catalog.pg_trigger t JOIN rel ON t.tgrelid = rel.r
    UNION ALL SELECT 'pg_catalog.pg_attrdef'::pg_catalog.regclass, d.oid
    FROM pg_catalog.pg_attrdef d JOIN rel ON d.adrelid = rel.r
    UNION ALL SELECT 'pg_catalog.pg_constraint'::pg_catalog.regclass, k.oid
    FROM pg_catalog.pg_constraint k JOIN rel ON k.conrelid = rel.r
    UNION ALL SELECT 'pg_catalog.pg_class'::pg_catalog.regclass, i.indexrelid
    FROM pg_catalog.pg_index i JOIN rel ON i.indrelid = rel.r
    UNION ALL SELECT 'pg_catalog.pg_policy'::pg_catalog.regclass, p.oid
    FROM pg_catalog.pg_policy p JOIN rel ON p.polrelid = rel.r
    UNION ALL SELECT 'pg_catalog.pg_rewrite'::pg_catalog.regclass, w.oid
    FROM pg_catalog.pg_rewrite w JOIN rel ON w.ev_class = rel.r
    UNION ALL SELECT 'pg_catalog.pg_constraint'::pg_catalog.regclass, k.oid
    FROM pg_catalog.pg_attribute a JOIN rel ON a.attrelid = rel.r
    JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid
    JOIN pg_catalog.pg_type base ON base.oid IN (ty.oid, ty.typelem)
    JOIN pg_catalog.pg_constraint k ON k.contypid <> 0 AND k.contypid IN (base.oid, base.typbasetype)
    WHERE a.attnum > 0 AND NOT a.attisdropped
)
SELECT DISTINCT owner FROM (
    SELECT c.relowner AS owner FROM pg_catalog.pg_class c JOIN rel ON c.oid = rel.r
    UNION ALL
    SELECT p.proowner FROM objects
    JOIN pg_catalog.pg_depend d ON d.classid = objects.c AND d.objid = objects.o
    JOIN pg_catalog.pg_proc p ON d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND p.oid = d.refobjid
) owners";

/// Whether code owned by roles without the applying role's privileges may run: only in a
/// background worker whose role the administrator chose (`ecst.worker_role`), which is trusted
/// with the code of every stream it may write. Everywhere else — the default worker (the bootstrap
/// superuser), `process_inbox`, a retry of every stream, `rebuild`, `load_snapshot` — it may not.
fn trusts_all_code() -> bool {
    // SAFETY: reads a backend global.
    let worker = unsafe { pg_sys::MyBackendType } == pg_sys::BackendType::B_BG_WORKER;
    worker && crate::pg::gucs::worker_role().is_some()
}

/// Why the current role must not apply `stream` on behalf of others, if it must not: writing its
/// tables runs code (triggers, defaults, constraints...) owned by roles that do not have the
/// current role's privileges, which would hand them those privileges — with the default worker,
/// a superuser's. `None` when every such owner is the current role, a member of it, or a
/// superuser, and in a worker running as a configured `ecst.worker_role`.
pub fn untrusted_code(stream: &Stream) -> Option<String> {
    if trusts_all_code() {
        return None;
    }
    let user = current_user();
    let relids: Vec<pg_sys::Oid> = tables(stream).map(|t| t.oid).collect();
    let owners: Vec<pg_sys::Oid> = pinned(|| {
        pgrx::Spi::connect(|client| {
            client
                .select(CODE_OWNERS, None, &[relids.into()])
                .expect("reading who owns a stream's code")
                .filter_map(|r| r.get::<pg_sys::Oid>(1).ok().flatten())
                .collect()
        })
    });
    // SAFETY: role membership checks.
    let untrusted: Vec<String> = owners
        .into_iter()
        .filter(|owner| !unsafe { pg_sys::has_privs_of_role(*owner, user) })
        .map(|owner| format!("\"{}\"", role_name(owner)))
        .collect();
    (!untrusted.is_empty()).then(|| {
        format!(
            "stream \"{}\" is not applied as role \"{}\": its tables, or functions they run (triggers, defaults, constraints, indexes), belong to role(s) {} without that role's privileges",
            stream.spec.name,
            role_name(user),
            untrusted.join(", ")
        )
    })
}

/// The hint for [`untrusted_code`]'s message.
pub const UNTRUSTED_HINT: &str = "Set ecst.worker_role to a LOGIN role with only the apply privileges on the replicas, or let the tables' owner apply these events itself (e.g. SELECT ecst.retry_dead_letters('stream') as that role).";

/// Raises 42501 if [`untrusted_code`] refuses `stream` (for calls that name one stream:
/// `rebuild`, `load_snapshot`, `retry_dead_letters(stream)`).
pub fn require_trusted_code(stream: &Stream) {
    if let Some(message) = untrusted_code(stream) {
        raise(Code::ERRCODE_INSUFFICIENT_PRIVILEGE, message, Some(UNTRUSTED_HINT));
    }
}
