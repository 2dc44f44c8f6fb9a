//! Rows found and written through the executor's per-row API — the calls PostgreSQL's
//! logical replication apply worker makes (`RelationFindReplTupleByIndex`,
//! `ExecSimpleRelationUpdate`, `ExecSimpleRelationInsert`) — instead of through a SQL statement:
//! nothing to plan, start or shut down per row. Used for the hottest write there is, the guarded
//! write of an entity whose version lives in its replica row (`apply::row_mode`), per event and
//! per batch; for a batch's other upserts of such tables; for the question that precedes a
//! guarded write per event: whether the entity has a version-state row at all; and for a batch's
//! version-state rows, locked, read and updated (`StateRows`). The worker's claim of the oldest
//! inbox rows is the same kind of work: an index scan in `seq` order deleting what it returns
//! (`claim_inbox`), or, with several workers, what the worker owns (`InboxRows`).
//!
//! The API does what the statement would, except what it does not know about, so it is only used
//! where none of that applies: a plain heap table (not partitioned, not a partition, not a Citus
//! table, whose rows are in its shards) keyed by its primary key, without triggers (statement
//! triggers would not fire), rules or row-level security, that the current user may `SELECT` and
//! `UPDATE`, in a READ COMMITTED transaction (it acts on a row's newest committed version, where
//! REPEATABLE READ must raise a serialization failure); it only inserts rows whose other columns
//! have no default and no domain type, and leaves a row it has nothing to set. Anything else goes
//! through SQL as before. Stored generated columns (on servers that recompute them here: 14.7,
//! 15.2 and later), constraints, index maintenance and HOT updates are the executor's own. Built
//! for every supported major (14-18); the calls whose signatures differ between majors are in
//! `imp::compat`.

use crate::engine::writer::Bound;
use crate::stream::catalog::{Column, TableInfo};

/// An inbox row claimed (`claim_inbox`, `InboxRows`; the inbox feature's `Row`).
pub struct InboxRow {
    pub seq: i64,
    pub stream: Option<String>,
    pub payload: Option<String>,
    pub received_at: pgrx::datum::TimestampWithTimeZone,
}

/// What a guarded write did.
pub enum Update {
    /// The row's version was older (or NULL), or there was no row: the row now holds the new
    /// values. `previous` is the version it replaced (its text; `None` when NULL or inserted).
    Written { previous: Option<String> },
    /// The row's version was not older (its text): nothing was written.
    NotNewer(String),
    /// The entity has no row, and inserting one needs SQL (another column has a default), or the
    /// new version is NULL: nothing was written.
    NeedsSql,
}

/// Writes rows of one replica table; `RowWriter::open` is `None` where SQL must do it.
pub struct RowWriter(imp::Writer);

impl RowWriter {
    pub fn open(table: &TableInfo) -> Option<RowWriter> {
        imp::Writer::open(table).map(RowWriter)
    }

    /// Whether `open` would open a writer for this table (in this transaction).
    pub fn available(table: &TableInfo) -> bool {
        imp::Writer::available(table)
    }

    /// Writes the row with these `keys` and the values `set` as
    /// `INSERT … ON CONFLICT DO UPDATE … WHERE t.v IS NULL OR t.v < EXCLUDED.v` would: an
    /// existing row (its newest version, after waiting for a concurrent writer of it) is updated
    /// if its `version` column is NULL or older than the new version (the `set` value of that
    /// column) — read again if a concurrent session changes it before the update — and left
    /// unlocked if not; a missing row is inserted. An insert that loses a race to a concurrent
    /// insert of the same key fails with a unique violation (`insert_lost_race` tells).
    pub fn write_if_newer(&mut self, keys: &[Bound], set: &[Bound], version: &Column) -> Update {
        match set.iter().find(|b| b.column.attnum == version.attnum).and_then(|b| b.value) {
            Some(new_version) => self.0.write(keys, set, Some((version, new_version))),
            None => Update::NeedsSql,
        }
    }

    /// Writes the row with these `keys` and the values `set` as
    /// `INSERT … ON CONFLICT DO UPDATE SET …` would, without a version guard: an existing row is
    /// updated (as in `write_if_newer`); a missing row is inserted
    /// (a lost race fails as in `write_if_newer`). `NotNewer` is never the answer.
    pub fn upsert(&mut self, keys: &[Bound], set: &[Bound]) -> Update {
        self.0.write(keys, set, None)
    }

    /// Releases what `open` took (the table's lock stays to the end of the transaction). After
    /// an error, the aborted (sub)transaction releases it instead.
    pub fn close(self) {
        self.0.close()
    }
}

/// Where a locked version-state row is, for the update that follows its read.
#[derive(Clone, Copy)]
pub struct StateRowId(imp::Tid);

/// A version-state row's stored values as text: `live_version`, `tomb_version`, `field_versions`.
pub type StoredState = (Option<String>, Option<String>, Option<String>);

/// The `ecst.entity_state` rows of a run, locked, read and updated through the row API instead of
/// a `SELECT … FOR UPDATE` and an `UPDATE` over arrays of keys: one index lookup per entity
/// instead of two, and no statement to plan. Only in READ COMMITTED, where locking the newest
/// committed version of a row is what `SELECT … FOR UPDATE` does; `open` is `None` otherwise, and
/// where a trigger of a user's is on the table (SQL then does it).
pub struct StateRows(imp::States);

impl StateRows {
    pub fn open() -> Option<StateRows> {
        imp::States::open().map(StateRows)
    }

    /// The entity's state row, locked as `SELECT … FOR UPDATE` locks it (waiting for a concurrent
    /// writer of it, then taking its newest version), or `None` if it has none. Entities must be
    /// locked in the order every path takes (key order, `COLLATE "C"`).
    pub fn lock(&mut self, stream_id: i32, entity_key: &str) -> Option<(StateRowId, StoredState)> {
        self.0.lock(stream_id, entity_key).map(|(tid, state)| (StateRowId(tid), state))
    }

    /// Replaces a locked row's state (versions as numeric text, field versions as JSON text).
    pub fn update(
        &mut self,
        row: StateRowId,
        stream_id: i32,
        entity_key: &str,
        live: Option<&str>,
        tomb: Option<&str>,
        fields: Option<&str>,
    ) {
        self.0.update(row.0, stream_id, entity_key, [live, tomb, fields])
    }

    /// Releases what `open` took. After an error, the aborted (sub)transaction releases it instead.
    pub fn close(self) {
        self.0.close()
    }
}

/// Whether the error being handled was raised while inserting a row (a unique violation there
/// means a concurrent session inserted the same key first). Clears the flag.
pub fn insert_lost_race() -> bool {
    imp::insert_lost_race()
}

