//! Draining `ecst.inbox`: claim the oldest rows (by `seq`, i.e. inbox order), apply them in that
//! order, and delete them — all in the caller's transaction, so the rows go away exactly when the
//! replica writes commit. A crash before commit leaves both untouched; nothing is lost or doubled.
//!
//! Several workers split the inbox by entity: worker `i` of `n` only claims rows whose entity key
//! hashes to `i`, so the events of one entity are always applied by one worker, in inbox order.

use crate::engine::apply;
use crate::engine::direct;
use crate::engine::outcome::{self, ErrorPolicy};
use crate::features::rows::{self, Row};
use crate::features::sorted::Sorter;
use crate::pg::gucs;
use crate::pg::spi;
use crate::stream::catalog::{self, Stream};
use crate::stream::routes;
use crate::stream::security;
use ecst_core::event::parse_key;
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

/// How many rows a claim took, whether it looked at every row there was, and the newest `seq` it
/// looked at.
struct Claimed {
    rows: i64,
    all: bool,
    newest: Option<i64>,
}

/// Where a claim puts the rows it takes: a batch in memory, applied in inbox order; or a backlog
/// batch, sorted by entity first (`features::sorted`), its memory bounded by `ecst.feed_buffer`.
enum Taken {
    Rows(Vec<Row>),
    Sorted(Sorter),
}

impl Taken {
    fn push(&mut self, row: Row) {
        match self {
            Taken::Rows(rows) => rows.push(row),
            Taken::Sorted(sorter) => {
                sorter.add(row.seq, row.stream.as_deref(), row.payload.as_deref(), row.received_at)
            }
        }
    }
}

/// Claims up to `limit` rows of `part` (where `cursor` says) and applies them. A `backlog` batch
/// (a drainer that found more rows than a batch) is sorted by entity before it is applied, so each
/// entity is decided and written once however many of its events the batch holds; otherwise the
/// rows are applied as claimed, in inbox order.
///
/// `last_try(first)`: whether the batch that claimed inbox row `first` first is on its last try
/// (`outcome::last_try`; the worker keeps count).
pub fn drain_batch(
    limit: i64,
    backlog: bool,
    part: Part,
    policy: ErrorPolicy,
    cursor: &mut Cursor,
    last_try: impl FnOnce(Option<i64>) -> bool,
) -> Drained {
    let mut taken = if backlog { Taken::Sorted(Sorter::new(policy)) } else { Taken::Rows(Vec::new()) };
    let Claimed { rows, all, newest } = Spi::connect_mut(|client| claim(client, limit, part, cursor, &mut taken));
    match taken {
        Taken::Rows(mut claimed) => {
            claimed.sort_by_key(|r| r.seq);
            let last_try = policy == ErrorPolicy::Worker && last_try(claimed.first().map(|r| r.seq));
            outcome::last_try(last_try, || Spi::connect_mut(|client| rows::apply_rows(client, &claimed, policy)));
        }
        Taken::Sorted(sorter) => {
            let last_try = policy == ErrorPolicy::Worker && last_try(sorter.first_seq());
            outcome::last_try(last_try, || sorter.apply());
        }
    }
    Drained { rows, all, newest }
}

