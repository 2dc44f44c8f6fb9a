//! The background workers (need `shared_preload_libraries = 'pg_ecst'`).
//!
//! A static **launcher** (connected to no database) keeps `ecst.workers` **workers** running in
//! `ecst.database`: it waits quietly while that database does not exist, restarts a worker that
//! stopped, and follows `ecst.workers`/`ecst.database` changes on SIGHUP. Worker `i` of `n` drains
//! the inbox rows whose entity hashes to `i`, one batch per transaction, and sleeps on its latch
//! between batches. Inserting into `ecst.inbox` sets the workers' latches when the inserting
//! transaction commits, so events are applied within milliseconds.

use crate::apply::ErrorPolicy;
use crate::gucs;
use crate::inbox;
use pgrx::atomics::PgAtomic;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, pg_sys, PGRXSharedMemory};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Per worker slot: the pid holding it and its latch (shared memory is mapped at the same
/// address in every backend, so the latch pointer is valid everywhere).
#[derive(Clone, Copy, Default)]
pub struct Slots {
    pid: [i32; gucs::MAX_WORKERS],
    latch: [usize; gucs::MAX_WORKERS],
}

unsafe impl PGRXSharedMemory for Slots {}

static SLOTS: PgLwLock<Slots> = unsafe { PgLwLock::new(c"pg_ecst_worker_slots") };

/// Transactions that inserted into the inbox, server-wide: `begun` counts those about to commit
/// (before their rows become visible), `ended` those that have committed or aborted since (after
/// their rows became visible, if they did). A drainer whose claim's snapshot came after `begun`
/// read `n`, and whose previous claim's snapshot came before `ended` read `n`, knows that no
/// inbox row became visible in between (`inbox::Cursor`). A prepared transaction is counted as
/// begun and never as ended: its `COMMIT PREPARED` runs in another session.
#[derive(Default)]
pub struct InboxCommits {
    begun: AtomicU64,
    ended: AtomicU64,
}

unsafe impl PGRXSharedMemory for InboxCommits {}

static INBOX_COMMITS: PgAtomic<InboxCommits> = unsafe { PgAtomic::new(c"pg_ecst_inbox_commits") };

thread_local! {
    static PRELOADED: Cell<bool> = const { Cell::new(false) };
    /// This transaction inserted into the inbox (its statement trigger ran).
    static INSERTED: Cell<bool> = const { Cell::new(false) };
    /// ... and was counted in `InboxCommits::begun`.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
    /// Inbox insert statements of this backend, counted as they end (their rows visible to the
    /// transaction's later commands).
    static OWN_INSERTS: Cell<u64> = const { Cell::new(0) };
}

/// Called from `_PG_init`: shared memory, the launcher, and the commit hook that wakes workers.
pub fn init() {
    // SAFETY: reading a postmaster global during library load.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    if preloading {
        pg_shmem_init!(SLOTS);
        pg_shmem_init!(INBOX_COMMITS);
        PRELOADED.with(|p| p.set(true));
        BackgroundWorkerBuilder::new("pg_ecst launcher")
            .set_type("pg_ecst launcher")
            .set_library("pg_ecst")
            .set_function("pg_ecst_launcher_main")
            .enable_spi_access()
            .set_restart_time(Some(Duration::from_secs(5)))
            .load();
    } else if unsafe { pg_sys::IsUnderPostmaster } && !unsafe { pg_sys::IsBinaryUpgrade } {
        // Loaded on first use in a session: SQL functions work, the background worker does not.
        pgrx::debug1!("pg_ecst: not in shared_preload_libraries; the background worker is not running");
    }
    // SAFETY: registered once per backend.
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
}

/// Whether shared memory (and so the workers) exists in this server.
fn preloaded() -> bool {
    // In backends forked from a postmaster that preloaded us, the flag was set before fork.
    PRELOADED.with(|p| p.get())
}

/// Notes that the current transaction inserted into the inbox: it wakes the workers when it
/// commits, and it is counted in `InboxCommits`.
pub fn inserted_into_inbox() {
    OWN_INSERTS.with(|n| n.set(n.get() + 1));
    if preloaded() {
        INSERTED.with(|w| w.set(true));
    }
}

/// `InboxCommits::begun` (`None` without shared memory: pg_ecst is not preloaded).
pub fn inbox_commits_begun() -> Option<u64> {
    preloaded().then(|| INBOX_COMMITS.get().begun.load(Ordering::SeqCst))
}

/// `InboxCommits::ended` (`None` without shared memory).
pub fn inbox_commits_ended() -> Option<u64> {
    preloaded().then(|| INBOX_COMMITS.get().ended.load(Ordering::SeqCst))
}

