//! Whose privileges pg_ecst's own statements run with: pg_ecst's tables in schema `ecst`
//! (version state, event ids, dead letters, counters, inbox, event log, catalog) are reached only
//! through pg_ecst's functions, which run those statements — and only those — as the extension's
//! owner, with `search_path` pinned to `pg_catalog, pg_temp`, so that no caller-created operator
//! or function can be resolved while the owner's privileges are in effect. The owner context is
//! entered only by [`crate::pg::spi::Internal`] statements (and [`internal`] for the catalog's
//! few multi-statement units); replica tables are never written in it. Also: role checks.

use crate::pg::errors::raise;
use crate::pg::syscache::{own_relation, with_pg_class};
use pgrx::pg_sys;
use pgrx::PgSqlErrorCode as Code;

/// The role that owns pg_ecst's tables (the role that ran `CREATE EXTENSION`).
pub fn extension_owner() -> pg_sys::Oid {
    let Some(streams) = own_relation(c"streams") else {
        raise(Code::ERRCODE_UNDEFINED_TABLE, "table ecst.streams does not exist", Some("Is pg_ecst installed?"));
    };
    relation_owner(streams).expect("ecst.streams exists")
}

/// The owner of a relation, if it exists.
fn relation_owner(relid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    with_pg_class(relid, |c| c.relowner)
}

pub fn current_user() -> pg_sys::Oid {
    // SAFETY: reads the current user id.
    unsafe { pg_sys::GetUserId() }
}

pub fn role_name(role: pg_sys::Oid) -> String {
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
fn pinned_path() -> crate::pg::gucs::Override {
    crate::pg::gucs::Override::enter(&[(c"search_path", c"pg_catalog, pg_temp")])
}

/// Undoes [`internal`]'s switch (also when an error unwinds through it).
struct AsOwner {
    user: pg_sys::Oid,
    context: i32,
    // Dropped after the user id is restored: the path was pinned first.
    _path: crate::pg::gucs::Override,
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
pub(in crate::pg) fn as_owner<R>(work: impl FnOnce() -> R) -> R {
    let _owner = AsOwner::enter();
    work()
}

/// Whether the current role has the privileges of `role` (superusers have all).
pub fn acts_as(role: pg_sys::Oid) -> bool {
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