/// Deletes and returns the oldest `limit` rows of `part` (a drainer of the whole inbox: those
/// after where `cursor` lets it start). Concurrent drainers of the same rows wait for each other;
/// the second finds them gone. A worker of several claims the rows whose entity it owns
/// (`owned_rows`) and leaves the others to their workers.
fn claim(client: &mut SpiClient, limit: i64, part: Part, cursor: &mut Cursor, taken: &mut Taken) -> Claimed {
    let (mut rows, mut newest) = (0i64, None::<i64>);
    let mut each = |row: Row| {
        rows += 1;
        newest = Some(newest.map_or(row.seq, |n| n.max(row.seq)));
        taken.push(row);
    };
    // Where the cursor does not say: whether fewer rows than asked came. (The SQL claims, where
    // the executor's API is not available, take at most a batch: their rows are all in memory.)
    let sql_limit = limit.min(gucs::BATCH_SIZE.get().max(1) as i64);
    let claimed = match part {
        Some((index, of)) if of > 1 => {
            // From the oldest row: the cursor is for a drainer of the whole inbox.
            cursor.start_over();
            if claim_owned(limit, index, of, &mut each).is_some() {
                return Claimed { all: rows < limit, rows, newest };
            }
            let mine = owned_rows(client, sql_limit, index, of);
            if mine.is_empty() {
                return Claimed { rows: 0, all: true, newest: None };
            }
            spi::internal::run_once(
                client,
                "DELETE FROM ecst.inbox WHERE ctid = ANY ($1::text[]::tid[]) RETURNING seq, stream, payload, received_at",
                &[mine.into()],
            )
        }
        _ => {
            let ended = cursor.before_snapshot();
            if let Some((all, looked)) = direct::claim_inbox(limit, |snapshot| cursor.start(ended, snapshot), &mut each)
            {
                return Claimed { rows, all, newest: looked };
            }
            // The statement takes its snapshot after `seq > $2` is decided: from the oldest row.
            cursor.start_over();
            spi::internal::run_once(
                client,
                "DELETE FROM ecst.inbox WHERE ctid = ANY (ARRAY(SELECT ctid FROM ecst.inbox ORDER BY seq LIMIT $1))
             RETURNING seq, stream, payload, received_at",
                &[sql_limit.into()],
            )
        }
    };
    for r in claimed {
        each(Row {
            seq: r.get(1).unwrap().unwrap(),
            stream: r.get(2).unwrap(),
            payload: r.get(3).unwrap(),
            received_at: r.get(4).unwrap().unwrap(),
        });
    }
    Claimed { all: rows < sql_limit, rows, newest }
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

/// Deletes up to `limit` of the oldest inbox rows that worker `index` of `of` owns and hands each
/// to `each`, as `owned_rows` and a `DELETE` by `ctid` would, through the executor's API
/// (`direct::InboxRows`); `None` where that is not available. Rows seen before need no payload:
/// their owner is known. Windows hold at most `direct::CLAIM_PIECE` of this worker's rows.
fn claim_owned(limit: i64, index: i32, of: i32, mut each: impl FnMut(Row)) -> Option<()> {
    forget_partition_streams();
    let _style = crate::pg::convert::fixed_style();
    let mut inbox_rows = direct::InboxRows::open()?;
    let piece = limit.min(direct::CLAIM_PIECE);
    let window = piece.saturating_mul(of as i64 * 2);
    let turns = MAX_WINDOWS * (limit as usize).div_ceil(piece.max(1) as usize);
    with_owners(of, |owners| {
        let mut mine = 0i64;
        let mut after = i64::MIN;
        for turn in 0..turns {
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
                if owner == index && mine < limit {
                    let seq = s.seq;
                    if let Some(row) = inbox_rows.take(s) {
                        mine += 1;
                        each(row);
                    }
                    owners.by_seq.remove(&seq);
                }
            }
            if mine >= limit || !full {
                break;
            }
        }
    });
    inbox_rows.close();
    Some(())
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

/// The size of a drainer's next claim, and whether it is a backlog batch (`drain_batch`): after a
/// claim that came back full (`!Drained::all`), `ecst.backlog_batch_size` rows, sorted by entity;
/// otherwise `batch` rows, in inbox order.
pub fn next_claim(batch: i64, after_full: bool) -> (i64, bool) {
    let backlog = gucs::BACKLOG_BATCH_SIZE.get() as i64;
    if after_full && backlog > batch {
        (backlog, true)
    } else {
        (batch, false)
    }
}

/// Drains everything visible (up to `max` rows) in the caller's transaction.
pub fn process(max: Option<i64>, batch: i64) -> i64 {
    let mut total = 0;
    let mut cursor = Cursor::new(None);
    let mut full = false;
    loop {
        let (size, backlog) = next_claim(batch, full);
        let want = match max {
            Some(m) if m - total <= 0 => break,
            Some(m) => size.min(m - total),
            None => size,
        };
        let drained = drain_batch(want, backlog, None, ErrorPolicy::Caller, &mut cursor, |_| false);
        full = !drained.all;
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