/// Inbox insert statements this backend has run.
pub fn own_inbox_inserts() -> u64 {
    OWN_INSERTS.with(|n| n.get())
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    let count = |counter: fn(&InboxCommits) -> &AtomicU64| {
        counter(INBOX_COMMITS.get()).fetch_add(1, Ordering::SeqCst);
    };
    match event {
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PRE_PREPARE if INSERTED.with(|i| i.get()) => {
            count(|c| &c.begun);
            COUNTED.with(|c| c.set(event == XACT_EVENT_PRE_COMMIT));
        }
        XACT_EVENT_COMMIT => {
            if COUNTED.with(|c| c.replace(false)) {
                count(|c| &c.ended);
            }
            if INSERTED.with(|i| i.replace(false)) {
                wake_all();
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PREPARE => {
            if COUNTED.with(|c| c.replace(false)) {
                count(|c| &c.ended);
            }
            INSERTED.with(|i| i.set(false));
        }
        _ => {}
    }
}

fn wake_all() {
    let slots = *SLOTS.share();
    for latch in slots.latch.iter().filter(|l| **l != 0) {
        // SAFETY: a latch in shared memory; setting a latch is always safe (at worst spurious).
        unsafe { pg_sys::SetLatch(*latch as *mut pg_sys::Latch) };
    }
}

fn naptime() -> Duration {
    Duration::from_millis(gucs::NAPTIME_MS.get().max(10) as u64)
}

fn reload_config() {
    // SAFETY: the standard SIGHUP handling of a background worker.
    unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
}

// ---------------------------------------------------------------------------------------
// The launcher

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_ecst_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    let mut workers: Vec<Option<DynamicBackgroundWorker>> = (0..gucs::MAX_WORKERS).map(|_| None).collect();
    let mut database = String::new();
    let mut role: Option<String> = None;
    let mut reported_missing = false;
    let mut reported_role = false;
    loop {
        if BackgroundWorker::sighup_received() {
            reload_config();
        }
        let wanted_db = gucs::database();
        let wanted_role = gucs::worker_role();
        let wanted = gucs::WORKERS.get().clamp(0, gucs::MAX_WORKERS as i32) as usize;
        if wanted_db != database || wanted_role != role {
            stop_all(&mut workers);
            database = wanted_db.clone();
            role = wanted_role.clone();
            reported_missing = false;
            reported_role = false;
        }
        let role_problem = role.as_deref().and_then(role_unusable);
        if let Some(problem) = &role_problem {
            if !reported_role {
                log!("pg_ecst: {problem}; the workers wait for it (ecst.worker_role)");
                reported_role = true;
            }
            stop_all(&mut workers);
        } else if database_exists(&database) {
            if reported_missing || reported_role {
                log!("pg_ecst: database \"{database}\" and the worker role are ready; starting {wanted} worker(s)");
                reported_missing = false;
                reported_role = false;
            }
            for (i, slot) in workers.iter_mut().enumerate() {
                if i >= wanted {
                    if let Some(w) = slot.take() {
                        let _ = w.terminate();
                    }
                } else if slot.as_ref().is_none_or(|w| matches!(w.pid(), Err(BackgroundWorkerStatus::Stopped))) {
                    *slot = start_worker(&database, i);
                }
            }
        } else {
            if !reported_missing {
                log!("pg_ecst: database \"{database}\" (ecst.database) does not exist; waiting for it");
                reported_missing = true;
            }
            stop_all(&mut workers);
        }
        if !BackgroundWorker::wait_latch(Some(naptime().max(Duration::from_millis(500)))) {
            break;
        }
    }
    stop_all(&mut workers);
}

fn stop_all(workers: &mut [Option<DynamicBackgroundWorker>]) {
    for slot in workers.iter_mut() {
        if let Some(w) = slot.take() {
            let _ = w.terminate();
        }
    }
}

fn start_worker(database: &str, index: usize) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new(&format!("pg_ecst worker {index}"))
        .set_type("pg_ecst worker")
        .set_library("pg_ecst")
        .set_function("pg_ecst_worker_main")
        .set_argument(Some(pg_sys::Datum::from(index)))
        .set_extra(database)
        .enable_spi_access()
        .set_restart_time(None)
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .ok()
}

/// The first row of a shared catalog for which `pick` returns `Some`. A heap scan (as
/// PostgreSQL's own launchers do): the launcher is connected to no database, and right after
/// crash recovery a catalog's index cannot be opened.
fn scan_shared_catalog<T>(relid: pg_sys::Oid, pick: impl FnMut(*mut pg_sys::HeapTupleData) -> Option<T>) -> Option<T> {
    // `pick` only reads the tuple it is given.
    let pick = std::panic::AssertUnwindSafe(pick);
    BackgroundWorker::transaction(move || unsafe {
        let mut pick = pick; // the whole wrapper, not just its field
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as i32);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        let mut found = None;
        while found.is_none() {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            found = (pick.0)(tuple);
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as i32);
        found
    })
}

/// Why `role` cannot run the workers (missing, or without LOGIN), if it cannot.
fn role_unusable(name: &str) -> Option<String> {
    // SAFETY: tuples of pg_authid, read during the scan.
    let can_login = scan_shared_catalog(pg_sys::AuthIdRelationId, |tuple| unsafe {
        let form = pg_sys::GETSTRUCT(tuple) as *const pg_sys::FormData_pg_authid;
        let rolname = std::ffi::CStr::from_ptr((*form).rolname.data.as_ptr());
        (rolname.to_bytes() == name.as_bytes()).then_some((*form).rolcanlogin)
    });
    match can_login {
        None => Some(format!("role \"{name}\" does not exist")),
        Some(false) => Some(format!("role \"{name}\" does not have LOGIN")),
        Some(true) => None,
    }
}

