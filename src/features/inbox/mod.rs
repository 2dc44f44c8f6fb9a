//! Draining `ecst.inbox`: claim the oldest rows (by `seq`, i.e. inbox order), apply them in that
//! order, and delete them — all in the caller's transaction, so the rows go away exactly when the
//! replica writes commit. A crash before commit leaves both untouched; nothing is lost or doubled.
//!
//! Several workers split the inbox by entity: worker `i` of `n` only claims rows whose entity key
//! hashes to `i`, so the events of one entity are always applied by one worker, in inbox order.

use crate::engine;
use crate::engine::apply;
use crate::engine::direct;
use crate::engine::outcome::{self, Applied, ErrorPolicy};
use crate::engine::record::{self, EventLog};
use crate::pg::spi;
use crate::stream::catalog::{self, Stream};
use crate::stream::routes;
use crate::stream::security;
use ecst_core::event::{parse_key, Event};
use ecst_core::reject::{RejectCode, Rejection};
use ecst_core::route::Route;
pub mod commits;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Which part of the inbox a drainer owns: `(index, of)`; `None` owns everything.
pub type Part = Option<(i32, i32)>;

pub use crate::engine::direct::InboxRow as Row;

/// What one batch drained.
pub struct Drained {
    /// How many rows were processed.
    pub rows: i64,
    /// Whether the claim looked at every row there was to claim: it came up short, and not only
    /// because concurrent drainers took rows it saw.
    pub all: bool,
    /// The newest `seq` the claim looked at.
    pub newest: Option<i64>,
}

/// What a claim took, whether it looked at every row there was, and the newest `seq` it looked at.
struct Claimed {
    rows: Vec<Row>,
    all: bool,
    newest: Option<i64>,
}

/// Claims up to `limit` rows of `part` (where `cursor` says) and applies them.
///
/// `last_try(first)`: whether the batch that claimed inbox row `first` first is on its last try
/// (`outcome::last_try`; the worker keeps count).
pub fn drain_batch(
    limit: i64,
    part: Part,
    policy: ErrorPolicy,
    cursor: &mut Cursor,
    last_try: impl FnOnce(Option<i64>) -> bool,
) -> Drained {
    Spi::connect_mut(|client| {
        let Claimed { mut rows, all, newest } = claim(client, limit, part, cursor);
        rows.sort_by_key(|r| r.seq);
        let last_try = policy == ErrorPolicy::Worker && last_try(rows.first().map(|r| r.seq));
        outcome::last_try(last_try, || apply_rows(client, &rows, policy));
        Drained { rows: rows.len() as i64, all, newest }
    })
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
    let mut streams: HashMap<String, Lookup> = HashMap::new();
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
                engine::apply(client, &s.styled(), &events, policy)
            }
            None => run
                .iter()
                .map(|_| {
                    Applied::rejected(Rejection::new(
                        RejectCode::UnknownStream,
                        format!("stream {:?} does not exist", run_name.as_deref().unwrap_or("")),
                    ))
                })
                .collect(),
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

type Lookup = catalog::Lookup;

/// The stream `name`. For the worker, a definition that no longer builds (its table or a mapped
/// column was dropped, a temporary table's session ended) is an answer, not an error: raised, it
/// would fail the worker's batch — every stream's events — over and over.
fn lookup(name: &str, policy: ErrorPolicy) -> Lookup {
    if policy == ErrorPolicy::Worker {
        catalog::try_stream_quietly(name)
    } else {
        Ok(catalog::try_stream(name))
    }
}

