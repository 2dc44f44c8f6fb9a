//! Rows of events sorted by (stream, entity, row order) in PostgreSQL's tuplesort, then applied in
//! chunks: what `ecst.feed` does with a statement's rows, and a drainer of the inbox with a
//! backlog batch. Every event of one entity reaches the engine in one run, whatever the number of
//! rows, so each entity is decided once and its row written once; and the applier takes entity
//! locks in one (stream, key) order from its first chunk to its last. Memory is bounded by
//! `ecst.feed_buffer`: the sort spills to temporary files beyond it, and the sorted rows are
//! applied in chunks of a quarter of it (at most 4 MB). Each chunk goes [`rows::apply_parsed_rows`]'
//! way: by stream, each stream's events to the engine in one run — collapsed per entity, decided
//! by the core's fold, written set-based — with the next chunk parsed on a helper thread
//! meanwhile.
//!
//! A row's entity is its key read with the stream's key fields (`parse_key`), in the key columns'
//! canonical text; a route's rows are keyed in the stream the route selects for each. A row whose
//! key cannot be read (or whose stream the applier may not read keys of: the worker and streams
//! running code of roles it does not trust) sorts first in its stream and is decided there by the
//! engine, as anywhere.

use crate::engine::apply;
use crate::engine::outcome::ErrorPolicy;
use crate::features::rows::{self, Row};
use crate::pg::gucs;
use crate::stream::catalog::Stream;
use crate::stream::routes;
use crate::stream::security;
use ecst_core::event::parse_key;
use ecst_core::route::Route;
use ecst_core::spec::StreamSpec;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// What a name rows are written under stands for, looked up once per sorter.
enum Target {
    Stream(Rc<Stream>),
    Route(Route),
    /// Neither (now), or a stream whose keys the applier does not read: its rows are decided when
    /// applied (dead letters `unknown_stream`, or what the engine says of the stream).
    Unknown,
}

/// Rows being gathered to be applied sorted.
pub struct Sorter {
    sort: Sort,
    targets: HashMap<String, Target>,
    policy: ErrorPolicy,
    rows: i64,
    first: Option<i64>,
}

impl Sorter {
    /// A sorter in the current (sub)transaction's memory, with `ecst.feed_buffer` of it.
    pub fn new(policy: ErrorPolicy) -> Sorter {
        Sorter {
            sort: Sort::begin(gucs::FEED_BUFFER_KB.get().max(64)),
            targets: HashMap::new(),
            policy,
            rows: 0,
            first: None,
        }
    }

    /// Rows added so far.
    pub fn rows(&self) -> i64 {
        self.rows
    }

    /// The smallest `seq` added.
    pub fn first_seq(&self) -> Option<i64> {
        self.first
    }

    /// Adds a row: `seq` orders the rows of one entity.
    pub fn add(&mut self, seq: i64, stream: Option<&str>, payload: Option<&str>, received_at: TimestampWithTimeZone) {
        self.rows += 1;
        self.first = Some(self.first.map_or(seq, |f| f.min(seq)));
        let (name, entity) = match stream {
            None => (None, None),
            Some(name) => keyed(&mut self.targets, self.policy, name, payload),
        };
        let name = name.as_deref().or(stream);
        // Rows whose entity cannot be read go first in their stream (the engine rejects them).
        let group = name.map(|n| format!("{n}\u{1}{}", entity.as_deref().unwrap_or("")));
        let received_at = received_at.into_datum().expect("a timestamptz datum");
        self.sort.put(group.as_deref(), seq, name, payload, received_at);
    }

