//! Discarding dead letters that will never apply (`ecst.discard_dead_letters`).
//!
//! The privilege rule is `ecst.retry_dead_letters`'s: a stream's letters are the business of
//! whoever may apply that stream (INSERT, UPDATE and DELETE on each of its tables); letters
//! received before their stream was created, and letters of streams that do not exist, only the
//! extension owner's (or a member of its role). Letters the caller may not discard are left and
//! counted in a notice.

use crate::pg::errors;
use crate::pg::owner;
use crate::pg::spi;
use crate::stream::security;
use ecst_core::reject::RejectCode;
use pgrx::datum::Interval;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

/// The letters a filter selects: `$1` stream, `$2` error code, `$3` older than (by `failed_at`,
/// the last attempt: a letter someone retried a minute ago is not old). A macro: statements are
/// literals (`spi::internal`).
macro_rules! filter {
    () => {
        "($1::text IS NULL OR d.stream = $1)
         AND ($2::text IS NULL OR d.error_code = $2)
         AND ($3::interval IS NULL OR d.failed_at < pg_catalog.now() - $3)"
    };
}

/// Removes the dead letters matching every given filter that the caller may discard; returns how
/// many were removed.
pub fn discard(stream: Option<&str>, error_code: Option<&str>, older_than: Option<Interval>) -> i64 {
    if let Some(code) = error_code {
        if !RejectCode::ALL.iter().any(|c| c.as_str() == code) {
            let known: Vec<&str> = RejectCode::ALL.iter().map(|c| c.as_str()).collect();
            errors::raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("unknown dead-letter error code {code:?}"),
                Some(&format!("error codes: {}", known.join(", "))),
            );
        }
    }
    if let Some(age) = older_than {
        if age.is_negative() {
            errors::raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                "older_than must not be negative",
                Some("e.g. older_than => interval '30 days'"),
            );
        }
    }
    if let Some(s) = stream.and_then(crate::stream::catalog::try_stream) {
        security::require_apply(&s);
    }
    let args = || [stream.into(), error_code.into(), older_than.into()];
    Spi::connect_mut(|client| {
        if owner::is_admin() {
            return spi::internal::run_once(
                client,
                concat!("DELETE FROM ecst.dead_letters d WHERE ", filter!()),
                &args(),
            )
            .len() as i64;
        }
        // Per stream name: the stream's tables (none: no such stream), and how many of the selected
        // letters arrived before the stream was created.
        type Group = (String, Vec<pgrx::pg_sys::Oid>, i64, i64);
        let groups: Vec<Group> = spi::internal::run_once(
            client,
            concat!(
                "SELECT d.stream,
                                CASE WHEN s.id IS NULL THEN '{}'::oid[] ELSE
                                    pg_catalog.array_prepend(s.target::oid, ARRAY(
                                        SELECT c.target::oid FROM ecst.stream_children c WHERE c.stream_id = s.id))
                                END,
                                count(*) FILTER (WHERE s.id IS NULL OR d.received_at < s.created_at),
                                count(*)
                         FROM ecst.dead_letters d LEFT JOIN ecst.streams s ON s.name = d.stream
                         WHERE ",
                filter!(),
                "
                         GROUP BY d.stream, s.id, s.target"
            ),
            &args(),
        )
        .map(|r| {
            (
                r.get(1).unwrap().unwrap(),
                r.get(2).unwrap().unwrap(),
                r.get(3).unwrap().unwrap(),
                r.get(4).unwrap().unwrap(),
            )
        })
        .collect();
        let mut removed = 0i64;
        let mut skipped = 0i64;
        for (name, tables, not_theirs, total) in groups {
            // A stream's tables are only looked at (not locked): may_apply_table reads pg_class.
            if tables.is_empty() || !tables.iter().all(|t| security::may_apply_table(*t)) {
                skipped += total;
                continue;
            }
            skipped += not_theirs;
            removed += spi::internal::run_once(
                client,
                concat!(
                    "DELETE FROM ecst.dead_letters d USING ecst.streams s WHERE ",
                    filter!(),
                    " AND d.stream = $4 AND s.name = $4 AND d.received_at >= s.created_at"
                ),
                &[stream.into(), error_code.into(), older_than.into(), name.as_str().into()],
            )
            .len() as i64;
        }
        if skipped > 0 {
            notice!(
                "pg_ecst: kept {skipped} dead letter(s) this role may not discard (of streams it may not apply, of streams that do not exist, or received before their stream was created)"
            );
        }
        removed
    })
}