/// Deletes and returns the oldest `limit` rows of `part` (a drainer of the whole inbox: those
/// after where `cursor` lets it start). Concurrent drainers of the same rows wait for each other;
/// the second finds them gone. A worker of several claims the rows whose entity it owns
/// (`owned_rows`) and leaves the others to their workers.
fn claim(client: &mut SpiClient, limit: i64, part: Part, cursor: &mut Cursor) -> Claimed {
    // Where the cursor does not say: whether fewer rows than asked came, and the newest.
    let counted =
        |rows: Vec<Row>| Claimed { all: (rows.len() as i64) < limit, newest: rows.iter().map(|r| r.seq).max(), rows };
    let claimed = match part {
        Some((index, of)) if of > 1 => {
            // From the oldest row: the cursor is for a drainer of the whole inbox.
            cursor.start_over();
            if let Some(rows) = claim_owned(limit, index, of) {
                return counted(rows);
            }
            let mine = owned_rows(client, limit, index, of);
            if mine.is_empty() {
                return counted(Vec::new());
            }
            spi::internal::run_once(
                client,
                "DELETE FROM ecst.inbox WHERE ctid = ANY ($1::text[]::tid[]) RETURNING seq, stream, payload, received_at",
                &[mine.into()],
            )
        }
        _ => {
            let ended = cursor.before_snapshot();
            if let Some((rows, all, newest)) = direct::claim_inbox(limit, |snapshot| cursor.start(ended, snapshot)) {
                return Claimed { rows, all, newest };
            }
            // The statement takes its snapshot after `seq > $2` is decided: from the oldest row.
            cursor.start_over();
            spi::internal::run_once(
                client,
                "DELETE FROM ecst.inbox WHERE ctid = ANY (ARRAY(SELECT ctid FROM ecst.inbox ORDER BY seq LIMIT $1))
             RETURNING seq, stream, payload, received_at",
                &[limit.into()],
            )
        }
    };
    counted(
        claimed
            .map(|r| Row {
                seq: r.get(1).unwrap().unwrap(),
                stream: r.get(2).unwrap(),
                payload: r.get(3).unwrap(),
                received_at: r.get(4).unwrap().unwrap(),
            })
            .collect(),
    )
}

thread_local! {
    /// The owners of the inbox rows this worker has looked at, by `seq`, for one inbox table and
    /// worker count: a row stays in the window of the oldest rows until its owner claims it, and
    /// is parsed here once rather than in every batch meanwhile.
    static OWNERS: RefCell<Owners> = RefCell::new(Owners::default());
}

#[derive(Default)]
struct Owners {
    inbox: Option<pg_sys::Oid>,
    of: i32,
    by_seq: HashMap<i64, i32>,
}

impl Owners {
    /// Forgets the rows older than `oldest`, the oldest row left (`None`: none is left): they are
    /// gone, claimed by their owners.
    fn forget_older_than(&mut self, oldest: Option<i64>) {
        let oldest = oldest.unwrap_or(i64::MAX);
        self.by_seq.retain(|seq, _| *seq >= oldest);
    }
}

/// Runs `f` with this worker's owner cache, emptied first if it was kept for another inbox table
/// or worker count.
fn with_owners<R>(of: i32, f: impl FnOnce(&mut Owners) -> R) -> R {
    let inbox = crate::pg::syscache::own_relation(c"inbox");
    OWNERS.with(|owners| {
        let mut owners = owners.borrow_mut();
        if owners.inbox != inbox || owners.of != of {
            *owners = Owners { inbox, of, by_seq: HashMap::new() };
        }
        f(&mut owners)
    })
}

/// Windows a worker looks through per batch for rows it owns (see `owned_rows`).
const MAX_WINDOWS: usize = 8;

/// Deletes and returns up to `limit` of the oldest inbox rows that worker `index` of `of` owns, as
/// `owned_rows` and a `DELETE` by `ctid` would, through the executor's API (`direct::InboxRows`);
/// `None` where that is not available. Rows seen before need no payload: their owner is known.
fn claim_owned(limit: i64, index: i32, of: i32) -> Option<Vec<Row>> {
    forget_partition_streams();
    let _style = crate::pg::convert::fixed_style();
    let mut inbox_rows = direct::InboxRows::open()?;
    let window = limit.saturating_mul(of as i64 * 2);
    let mine = with_owners(of, |owners| {
        let mut mine = Vec::new();
        let mut after = i64::MIN;
        for turn in 0..MAX_WINDOWS {
            let seen = inbox_rows.look(after, window, |seq| owners.by_seq.get(&seq).is_none_or(|&o| o == index));
            if turn == 0 {
                owners.forget_older_than(seen.first().map(|s| s.seq));
            }
            let full = seen.len() as i64 == window;
            after = seen.last().map_or(after, |s| s.seq);
            for s in seen {
                let row = s.row.as_ref();
                let owner = *owners.by_seq.entry(s.seq).or_insert_with(|| {
                    let row = row.expect("rows not seen before are read");
                    owner(row.stream.as_deref(), row.payload.as_deref(), of)
                });
                if owner == index && (mine.len() as i64) < limit {
                    let seq = s.seq;
                    if let Some(row) = inbox_rows.take(s) {
                        mine.push(row);
                    }
                    owners.by_seq.remove(&seq);
                }
            }
            if mine.len() as i64 >= limit || !full {
                break;
            }
        }
        mine
    });
    inbox_rows.close();
    Some(mine)
}

