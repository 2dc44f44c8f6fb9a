//! Applying rows of events (claimed from the inbox, or fed to `ecst.feed`): each name looked up
//! once (a stream, a route, or neither), each route's rows sent to the stream it selects, each
//! stream's rows to the engine in one run, and every outcome recorded.

use crate::engine;
use crate::engine::apply;
use crate::engine::outcome::{Applied, ErrorPolicy};
use crate::engine::record::{self, EventLog};
use crate::pg::spi;
use crate::stream::catalog::{self, Stream};
use crate::stream::routes;
use crate::stream::security;
use ecst_core::event::Event;
use ecst_core::reject::{RejectCode, Rejection};
use ecst_core::route::Route;
use pgrx::spi::SpiClient;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

pub use crate::engine::direct::InboxRow as Row;

thread_local! {
    /// Streams the worker refused for their code's owners (`security::untrusted_code`): logged
    /// once per stream, not per event.
    static REPORTED_UNTRUSTED: RefCell<std::collections::HashSet<String>> = RefCell::new(Default::default());
}

/// Applies rows (claimed from the inbox, or fed to `ecst.feed`), stream by stream, and records
/// each outcome.
pub fn apply_rows(client: &mut SpiClient, rows: &[Row], policy: ErrorPolicy) {
    apply_parsed_rows(client, rows, None, policy)
}

/// Rows parsed ahead (elsewhere, e.g. on a helper thread): each row's parse, done with the spec of
/// the stream in the map under the row's stream name. A row's parse is used only where the stream
/// applying it is that very stream (the definition did not change meanwhile).
pub type Parsed<'a> = (&'a RefCell<Vec<Option<Result<Event, Rejection>>>>, &'a HashMap<String, Rc<Stream>>);

/// The rows of one stream in a batch, each with its index in the batch.
type Run<'r> = Vec<(usize, &'r Row)>;

