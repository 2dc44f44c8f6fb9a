//! The background workers (need `shared_preload_libraries = 'pg_ecst'`).
//!
//! A static **launcher** (connected to no database) serves every database of the cluster where
//! the extension is installed (or those `ecst.database` names): it lists the databases that
//! allow connections, starts one *probe* (worker 0) in each database it knows nothing about — at
//! most [`PROBES`] at a time — and, once a worker reports the extension there, keeps
//! `ecst.workers` workers running in it. A worker that finds no extension reports so and exits;
//! the database is probed again when `CREATE EXTENSION pg_ecst` commits there (it wakes the
//! launcher) and otherwise every [`REPROBE`]. `DROP DATABASE`, `ALTER DATABASE ... RENAME` and
//! `CREATE DATABASE ... TEMPLATE` (which need the database to themselves) first make the workers
//! leave it and pause it for a few seconds (a `ProcessUtility` hook). Worker `i` of `n` drains the inbox rows whose entity
//! hashes to `i`, one batch per transaction, and sleeps on its latch between batches. Inserting
//! into `ecst.inbox` sets the latches of the database's workers when the inserting transaction
//! commits, so events are applied within milliseconds.

use crate::engine::outcome::ErrorPolicy;
use crate::features::inbox;
use crate::pg::gucs;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, pg_sys, PGRXSharedMemory};
use std::cell::Cell;
use std::collections::HashMap;

use std::time::{Duration, Instant};

/// Worker processes the registry can hold (all databases together; `max_worker_processes`
/// bounds them first).
const MAX_SLOTS: usize = 128;
/// Databases whose state the registry can hold.
const MAX_DATABASES: usize = 512;
/// Probes (a worker started in a database not yet known to have the extension) at a time.
const PROBES: usize = 2;
/// How often a database without the extension is probed again (`CREATE EXTENSION` wakes the
/// launcher at once; this is for anything that installs it without running its script).
const REPROBE: Duration = Duration::from_secs(300);
/// How long a database stays paused (no workers) after `DROP DATABASE` or a rename asked for it.
const PAUSE_MS: i64 = 10_000;

/// One worker process: its pid, latch (shared memory is mapped at the same address in every
/// backend, so the latch pointer is valid everywhere), database and index.
#[derive(Clone, Copy, Default)]
struct Slot {
    pid: i32,
    latch: usize,
    database: pg_sys::Oid,
    index: u32,
}

/// What is known about a database: whether the extension is installed there (reported by its
/// workers and by `CREATE EXTENSION`), and until when it must have no workers.
#[derive(Clone, Copy, Default, PartialEq)]
enum Installed {
    #[default]
    Unknown,
    Yes,
    No,
}

/// A worker's batch under way: the `seq` of its first inbox row, and how many attempts of a batch
/// from that row have failed before (the worker dies with its transaction: this outlives it).
#[derive(Clone, Copy, Default)]
struct Attempt {
    first: i64,
    failed: u32,
}

#[derive(Clone, Copy, Default)]
struct DatabaseEntry {
    oid: pg_sys::Oid,
    installed: Installed,
    /// Bumped by each `CREATE EXTENSION` that commits: a probe that looked before it must not
    /// report the extension missing after it.
    generation: u32,
    /// `GetCurrentTimestamp()` until which the database is paused (0: not paused).
    paused_until: i64,
    /// Per worker index.
    attempts: [Attempt; gucs::MAX_WORKERS],
}

#[derive(Clone, Copy)]
pub struct Registry {
    slots: [Slot; MAX_SLOTS],
    databases: [DatabaseEntry; MAX_DATABASES],
    launcher_latch: usize,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            slots: [Slot::default(); MAX_SLOTS],
            databases: [DatabaseEntry::default(); MAX_DATABASES],
            launcher_latch: 0,
        }
    }
}

unsafe impl PGRXSharedMemory for Registry {}

static REGISTRY: PgLwLock<Registry> = unsafe { PgLwLock::new(c"pg_ecst_worker_registry") };

impl Registry {
    fn entry_mut(&mut self, oid: pg_sys::Oid) -> Option<&mut DatabaseEntry> {
        let at = self.databases.iter().position(|d| d.oid == oid).or_else(|| {
            let free = self.databases.iter().position(|d| d.oid == pg_sys::InvalidOid)?;
            self.databases[free] = DatabaseEntry { oid, ..Default::default() };
            Some(free)
        })?;
        Some(&mut self.databases[at])
    }