/// The `ctid`s of up to `limit` of the oldest inbox rows that worker `index` of `of` owns. It
/// looks at windows of the oldest rows (in `seq` order, through the index) and keeps its own,
/// going on to the next window while it has fewer than `limit` and more rows follow: the oldest
/// rows may all be another worker's (one that lags behind), and a worker that found too few would
/// otherwise sleep. Rows newer than any seen before come with their payloads; rows seen before
/// need none.
fn owned_rows(client: &mut SpiClient, limit: i64, index: i32, of: i32) -> Vec<String> {
    forget_partition_streams();
    let _style = crate::pg::convert::fixed_style();
    let window = limit.saturating_mul(of as i64 * 2);
    with_owners(of, |owners| {
        let seen_up_to = owners.by_seq.keys().copied().max().unwrap_or(i64::MIN);
        let mut mine = Vec::new();
        let mut after = i64::MIN;
        for turn in 0..MAX_WINDOWS {
            let rows: Vec<(String, i64, Option<String>, Option<String>)> = spi::internal::run_once(
                client,
                "SELECT ctid::text, seq, CASE WHEN seq > $2 THEN stream END, CASE WHEN seq > $2 THEN payload END
                     FROM ecst.inbox WHERE seq > $3 ORDER BY seq LIMIT $1",
                &[window.into(), seen_up_to.into(), after.into()],
            )
            .map(|r| (r.get(1).unwrap().unwrap(), r.get(2).unwrap().unwrap(), r.get(3).unwrap(), r.get(4).unwrap()))
            .collect();
            if turn == 0 {
                owners.forget_older_than(rows.first().map(|r| r.1));
            }
            let mut late = Vec::new();
            for (ctid, seq, stream, payload) in &rows {
                if owners.by_seq.contains_key(seq) {
                    continue;
                }
                if *seq > seen_up_to {
                    owners.by_seq.insert(*seq, owner(stream.as_deref(), payload.as_deref(), of));
                } else {
                    // Committed after newer rows were seen (seq values are cached per session).
                    late.push(ctid.clone());
                }
            }
            if !late.is_empty() {
                for r in spi::internal::run_once(
                    client,
                    "SELECT seq, stream, payload FROM ecst.inbox WHERE ctid = ANY ($1::text[]::tid[])",
                    &[late.into()],
                ) {
                    let (stream, payload) = (r.get::<String>(2).unwrap(), r.get::<String>(3).unwrap());
                    owners.by_seq.insert(r.get(1).unwrap().unwrap(), owner(stream.as_deref(), payload.as_deref(), of));
                }
            }
            let full = rows.len() as i64 == window;
            after = rows.last().map_or(after, |r| r.1);
            let wanted = limit as usize - mine.len();
            mine.extend(rows.into_iter().filter(|r| owners.by_seq.get(&r.1) == Some(&index)).map(|r| r.0).take(wanted));
            if mine.len() >= limit as usize || !full {
                break;
            }
        }
        mine
    })
}

fn owner(stream: Option<&str>, payload: Option<&str>, of: i32) -> i32 {
    match (stream, payload) {
        (Some(s), Some(p)) => partition(s, p, of),
        _ => 0,
    }
}

/// What `partition` found under a name: a stream (not one the worker refuses), or a route.
type Feed = (Option<Rc<Stream>>, Option<Route>);

thread_local! {
    /// The streams `partition` looked up for the claim under way (`None`: no such stream, or one
    /// whose definition no longer builds), each once per claim.
    static PARTITION_STREAMS: RefCell<HashMap<String, Feed>> = RefCell::new(HashMap::new());
    /// Streams the worker refused for their code's owners (`security::untrusted_code`): logged
    /// once per stream, not per event.
    static REPORTED_UNTRUSTED: RefCell<std::collections::HashSet<String>> = RefCell::new(Default::default());
}