/// Deletes up to `limit` of the oldest rows of `ecst.inbox` with a `seq` above what `after`
/// answers — asked once the claim's snapshot is taken, with its mark (`InboxRows::snapshot_mark`)
/// — and hands each to `each`, in `seq` order, through its index, as `DELETE … RETURNING` would: a
/// row another session is deleting is waited for and skipped once that commits. Returns whether
/// it looked at every row there was (fewer than `limit`), and the newest `seq` it looked at. Rows
/// are looked at in pieces of at most `CLAIM_PIECE` under the one snapshot, so a large claim holds
/// no more than a piece in memory. `None` where `InboxRows::open` is.
pub fn claim_inbox(
    limit: i64,
    after: impl FnOnce(Vec<u32>) -> i64,
    mut each: impl FnMut(InboxRow),
) -> Option<(bool, Option<i64>)> {
    let mut inbox = InboxRows::open()?;
    let mut after = after(inbox.snapshot_mark());
    let (mut looked, mut newest) = (0i64, None);
    // The rows taken that share the last piece's newest `seq` (a `seq` given explicitly may
    // repeat): the next piece starts at that `seq` again and skips them.
    let mut at_boundary: Vec<(u16, u16, u16)> = Vec::new();
    let tid = |seen: &Seen| (seen.at.ip_blkid.bi_hi, seen.at.ip_blkid.bi_lo, seen.at.ip_posid);
    loop {
        let piece = (limit - looked).min(CLAIM_PIECE);
        if piece <= 0 {
            break;
        }
        let seen: Vec<Seen> = inbox
            .look(after, piece + at_boundary.len() as i64, |_| true)
            .into_iter()
            .filter(|s| !at_boundary.contains(&tid(s)))
            .collect();
        let short = (seen.len() as i64) < piece;
        let Some(last) = seen.last().map(|s| s.seq) else { break };
        newest = Some(last);
        looked += seen.len() as i64;
        at_boundary = seen.iter().filter(|s| s.seq == last).map(tid).collect();
        after = last.saturating_sub(1);
        for s in seen {
            if let Some(row) = inbox.take(s) {
                each(row);
            }
        }
        if short {
            inbox.close();
            return Some((true, newest));
        }
    }
    inbox.close();
    Some((looked < limit, newest))
}

/// Rows a claim looks at, at most, at a time (`claim_inbox`).
pub const CLAIM_PIECE: i64 = 10_000;

/// The oldest rows of `ecst.inbox`, looked at in `seq` order through its index under one snapshot
/// (`look`), then deleted one by one as the caller decides (`take`), as a `SELECT` and a
/// `DELETE … RETURNING` by `ctid` would, without planning either or converting a `ctid` to text
/// and back. The snapshot stays registered until `close`, so a row looked at cannot be vacuumed
/// away (and its place reused) before it is taken. `None` where
/// the inbox has delete triggers (a user's): the caller then uses SQL.
pub struct InboxRows(imp::Inbox);

/// An inbox row `InboxRows::look` saw: its `seq`, and the whole row where it was asked for.
pub struct Seen {
    pub seq: i64,
    pub row: Option<InboxRow>,
    at: imp::Tid,
}

impl InboxRows {
    pub fn open() -> Option<InboxRows> {
        imp::Inbox::open().map(InboxRows)
    }

    /// Up to `limit` rows with a `seq` above `after`, oldest first, without locking them; the
    /// stream, payload and arrival time of those for which `read(seq)` is true.
    pub fn look(&mut self, after: i64, limit: i64, read: impl FnMut(i64) -> bool) -> Vec<Seen> {
        self.0.look(after, limit, read)
    }

    /// What its snapshot says about other transactions — its `xmin`, `xmax` and the transactions
    /// in progress — equal for two snapshots between which no other transaction ended (so that
    /// no row became visible).
    pub fn snapshot_mark(&self) -> Vec<u32> {
        self.0.snapshot_mark()
    }

    /// Deletes a row `look` saw, read in full, and returns it; `None` if another session deleted
    /// it first (waited for if it is still deleting it).
    pub fn take(&mut self, seen: Seen) -> Option<InboxRow> {
        let row = seen.row.expect("only rows read in full are taken");
        self.0.delete(seen.at).then_some(row)
    }

    /// Releases what `open` took; later statements see the deletions.
    pub fn close(self) {
        self.0.close()
    }
}

/// Whether `ecst.entity_state` has a row for this entity, seen by a snapshot taken now (after
/// the caller's stripe lock, which is what makes the answer last: see `apply::row_mode`).
/// `None` where it cannot look (the caller then asks SQL).
pub fn state_row_exists(stream_id: i32, entity_key: &str) -> Option<bool> {
    imp::state_row_exists(stream_id, entity_key)
}

mod imp {
    use super::*;
    use crate::pg::syscache::own_relation;

    /// The executor calls whose signatures differ between PostgreSQL majors.
    mod compat {
        use pgrx::pg_sys;
        use std::ptr::null_mut;

        /// Whether the running server recomputes stored generated columns in
        /// `ExecSimpleRelationUpdate` for a range table entry that names no updated column, as
        /// here: since 14.7 and 15.2, where the columns to recompute are found at execution
        /// (before, the rewriter found them, and this path has no rewriter). Asked of the server
        /// that runs, not of the headers built against: any minor of a major loads this library.
        pub unsafe fn recomputes_generated_columns() -> bool {
            let text = pg_sys::GetConfigOption(c"server_version_num".as_ptr(), false, false);
            let num: i32 = if text.is_null() {
                0
            } else {
                std::ffi::CStr::from_ptr(text).to_str().ok().and_then(|s| s.parse().ok()).unwrap_or(0)
            };
            match num / 10000 {
                14 => num >= 140007,
                15 => num >= 150002,
                major => major >= 16,
            }
        }

        pub unsafe fn epq_init(epq: *mut pg_sys::EPQState, estate: *mut pg_sys::EState) {
            #[cfg(any(feature = "pg14", feature = "pg15"))]
            pg_sys::EvalPlanQualInit(epq, estate, null_mut(), null_mut(), -1);
            // 16+: the result relations EPQ may need to check (none: no EPQ rechecks here).
            #[cfg(not(any(feature = "pg14", feature = "pg15")))]
            pg_sys::EvalPlanQualInit(epq, estate, null_mut(), null_mut(), -1, null_mut());
        }