/// [`apply_rows`], with the rows' parses where `parsed` has them.
pub fn apply_parsed_rows(client: &mut SpiClient, rows: &[Row], parsed: Option<Parsed>, policy: ErrorPolicy) {
    let mut streams: HashMap<String, catalog::Lookup> = HashMap::new();
    // A row fed under a route's name goes to the stream the route selects for it; one it selects
    // none for is a dead letter `unrouted` under the route's name (retried by route). Each name is
    // looked up once, in name order (looking a stream up locks its tables).
    let names: std::collections::BTreeSet<&str> = rows.iter().filter_map(|r| r.stream.as_deref()).collect();
    let mut route_of: HashMap<&str, Route> = HashMap::new();
    for name in names {
        let found = lookup(name, policy);
        if matches!(found, Ok(None)) {
            if let Some(route) = routes::route(name) {
                route_of.insert(name, route);
            }
        }
        streams.insert(name.to_string(), found);
    }
    let mut unrouted: Vec<(&Row, Rejection)> = Vec::new();
    // The rows of each stream are applied together (set-based), in inbox order. One run per
    // stream per batch: several runs of one stream would lock its entities out of key order.
    // (Two streams writing one replica table are therefore not ordered within a batch.)
    let mut by_stream: Vec<(Option<&str>, Run)> = Vec::new();
    for (index, row) in rows.iter().enumerate() {
        let mut name = row.stream.as_deref();
        if let Some(route) = name.and_then(|n| route_of.get(n)) {
            match route.select(row.payload.as_deref()) {
                Ok(target) => name = Some(target),
                Err(rejection) => {
                    unrouted.push((row, rejection));
                    continue;
                }
            }
        }
        match by_stream.iter_mut().find(|(n, _)| *n == name) {
            Some((_, run)) => run.push((index, row)),
            None => by_stream.push((name, vec![(index, row)])),
        }
    }
    for (row, rejection) in unrouted {
        let event = [(row.payload.as_deref(), Some(row.received_at))];
        let result = [Applied::rejected(rejection)];
        record::record_all(client, None, row.stream.as_deref(), event, &result, EventLog::Append);
    }
    // Streams in name order: with entities in key order within each run, every session takes
    // its locks in one global (stream, key) order.
    by_stream.sort_by(|a, b| a.0.cmp(&b.0));
    for (run_name, run) in &by_stream {
        let found =
            run_name.map(|name| streams.entry(name.to_string()).or_insert_with(|| lookup(name, policy)).clone());
        let (stream, broken) = match found {
            None | Some(Ok(None)) => (None, None),
            Some(Ok(Some(s))) => (Some(s), None),
            Some(Err(broken)) => (None, Some(broken)),
        };
        let results: Vec<Applied> = match &stream {
            // A stream whose definition no longer fits its tables (a mapped column dropped,
            // the table dropped): its events wait in the dead letters, the others go on.
            None if let Some((message, sqlstate)) = &broken => write_failed(run.len(), message, sqlstate),
            Some(s) if let Some(message) = security::apply_denied(s) => {
                if policy == ErrorPolicy::Caller {
                    crate::pg::errors::raise(
                        pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                        message,
                        Some(security::apply_hint()),
                    );
                }
                // The worker's role may not write this stream: its events wait in the dead
                // letters (retry_dead_letters once the role has the privileges).
                write_failed(run.len(), &message, "42501")
            }
            // Writing its tables would run code of roles without the applier's privileges
            // (with the default worker: a superuser's): its events wait in the dead letters,
            // for a worker role or the tables' owner to retry.
            Some(s) if let Some(message) = security::untrusted_code(s) => {
                if policy == ErrorPolicy::Worker
                    && REPORTED_UNTRUSTED.with(|r| r.borrow_mut().insert(s.spec.name.clone()))
                {
                    pgrx::log!(
                        "pg_ecst: {message}; its events become dead letters (SQLSTATE 42501). {}",
                        security::UNTRUSTED_HINT
                    );
                }
                write_failed(run.len(), &message, "42501")
            }
            Some(s) => {
                let ahead = parsed.filter(|(_, streams)| {
                    run_name.and_then(|n| streams.get(n)).is_some_and(|parsed_by| Rc::ptr_eq(parsed_by, s))
                });
                let events: Vec<Result<_, Rejection>> = run
                    .iter()
                    .map(|&(i, r)| match ahead.and_then(|(events, _)| events.borrow_mut()[i].take()) {
                        Some(event) => event,
                        None => apply::parse_payload(&s.spec, r.payload.as_deref()),
                    })
                    .collect();
                // The worker's session runs many owners' replica triggers: what one sets
                // must not reach the next stream's statements (nor pg_ecst's own).
                let _isolated = (policy == ErrorPolicy::Worker).then(crate::pg::gucs::Override::isolated);
                let texts: Vec<Option<&str>> = run.iter().map(|(_, r)| r.payload.as_deref()).collect();
                engine::apply(client, &s.styled(), &texts, &events, policy)
            }
            None => {
                let message = catalog::unknown_stream_message(run_name.as_deref().unwrap_or(""));
                run.iter()
                    .map(|_| Applied::rejected(Rejection::new(RejectCode::UnknownStream, message.clone())))
                    .collect()
            }
        };
        let events = run.iter().map(|(_, row)| (row.payload.as_deref(), Some(row.received_at)));
        record::record_all(client, stream.as_deref(), run_name.as_deref(), events, &results, EventLog::Append);
        // A stream that no longer builds still has its id: its dead letters count in ecst.stats.
        if let (None, Some(_), Some(name)) = (&stream, &broken, run_name.as_deref()) {
            let id = spi::internal::run_once(client, "SELECT id FROM ecst.streams WHERE name = $1", &[name.into()])
                .first()
                .get::<i32>(1)
                .ok()
                .flatten();
            if let (Some(id), Some(result)) = (id, results.first()) {
                crate::engine::counters::count_many(id, result, results.len() as i64);
            }
        }
    }
}

/// `n` events of a stream that cannot be written now, each a dead letter with this reason.
fn write_failed(n: usize, message: &str, sqlstate: &str) -> Vec<Applied> {
    (0..n)
        .map(|_| Applied::Rejected {
            rejection: Rejection::new(RejectCode::WriteFailed, message),
            sqlstate: Some(sqlstate.into()),
            conflict: false,
        })
        .collect()
}

/// The stream `name`. For the worker, a definition that no longer builds (its table or a mapped
/// column was dropped, a temporary table's session ended) is an answer, not an error: raised, it
/// would fail the worker's batch — every stream's events — over and over.
pub fn lookup(name: &str, policy: ErrorPolicy) -> catalog::Lookup {
    if policy == ErrorPolicy::Worker {
        catalog::try_stream_quietly(name)
    } else {
        Ok(catalog::try_stream(name))
    }
}