    /// Applies the rows, sorted, and ends the sort.
    pub fn apply(self) {
        let Sorter { sort, targets, policy, .. } = self;
        // Chunks of payload the engine takes at once: a quarter of the setting, at most 4 MB (the
        // engine's memory grows with a chunk, about tenfold; larger chunks save nothing once every
        // entity arrives whole).
        let chunk_bytes = ((gucs::FEED_BUFFER_KB.get().max(64) as usize) * 1024 / 4).min(4 << 20);
        let streams: HashMap<String, Rc<Stream>> = targets
            .iter()
            .filter_map(|(name, t)| match t {
                Target::Stream(s) => Some((name.clone(), s.clone())),
                _ => None,
            })
            .collect();
        let specs: HashMap<String, StreamSpec> = streams.iter().map(|(n, s)| (n.clone(), s.spec.clone())).collect();
        let mut sorted = sort.sorted();
        let mut next: Option<Sorted> = sorted.next();
        let produce = || {
            let mut chunk: Vec<Row> = Vec::new();
            let mut bytes = 0usize;
            let mut last: Option<Option<String>> = None;
            while let Some(row) = next.take() {
                // A chunk ends between entities (an entity larger than a chunk goes on in the next one).
                if bytes >= chunk_bytes && last.as_ref() != Some(&row.group) {
                    next = Some(row);
                    break;
                }
                bytes += row.payload.as_ref().map_or(0, String::len) + ROW_OVERHEAD;
                last = Some(row.group);
                chunk.push(Row {
                    seq: row.seq,
                    stream: row.stream,
                    payload: row.payload,
                    received_at: row.received_at,
                });
                next = sorted.next();
            }
            (!chunk.is_empty()).then_some(chunk)
        };
        let parse = move |rows: Vec<Row>| {
            let events: Vec<_> = rows
                .iter()
                .map(|r| {
                    let spec = specs.get(r.stream.as_deref()?)?;
                    Some(apply::parse_payload(spec, r.payload.as_deref()))
                })
                .collect();
            (rows, events)
        };
        let apply = |(rows, events): (Vec<Row>, Vec<_>)| {
            let events = RefCell::new(events);
            Spi::connect_mut(|client| rows::apply_parsed_rows(client, &rows, Some((&events, &streams)), policy));
            std::ops::ControlFlow::<()>::Continue(())
        };
        crate::pg::parallel::pipeline(produce, parse, apply);
        sorted.end();
    }
}

/// The stream a row goes to (for a route's row: the stream the route selects, if any) and its
/// entity there.
fn keyed(
    targets: &mut HashMap<String, Target>,
    policy: ErrorPolicy,
    name: &str,
    payload: Option<&str>,
) -> (Option<String>, Option<String>) {
    let entity_in = |stream: &Stream| -> Option<String> {
        let key = parse_key(&stream.spec, payload?).ok()?;
        let _styled = stream.styled();
        apply::canonical_entity(stream, &key)
    };
    match target(targets, policy, name) {
        Target::Stream(stream) => {
            let stream = stream.clone();
            (None, entity_in(&stream))
        }
        Target::Route(route) => match route.select(payload) {
            Ok(selected) => {
                let selected = selected.to_string();
                match target(targets, policy, &selected) {
                    Target::Stream(stream) => {
                        let stream = stream.clone();
                        let entity = entity_in(&stream);
                        (Some(selected), entity)
                    }
                    // A route to a stream dropped since: the engine says so, under the route.
                    _ => (None, None),
                }
            }
            Err(_) => (None, None),
        },
        Target::Unknown => (None, None),
    }
}

fn target<'t>(targets: &'t mut HashMap<String, Target>, policy: ErrorPolicy, name: &str) -> &'t Target {
    if !targets.contains_key(name) {
        let found = match rows::lookup(name, policy) {
            // The worker reads no keys through the types of a stream whose code it must not run
            // (a key column's domain check is code too): the engine dead-letters its events.
            Ok(Some(stream)) if policy == ErrorPolicy::Caller || security::untrusted_code(&stream).is_none() => {
                Target::Stream(stream)
            }
            Ok(Some(_)) | Err(_) => Target::Unknown,
            Ok(None) => routes::route(name).map_or(Target::Unknown, Target::Route),
        };
        targets.insert(name.to_string(), found);
    }
    &targets[name]
}

/// What a row costs in memory beside its text (the row, its two strings' headers).
const ROW_OVERHEAD: usize = std::mem::size_of::<Row>() + 2 * std::mem::size_of::<usize>();

/// The rows in PostgreSQL's tuplesort: (group text, seq int8, stream text, payload text,
/// received_at timestamptz), sorted by group (NULLs first, byte order) and seq. The group is the stream's name and the
/// entity joined by U+0001 (which sorts below every character of a name): one text compared
/// byte-wise orders rows by stream, then entity, and keeps the rows of one entity of one stream
/// together, in the order they were fed. Everything the sort holds lives in a memory context of
/// the (sub)transaction that began it, so an error anywhere frees it.
struct Sort {
    context: pg_sys::MemoryContext,
    state: *mut pg_sys::Tuplesortstate,
    slot: *mut pg_sys::TupleTableSlot,
}

/// A row read back from the sort.
struct Sorted {
    group: Option<String>,
    stream: Option<String>,
    seq: i64,
    payload: Option<String>,
    received_at: pgrx::datum::TimestampWithTimeZone,
}

