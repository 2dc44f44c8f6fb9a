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
//!   while the owner's privileges are in effect ([`internal`]).
//! - Operations on a whole stream (`drop_stream`, `rebuild`, `compact_events`) need ownership
//!   of its replica table, like `ALTER TABLE` would ([`require_owner`]).

use crate::catalog::{self, Stream, TableInfo};
use crate::errors::raise;
use pgrx::pg_sys;
use pgrx::PgSqlErrorCode as Code;

/// The role that owns pg_ecst's tables (the role that ran `CREATE EXTENSION`).
pub fn extension_owner() -> pg_sys::Oid {
    let Some(streams) = catalog::own_relation(c"streams") else {
        raise(Code::ERRCODE_UNDEFINED_TABLE, "table ecst.streams does not exist", Some("Is pg_ecst installed?"));
    };
    relation_owner(streams).expect("ecst.streams exists")
}

/// The owner of a relation, if it exists.
fn relation_owner(relid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    catalog::with_pg_class(relid, |c| c.relowner)
}

fn current_user() -> pg_sys::Oid {
    // SAFETY: reads the current user id.
    unsafe { pg_sys::GetUserId() }
}

fn role_name(role: pg_sys::Oid) -> String {
    // SAFETY: returns a palloc'd copy of the name (or NULL with noerr).
    unsafe {
        let name = pg_sys::GetUserNameFromId(role, true);
        if name.is_null() {
            format!("role {}", role.to_u32())
        } else {
            std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    }
}

/// `search_path = pg_catalog, pg_temp` until dropped (also when an error unwinds through it).
fn pinned_path() -> crate::gucs::Override {
    crate::gucs::Override::enter(&[(c"search_path", c"pg_catalog, pg_temp")])
}

/// Undoes [`internal`]'s switch (also when an error unwinds through it).
struct AsOwner {
    user: pg_sys::Oid,
    context: i32,
    // Dropped after the user id is restored: the path was pinned first.
    _path: crate::gucs::Override,
}

impl AsOwner {
    fn enter() -> AsOwner {
        let owner = extension_owner();
        let mut user = pg_sys::Oid::INVALID;
        let mut context = 0;
        // SAFETY: the same steps as a SECURITY DEFINER function with `SET search_path` (fmgr.c's
        // fmgr_security_definer): a new GUC nesting level holding the pinned search_path, then the
        // owner's user id; `drop` pops both.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
            let path = pinned_path();
            pg_sys::SetUserIdAndSecContext(owner, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
            AsOwner { user, context, _path: path }
        }
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        // SAFETY: restores the user id `enter` changed; the path's level pops after this.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.context) };
    }
}

/// Runs `work` — catalog queries made as the caller — with `search_path = pg_catalog, pg_temp`:
/// no function or operator the caller (or anyone who may create objects in a schema on the
/// caller's path) defined can stand in for a built-in one and answer the query, nor run with the
/// privileges of whoever the caller is (a superuser, the worker).
pub fn pinned<R>(work: impl FnOnce() -> R) -> R {
    let _path = pinned_path();
    work()
}

/// Runs `work` — statements on pg_ecst's own tables only, never on replica tables or anything the
/// caller names — as the extension's owner with `search_path = pg_catalog, pg_temp`.
pub fn internal<R>(work: impl FnOnce() -> R) -> R {
    let _owner = AsOwner::enter();
    work()
}

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
    catalog::with_pg_class(table, |_| ()).is_some() && missing_privileges(table, current_user()).is_empty()
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

/// Whether the current role has the privileges of `role` (superusers have all).
fn acts_as(role: pg_sys::Oid) -> bool {
    // SAFETY: a role membership check.
    unsafe { pg_sys::has_privs_of_role(current_user(), role) }
}

/// Raises 42501 unless the current role owns (or is a member of the role owning) the table
/// `target`; a table that no longer exists can only be handled by the extension's owner.
pub fn require_owner(stream_name: &str, target: pg_sys::Oid, action: &str) {
    let allowed = match relation_owner(target) {
        Some(owner) => acts_as(owner),
        None => acts_as(extension_owner()),
    };
    if !allowed {
        raise(
            Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("must be owner of the replica table of stream \"{stream_name}\" to {action} it"),
            Some("Only the owner of a stream's replica table (or a member of the owning role) may do this."),
        );
    }
}

/// Whether the current role has the extension owner's privileges (e.g. for dead letters of a
/// stream that no longer exists).
pub fn is_admin() -> bool {
    acts_as(extension_owner())
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
    worker && crate::gucs::worker_role().is_some()
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