/// Whether a database exists.
fn database_exists(name: &str) -> bool {
    // SAFETY: tuples of pg_database, read during the scan.
    scan_shared_catalog(pg_sys::DatabaseRelationId, |tuple| unsafe {
        let form = pg_sys::GETSTRUCT(tuple) as *const pg_sys::FormData_pg_database;
        let datname = std::ffi::CStr::from_ptr((*form).datname.data.as_ptr());
        (datname.to_bytes() == name.as_bytes()).then_some(())
    })
    .is_some()
}

// ---------------------------------------------------------------------------------------
// A worker

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_ecst_worker_main(arg: pg_sys::Datum) {
    let index = arg.value();
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = BackgroundWorker::get_extra().to_string();
    let role = gucs::worker_role();
    BackgroundWorker::connect_worker_to_spi(Some(&database), role.as_deref());
    if !claim_slot(index) {
        return; // another live worker holds this slot
    }
    unsafe {
        pg_sys::before_shmem_exit(Some(release_slot), pg_sys::Datum::from(index));
        pg_sys::SetConfigOption(
            c"application_name".as_ptr(),
            std::ffi::CString::new(format!("pg_ecst worker {index}")).unwrap().as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
        );
        pg_sys::pgstat_report_appname(std::ffi::CString::new(format!("pg_ecst worker {index}")).unwrap().as_ptr());
    }
    let mut reported_missing = false;
    // Where claims start (`inbox::Cursor`; only while this is the only worker). A transaction that
    // fails ends the worker, and with it the cursor.
    let new_cursor = || inbox::Cursor::new(Some(Duration::from_secs(10)));
    let mut cursor = new_cursor();
    loop {
        // Between batches too, not only when idle: a worker with a backlog never waits on its
        // latch, and would hold up a shutdown (or the launcher) until the inbox was empty. A
        // batch under way finishes first (it is bounded by ecst.batch_size).
        if BackgroundWorker::sigterm_received() {
            return;
        }
        if BackgroundWorker::sighup_received() {
            reload_config();
            if gucs::database() != database
                || gucs::worker_role() != role
                || index >= gucs::WORKERS.get().max(0) as usize
            {
                return; // the launcher starts the right workers
            }
        }
        let of = gucs::WORKERS.get().max(1);
        let batch = gucs::BATCH_SIZE.get().max(1) as i64;
        let claiming = std::panic::AssertUnwindSafe(&mut cursor);
        let processed = BackgroundWorker::transaction(move || {
            report_activity(c"draining the inbox");
            if !extension_installed() {
                return None;
            }
            let cursor = claiming; // the whole wrapper, not its field (closures capture fields)
            Some(inbox::drain_batch(batch, Some((index as i32, of)), ErrorPolicy::Worker, cursor.0))
        });
        // Report table statistics, or autovacuum never sees the inbox deletes and state updates.
        unsafe { pg_sys::pgstat_report_stat(false) };
        match processed {
            None => {
                if !reported_missing {
                    log!("pg_ecst worker {index}: extension pg_ecst is not installed in database \"{database}\"; waiting");
                    reported_missing = true;
                }
                cursor = new_cursor();
            }
            Some(drained) => {
                reported_missing = false;
                if !cursor.claimed(&drained) {
                    continue; // more is waiting: no sleep
                }
            }
        }
        report_activity(c"idle");
        if !BackgroundWorker::wait_latch(Some(naptime())) {
            return; // SIGTERM
        }
    }
}

fn report_activity(what: &std::ffi::CStr) {
    unsafe { pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, what.as_ptr()) };
}

fn extension_installed() -> bool {
    Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_ecst')")
        .ok()
        .flatten()
        .unwrap_or(false)
}

fn claim_slot(index: usize) -> bool {
    let mut slots = SLOTS.exclusive();
    let holder = slots.pid[index];
    let me = unsafe { pg_sys::MyProcPid };
    // SAFETY: kill(pid, 0) only checks that the process exists.
    if holder != 0 && holder != me && unsafe { libc_kill(holder, 0) } == 0 {
        return false;
    }
    slots.pid[index] = me;
    slots.latch[index] = unsafe { pg_sys::MyLatch } as usize;
    true
}

#[pg_guard]
unsafe extern "C-unwind" fn release_slot(_code: i32, arg: pg_sys::Datum) {
    let index = arg.value();
    let mut slots = SLOTS.exclusive();
    if slots.pid[index] == unsafe { pg_sys::MyProcPid } {
        slots.pid[index] = 0;
        slots.latch[index] = 0;
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// `AFTER INSERT ... FOR EACH STATEMENT` on `ecst.inbox`: wake the workers at commit.
#[pg_trigger]
fn _inbox_wake<'a>(
    _trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<pgrx::heap_tuple::PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    inserted_into_inbox();
    Ok(None)
}
