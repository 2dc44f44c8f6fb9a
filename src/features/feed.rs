//! `ecst.feed`: events applied within the statement that inserts them — `COPY ecst.feed (stream,
//! payload) FROM STDIN` or `INSERT INTO ecst.feed ... SELECT` — with nothing of them stored but
//! dead letters and retained events. The statement's own transaction is the durability: the
//! replica is up to date when it commits, and a rollback leaves nothing.
//!
//! `ecst.feed` is a view with three triggers: BEFORE STATEMENT opens a sort, the INSTEAD OF row
//! trigger adds each row to it (and the row counts in the command tag), and AFTER STATEMENT applies
//! the sorted rows. The sort is PostgreSQL's (`tuplesort`), by (stream, entity, row order): every
//! event of one entity reaches the engine in one run, whatever the size of the statement, so each
//! entity is decided once and its row written once; and the statement takes entity locks in one
//! (stream, key) order from its first chunk to its last. Memory is bounded by `ecst.feed_buffer`:
//! the sort spills to temporary files beyond it, and the sorted rows are applied in chunks of a
//! quarter of it. Each chunk goes the inbox drain's way ([`inbox::apply_rows`]): by stream, each
//! stream's events to the engine in one run — collapsed per entity, decided by the core's fold,
//! written set-based.
//!
//! A row's entity is its key read with the stream's key fields (`parse_key`), in the key columns'
//! canonical text; a route's rows are keyed in the stream the route selects for each. A row whose
//! key cannot be read sorts first in its stream and becomes the engine's dead letter, as anywhere.
//!
//! Buffers form a stack (a replica's trigger may feed events while a chunk applies). A statement
//! that fails takes its buffer with it: its sort lives in the memory of the (sub)transaction
//! running the statement, and an aborted subtransaction drops the buffers it opened, an aborted
//! transaction all of them. A transaction never commits with rows left unapplied.

use crate::engine::apply;
use crate::engine::direct::InboxRow;
use crate::engine::outcome::ErrorPolicy;
use crate::features::inbox;
use crate::pg::gucs;
use crate::stream::catalog::{self, Stream};
use crate::stream::routes;
use ecst_core::event::parse_key;
use ecst_core::route::Route;
use ecst_core::spec::StreamSpec;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// What a name written into `ecst.feed` stands for, looked up once per statement.
enum Target {
    Stream(Rc<Stream>),
    Route(Route),
    /// Neither (now): its rows become dead letters `unknown_stream` when applied.
    Unknown,
}

struct Buffer {
    /// The subtransaction of the statement that opened it.
    subxact: pg_sys::SubTransactionId,
    sort: Sort,
    /// Rows fed by the statement so far (their order).
    seq: i64,
    targets: HashMap<String, Target>,
}

thread_local! {
    static STACK: RefCell<Vec<Buffer>> = const { RefCell::new(Vec::new()) };
    static CALLBACKS: Cell<bool> = const { Cell::new(false) };
}

/// BEFORE INSERT ... FOR EACH STATEMENT: a statement starts feeding.
pub fn begin_statement() {
    register_callbacks();
    // SAFETY: reads the current subtransaction's id.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let sort = Sort::begin(gucs::FEED_BUFFER_KB.get().max(64));
    STACK.with(|s| s.borrow_mut().push(Buffer { subxact, sort, seq: 0, targets: HashMap::new() }));
}

/// The INSTEAD OF row trigger: one row fed.
pub fn add_row(stream: Option<&str>, payload: Option<&str>) {
    STACK.with(|s| {
        let mut stack = s.borrow_mut();
        let Some(buffer) = stack.last_mut() else {
            // A row without its statement's BEFORE trigger (it never happens): refuse rather
            // than buffer where nothing would apply it.
            crate::pg::errors::raise(
                pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "a row reached ecst.feed without its statement's trigger",
                Some("ecst.feed's triggers are part of the extension: do not drop or disable them."),
            )
        };
        buffer.seq += 1;
        let (name, entity) = match stream {
            None => (None, None),
            Some(name) => keyed(&mut buffer.targets, name, payload),
        };
        let name = name.as_deref().or(stream);
        // Rows whose entity cannot be read go first in their stream (the engine rejects them).
        let group = name.map(|n| format!("{n}\u{1}{}", entity.as_deref().unwrap_or("")));
        buffer.sort.put(group.as_deref(), buffer.seq, name, payload);
    })
}

