//! The epilogue of every applied event, on every path: its dead letter (payload verbatim), the
//! stream's counters, and the payload kept for the event log of a stream that retains events.

use crate::engine::outcome::Applied;
use crate::pg::spi;
use crate::stream::catalog::Stream;
use ecst_core::merge::Outcome;
use ecst_core::reject::Rejection;
use pgrx::spi::SpiClient;

/// Whether the applied payloads of a stream that retains events go to its event log: not while the
/// log itself is replayed (`rebuild`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum EventLog {
    Append,
    Replaying,
}

/// Records what happened to a run of events of one stream (`stream`: `None` when there is no such
/// stream; `stream_name` as the events named it), one result per event, each given as (payload as
/// received, when it was received: an inbox row's time, else now): the dead letters (payloads
/// verbatim), the stream's counters, and — for streams that retain events — the payloads for the
/// event log, appended in one statement. The log keeps every event but duplicates, dead letters
/// and events skipped for a conflict (replayed after a compaction, with nothing left to conflict
/// with, a skipped event would be applied): an event stale under today's mapping (a delta whose
/// fields are all unmapped) may write a column a later mapping adds.
pub fn record_all<'p>(
    client: &mut SpiClient,
    stream: Option<&Stream>,
    stream_name: Option<&str>,
    events: impl IntoIterator<Item = (Option<&'p str>, Option<pgrx::datum::TimestampWithTimeZone>)>,
    results: &[Applied],
    log: EventLog,
) {
    let mut retained = Vec::new();
    for ((payload, received_at), result) in events.into_iter().zip(results) {
        record(client, stream, stream_name, payload, result, received_at, &mut retained);
    }
    if let (Some(s), EventLog::Append, false) = (stream, log, retained.is_empty()) {
        spi::internal::run(
            client,
            "INSERT INTO ecst.event_log (stream_id, payload) SELECT $1, pg_catalog.unnest($2::text[])",
            &[s.id.into(), retained.into()],
        );
    }
}

fn record(
    client: &mut SpiClient,
    stream: Option<&Stream>,
    stream_name: Option<&str>,
    payload: Option<&str>,
    result: &Applied,
    received_at: Option<pgrx::datum::TimestampWithTimeZone>,
    retained: &mut Vec<String>,
) {
    if let Applied::Rejected { rejection, sqlstate, .. } = result {
        dead_letter(client, stream_name, payload, rejection, sqlstate.as_deref(), received_at);
    }
    if let Some(s) = stream {
        crate::engine::counters::count(s.id, result);
        let kept = matches!(result, Applied::Done { outcome, .. } if !matches!(outcome, Outcome::Duplicate | Outcome::Skipped));
        if let (true, true, Some(p)) = (s.retain_events, kept, payload) {
            retained.push(p.to_string());
        }
    }
}

/// Records a dead letter that arrived at `received_at` (an inbox row), or now.
pub fn dead_letter(
    client: &mut SpiClient,
    stream: Option<&str>,
    payload: Option<&str>,
    r: &Rejection,
    sqlstate: Option<&str>,
    received_at: Option<pgrx::datum::TimestampWithTimeZone>,
) {
    spi::internal::run(
        client,
        "INSERT INTO ecst.dead_letters (stream, payload, error_code, message, sqlstate, received_at)
         VALUES ($1, $2, $3, $4, $5, coalesce($6, now()))",
        &[
            stream.into(),
            payload.into(),
            r.code.as_str().into(),
            r.message.as_str().into(),
            sqlstate.into(),
            received_at.into(),
        ],
    );
}