/// Forgets `partition`'s streams: called as a claim begins, which then enters the fixed styles
/// (`convert::fixed_style`) once for all its rows: keys of a stream that needs them are read as
/// its runs read them, and the others' keys do not depend on those settings.
fn forget_partition_streams() {
    PARTITION_STREAMS.with(|m| m.borrow_mut().clear());
}

/// The worker (of `of`) that owns an inbox row: a hash of the stream and the entity's canonical
/// key. Rows without a parseable key, or of a stream that does not exist or no longer builds, go
/// to worker 0 (they become dead letters there; raising here would stop every worker's claims).
pub fn partition(stream: &str, payload: &str, of: i32) -> i32 {
    partition_as(stream, payload, of, true)
}

/// [`partition`]; `follow_route`: a route's name is followed to the stream it selects (once:
/// routes do not nest).
fn partition_as(stream: &str, payload: &str, of: i32, follow_route: bool) -> i32 {
    if of <= 1 {
        return 0;
    }
    let known = PARTITION_STREAMS.with(|m| m.borrow().get(stream).cloned());
    let found = known.unwrap_or_else(|| {
        // A stream whose code the worker must not run: its keys are not read through their
        // types (a key column's domain check is code too); worker 0 dead-letters its events.
        let lookup = catalog::try_stream_quietly(stream);
        let found = lookup.as_ref().ok().cloned().flatten().filter(|s| security::untrusted_code(s).is_none());
        // A route's name (no stream, not a broken one): its rows are partitioned as the stream
        // the route selects for each, which is where they are applied.
        let route = matches!(lookup, Ok(None)).then(|| routes::route(stream)).flatten();
        PARTITION_STREAMS.with(|m| m.borrow_mut().insert(stream.to_string(), (found.clone(), route.clone())));
        (found, route)
    });
    let s = match found {
        (Some(s), _) => s,
        (None, Some(route)) => {
            return match route.select(Some(payload)) {
                Ok(target) if follow_route => partition_as(target, payload, of, false),
                _ => 0,
            }
        }
        (None, None) => return 0,
    };
    // Only the key: every worker looks at every row, and parses in full only its own.
    let Ok(key) = parse_key(&s.spec, payload) else { return 0 };
    // Under the claim's fixed styles (`forget_partition_streams`' caller enters them once).
    let Some(key) = apply::entity_key(&s, &key) else { return 0 };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (stream, key).hash(&mut h);
    (h.finish() % of as u64) as i32
}

/// Where a drainer of the whole inbox starts its next claim. The rows it deletes stay in the
/// inbox's index until no transaction may see them any more — until the drainer's own transaction
/// ends, and while any older transaction elsewhere is open — and a claim that starts from the
/// oldest row walks past all of them: quadratic in the rows drained when every claim does (one
/// `ecst.process_inbox()` of 1,000,000 events took 112 s instead of 19 s; a worker drained them in
/// 37 s instead of 17 s while a `REPEATABLE READ` transaction was open elsewhere).
///
/// A claim may start after the newest row claimed before only if no row can have appeared below
/// it since: rows are claimed in `seq` order, but `seq` values are cached per session, so a row
/// that becomes visible later (its transaction commits later, or a session inserts from a block of
/// values it took long ago) can have an older `seq` than rows claimed already, and must then be
/// applied before the newer rows of its entity, as a claim from the oldest row would. So a claim
/// starts after the last one only if no row can have become visible in between: this backend ran
/// no insert into the inbox, and either no other transaction ended (the two claims' snapshots
/// agree on the transactions in progress) or none that ended had inserted into the inbox
/// (`commits::InboxCommits`, read around the two snapshots; needs pg_ecst preloaded); otherwise it
/// starts from the oldest row. An idle worker's claims walk nothing. (Inserts with the inbox's
/// triggers disabled, `session_replication_role = replica`, are not counted.)
pub struct Cursor {
    /// Every row visible to the last claim with a `seq` up to this one was claimed (by this
    /// drainer or another): the newest `seq` that claim looked at, less one for rows sharing it.
    after: i64,
    /// What the last claim saw: `InboxCommits::ended` before its snapshot (in READ COMMITTED,
    /// where the snapshot is taken for the claim), this backend's inbox inserts and the
    /// snapshot's mark after it.
    mark: Option<Mark>,
    /// The same for the claim under way.
    next: Option<Mark>,
    /// Whether the claim under way started from the oldest row.
    from_oldest: bool,
    /// A worker's: at least this often a claim from the oldest row (for rows that became visible
    /// without their insert being counted: triggers disabled, logical replication, updates).
    rewind_every: Option<Duration>,
    rewound: Instant,
}