/// AFTER INSERT ... FOR EACH STATEMENT: the statement's rows are all in; apply them, sorted. The
/// next chunk's events are parsed on a helper thread while the backend applies the current one.
pub fn end_statement() {
    let Some(buffer) = STACK.with(|s| s.borrow_mut().pop()) else { return };
    // Chunks of payload the engine takes at once: a quarter of the setting, at most 4 MB (the
    // engine's memory grows with a chunk, about tenfold; larger chunks save nothing once every
    // entity arrives whole).
    let chunk_bytes = ((gucs::FEED_BUFFER_KB.get().max(64) as usize) * 1024 / 4).min(4 << 20);
    let now = now();
    let streams: HashMap<String, Rc<Stream>> = buffer
        .targets
        .iter()
        .filter_map(|(name, t)| match t {
            Target::Stream(s) => Some((name.clone(), s.clone())),
            _ => None,
        })
        .collect();
    let specs: HashMap<String, StreamSpec> = streams.iter().map(|(n, s)| (n.clone(), s.spec.clone())).collect();
    let mut sorted = buffer.sort.sorted();
    let mut next: Option<Sorted> = sorted.next();
    let produce = || {
        let mut chunk: Vec<InboxRow> = Vec::new();
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
            chunk.push(InboxRow { seq: row.seq, stream: row.stream, payload: row.payload, received_at: now });
            next = sorted.next();
        }
        (!chunk.is_empty()).then_some(chunk)
    };
    let parse = move |rows: Vec<InboxRow>| {
        let events: Vec<_> = rows
            .iter()
            .map(|r| {
                let spec = specs.get(r.stream.as_deref()?)?;
                Some(apply::parse_payload(spec, r.payload.as_deref()))
            })
            .collect();
        (rows, events)
    };
    let apply = |(rows, events): (Vec<InboxRow>, Vec<_>)| {
        let events = RefCell::new(events);
        Spi::connect_mut(|client| {
            inbox::apply_parsed_rows(client, &rows, Some((&events, &streams)), ErrorPolicy::Caller)
        });
        std::ops::ControlFlow::<()>::Continue(())
    };
    crate::pg::parallel::pipeline(produce, parse, apply);
    sorted.end();
}

/// The stream a row goes to (for a route's row: the stream the route selects, if any) and its
/// entity there.
fn keyed(targets: &mut HashMap<String, Target>, name: &str, payload: Option<&str>) -> (Option<String>, Option<String>) {
    let entity_in = |stream: &Stream| -> Option<String> {
        let key = parse_key(&stream.spec, payload?).ok()?;
        let _styled = stream.styled();
        apply::canonical_entity(stream, &key)
    };
    match target(targets, name) {
        Target::Stream(stream) => {
            let stream = stream.clone();
            (None, entity_in(&stream))
        }
        Target::Route(route) => match route.select(payload) {
            Ok(selected) => {
                let selected = selected.to_string();
                match target(targets, &selected) {
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

fn target<'t>(targets: &'t mut HashMap<String, Target>, name: &str) -> &'t Target {
    if !targets.contains_key(name) {
        let found = match catalog::try_stream(name) {
            Some(stream) => Target::Stream(stream),
            None => routes::route(name).map_or(Target::Unknown, Target::Route),
        };
        targets.insert(name.to_string(), found);
    }
    &targets[name]
}

/// What a row costs in memory beside its text (the row, its two strings' headers).
const ROW_OVERHEAD: usize = std::mem::size_of::<InboxRow>() + 2 * std::mem::size_of::<usize>();

fn now() -> pgrx::datum::TimestampWithTimeZone {
    // SAFETY: the transaction's start time, as now() gives it.
    let ts = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    // SAFETY: a TimestampTz is the datum of a timestamptz.
    unsafe { pgrx::datum::TimestampWithTimeZone::from_datum(pg_sys::Datum::from(ts), false) }.expect("a timestamp")
}

/// The statement's rows in PostgreSQL's tuplesort: (group text, seq int8, stream text, payload
/// text), sorted by group (NULLs first, byte order) and seq. The group is the stream's name and the
/// entity joined by U+0001 (which sorts below every character of a name): one text compared
/// byte-wise orders rows by stream, then entity, and keeps the rows of one entity of one stream
/// together, in the order they were fed. Everything the sort holds lives in a memory context of
/// the statement's (sub)transaction, so an error anywhere frees it.
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
            let desc = pg_sys::CreateTemplateTupleDesc(4);
            for (i, (name, ty)) in [
                (c"grp", pg_sys::TEXTOID),
                (c"seq", pg_sys::INT8OID),
                (c"stream", pg_sys::TEXTOID),
                (c"payload", pg_sys::TEXTOID),
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

    fn put(&mut self, group: Option<&str>, seq: i64, stream: Option<&str>, payload: Option<&str>) {
        let text = |s: Option<&str>| match s {
            // SAFETY: a text datum in the current (per-row) memory; the sort copies the row.
            Some(s) => (
                unsafe { pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(s.as_ptr() as _, s.len() as i32)) },
                false,
            ),
            None => (pg_sys::Datum::from(0), true),
        };
        let values = [text(group), (pg_sys::Datum::from(seq), false), text(stream), text(payload)];
        // SAFETY: the four values of the slot's descriptor, stored virtually and copied by the sort.
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

fn register_callbacks() {
    if CALLBACKS.with(|c| c.replace(true)) {
        return;
    }
    // SAFETY: backend-lifetime callbacks, registered once.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact), std::ptr::null_mut());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    match event {
        // The sorts' memory goes with the transaction's; only forget them.
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            STACK.with(|s| s.borrow_mut().clear())
        }
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT | pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE => {
            let left = STACK.with(|s| {
                let mut stack = s.borrow_mut();
                let rows: i64 = stack.iter().map(|b| b.seq).sum();
                stack.clear();
                rows
            });
            if left > 0 {
                crate::pg::errors::raise(
                    pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                    format!("{left} rows fed to ecst.feed were not applied; the transaction is rolled back"),
                    Some("ecst.feed's triggers are part of the extension: do not drop or disable them."),
                );
            }
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        STACK.with(|s| {
            let mut stack = s.borrow_mut();
            // Subtransaction ids grow: those at or after this one are this one's or its children's.
            while stack.last().is_some_and(|b| b.subxact >= my_subid) {
                stack.pop();
            }
        });
    }
}
