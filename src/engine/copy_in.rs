//! Inserting rows produced in Rust through PostgreSQL's own `COPY FROM` machinery
//! (`BeginCopyFrom` with a data callback, as logical replication's initial table sync does): the
//! same multi-row heap inserts, index maintenance, defaults, constraints and triggers as `COPY`.
//! `COPY` checks no privileges at this level: callers check them first (`security`).

use crate::stream::catalog::{Column, TableInfo};
use pgrx::pg_sys;
use std::cell::RefCell;
use std::ffi::CString;

/// Rows in `COPY` text format (tab-separated, `\N` for NULL), one `push_row` at a time.
#[derive(Default)]
pub struct Rows {
    text: Vec<u8>,
    pub count: usize,
}

impl Rows {
    pub fn push_row<'a>(&mut self, values: impl IntoIterator<Item = Option<&'a str>>) {
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.text.push(b'\t');
            }
            match value {
                None => self.text.extend_from_slice(b"\\N"),
                Some(v) => escape_into(&mut self.text, v),
            }
        }
        self.text.push(b'\n');
        self.count += 1;
    }
}

/// Escapes a value for `COPY` text format: backslash, tab, newline and carriage return.
fn escape_into(out: &mut Vec<u8>, value: &str) {
    for &b in value.as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

thread_local! {
    /// The rows `CopyFrom` is reading, and how far it got (the callback has no argument).
    static FEED: RefCell<(Vec<u8>, usize)> = const { RefCell::new((Vec::new(), 0)) };
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn read_feed(
    outbuf: *mut std::ffi::c_void,
    _minread: std::ffi::c_int,
    maxread: std::ffi::c_int,
) -> std::ffi::c_int {
    FEED.with(|f| {
        let (text, pos) = &mut *f.borrow_mut();
        let n = (text.len() - *pos).min(maxread.max(0) as usize);
        // SAFETY: COPY hands a buffer of at least `maxread` bytes.
        unsafe { std::ptr::copy_nonoverlapping(text.as_ptr().add(*pos), outbuf as *mut u8, n) };
        *pos += n;
        n as std::ffi::c_int
    })
}

/// Inserts `rows` (values for `columns`, in order) into `table` as `COPY table (columns) FROM`
/// would. Returns the number of rows inserted. Errors (a value that does not fit, a unique
/// violation...) are raised as `COPY` raises them.
pub fn copy_rows(table: &TableInfo, columns: &[&Column], rows: Rows) -> u64 {
    if rows.count == 0 {
        return 0;
    }
    FEED.with(|f| *f.borrow_mut() = (rows.text, 0));
    let names: Vec<CString> = columns.iter().map(|c| CString::new(c.name.as_str()).expect("no NUL")).collect();
    // SAFETY: the sequence of logical replication's copy_table (tablesync.c): open the relation,
    // a parse state with its range table entry, BeginCopyFrom with a callback, CopyFrom,
    // EndCopyFrom. Every list and string is palloc'd in the current memory context.
    let inserted = unsafe {
        let lock = pg_sys::RowExclusiveLock as i32;
        let rel = pg_sys::table_open(table.oid, lock);
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        pg_sys::addRangeTableEntryForRelation(pstate, rel, lock, std::ptr::null_mut(), false, false);
        let mut attnames: *mut pg_sys::List = std::ptr::null_mut();
        for name in &names {
            attnames = pg_sys::lappend(attnames, pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())) as *mut _);
        }
        // Rust strings are UTF-8 whatever the session's client_encoding.
        let encoding = pg_sys::makeDefElem(
            pg_sys::pstrdup(c"encoding".as_ptr()),
            pg_sys::makeString(pg_sys::pstrdup(c"UTF8".as_ptr())) as *mut pg_sys::Node,
            -1,
        );
        let options = pg_sys::lappend(std::ptr::null_mut(), encoding as *mut _);
        let cstate = pg_sys::BeginCopyFrom(
            pstate,
            rel,
            std::ptr::null_mut(),
            std::ptr::null(),
            false,
            Some(read_feed),
            attnames,
            options,
        );
        let inserted = pg_sys::CopyFrom(cstate);
        pg_sys::EndCopyFrom(cstate);
        pg_sys::free_parsestate(pstate);
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        inserted
    };
    FEED.with(|f| *f.borrow_mut() = (Vec::new(), 0));
    inserted
}

/// Whether `copy_rows` writes the table as SQL's `INSERT` would: not where `COPY FROM` skips
/// something SQL does — row-level security policies, rules — nor into a Citus table, whose rows
/// live in its shards, which only Citus's own `COPY` reaches (asked now, not of a cached stream:
/// a table distributed since is no less a shell on the coordinator).
pub fn writes_as_sql(table: &TableInfo) -> bool {
    crate::pg::syscache::with_pg_class(table.oid, |c| !c.relrowsecurity && !c.relhasrules).unwrap_or(false)
        && !crate::stream::citus::managed(table.oid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_escaped_for_copy_text_format() {
        let mut rows = Rows::default();
        rows.push_row([Some("a\tb"), None, Some("back\\slash\nnew\rline"), Some("\\N"), Some("")]);
        rows.push_row([Some("x")]);
        assert_eq!(String::from_utf8(rows.text).unwrap(), "a\\tb\t\\N\tback\\\\slash\\nnew\\rline\t\\\\N\t\nx\n");
        assert_eq!(rows.count, 2);
    }
}