        /// The estate's range table: the one relation, as logical replication's apply worker
        /// sets it up (16+: with its permission info; 18+: and as not pruned).
        pub unsafe fn init_range_table(estate: *mut pg_sys::EState, rte: *mut pg_sys::RangeTblEntry) {
            let tables = pg_sys::lappend(null_mut(), rte.cast());
            #[cfg(any(feature = "pg14", feature = "pg15"))]
            pg_sys::ExecInitRangeTable(estate, tables);
            #[cfg(not(any(feature = "pg14", feature = "pg15")))]
            {
                let mut permissions: *mut pg_sys::List = null_mut();
                pg_sys::addRTEPermissionInfo(&mut permissions, rte);
                #[cfg(any(feature = "pg16", feature = "pg17"))]
                pg_sys::ExecInitRangeTable(estate, tables, permissions);
                #[cfg(not(any(feature = "pg16", feature = "pg17")))]
                pg_sys::ExecInitRangeTable(estate, tables, permissions, pg_sys::bms_make_singleton(1));
            }
        }

        /// What a table access method's `tuple_update` says about the indexes: whether (14, 15),
        /// or which (16+: all, or only the summarizing ones), need the new row.
        #[cfg(any(feature = "pg14", feature = "pg15"))]
        pub type UpdateIndexes = bool;
        #[cfg(not(any(feature = "pg14", feature = "pg15")))]
        pub type UpdateIndexes = pg_sys::TU_UpdateIndexes::Type;

        /// An index scan without instrumentation (18+ can count it) or ordering keys.
        pub unsafe fn index_beginscan(
            heap: pg_sys::Relation,
            index: pg_sys::Relation,
            snapshot: pg_sys::Snapshot,
            keys: i32,
        ) -> pg_sys::IndexScanDesc {
            #[cfg(not(any(feature = "pg14", feature = "pg15", feature = "pg16", feature = "pg17")))]
            return pg_sys::index_beginscan(heap, index, snapshot, null_mut(), keys, 0);
            #[cfg(any(feature = "pg14", feature = "pg15", feature = "pg16", feature = "pg17"))]
            return pg_sys::index_beginscan(heap, index, snapshot, keys, 0);
        }

        /// The table's primary key index (InvalidOid: none; 18+: not a deferrable one, which
        /// earlier majors do not report either).
        pub unsafe fn primary_key_index(rel: pg_sys::Relation) -> pg_sys::Oid {
            #[cfg(not(any(feature = "pg14", feature = "pg15", feature = "pg16", feature = "pg17")))]
            return pg_sys::RelationGetPrimaryKeyIndex(rel, false);
            #[cfg(any(feature = "pg14", feature = "pg15", feature = "pg16", feature = "pg17"))]
            return pg_sys::RelationGetPrimaryKeyIndex(rel);
        }

        /// Inserts the index entries an update needs, as `ExecUpdateEpilogue` does.
        pub unsafe fn insert_index_tuples(
            rri: *mut pg_sys::ResultRelInfo,
            slot: *mut pg_sys::TupleTableSlot,
            estate: *mut pg_sys::EState,
            update_indexes: UpdateIndexes,
        ) {
            #[cfg(any(feature = "pg14", feature = "pg15"))]
            let recheck = if update_indexes {
                pg_sys::ExecInsertIndexTuples(rri, slot, estate, true, false, null_mut(), null_mut())
            } else {
                null_mut()
            };
            #[cfg(not(any(feature = "pg14", feature = "pg15")))]
            let recheck = match update_indexes {
                pg_sys::TU_UpdateIndexes::TU_None => null_mut(),
                only => pg_sys::ExecInsertIndexTuples(
                    rri,
                    slot,
                    estate,
                    true,
                    false,
                    null_mut(),
                    null_mut(),
                    only == pg_sys::TU_UpdateIndexes::TU_Summarizing,
                ),
            };
            pg_sys::list_free(recheck);
        }
    }
    use pgrx::pg_sys;
    use pgrx::IntoDatum;
    use std::cell::Cell;
    use std::ptr::null_mut;

    thread_local! {
        /// Set while a row is being inserted, so that the error of an insert that lost a race can
        /// be told from any other.
        static INSERTING: Cell<bool> = const { Cell::new(false) };
    }

    pub fn insert_lost_race() -> bool {
        INSERTING.with(|i| i.replace(false))
    }

    // The row API writes only in READ COMMITTED (`read_committed`). It finds rows as logical
    // replication's apply worker does, by their newest committed version (a dirty snapshot),
    // which is what a READ COMMITTED statement's update or row lock ends up acting on too. Under
    // REPEATABLE READ or SERIALIZABLE a statement raises a serialization failure (40001) where a
    // row it would write was changed after the transaction's snapshot; the row API would silently
    // write over it, so there SQL does the writing.
    use crate::pg::subxact::read_committed;

    /// Whether the row API may write in this transaction: READ COMMITTED (above), and not READ
    /// ONLY — `ExecSimpleRelation*` skip the executor's read-only check, so a row written here
    /// would fail only at commit; SQL raises 25006 at once.
    fn may_write() -> bool {
        // SAFETY: a plain read of the transaction's read-only flag.
        read_committed() && !unsafe { pg_sys::XactReadOnly }
    }

    /// An open replica table with the executor state to write it.
    pub struct Writer(Edata);

    impl Writer {
        pub fn open(table: &TableInfo) -> Option<Writer> {
            // A Citus table's rows are in its shards, out of the row API's reach.
            if !may_write() || table.citus {
                return None;
            }
            // SAFETY: the relation stays locked (ROW EXCLUSIVE, as any writer's) to the end of the
            // transaction; what is opened here is released by `close`, or by the abort of the
            // (sub)transaction an error unwinds through.
            unsafe {
                let rel = pg_sys::table_open(table.oid, pg_sys::RowExclusiveLock as i32);
                let Some(pk) = usable_primary_key(rel, &table.keys) else {
                    pg_sys::table_close(rel, pg_sys::NoLock as i32);
                    return None;
                };
                Some(Writer(Edata::open(rel, pk)))
            }
        }

        pub fn available(table: &TableInfo) -> bool {
            if !may_write() || table.citus {
                return false;
            }
            // SAFETY: opened and closed here; the lock (ROW EXCLUSIVE, as `open` takes) stays to
            // the end of the transaction.
            unsafe {
                let rel = pg_sys::table_open(table.oid, pg_sys::RowExclusiveLock as i32);
                let usable = usable_primary_key(rel, &table.keys).is_some();
                pg_sys::table_close(rel, pg_sys::NoLock as i32);
                usable
            }
        }

