//! The locks pg_ecst takes besides row locks, all transaction-level and taken directly in the
//! lock manager (no SQL): PostgreSQL's advisory lock tags, in key spaces no SQL call produces
//! except where noted, so they cannot collide with an application's advisory locks.
//!
//! - The **stream lock** (one per stream): writers hold it in share mode; an operation that must
//!   exclude every writer of the stream (a large unversioned batch, `ecst.rebuild`, a replace-mode
//!   `load_snapshot`) holds it exclusively.
//! - **Entity locks** (unversioned streams, which have no version-state row to lock).
//! - **Stripe locks** (row-version streams, see [`lock_stripes`]): guard the creation of
//!   version-state rows, so that an entity's state never moves from its replica row to a state row
//!   under the feet of a session that read it from the row.

use pgrx::pg_sys;
use pgrx::spi::SpiClient;
use std::collections::BTreeMap;

/// Above this many entities a call locks the whole stream instead of each entity: every
/// transaction-level lock takes a slot in PostgreSQL's shared lock table
/// (`max_locks_per_transaction` × connections, about 7,800 by default), which a batch of 50,000
/// entity locks overflows ("out of shared memory").
const ENTITY_LOCKS_MAX: usize = 256;

/// The first key of the two-key advisory lock space used for whole-stream locks (the second is
/// the stream id); entity locks use the one-bigint key space, which is distinct.
const STREAM_LOCK_SPACE: u32 = 0x6563_7374; // "ecst"

/// `locktag_field4` of stripe locks. SQL's advisory locks use 1 (one bigint) and 2 (two
/// integers); 3 is a key space of pg_ecst's own (`pg_locks.objsubid = 3`).
const STRIPE_TAG: u16 = 3;

/// Stripes per stream. A batch touches at most this many stripe locks, whatever its size.
pub const STRIPES: u32 = 64;

fn advisory_tag(field2: u32, field3: u32, field4: u16) -> pg_sys::LOCKTAG {
    pg_sys::LOCKTAG {
        // SAFETY: a plain read of this backend's database id.
        locktag_field1: unsafe { pg_sys::MyDatabaseId.to_u32() },
        locktag_field2: field2,
        locktag_field3: field3,
        locktag_field4: field4,
        locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
        locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
    }
}

fn acquire(tag: &pg_sys::LOCKTAG, exclusive: bool) {
    let mode = if exclusive { pg_sys::ExclusiveLock } else { pg_sys::ShareLock };
    // SAFETY: a transaction-level lock in the user lock method, released at commit or abort
    // (or when the subtransaction that took it aborts).
    unsafe { pg_sys::LockAcquire(tag, mode as pg_sys::LOCKMODE, false, false) };
}

/// The stream's lock (`pg_advisory_xact_lock[_shared](STREAM_LOCK_SPACE, stream_id)`).
pub fn lock_stream(stream_id: i32, exclusive: bool) {
    acquire(&advisory_tag(STREAM_LOCK_SPACE, stream_id as u32, 2), exclusive);
}

/// Locks entities of an unversioned stream (no version-state row to lock), in the order given,
/// until the end of the transaction: every path (set-based and per-event) takes these before any
/// replica row, in key order, so two sessions writing the same entities in different column-set
/// groups or with deletes cannot deadlock.
///
/// Two levels: up to [`ENTITY_LOCKS_MAX`] entities, the stream's lock in share mode and then one
/// transaction-level advisory lock per entity on a 64-bit hash of (stream, entity key) — a
/// collision only makes two entities share a lock; more entities than that, the stream's lock
/// in exclusive mode alone, which excludes every other writer of the stream until commit.
pub fn lock_entities(client: &mut SpiClient, stream_id: i32, keys: Vec<String>) {
    let whole = keys.len() > ENTITY_LOCKS_MAX;
    lock_stream(stream_id, whole);
    if whole {
        return;
    }
    crate::pg::spi::run(
        client,
        "SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(u.k, $1))
         FROM pg_catalog.unnest($2::text[]) WITH ORDINALITY AS u (k, n) ORDER BY u.n",
        &[(stream_id as i64).into(), keys.into()],
    );
}

/// The stripe of an entity (by its canonical key): FNV-1a, the same in every backend.
pub fn stripe(entity_key: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in entity_key.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h % STRIPES
}

/// Stripe → whether it is needed exclusively.
pub type Stripes = BTreeMap<u32, bool>;

/// Adds an entity's stripe (exclusive wins over share).
pub fn add_stripe(stripes: &mut Stripes, entity_key: &str, exclusive: bool) {
    *stripes.entry(stripe(entity_key)).or_insert(false) |= exclusive;
}

/// Locks a row-version stream's stripes, in ascending order after the stream's lock in share
/// mode. In a row-version stream an entity without a version-state row keeps its version in the
/// replica row; writers of such entities hold its stripe in share mode, and whoever creates a
/// state row (a delete leaving a tombstone; any write outside READ COMMITTED) holds it
/// exclusively. So a session that found no state row can rely on there being none until it
/// commits, and its guarded replica write (never lowering the row's version) is all the
/// serialisation it needs.
pub fn lock_stripes(stream_id: i32, stripes: &Stripes) {
    lock_stream(stream_id, false);
    for (&stripe, &exclusive) in stripes {
        acquire(&advisory_tag(stream_id as u32, stripe, STRIPE_TAG), exclusive);
    }
}

/// Takes the replica's `ROW EXCLUSIVE` lock (which every writer takes anyway) before the state of
/// an entity without a state row is read from its replica row: a bulk load in flight holds
/// `SHARE ROW EXCLUSIVE` until it commits, so the read that follows (with a new snapshot) sees
/// the loaded rows rather than deciding on the empty table.
pub fn wait_for_bulk_load(table: pg_sys::Oid) {
    // SAFETY: an ordinary relation lock, held to the end of the transaction like any writer's.
    unsafe { pg_sys::LockRelationOid(table, pg_sys::RowExclusiveLock as i32) };
}
