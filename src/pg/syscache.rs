//! Catalog lookups through PostgreSQL's syscache (no SQL, no snapshot).

use pgrx::pg_sys;

/// One of pg_ecst's own relations in schema `ecst`, by name (syscache lookups), if it exists.
pub fn own_relation(name: &std::ffi::CStr) -> Option<pg_sys::Oid> {
    // SAFETY: catalog lookups through the syscache, inside a transaction.
    let oid = unsafe {
        let schema = pg_sys::get_namespace_oid(c"ecst".as_ptr(), true);
        if schema == pg_sys::Oid::INVALID {
            return None;
        }
        pg_sys::get_relname_relid(name.as_ptr(), schema)
    };
    (oid != pg_sys::Oid::INVALID).then_some(oid)
}

/// Reads a relation's `pg_class` row through the syscache (`None`: no such relation).
pub fn with_pg_class<T>(relid: pg_sys::Oid, read: impl FnOnce(&pg_sys::FormData_pg_class) -> T) -> Option<T> {
    // SAFETY: a syscache lookup; the tuple is only read inside `read` and released before returning.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(pg_sys::SysCacheIdentifier::RELOID as _, relid.into());
        if tuple.is_null() {
            return None;
        }
        let value = read(&*(pg_sys::GETSTRUCT(tuple) as *const pg_sys::FormData_pg_class));
        pg_sys::ReleaseSysCache(tuple);
        Some(value)
    }
}