        pub fn write(&mut self, keys: &[Bound], set: &[Bound], guard: Option<(&Column, pg_sys::Datum)>) -> Update {
            INSERTING.with(|i| i.set(false));
            // SAFETY: slots of this writer's relation; as apply_handle_update_internal does, except
            // that the row is not locked before it is updated (see `Edata::newest`).
            unsafe {
                // Again when a concurrent session changed the row between its read and its update.
                loop {
                    // What the previous row left in per-row memory (index values, constraint
                    // checks), and the command that writes this row.
                    self.0.reset_per_row();
                    (*self.0.estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
                    let (values, nulls) = self.0.blank(self.0.search);
                    for k in keys {
                        let i = k.column.attnum as usize - 1;
                        values[i] = k.value.expect("key values are never NULL");
                        nulls[i] = false;
                    }
                    let unlocked = self.0.updates_unlocked();
                    let exists = if unlocked { self.0.newest() } else { self.0.find() };
                    if exists && set.is_empty() && guard.is_none() {
                        // `ON CONFLICT DO NOTHING`, as SQL writes it: no new row version.
                        pg_sys::ExecClearTuple(self.0.found);
                        return Update::Written { previous: None };
                    }
                    pg_sys::ExecClearTuple(self.0.new);
                    let (values, nulls) = slot_arrays(self.0.new, self.0.natts);
                    let mut previous = None;
                    if exists {
                        pg_sys::slot_getsomeattrs_int(self.0.found, self.0.natts as i32);
                        let (old_values, old_nulls) = slot_arrays(self.0.found, self.0.natts);
                        if let Some((version, new_version)) = guard {
                            let v = version.attnum as usize - 1;
                            if !old_nulls[v] {
                                let old = version.ty.output(old_values[v]);
                                // Not written, and needs no lock: a guarded write never lowers a
                                // row's version, so it stays at least this high.
                                if compare(version, old_values[v], new_version) >= 0 {
                                    // Unpins the row's page (the writer stays open between rows).
                                    pg_sys::ExecClearTuple(self.0.found);
                                    return Update::NotNewer(old);
                                }
                                previous = Some(old);
                            }
                        }
                        values.copy_from_slice(old_values);
                        nulls.copy_from_slice(old_nulls);
                    } else if insertable(self.0.rel, keys, set) {
                        nulls.fill(true);
                    } else {
                        return Update::NeedsSql;
                    }
                    for b in keys.iter().chain(set) {
                        let i = b.column.attnum as usize - 1;
                        values[i] = b.value.unwrap_or(pg_sys::Datum::from(0));
                        nulls[i] = b.value.is_none();
                    }
                    pg_sys::ExecStoreVirtualTuple(self.0.new);
                    if exists && unlocked {
                        if !self.0.update_found() {
                            continue;
                        }
                    } else if exists {
                        let mut epq: pg_sys::EPQState = std::mem::zeroed();
                        compat::epq_init(&mut epq, self.0.estate);
                        pg_sys::ExecSimpleRelationUpdate(self.0.rri, self.0.estate, &mut epq, self.0.found, self.0.new);
                        pg_sys::EvalPlanQualEnd(&mut epq);
                    } else {
                        // A concurrent insert of the same key makes this fail with a unique
                        // violation (after waiting for it to commit).
                        INSERTING.with(|i| i.set(true));
                        pg_sys::ExecSimpleRelationInsert(self.0.rri, self.0.estate, self.0.new);
                        INSERTING.with(|i| i.set(false));
                    }
                    // Later reads and row locks of this transaction see the new row version.
                    pg_sys::CommandCounterIncrement();
                    pg_sys::ExecClearTuple(self.0.found);
                    return Update::Written { previous };
                }
            }
        }

        pub fn close(self) {
            // SAFETY: releases what `open` took, once.
            unsafe { self.0.release() }
        }
    }

    /// A relation open for the row API: the executor state to write it, as logical replication's
    /// apply worker sets it up (worker.c: create_edata_for_relation, finish_edata) — one result
    /// relation, its indexes open — and the slots of a lookup and a write.
    struct Edata {
        rel: pg_sys::Relation,
        estate: *mut pg_sys::EState,
        rri: *mut pg_sys::ResultRelInfo,
        /// The index rows are looked up by.
        pk: pg_sys::Oid,
        search: *mut pg_sys::TupleTableSlot,
        found: *mut pg_sys::TupleTableSlot,
        new: *mut pg_sys::TupleTableSlot,
        natts: usize,
        /// `newest`'s primary-key search, set up at its first use.
        pk_search: Option<PkSearch>,
    }

    /// The primary key's index (one of those `ExecOpenIndices` opened) and, per key column, its
    /// zero-based heap attribute number and a scan key whose argument each lookup fills in.
    struct PkSearch {
        index: pg_sys::Relation,
        attributes: Vec<usize>,
        keys: Vec<pg_sys::ScanKeyData>,
    }

    impl Edata {
        /// `rel` is open (and locked) already; `release` closes it.
        unsafe fn open(rel: pg_sys::Relation, pk: pg_sys::Oid) -> Edata {
            let estate = pg_sys::CreateExecutorState();
            let rte = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblEntry>()).cast::<pg_sys::RangeTblEntry>();
            (*rte).type_ = pg_sys::NodeTag::T_RangeTblEntry;
            (*rte).rtekind = pg_sys::RTEKind::RTE_RELATION;
            (*rte).relid = (*rel).rd_id;
            (*rte).relkind = (*(*rel).rd_rel).relkind;
            (*rte).rellockmode = pg_sys::AccessShareLock as i32;
            compat::init_range_table(estate, rte);
            let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>()).cast::<pg_sys::ResultRelInfo>();
            (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
            pg_sys::InitResultRelInfo(rri, rel, 1, null_mut(), 0);
            (*estate).es_opened_result_relations = pg_sys::lappend((*estate).es_opened_result_relations, rri.cast());
            if pg_sys::ActiveSnapshotSet() {
                (*estate).es_snapshot = pg_sys::GetActiveSnapshot();
            }
            pg_sys::ExecOpenIndices(rri, false);
            let slot = || pg_sys::table_slot_create(rel, &mut (*estate).es_tupleTable);
            let (search, found, new) = (slot(), slot(), slot());
            let natts = (*(*rel).rd_att).natts as usize;
            Edata { rel, estate, rri, pk, search, found, new, natts, pk_search: None }
        }

        /// Resets per-row memory (what the executor keeps there for the previous row: index
        /// values, constraint checks) and returns it.
        unsafe fn reset_per_row(&mut self) -> pg_sys::MemoryContext {
            if (*self.estate).es_per_tuple_exprcontext.is_null() {
                (*self.estate).es_per_tuple_exprcontext = pg_sys::CreateExprContext(self.estate);
            }
            let memory = (*(*self.estate).es_per_tuple_exprcontext).ecxt_per_tuple_memory;
            pg_sys::MemoryContextReset(memory);
            memory
        }

        /// Resets per-row memory and makes it current; returns the context to switch back to.
        unsafe fn per_row(&mut self) -> pg_sys::MemoryContext {
            pg_sys::MemoryContextSwitchTo(self.reset_per_row())
        }

        /// Clears `slot` to all NULLs and returns its values and null flags, to be filled.
        unsafe fn blank<'s>(&self, slot: *mut pg_sys::TupleTableSlot) -> (&'s mut [pg_sys::Datum], &'s mut [bool]) {
            pg_sys::ExecClearTuple(slot);
            let (values, nulls) = slot_arrays(slot, self.natts);
            nulls.fill(true);
            (values, nulls)
        }