impl Sort {
    fn begin(work_mem_kb: i32) -> Sort {
        // SAFETY: a memory context under the current transaction's, a tuple descriptor and slot
        // in it, and a tuplesort begun in it (as nodeSort.c begins one), with text's and int8's
        // default "<" operators, text compared byte-wise (collation "C").
        unsafe {
            let context = pg_sys::AllocSetContextCreateExtended(
                pg_sys::CurTransactionContext,
                c"pg_ecst feed".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            );
            let old = pg_sys::MemoryContextSwitchTo(context);
            let desc = pg_sys::CreateTemplateTupleDesc(5);
            for (i, (name, ty)) in [
                (c"grp", pg_sys::TEXTOID),
                (c"seq", pg_sys::INT8OID),
                (c"stream", pg_sys::TEXTOID),
                (c"payload", pg_sys::TEXTOID),
                (c"received_at", pg_sys::TIMESTAMPTZOID),
            ]
            .into_iter()
            .enumerate()
            {
                pg_sys::TupleDescInitEntry(desc, (i + 1) as i16, name.as_ptr(), ty, -1, 0);
            }
            let mut columns: [pg_sys::AttrNumber; 2] = [1, 2];
            let mut operators =
                [pg_sys::Oid::from(pg_sys::TextLessOperator), pg_sys::Oid::from(pg_sys::Int8LessOperator)];
            let mut collations = [pg_sys::C_COLLATION_OID, pg_sys::InvalidOid];
            let mut nulls_first = [true, false];
            #[cfg(feature = "pg14")]
            let options = false;
            #[cfg(not(feature = "pg14"))]
            let options = 0;
            let state = pg_sys::tuplesort_begin_heap(
                desc,
                2,
                columns.as_mut_ptr(),
                operators.as_mut_ptr(),
                collations.as_mut_ptr(),
                nulls_first.as_mut_ptr(),
                work_mem_kb,
                std::ptr::null_mut(),
                options,
            );
            let slot = pg_sys::MakeSingleTupleTableSlot(desc, &pg_sys::TTSOpsMinimalTuple);
            pg_sys::MemoryContextSwitchTo(old);
            Sort { context, state, slot }
        }
    }

    fn put(
        &mut self,
        group: Option<&str>,
        seq: i64,
        stream: Option<&str>,
        payload: Option<&str>,
        received_at: pg_sys::Datum,
    ) {
        let text = |s: Option<&str>| match s {
            // SAFETY: a text datum in the current (per-row) memory; the sort copies the row.
            Some(s) => (
                unsafe { pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(s.as_ptr() as _, s.len() as i32)) },
                false,
            ),
            None => (pg_sys::Datum::from(0), true),
        };
        let values =
            [text(group), (pg_sys::Datum::from(seq), false), text(stream), text(payload), (received_at, false)];
        // SAFETY: the five values of the slot's descriptor, stored virtually and copied by the sort.
        unsafe {
            let slot = &mut *self.slot;
            pg_sys::ExecClearTuple(slot);
            for (i, (value, null)) in values.into_iter().enumerate() {
                *slot.tts_values.add(i) = value;
                *slot.tts_isnull.add(i) = null;
            }
            pg_sys::ExecStoreVirtualTuple(slot);
            let old = pg_sys::MemoryContextSwitchTo(self.context);
            pg_sys::tuplesort_puttupleslot(self.state, slot);
            pg_sys::MemoryContextSwitchTo(old);
        }
    }

    fn sorted(self) -> SortedRows {
        // SAFETY: sorts what was put.
        unsafe {
            let old = pg_sys::MemoryContextSwitchTo(self.context);
            pg_sys::tuplesort_performsort(self.state);
            pg_sys::MemoryContextSwitchTo(old);
        }
        SortedRows { sort: self }
    }
}

struct SortedRows {
    sort: Sort,
}

impl SortedRows {
    fn next(&mut self) -> Option<Sorted> {
        let Sort { context, state, slot } = self.sort;
        // SAFETY: the next sorted row into the slot, read while the slot holds it.
        unsafe {
            let old = pg_sys::MemoryContextSwitchTo(context);
            let found = pg_sys::tuplesort_gettupleslot(state, true, false, slot, std::ptr::null_mut());
            pg_sys::MemoryContextSwitchTo(old);
            if !found {
                return None;
            }
            pg_sys::slot_getallattrs(slot);
            let value = |i: usize| -> Option<String> {
                if *(*slot).tts_isnull.add(i) {
                    return None;
                }
                let datum = *(*slot).tts_values.add(i);
                String::from_datum(datum, false)
            };
            Some(Sorted {
                group: value(0),
                seq: (*(*slot).tts_values.add(1)).value() as i64,
                stream: value(2),
                payload: value(3),
                received_at: pgrx::datum::TimestampWithTimeZone::from_datum(*(*slot).tts_values.add(4), false)
                    .expect("received_at is not NULL"),
            })
        }
    }

    fn end(self) {
        // SAFETY: ends the sort (its temporary files) and frees its memory.
        unsafe {
            pg_sys::ExecDropSingleTupleTableSlot(self.sort.slot);
            pg_sys::tuplesort_end(self.sort.state);
            pg_sys::MemoryContextDelete(self.sort.context);
        }
    }
}