struct Mark {
    ended: Option<u64>,
    own: u64,
    snapshot: Vec<u32>,
}

impl Cursor {
    pub fn new(rewind_every: Option<Duration>) -> Cursor {
        Cursor { after: i64::MIN, mark: None, next: None, from_oldest: true, rewind_every, rewound: Instant::now() }
    }

    /// Read before the claim's snapshot is taken.
    fn before_snapshot(&self) -> Option<u64> {
        commits::ended()
    }

    /// Where the claim starts (`i64::MIN`: from the oldest row), decided once its snapshot was
    /// taken: `ended` is what `before_snapshot` read, `snapshot` the snapshot's mark.
    fn start(&mut self, ended: Option<u64>, snapshot: Vec<u32>) -> i64 {
        // Outside READ COMMITTED the snapshot was taken when the transaction began, before
        // `ended` was read.
        let read_committed = crate::pg::subxact::read_committed();
        let own = commits::own_inserts();
        let begun = commits::begun();
        let due = self.rewind_every.is_some_and(|every| self.rewound.elapsed() >= every);
        let quiet = !due
            && self.mark.as_ref().is_some_and(|then| {
                then.own == own && (then.snapshot == snapshot || (then.ended.is_some() && then.ended == begun))
            });
        self.next = Some(Mark { ended: ended.filter(|_| read_committed), own, snapshot });
        self.from_oldest = !quiet;
        if quiet {
            self.after
        } else {
            self.rewound = Instant::now();
            i64::MIN
        }
    }

    /// For a claim whose snapshot is not ours to see: from the oldest row.
    fn start_over(&mut self) {
        (self.next, self.from_oldest, self.rewound) = (None, true, Instant::now());
    }

    /// Whether the last claim started from the oldest row.
    pub fn started_from_oldest(&self) -> bool {
        self.from_oldest
    }

    /// Makes the next claim start from the oldest row.
    pub fn rewind(&mut self) {
        self.mark = None;
    }

    /// Moves on after a claim (for a worker, once its transaction committed); true when it
    /// looked at every row there was: everything visible to it was drained (a claim from `after`
    /// only starts there when every row visible below it was claimed).
    pub fn claimed(&mut self, drained: &Drained) -> bool {
        self.mark = self.next.take();
        let newest = drained.newest.map_or(i64::MIN, |seq| seq.saturating_sub(1));
        // After a claim that saw every row, any start is as good, the furthest best.
        self.after = if drained.all { self.after.max(newest) } else { newest };
        drained.all
    }
}

/// Drains everything visible (up to `max` rows) in the caller's transaction.
pub fn process(max: Option<i64>, batch: i64) -> i64 {
    let mut total = 0;
    let mut cursor = Cursor::new(None);
    loop {
        let want = match max {
            Some(m) if m - total <= 0 => break,
            Some(m) => batch.min(m - total),
            None => batch,
        };
        let drained = drain_batch(want, None, ErrorPolicy::Caller, &mut cursor, |_| false);
        total += drained.rows;
        if cursor.claimed(&drained) {
            // Drained: and, in READ COMMITTED, once more from the oldest row, for rows that
            // became visible below the cursor without their insert being counted. (With one
            // snapshot for the whole transaction nothing can have; a claim from the oldest row
            // would also see again the rows other drainers deleted since, and never end.)
            if cursor.started_from_oldest() || !crate::pg::subxact::read_committed() {
                break;
            }
            cursor.rewind();
        }
    }
    total
}