    fn entry(&self, oid: pg_sys::Oid) -> DatabaseEntry {
        self.databases.iter().find(|d| d.oid == oid).copied().unwrap_or(DatabaseEntry { oid, ..Default::default() })
    }
}

/// Records whether the extension is installed in database `db`, as seen by a look taken at
/// `generation` (see [`DatabaseEntry::generation`]; `None`: unconditionally, starting a new
/// generation — a CREATE EXTENSION that commits now, or the launcher's reprobe).
fn report_installed(db: pg_sys::Oid, installed: Installed, generation: Option<u32>) {
    let mut registry = REGISTRY.exclusive();
    if let Some(entry) = registry.entry_mut(db) {
        match generation {
            None => {
                entry.generation = entry.generation.wrapping_add(1);
                entry.installed = installed;
            }
            Some(g) if g == entry.generation => entry.installed = installed,
            Some(_) => {} // the extension was created since the look
        }
    }
}

/// This backend's database's generation (see [`DatabaseEntry::generation`]).
fn generation() -> u32 {
    REGISTRY.share().entry(unsafe { pg_sys::MyDatabaseId }).generation
}

fn wake_launcher() {
    let latch = REGISTRY.share().launcher_latch;
    if latch != 0 {
        // SAFETY: a latch in shared memory; setting a latch is always safe (at worst spurious).
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

thread_local! {
    /// This transaction ran `CREATE EXTENSION pg_ecst`: the launcher probes the database when it
    /// commits.
    static CREATED: Cell<bool> = const { Cell::new(false) };
    /// In a worker: its index.
    static WORKER_INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// A worker's batch starts with the inbox row `first`: whether this is the batch's last try (the
/// batches from that row failed `outcome::LAST_TRY_AFTER` times in a row), in which errors about
/// the session become the failing event's dead letter (`outcome::last_try`).
pub fn attempting(first: Option<i64>) -> bool {
    let (Some(index), Some(first)) = (WORKER_INDEX.with(|i| i.get()), first) else { return false };
    let db = unsafe { pg_sys::MyDatabaseId };
    let failed = {
        let mut registry = REGISTRY.exclusive();
        let Some(entry) = registry.entry_mut(db) else { return false };
        let attempt = &mut entry.attempts[index];
        if attempt.first == first {
            attempt.failed += 1;
        } else {
            *attempt = Attempt { first, failed: 0 };
        }
        attempt.failed
    };
    let last = failed >= crate::engine::outcome::LAST_TRY_AFTER;
    if last {
        log!(
            "pg_ecst worker {index}: the batch from inbox row {first} failed {failed} times in a row; this time an event that fails on the same kind of error becomes a dead letter"
        );
    }
    last
}

/// The worker's batch committed.
fn attempt_done(index: usize) {
    let db = unsafe { pg_sys::MyDatabaseId };
    if let Some(entry) = REGISTRY.exclusive().entry_mut(db) {
        entry.attempts[index] = Attempt::default();
    }
}

/// SIGTERM as PostgreSQL's own processes take it (`die`, as logical replication's apply worker
/// does): the next interrupt check — the executor checks between rows — ends a batch under way
/// with its transaction (its inbox rows stay for the next worker), so a shutdown or the launcher
/// never waits for a long batch. Between batches the worker just returns.
fn terminate_on_sigterm() {
    extern "C-unwind" {
        /// PostgreSQL's `die` itself (pgrx's `pg_sys::die` is a Rust wrapper, not a handler).
        #[link_name = "die"]
        fn postgres_die(signal: i32);
    }
    // SAFETY: installs PostgreSQL's own SIGTERM handler for a backend.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(postgres_die));
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(pg_sys::SIGTERM as i32, Some(postgres_die));
    }
}

/// Whether SIGTERM arrived (see [`terminate_on_sigterm`]).
fn terminating() -> bool {
    // SAFETY: reads a flag the signal handler sets.
    unsafe { pg_sys::ProcDiePending != 0 }
}

/// The `ProcessUtility` hook this one was installed over.
static mut PREVIOUS_UTILITY_HOOK: pg_sys::ProcessUtility_hook_type = None;

/// Called from `_PG_init`: shared memory, the launcher, and the commit hook that wakes workers.
// pgrx's pg_shmem_init! tests a `pg13` feature, which this crate does not have (PostgreSQL 13 is
// past its end of life, and no build of it is at hand to test against).
#[allow(unexpected_cfgs)]
pub fn init() {
    // SAFETY: reading a postmaster global during library load.
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    if preloading {
        pg_shmem_init!(REGISTRY);
        inbox::commits::init_shared_memory();
        // SAFETY: hooks are installed while the library loads, chaining the previous one.
        unsafe {
            PREVIOUS_UTILITY_HOOK = pg_sys::ProcessUtility_hook;
            pg_sys::ProcessUtility_hook = Some(process_utility);
        }
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

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    let inserted = inbox::commits::on_xact_event(event);
    match event {
        XACT_EVENT_COMMIT => {
            if inserted {
                wake_database();
            }
            if CREATED.with(|c| c.replace(false)) {
                report_installed(unsafe { pg_sys::MyDatabaseId }, Installed::Unknown, None);
                wake_launcher();
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PREPARE => CREATED.with(|c| c.set(false)),
        _ => {}
    }
}

/// Wakes the workers of this backend's database.
fn wake_database() {
    let db = unsafe { pg_sys::MyDatabaseId };
    let registry = REGISTRY.share();
    for slot in registry.slots.iter().filter(|s| s.pid != 0 && s.latch != 0 && s.database == db) {
        // SAFETY: a latch in shared memory; setting a latch is always safe (at worst spurious).
        unsafe { pg_sys::SetLatch(slot.latch as *mut pg_sys::Latch) };
    }
}

/// Called by the extension's install script (`ecst._extension_created()`): when the
/// transaction commits, the launcher learns that this database now has the extension.
pub fn extension_created() {
    if inbox::commits::preloaded() {
        CREATED.with(|c| c.set(true));
    }
}

/// Before `DROP DATABASE`, `ALTER DATABASE ... RENAME` or `CREATE DATABASE ... TEMPLATE` (each
/// needs the database to itself): the database's workers leave it, and the launcher starts none
/// there for [`PAUSE_MS`]. PostgreSQL then waits up to 5 s for other sessions to leave; a worker
/// in the middle of a batch leaves at its next interrupt check (`terminate_on_sigterm`).
fn pause_database(name: *const std::ffi::c_char) {
    if name.is_null() {
        return;
    }
    // SAFETY: a catalog lookup by name (InvalidOid when there is no such database).
    let oid = unsafe { pg_sys::get_database_oid(name, true) };
    if oid == pg_sys::InvalidOid {
        return;
    }
    let until = unsafe { pg_sys::GetCurrentTimestamp() } + PAUSE_MS * 1000;
    let pids: Vec<i32> = {
        let mut registry = REGISTRY.exclusive();
        if let Some(entry) = registry.entry_mut(oid) {
            entry.paused_until = until;
        }
        registry.slots.iter().filter(|s| s.pid != 0 && s.database == oid).map(|s| s.pid).collect()
    };
    for pid in pids {
        // SAFETY: signalling a pg_ecst worker's process (as pg_terminate_backend would).
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    wake_launcher();
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    let statement = (*pstmt).utilityStmt;
    if !statement.is_null() {
        match (*statement).type_ {
            pg_sys::NodeTag::T_DropdbStmt => pause_database((*(statement as *mut pg_sys::DropdbStmt)).dbname),
            pg_sys::NodeTag::T_CreatedbStmt => {
                // CREATE DATABASE ... TEMPLATE x needs x to itself, as DROP DATABASE x does.
                let options = (*(statement as *mut pg_sys::CreatedbStmt)).options;
                let count = if options.is_null() { 0 } else { (*options).length as usize };
                for i in 0..count {
                    let option = (*(*options).elements.add(i)).ptr_value as *mut pg_sys::DefElem;
                    if std::ffi::CStr::from_ptr((*option).defname).to_bytes() == b"template" && !(*option).arg.is_null()
                    {
                        pause_database(pg_sys::defGetString(option));
                    }
                }
            }
            pg_sys::NodeTag::T_RenameStmt => {
                let rename = statement as *mut pg_sys::RenameStmt;
                if (*rename).renameType == pg_sys::ObjectType::OBJECT_DATABASE {
                    pause_database((*rename).subname);
                }
            }
            _ => {}
        }
    }
    match PREVIOUS_UTILITY_HOOK {
        Some(previous) => previous(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc),
        None => {
            pg_sys::standard_ProcessUtility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc)
        }
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

/// The launcher's view of one database it serves.
struct Served {
    name: String,
    workers: Vec<Option<DynamicBackgroundWorker>>,
    /// Since when its workers have reported no extension (for [`REPROBE`]).
    absent_since: Option<Instant>,
    /// When a probe last ended without reporting either way (for [`REPROBE`]).
    probe_lost_at: Option<Instant>,
}

impl Served {
    fn running(&self, index: usize) -> bool {
        self.workers[index].as_ref().is_some_and(|w| !matches!(w.pid(), Err(BackgroundWorkerStatus::Stopped)))
    }

    fn stop(&mut self) {
        stop_all(&mut self.workers);
    }
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_ecst_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    REGISTRY.exclusive().launcher_latch = unsafe { pg_sys::MyLatch } as usize;
    let mut served: HashMap<pg_sys::Oid, Served> = HashMap::new();
    let mut role: Option<String> = None;
    let mut reported_role = false;
    let mut reported_missing: Vec<String> = Vec::new();
    loop {
        if BackgroundWorker::sighup_received() {
            reload_config();
        }
        let wanted_role = gucs::worker_role();
        let wanted = gucs::WORKERS.get().clamp(0, gucs::MAX_WORKERS as i32) as usize;
        if wanted_role != role {
            served.values_mut().for_each(Served::stop);
            role = wanted_role;
            reported_role = false;
        }
        if let Some(problem) = role.as_deref().and_then(role_unusable) {
            if !reported_role {
                log!("pg_ecst: {problem}; the workers wait for it (ecst.worker_role)");
                reported_role = true;
            }
            served.values_mut().for_each(Served::stop);
        } else {
            if reported_role {
                log!("pg_ecst: the worker role is ready; starting the workers");
                reported_role = false;
            }
            let (databases, missing) = databases_to_serve();
            for name in &missing {
                if !reported_missing.contains(name) {
                    log!("pg_ecst: database \"{name}\" (ecst.database) does not exist; waiting for it");
                }
            }
            reported_missing = missing;
            serve(&mut served, &databases, wanted);
        }
        if !BackgroundWorker::wait_latch(Some(naptime().clamp(Duration::from_millis(500), Duration::from_secs(5)))) {
            break;
        }
    }
    served.values_mut().for_each(Served::stop);
}

/// One pass of the launcher over the databases it should serve: start, probe, pause and stop.
fn serve(served: &mut HashMap<pg_sys::Oid, Served>, databases: &[(pg_sys::Oid, String)], wanted: usize) {
    // Databases gone (dropped, or no longer named by ecst.database): their workers stop, and
    // their registry entries are freed.
    served.retain(|oid, db| {
        let keep = databases.iter().any(|(o, _)| o == oid);
        if !keep {
            db.stop();
        }
        keep
    });
    {
        let mut registry = REGISTRY.exclusive();
        for entry in registry.databases.iter_mut() {
            if entry.oid != pg_sys::InvalidOid && !databases.iter().any(|(o, _)| *o == entry.oid) {
                *entry = DatabaseEntry::default();
            }
        }
    }
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    let registry = *REGISTRY.share();
    let mut probing = served
        .iter()
        .filter(|(oid, db)| registry.entry(**oid).installed == Installed::Unknown && db.running(0))
        .count();
    for (oid, name) in databases {
        let db = served.entry(*oid).or_insert_with(|| Served {
            name: name.clone(),
            workers: (0..gucs::MAX_WORKERS).map(|_| None).collect(),
            absent_since: None,
            probe_lost_at: None,
        });
        if db.name != *name {
            db.stop(); // renamed: workers connect by name
            db.name = name.clone();
        }
        let entry = registry.entry(*oid);
        if entry.paused_until > now {
            db.stop();
            continue;
        }
        match entry.installed {
            Installed::Yes => {
                db.absent_since = None;
                db.probe_lost_at = None;
                for index in 0..gucs::MAX_WORKERS {
                    if index >= wanted {
                        if let Some(w) = db.workers[index].take() {
                            let _ = w.terminate();
                        }
                    } else if !db.running(index) {
                        db.workers[index] = start_worker(name, index);
                    }
                }
            }
            Installed::No => {
                db.stop();
                let since = *db.absent_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= REPROBE {
                    db.absent_since = None;
                    report_installed(*oid, Installed::Unknown, None);
                }
            }
            Installed::Unknown => {
                // Unknown again after a report of no extension: CREATE EXTENSION, or REPROBE.
                db.absent_since = None;
                if db.running(0) || wanted == 0 {
                    continue;
                }
                // A probe that ended without a report (the registry is full, or it failed):
                // wait as for a database without the extension.
                if db.workers[0].take().is_some() {
                    db.probe_lost_at = Some(Instant::now());
                }
                if db.probe_lost_at.is_some_and(|at| at.elapsed() < REPROBE) {
                    continue;
                }
                if probing < PROBES {
                    db.probe_lost_at = None;
                    db.workers[0] = start_worker(name, 0);
                    probing += 1;
                }
            }
        }
    }
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

/// The databases the workers should serve (OID and name), and the names `ecst.database` lists
/// that do not exist. `*` (the default): every database that allows connections and is not a
/// template.
fn databases_to_serve() -> (Vec<(pg_sys::Oid, String)>, Vec<String>) {
    let listed = gucs::databases();
    // SAFETY: tuples of pg_database, read during the scan.
    let all: Vec<(pg_sys::Oid, String, bool)> = scan_shared_catalog(pg_sys::DatabaseRelationId, |tuple| unsafe {
        let form = pg_sys::GETSTRUCT(tuple) as *const pg_sys::FormData_pg_database;
        let name = std::ffi::CStr::from_ptr((*form).datname.data.as_ptr()).to_string_lossy().into_owned();
        // datconnlimit -2: a database a DROP DATABASE was interrupted in (PostgreSQL 15.4+).
        let connectable = (*form).datallowconn && !(*form).datistemplate && (*form).datconnlimit != -2;
        Some(((*form).oid, name, connectable))
    });
    match listed {
        None => (all.into_iter().filter(|(_, _, c)| *c).map(|(o, n, _)| (o, n)).collect(), Vec::new()),
        Some(names) => {
            let missing = names.iter().filter(|n| !all.iter().any(|(_, a, _)| a == *n)).cloned().collect();
            let found = all.into_iter().filter(|(_, n, _)| names.contains(n)).map(|(o, n, _)| (o, n)).collect();
            (found, missing)
        }
    }
}

/// What `pick` returns for the rows of a shared catalog (rows it returns `None` for are left
/// out). A heap scan (as PostgreSQL's own launchers do): the launcher is connected to no
/// database, and right after crash recovery a catalog's index cannot be opened.
fn scan_shared_catalog<T>(relid: pg_sys::Oid, pick: impl FnMut(*mut pg_sys::HeapTupleData) -> Option<T>) -> Vec<T> {
    // `pick` only reads the tuple it is given.
    let pick = std::panic::AssertUnwindSafe(pick);
    BackgroundWorker::transaction(move || unsafe {
        let mut pick = pick; // the whole wrapper, not just its field
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as i32);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        let mut found = Vec::new();
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            found.extend((pick.0)(tuple));
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
    match can_login.first().copied() {
        None => Some(format!("role \"{name}\" does not exist")),
        Some(false) => Some(format!("role \"{name}\" does not have LOGIN")),
        Some(true) => None,
    }
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
    let database_id = unsafe { pg_sys::MyDatabaseId };
    let looked_at = generation();
    if !BackgroundWorker::transaction(extension_installed) {
        // A probe (or a worker whose extension was just dropped): nothing to do here until
        // CREATE EXTENSION wakes the launcher.
        report_installed(database_id, Installed::No, Some(looked_at));
        return;
    }
    report_installed(database_id, Installed::Yes, Some(looked_at));
    if !claim_slot(index) {
        return; // another live worker holds this slot
    }
    WORKER_INDEX.with(|i| i.set(Some(index)));
    terminate_on_sigterm();
    let name = format!("pg_ecst worker {index}");
    unsafe {
        pg_sys::before_shmem_exit(Some(release_slot), pg_sys::Datum::from(index));
        let name = std::ffi::CString::new(name.clone()).unwrap();
        pg_sys::SetConfigOption(
            c"application_name".as_ptr(),
            name.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
        );
        pg_sys::pgstat_report_appname(name.as_ptr());
    }
    // Where claims start (`inbox::Cursor`; only while this is the only worker). A transaction that
    // fails ends the worker, and with it the cursor.
    let mut cursor = inbox::Cursor::new(Some(Duration::from_secs(10)));
    // Whether the last claim came back full: the next is a backlog batch (`inbox::next_claim`).
    let mut full = false;
    loop {
        // Between batches too, not only when idle: a worker with a backlog never waits on its
        // latch, and would hold up a shutdown (or the launcher) until the inbox was empty. A
        // batch under way is ended by the next interrupt check (`terminate_on_sigterm`).
        if terminating() {
            return;
        }
        if BackgroundWorker::sighup_received() {
            reload_config();
            if !gucs::serves_database(&database)
                || gucs::worker_role() != role
                || index >= gucs::WORKERS.get().max(0) as usize
            {
                return; // the launcher starts the right workers
            }
        }
        let of = gucs::WORKERS.get().max(1);
        let (batch, backlog) = inbox::next_claim(gucs::BATCH_SIZE.get().max(1) as i64, full);
        let claiming = std::panic::AssertUnwindSafe(&mut cursor);
        let processed = BackgroundWorker::transaction(move || {
            report_activity(c"draining the inbox");
            if !extension_installed() {
                return None;
            }
            // A replica's deferred constraints (a DEFERRABLE INITIALLY DEFERRED foreign key, a
            // deferred constraint trigger) are checked as each event is written, in its own
            // subtransaction: a violation is that event's dead letter, not a failed commit of the
            // whole batch that every retry would repeat.
            Spi::run("SET CONSTRAINTS ALL IMMEDIATE").expect("SET CONSTRAINTS");
            let cursor = claiming; // the whole wrapper, not its field (closures capture fields)
            Some(inbox::drain_batch(
                batch,
                backlog,
                Some((index as i32, of)),
                ErrorPolicy::Worker,
                cursor.0,
                attempting,
            ))
        });
        // Report table statistics, or autovacuum never sees the inbox deletes and state updates.
        unsafe { pg_sys::pgstat_report_stat(false) };
        match processed {
            None => {
                log!("{name}: extension pg_ecst was dropped from database \"{database}\"; leaving it");
                report_installed(database_id, Installed::No, Some(looked_at));
                wake_launcher();
                return;
            }
            Some(drained) => {
                attempt_done(index);
                full = !drained.all;
                if !cursor.claimed(&drained) {
                    continue; // more is waiting: no sleep
                }
            }
        }
        report_activity(c"idle");
        if !BackgroundWorker::wait_latch(Some(naptime())) || terminating() {
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

/// Takes the registry slot of (this database, `index`), unless a live process holds it.
fn claim_slot(index: usize) -> bool {
    let db = unsafe { pg_sys::MyDatabaseId };
    let me = unsafe { pg_sys::MyProcPid };
    // SAFETY: kill(pid, 0) only checks that the process exists.
    let alive = |pid: i32| pid != 0 && pid != me && unsafe { libc::kill(pid, 0) } == 0;
    let mut registry = REGISTRY.exclusive();
    if registry.slots.iter().any(|s| s.database == db && s.index == index as u32 && alive(s.pid)) {
        return false;
    }
    let Some(free) = registry.slots.iter().position(|s| !alive(s.pid)) else {
        log!("pg_ecst worker {index}: all {MAX_SLOTS} worker slots are taken; exiting");
        return false;
    };
    registry.slots[free] =
        Slot { pid: me, latch: unsafe { pg_sys::MyLatch } as usize, database: db, index: index as u32 };
    true
}

#[pg_guard]
unsafe extern "C-unwind" fn release_slot(_code: i32, _arg: pg_sys::Datum) {
    let me = unsafe { pg_sys::MyProcPid };
    let mut registry = REGISTRY.exclusive();
    for slot in registry.slots.iter_mut().filter(|s| s.pid == me) {
        *slot = Slot::default();
    }
}

/// Run by the extension's install and update scripts: when the transaction commits, the launcher
/// probes this database and starts its workers.
#[pg_extern]
fn _extension_created() {
    extension_created();
}

/// `AFTER INSERT ... FOR EACH STATEMENT` on `ecst.inbox`: wake the workers at commit.
#[pg_trigger]
fn _inbox_wake<'a>(
    _trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<pgrx::heap_tuple::PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    inbox::commits::inserted();
    Ok(None)
}
