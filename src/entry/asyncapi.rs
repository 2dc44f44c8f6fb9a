//! AsyncAPI contracts in SQL: `ecst.asyncapi_plan` (the replicas and streams a document's received
//! messages need, as SQL to review and run) and `ecst.asyncapi_message_schema` (one message's
//! payload schema, for `create_stream(..., schema => ...)`). The reading and inference are the
//! core's (`ecst_core::asyncapi`); this maps its errors to SQLSTATEs and quotes identifiers with
//! PostgreSQL's own rules. Nothing here executes the SQL it returns.

use crate::pg::errors::raise;
use ecst_core::asyncapi::{Document, Error, ErrorKind};
use pgrx::prelude::*;
use pgrx::{JsonB, PgSqlErrorCode as Code};

fn fail(e: Error) -> ! {
    let code = match e.kind {
        ErrorKind::NotAsyncApi | ErrorKind::BadRef | ErrorKind::CannotInfer => Code::ERRCODE_INVALID_PARAMETER_VALUE,
        ErrorKind::UnsupportedVersion | ErrorKind::Unsupported => Code::ERRCODE_FEATURE_NOT_SUPPORTED,
        ErrorKind::NotFound => Code::ERRCODE_UNDEFINED_OBJECT,
    };
    raise(code, e.message, e.hint.as_deref())
}

/// For each message the document's receive operations take (on `channel`, or on every channel):
/// its inferred shape, its key field(s), and the SQL creating its replica table(s) and stream.
#[pg_extern(stable, parallel_safe)]
fn asyncapi_plan(
    doc: Option<JsonB>,
    channel: default!(Option<&str>, "NULL"),
) -> TableIterator<'static, (name!(message, String), name!(shape, String), name!(key, String), name!(sql, String))> {
    let doc = doc.unwrap_or_else(|| raise(Code::ERRCODE_NULL_VALUE_NOT_ALLOWED, "doc must not be NULL", None));
    let document = Document::new(&doc.0).unwrap_or_else(|e| fail(e));
    let plans = document.plan(channel, &|name: &str| pgrx::spi::quote_identifier(name)).unwrap_or_else(|e| fail(e));
    TableIterator::new(plans.into_iter().map(|p| (p.message, p.shape.as_str().to_string(), p.key, p.sql)))
}

/// A message's payload schema with the document's `$ref`s inlined: what `create_stream`'s
/// `schema` checks every payload against.
#[pg_extern(stable, parallel_safe)]
fn asyncapi_message_schema(doc: JsonB, message: &str) -> JsonB {
    let document = Document::new(&doc.0).unwrap_or_else(|e| fail(e));
    JsonB(document.message_schema(message).unwrap_or_else(|e| fail(e)))
}