        /// Looks up the row with the key values filled into `search` (after `blank`), locking it
        /// as `SELECT … FOR UPDATE` does (waiting for a concurrent writer of it, then taking its
        /// newest version); whether there is one, in `found`.
        unsafe fn find(&mut self) -> bool {
            pg_sys::ExecStoreVirtualTuple(self.search);
            pg_sys::ExecClearTuple(self.found);
            pg_sys::RelationFindReplTupleByIndex(
                self.rel,
                self.pk,
                pg_sys::LockTupleMode::LockTupleExclusive,
                self.search,
                self.found,
            )
        }

        /// Whether rows of this table are updated without a lock taken first (`newest`, then
        /// `update_found`): not where stored generated columns must be computed, which only
        /// `ExecSimpleRelationUpdate` does here.
        unsafe fn updates_unlocked(&self) -> bool {
            let constr = (*(*self.rel).rd_att).constr;
            constr.is_null() || !(*constr).has_generated_stored
        }

        /// `pk_search`: the primary key's index among the result relation's open indexes, and the
        /// equality operator and collation of each of its key columns (in executor memory, which
        /// lives as long as this).
        unsafe fn pk_search_setup(&self) -> PkSearch {
            let open =
                std::slice::from_raw_parts((*self.rri).ri_IndexRelationDescs, (*self.rri).ri_NumIndices as usize);
            let index =
                *open.iter().find(|&&i| (*i).rd_id == self.pk).expect("the primary key is among the open indexes");
            let back = pg_sys::MemoryContextSwitchTo((*self.estate).es_query_cxt);
            let form = &*(*index).rd_index;
            let n = form.indnkeyatts as usize;
            let attributes = form.indkey.values.as_slice(n).iter().map(|&a| a as usize - 1).collect();
            let keys = (0..n)
                .map(|i| {
                    let family = *(*index).rd_opfamily.add(i);
                    let input = *(*index).rd_opcintype.add(i);
                    let op = pg_sys::get_opfamily_member(family, input, input, pg_sys::BTEqualStrategyNumber as i16);
                    if op == pg_sys::Oid::INVALID {
                        pgrx::error!("pg_ecst: no equality operator in the operator family of a primary key column");
                    }
                    let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
                    let equal = pg_sys::get_opcode(op);
                    pg_sys::ScanKeyInit(
                        &mut key,
                        (i + 1) as i16,
                        pg_sys::BTEqualStrategyNumber as u16,
                        equal,
                        pg_sys::Datum::from(0),
                    );
                    key.sk_collation = *(*index).rd_indcollation.add(i);
                    key
                })
                .collect();
            pg_sys::MemoryContextSwitchTo(back);
            PkSearch { index, attributes, keys }
        }

