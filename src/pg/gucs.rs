//! pg_ecst's settings (all but `ecst.workers`' upper bound are reloaded on SIGHUP), and
//! PostgreSQL settings overridden while pg_ecst does something ([`Override`]).

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// Upper bound of `ecst.workers` (slots in shared memory).
pub const MAX_WORKERS: usize = 32;

pub static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"*"));
pub static WORKER_ROLE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static WORKERS: GucSetting<i32> = GucSetting::<i32>::new(1);
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(5000);
pub static NAPTIME_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static BACKLOG_BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1_000_000);
pub static FEED_BUFFER_KB: GucSetting<i32> = GucSetting::<i32>::new(16 * 1024);
pub static SHARD_CONNECTIONS: GucSetting<i32> = GucSetting::<i32>::new(2);

pub fn init() {
    GucRegistry::define_string_guc(
        c"ecst.database",
        c"Databases whose inboxes the pg_ecst background workers drain: * (every database with the extension) or a comma-separated list of names.",
        c"The workers serve each database where the pg_ecst extension is installed; a listed database that does not exist yet is waited for quietly.",
        &DATABASE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"ecst.worker_role",
        c"Role the pg_ecst background workers run as (empty: the bootstrap superuser).",
        c"Use a role with INSERT, UPDATE and DELETE on the replica tables and nothing more; it needs LOGIN (a background worker connects like a session). Events of streams it may not write become dead letters (SQLSTATE 42501).",
        &WORKER_ROLE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ecst.workers",
        c"Number of pg_ecst background workers (0 disables them).",
        c"Events are partitioned between workers by entity key, so each entity's events keep inbox order.",
        &WORKERS,
        0,
        MAX_WORKERS as i32,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ecst.batch_size",
        c"Inbox events a worker applies per transaction.",
        c"",
        &BATCH_SIZE,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ecst.backlog_batch_size",
        c"Events a drainer of the inbox claims at once while a backlog lasts (after a claim of ecst.batch_size came back full), sorted by entity and written once per entity.",
        c"Values up to ecst.batch_size turn backlog batches off. Their sort takes ecst.feed_buffer of memory and spills beyond it.",
        &BACKLOG_BATCH_SIZE,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ecst.feed_buffer",
        c"Memory for sorting the rows of a statement writing into ecst.feed, or of an inbox backlog batch.",
        c"Beyond it the sort spills to temporary files; applying the sorted rows takes about 40 MB more.",
        &FEED_BUFFER_KB,
        64,
        1024 * 1024,
        GucContext::Userset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"ecst.shard_connections",
        c"Connections per Citus node that a batch of a stream on a distributed replica uses at most to apply its shards.",
        c"Each applies its node's shards one after another; 0 leaves it to citus.max_adaptive_executor_pool_size.",
        &SHARD_CONNECTIONS,
        0,
        1000,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"ecst.naptime",
        c"How long an idle worker sleeps between inbox checks (ms); inserts wake it at once.",
        c"",
        &NAPTIME_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
}

/// The databases `ecst.database` names: `None` for `*` (or empty), every database.
pub fn databases() -> Option<Vec<String>> {
    let setting = DATABASE.get().and_then(|c| c.into_string().ok()).unwrap_or_default();
    let names: Vec<String> = setting.split(',').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect();
    (!names.is_empty() && names != ["*"]).then_some(names)
}

/// Whether `ecst.database` includes the database `name`.
pub fn serves_database(name: &str) -> bool {
    databases().is_none_or(|names| names.iter().any(|n| n == name))
}

/// `ecst.worker_role`, if set.
pub fn worker_role() -> Option<String> {
    WORKER_ROLE.get().and_then(|c| c.into_string().ok()).filter(|r| !r.is_empty())
}

/// `citus.max_adaptive_executor_pool_size` for pg_ecst's batches on distributed replicas: at most
/// `ecst.shard_connections`, or less if the session asks for less (`None`: leave it).
pub fn shard_pool() -> Option<Override> {
    let ours = SHARD_CONNECTIONS.get();
    if ours <= 0 {
        return None;
    }
    let name = c"citus.max_adaptive_executor_pool_size";
    // SAFETY: reads a setting's current value (NULL if it does not exist).
    let current = unsafe {
        let value = pgrx::pg_sys::GetConfigOption(name.as_ptr(), true, false);
        (!value.is_null()).then(|| std::ffi::CStr::from_ptr(value).to_string_lossy().parse::<i32>().ok()).flatten()
    }?;
    let value = CString::new(current.min(ours).to_string()).expect("digits");
    Some(Override::enter(&[(name, value.as_c_str())]))
}

/// Server settings overridden until dropped (also when an error unwinds through it): a new GUC
/// nesting level holding them, as a function's `SET` clauses make (fmgr.c), popped on drop.
pub struct Override {
    nest_level: i32,
    /// Whether what was set inside the level (by pinned settings, or by anyone's `SET`) is undone
    /// when it pops, as at a function's end, rather than kept as a plain `SET` would be.
    discard: bool,
}

impl Override {
    /// A level that undoes, when dropped, every setting changed inside it — also a replica
    /// trigger's plain `SET` or `set_config(..., false)` — as VACUUM isolates a table owner's code:
    /// for the worker, whose session runs many owners' triggers one after another.
    pub fn isolated() -> Override {
        let mut level = Override::enter(&[]);
        level.discard = true;
        level
    }

    pub fn enter(settings: &[(&std::ffi::CStr, &std::ffi::CStr)]) -> Override {
        // SAFETY: fmgr.c's steps for `SET` clauses; `drop` pops the level.
        unsafe {
            let nest_level = pgrx::pg_sys::NewGUCNestLevel();
            for (name, value) in settings {
                pgrx::pg_sys::set_config_option(
                    name.as_ptr(),
                    value.as_ptr(),
                    pgrx::pg_sys::GucContext::PGC_USERSET,
                    pgrx::pg_sys::GucSource::PGC_S_SESSION,
                    pgrx::pg_sys::GucAction::GUC_ACTION_SAVE,
                    true,
                    0,
                    false,
                );
            }
            Override { nest_level, discard: false }
        }
    }
}

impl Drop for Override {
    fn drop(&mut self) {
        // SAFETY: pops the level `enter` pushed.
        unsafe { pgrx::pg_sys::AtEOXact_GUC(!self.discard, self.nest_level) };
    }
}