        /// Looks up the row with the key values filled into `search` (after `blank`) as
        /// `RelationFindReplTupleByIndex` does — its newest version, after waiting for a
        /// concurrent writer of it — but without locking it; whether there is one, in `found`.
        /// `update_found` then writes it as an `UPDATE` would and tells whether a concurrent
        /// session changed it meanwhile.
        ///
        /// Not `find`'s lock: a row locked and then updated by one subtransaction keeps that lock
        /// on its new version (as a key-share lock), and the next subtransaction of the same
        /// transaction to write it — the next `ecst.apply` of the entity in a transaction that
        /// applies many, or the next row of a statement in trigger mode — must combine it with
        /// its own into a MultiXact: a write to `pg_multixact` per repeated entity and, over time,
        /// anti-wraparound vacuums of the replica (100,000 calls over 20,000 entities, committed
        /// every 1,000, made 25,000 of them).
        unsafe fn newest(&mut self) -> bool {
            if self.pk_search.is_none() {
                self.pk_search = Some(self.pk_search_setup());
            }
            let PkSearch { index, attributes, keys } = self.pk_search.as_mut().expect("set up above");
            for (key, &at) in keys.iter_mut().zip(attributes.iter()) {
                key.sk_argument = *(*self.search).tts_values.add(at);
            }
            let (index, n) = (*index, keys.len() as i32);
            // A dirty snapshot: committed rows, and those of transactions still in progress, which
            // it names so that they can be waited for.
            let mut dirty: pg_sys::SnapshotData = std::mem::zeroed();
            dirty.snapshot_type = pg_sys::SnapshotType::SNAPSHOT_DIRTY;
            let scan = compat::index_beginscan(self.rel, index, &mut dirty, n);
            let found = loop {
                pg_sys::ExecClearTuple(self.found);
                pg_sys::index_rescan(scan, keys.as_mut_ptr(), n, null_mut(), 0);
                let found = pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, self.found);
                let writer = if dirty.xmin != pg_sys::InvalidTransactionId { dirty.xmin } else { dirty.xmax };
                if !found || writer == pg_sys::InvalidTransactionId {
                    break found;
                }
                // Another transaction is inserting, updating or deleting it: wait, then look again.
                pg_sys::XactLockTableWait(writer, null_mut(), null_mut(), pg_sys::XLTW_Oper::XLTW_None);
            };
            pg_sys::index_endscan(scan);
            found
        }

        /// Updates the row `newest` found to `new`, as an `UPDATE` does (`ExecSimpleRelationUpdate`
        /// for a table without triggers, whose row lock comes with the update): waits for a
        /// concurrent writer of the row; `false`, with nothing written, if that one changed or
        /// deleted it — the caller reads it again.
        unsafe fn update_found(&mut self) -> bool {
            pg_sys::CheckCmdReplicaIdentity(self.rel, pg_sys::CmdType::CMD_UPDATE);
            if !(*(*self.rel).rd_att).constr.is_null() {
                pg_sys::ExecConstraints(self.rri, self.new, self.estate);
            }
            let mut tid = (*self.found).tts_tid;
            let mut failure: pg_sys::TM_FailureData = std::mem::zeroed();
            let mut lock_mode = pg_sys::LockTupleMode::LockTupleNoKeyExclusive;
            let mut update_indexes = compat::UpdateIndexes::default();
            let update = (*(*self.rel).rd_tableam).tuple_update.expect("a table access method updates tuples");
            let result = update(
                self.rel,
                &mut tid,
                self.new,
                (*self.estate).es_output_cid,
                (*self.estate).es_snapshot,
                null_mut(),
                true,
                &mut failure,
                &mut lock_mode,
                &mut update_indexes,
            );
            match result {
                pg_sys::TM_Result::TM_Ok => {
                    if (*self.rri).ri_NumIndices > 0 {
                        compat::insert_index_tuples(self.rri, self.new, self.estate, update_indexes);
                    }
                    true
                }
                // A concurrent session updated or deleted it (waited for, committed).
                pg_sys::TM_Result::TM_Updated | pg_sys::TM_Result::TM_Deleted => false,
                other => pgrx::error!("pg_ecst: unexpected result {other} updating a replica row"),
            }
        }

        /// Releases what `open` took and closes the relation (its lock stays to the end of the
        /// transaction).
        unsafe fn release(self) {
            pg_sys::ExecCloseIndices(self.rri);
            pg_sys::ExecResetTupleTable((*self.estate).es_tupleTable, false);
            pg_sys::FreeExecutorState(self.estate);
            pg_sys::table_close(self.rel, pg_sys::NoLock as i32);
        }
    }

    pub type Tid = pg_sys::ItemPointerData;

    /// `ecst.entity_state` open for the row API, with its primary key (stream_id, entity_key).
    pub struct States {
        e: Edata,
        /// Zero-based attribute numbers of stream_id, entity_key, live_version, tomb_version,
        /// field_versions.
        at: [usize; 5],
    }

    /// The stored types of live_version, tomb_version and field_versions, with their input and
    /// output functions.
    const STATE_TYPES: [(pg_sys::Oid, u32, u32); 3] = [
        (pg_sys::NUMERICOID, pg_sys::F_NUMERIC_IN, pg_sys::F_NUMERIC_OUT),
        (pg_sys::NUMERICOID, pg_sys::F_NUMERIC_IN, pg_sys::F_NUMERIC_OUT),
        (pg_sys::JSONBOID, pg_sys::F_JSONB_IN, pg_sys::F_JSONB_OUT),
    ];

    impl States {
        pub fn open() -> Option<States> {
            // SAFETY: pg_ecst's own table, opened ROW EXCLUSIVE (as any writer's lock, kept to the
            // end of the transaction); what is opened here is released by `close`, or by the abort
            // of the (sub)transaction an error unwinds through.
            unsafe {
                if !may_write() {
                    return None;
                }
                let oid = own_relation(c"entity_state")?;
                let rel = pg_sys::table_open(oid, pg_sys::RowExclusiveLock as i32);
                // `Edata::newest` relies on heap visibility, as for replicas.
                if (*(*rel).rd_rel).relam != pg_sys::HEAP_TABLE_AM_OID {
                    pg_sys::table_close(rel, pg_sys::NoLock as i32);
                    return None;
                }
                let pk = compat::primary_key_index(rel);
                let names = [c"stream_id", c"entity_key", c"live_version", c"tomb_version", c"field_versions"];
                let at = names.map(|n| pg_sys::get_attnum(oid, n.as_ptr()) as i32 - 1);
                // Its foreign key's triggers are the only ones it should have (an update that keeps
                // the key queues none of them).
                if pk == pg_sys::Oid::INVALID || at.iter().any(|&a| a < 0) || !only_internal_triggers(rel) {
                    pg_sys::table_close(rel, pg_sys::NoLock as i32);
                    return None;
                }
                Some(States { e: Edata::open(rel, pk), at: at.map(|a| a as usize) })
            }
        }

        /// Clears `slot` to a row holding only this key (in per-row memory); returns its values and
        /// null flags.
        unsafe fn keyed<'s>(
            &self,
            slot: *mut pg_sys::TupleTableSlot,
            stream_id: i32,
            entity_key: &str,
        ) -> (&'s mut [pg_sys::Datum], &'s mut [bool]) {
            let (values, nulls) = self.e.blank(slot);
            let [stream_at, key_at, ..] = self.at;
            values[stream_at] = pg_sys::Datum::from(stream_id);
            nulls[stream_at] = false;
            values[key_at] = text_datum(entity_key);
            nulls[key_at] = false;
            (values, nulls)
        }

        pub fn lock(&mut self, stream_id: i32, entity_key: &str) -> Option<(Tid, StoredState)> {
            // SAFETY: slots of this relation; as apply_handle_update_internal finds its row.
            unsafe {
                let back = self.e.per_row();
                self.keyed(self.e.search, stream_id, entity_key);
                let exists = self.e.find();
                let result = exists.then(|| {
                    pg_sys::slot_getsomeattrs_int(self.e.found, self.e.natts as i32);
                    let (values, nulls) = slot_arrays(self.e.found, self.e.natts);
                    let text = |i: usize| {
                        let at = self.at[2 + i];
                        (!nulls[at]).then(|| {
                            let out = pg_sys::OidOutputFunctionCall(pg_sys::Oid::from(STATE_TYPES[i].2), values[at]);
                            std::ffi::CStr::from_ptr(out).to_str().expect("stored states are UTF-8").to_owned()
                        })
                    };
                    ((*self.e.found).tts_tid, (text(0), text(1), text(2)))
                });
                // Unpins the row's buffer.
                pg_sys::ExecClearTuple(self.e.found);
                pg_sys::MemoryContextSwitchTo(back);
                result
            }
        }

        pub fn update(&mut self, tid: Tid, stream_id: i32, entity_key: &str, state: [Option<&str>; 3]) {
            // SAFETY: a row this transaction has locked (`lock`), so it is still the newest version
            // of the entity's state; as apply_handle_update_internal updates it.
            unsafe {
                let back = self.e.per_row();
                (*self.e.estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
                let (values, nulls) = self.keyed(self.e.new, stream_id, entity_key);
                for (i, text) in state.iter().enumerate() {
                    let at = self.at[2 + i];
                    let (ty, input, _) = STATE_TYPES[i];
                    nulls[at] = text.is_none();
                    values[at] = match text {
                        Some(t) => {
                            let c = std::ffi::CString::new(*t).expect("no NUL in a version");
                            pg_sys::OidInputFunctionCall(pg_sys::Oid::from(input), c.as_ptr().cast_mut(), ty, -1)
                        }
                        None => pg_sys::Datum::from(0),
                    };
                }
                pg_sys::ExecStoreVirtualTuple(self.e.new);
                let mut epq: pg_sys::EPQState = std::mem::zeroed();
                compat::epq_init(&mut epq, self.e.estate);
                pg_sys::AfterTriggerBeginQuery();
                // The row API takes the old row's place from the search slot.
                pg_sys::ExecClearTuple(self.e.search);
                (*self.e.search).tts_tid = tid;
                pg_sys::ExecSimpleRelationUpdate(self.e.rri, self.e.estate, &mut epq, self.e.search, self.e.new);
                pg_sys::AfterTriggerEndQuery(self.e.estate);
                pg_sys::EvalPlanQualEnd(&mut epq);
                pg_sys::MemoryContextSwitchTo(back);
            }
        }

        pub fn close(self) {
            // SAFETY: releases what `open` took, once; later statements see the updates.
            unsafe {
                pg_sys::CommandCounterIncrement();
                self.e.release()
            }
        }
    }

    /// Whether every trigger on `rel` is one PostgreSQL made for a constraint (no user's trigger).
    unsafe fn only_internal_triggers(rel: pg_sys::Relation) -> bool {
        let desc = (*rel).trigdesc;
        desc.is_null() || {
            let n = (*desc).numtriggers as usize;
            std::slice::from_raw_parts((*desc).triggers, n).iter().all(|t| t.tgisinternal)
        }
    }

    /// A `text` datum of `s` in the current memory context.
    unsafe fn text_datum(s: &str) -> pg_sys::Datum {
        pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(s.as_ptr().cast(), s.len() as i32))
    }

    /// Whether a row holding only `keys` and `set` can be inserted without SQL: every other
    /// column would be NULL, so none of them may have a default (or be an identity column), nor a
    /// domain type (SQL gives it the domain's default, or checks NULL against the domain's
    /// constraints; the executor checks only the table's). Stored generated columns are computed
    /// by the executor.
    unsafe fn insertable(rel: pg_sys::Relation, keys: &[Bound], set: &[Bound]) -> bool {
        let desc = pgrx::PgTupleDesc::from_pg_unchecked((*rel).rd_att);
        desc.iter().all(|a| {
            a.attisdropped
                || a.attgenerated != 0
                || (!a.atthasdef
                    && a.attidentity == 0
                    && pg_sys::get_typtype(a.atttypid) != pg_sys::TYPTYPE_DOMAIN as std::ffi::c_char)
                || keys.iter().chain(set).any(|b| b.column.attnum == a.attnum)
        })
    }

    /// The values and null flags of a slot.
    unsafe fn slot_arrays<'s>(
        slot: *mut pg_sys::TupleTableSlot,
        natts: usize,
    ) -> (&'s mut [pg_sys::Datum], &'s mut [bool]) {
        (
            std::slice::from_raw_parts_mut((*slot).tts_values, natts),
            std::slice::from_raw_parts_mut((*slot).tts_isnull, natts),
        )
    }

    /// `a` compared with `b` (negative, 0, positive) by the type's default btree order.
    unsafe fn compare(column: &Column, a: pg_sys::Datum, b: pg_sys::Datum) -> i32 {
        let tc = pg_sys::lookup_type_cache(column.ty.oid, pg_sys::TYPECACHE_CMP_PROC_FINFO as i32);
        let result = pg_sys::FunctionCall2Coll(&mut (*tc).cmp_proc_finfo, pg_sys::Oid::INVALID, a, b);
        result.value() as i32
    }

    /// The primary key of `rel` if the row API may write it for the current user, and that key is
    /// exactly the stream's key columns.
    unsafe fn usable_primary_key(rel: pg_sys::Relation, keys: &[Column]) -> Option<pg_sys::Oid> {
        let form = &*(*rel).rd_rel;
        if form.relkind != pg_sys::RELKIND_RELATION as std::ffi::c_char
            || form.relispartition
            || form.relrowsecurity
            // Rules rewrite SQL statements; the row API would bypass them (SQL refuses the upsert).
            || form.relhasrules
            // `Edata::newest` relies on heap visibility (a dirty snapshot naming the writers).
            || form.relam != pg_sys::HEAP_TABLE_AM_OID
            || !(*rel).trigdesc.is_null()
        {
            return None;
        }
        // Stored generated columns are recomputed on update only by servers that do it here.
        let constr = (*(*rel).rd_att).constr;
        if !constr.is_null() && (*constr).has_generated_stored && !compat::recomputes_generated_columns() {
            return None;
        }
        // Both (an aclcheck of several modes passes when any one is held): the row API reads the
        // row's version where SQL's `ON CONFLICT … WHERE` needs SELECT.
        for mode in [pg_sys::ACL_SELECT, pg_sys::ACL_UPDATE] {
            if pg_sys::pg_class_aclcheck(form.oid, pg_sys::GetUserId(), mode as pg_sys::AclMode)
                != pg_sys::AclResult::ACLCHECK_OK
            {
                return None;
            }
        }
        let pk = compat::primary_key_index(rel);
        if pk == pg_sys::Oid::INVALID {
            return None;
        }
        let index = pg_sys::index_open(pk, pg_sys::RowExclusiveLock as i32);
        let ix = &*(*index).rd_index;
        let nkeys = ix.indnkeyatts as usize;
        let attnums = ix.indkey.values.as_slice(nkeys);
        let same = nkeys == keys.len() && keys.iter().all(|k| attnums.contains(&k.attnum));
        pg_sys::index_close(index, pg_sys::NoLock as i32);
        same.then_some(pk)
    }

    /// `ecst.inbox` and its `seq` index, open under a registered snapshot.
    pub struct Inbox {
        rel: pg_sys::Relation,
        index: pg_sys::Relation,
        snapshot: pg_sys::Snapshot,
        slot: *mut pg_sys::TupleTableSlot,
        /// One-based attribute numbers of seq, stream, payload, received_at.
        at: [usize; 4],
    }

    impl Inbox {
        pub fn open() -> Option<Inbox> {
            // SAFETY: pg_ecst's own heap table and index, opened ROW EXCLUSIVE (as a DELETE's lock,
            // kept to the end of the transaction), under a registered snapshot; released by `close`,
            // or by the abort of the (sub)transaction an error unwinds through.
            unsafe {
                // A READ ONLY transaction's claim goes through SQL, which refuses it (25006).
                if pg_sys::XactReadOnly {
                    return None;
                }
                let (Some(inbox), Some(index_oid)) = (own_relation(c"inbox"), own_relation(c"inbox_seq_idx")) else {
                    return None;
                };
                let rel = pg_sys::table_open(inbox, pg_sys::RowExclusiveLock as i32);
                // Rows are deleted with heap_delete: a heap table only (the database's default
                // table access method, when the extension was created, may have been another).
                if (*(*rel).rd_rel).relam != pg_sys::HEAP_TABLE_AM_OID {
                    pg_sys::table_close(rel, pg_sys::NoLock as i32);
                    return None;
                }
                // A publication of the inbox's deletes needs a replica identity: refused as the
                // DELETE would be (55000), not deleted unseen by its subscribers.
                pg_sys::CheckCmdReplicaIdentity(rel, pg_sys::CmdType::CMD_DELETE);
                let triggers = (*rel).trigdesc;
                if !triggers.is_null()
                    && ((*triggers).trig_delete_before_row
                        || (*triggers).trig_delete_after_row
                        || (*triggers).trig_delete_before_statement
                        || (*triggers).trig_delete_after_statement)
                {
                    pg_sys::table_close(rel, pg_sys::NoLock as i32);
                    return None;
                }
                let at = [c"seq", c"stream", c"payload", c"received_at"]
                    .map(|name| pg_sys::get_attnum(inbox, name.as_ptr()) as usize);
                pg_sys::CommandCounterIncrement();
                let index = pg_sys::index_open(index_oid, pg_sys::RowExclusiveLock as i32);
                // What a statement would see: in READ COMMITTED a new snapshot, else the transaction's.
                let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetTransactionSnapshot());
                let slot = pg_sys::table_slot_create(rel, null_mut());
                Some(Inbox { rel, index, snapshot, slot, at })
            }
        }

        pub fn look(&mut self, after: i64, limit: i64, mut read: impl FnMut(i64) -> bool) -> Vec<Seen> {
            use pgrx::FromDatum;
            // SAFETY: an index scan of the open inbox under the registered snapshot, ended here.
            unsafe {
                let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
                pg_sys::ScanKeyInit(
                    &mut key,
                    1,
                    pg_sys::BTGreaterStrategyNumber as u16,
                    pg_sys::Oid::from(pg_sys::F_INT8GT),
                    pg_sys::Datum::from(after),
                );
                let scan = compat::index_beginscan(self.rel, self.index, self.snapshot, 1);
                pg_sys::index_rescan(scan, &mut key, 1, null_mut(), 0);
                let [seq_at, stream_at, payload_at, received_at] = self.at;
                let last = *self.at.iter().max().expect("four columns");
                let mut seen = Vec::with_capacity(limit.clamp(0, 100_000) as usize);
                while (seen.len() as i64) < limit
                    && pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, self.slot)
                {
                    pg_sys::slot_getsomeattrs_int(self.slot, last as i32);
                    let (values, nulls) = slot_arrays(self.slot, last);
                    let seq = i64::from_datum(values[seq_at - 1], nulls[seq_at - 1]).expect("seq is NOT NULL");
                    let row = read(seq).then(|| {
                        let text = |at: usize| String::from_datum(values[at - 1], nulls[at - 1]);
                        InboxRow {
                            seq,
                            stream: text(stream_at),
                            payload: text(payload_at),
                            received_at: pgrx::datum::TimestampWithTimeZone::from_datum(
                                values[received_at - 1],
                                nulls[received_at - 1],
                            )
                            .expect("received_at is NOT NULL"),
                        }
                    });
                    seen.push(Seen { seq, row, at: (*self.slot).tts_tid });
                }
                pg_sys::ExecClearTuple(self.slot);
                pg_sys::index_endscan(scan);
                seen
            }
        }

        pub fn snapshot_mark(&self) -> Vec<u32> {
            // SAFETY: the registered snapshot's fields and its array of in-progress xids.
            unsafe {
                let snapshot = &*self.snapshot;
                let mut running: Vec<u32> = if snapshot.xip.is_null() {
                    Vec::new()
                } else {
                    std::slice::from_raw_parts(snapshot.xip, snapshot.xcnt as usize)
                        .iter()
                        .map(|x| x.into_inner())
                        .collect()
                };
                running.sort_unstable();
                [snapshot.xmin.into_inner(), snapshot.xmax.into_inner()].into_iter().chain(running).collect()
            }
        }

        pub fn delete(&mut self, mut tid: Tid) -> bool {
            // SAFETY: a row of the open inbox that `look` saw under the snapshot still registered, so
            // `tid` still holds it (or a version another session deleted); as a DELETE deletes it.
            unsafe {
                let cid = pg_sys::GetCurrentCommandId(true);
                let mut failure: pg_sys::TM_FailureData = std::mem::zeroed();
                match pg_sys::heap_delete(self.rel, &mut tid, cid, null_mut(), true, &mut failure, false) {
                    pg_sys::TM_Result::TM_Ok => true,
                    // Claimed by a concurrent drainer (waited for, committed) or by this one.
                    pg_sys::TM_Result::TM_Deleted
                    | pg_sys::TM_Result::TM_Updated
                    | pg_sys::TM_Result::TM_SelfModified => false,
                    other => pgrx::error!("pg_ecst: unexpected result {other} deleting an inbox row"),
                }
            }
        }

        pub fn close(self) {
            // SAFETY: releases what `open` took, once.
            unsafe {
                pg_sys::ExecDropSingleTupleTableSlot(self.slot);
                pg_sys::UnregisterSnapshot(self.snapshot);
                pg_sys::index_close(self.index, pg_sys::NoLock as i32);
                pg_sys::table_close(self.rel, pg_sys::NoLock as i32);
                pg_sys::CommandCounterIncrement();
            }
        }
    }

    pub fn state_row_exists(stream_id: i32, entity_key: &str) -> Option<bool> {
        // SAFETY: an index scan of pg_ecst's own table under a registered snapshot, closed before
        // returning; an error unwinds through the caller's subtransaction.
        unsafe {
            // What this transaction wrote before is seen too.
            pg_sys::CommandCounterIncrement();
            let (Some(heap_oid), Some(index_oid)) = (own_relation(c"entity_state"), own_relation(c"entity_state_pkey"))
            else {
                return None;
            };
            let heap = pg_sys::table_open(heap_oid, pg_sys::AccessShareLock as i32);
            let index = pg_sys::index_open(index_oid, pg_sys::AccessShareLock as i32);
            // A new snapshot (row mode is READ COMMITTED only), as the SQL `SELECT` it replaces took.
            let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetTransactionSnapshot());
            let mut keys: [pg_sys::ScanKeyData; 2] = std::mem::zeroed();
            pg_sys::ScanKeyInit(
                &mut keys[0],
                1,
                pg_sys::BTEqualStrategyNumber as u16,
                pg_sys::Oid::from(pg_sys::F_INT4EQ),
                pg_sys::Datum::from(stream_id),
            );
            pg_sys::ScanKeyInit(
                &mut keys[1],
                2,
                pg_sys::BTEqualStrategyNumber as u16,
                pg_sys::Oid::from(pg_sys::F_TEXTEQ),
                entity_key.into_datum().expect("text datum"),
            );
            // The index orders entity_key by its own collation; the search must use the same.
            keys[1].sk_collation = *(*index).rd_indcollation.add(1);
            let scan = compat::index_beginscan(heap, index, snapshot, 2);
            pg_sys::index_rescan(scan, keys.as_mut_ptr(), 2, null_mut(), 0);
            let slot = pg_sys::table_slot_create(heap, null_mut());
            let exists = pg_sys::index_getnext_slot(scan, pg_sys::ScanDirection::ForwardScanDirection, slot);
            pg_sys::ExecDropSingleTupleTableSlot(slot);
            pg_sys::index_endscan(scan);
            pg_sys::UnregisterSnapshot(snapshot);
            pg_sys::index_close(index, pg_sys::AccessShareLock as i32);
            pg_sys::table_close(heap, pg_sys::AccessShareLock as i32);
            Some(exists)
        }
    }
}
