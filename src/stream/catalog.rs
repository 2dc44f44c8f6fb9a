//! Stream definitions: validating and storing them (`ecst.create_stream` / `drop_stream`), and
//! loading them as a ready-to-apply [`Stream`] — the core's `StreamSpec` plus each column's
//! type — cached per backend. The cache is dropped whenever a relcache invalidation touches
//! the catalog tables or a replica table (`ALTER TABLE`, `create_stream`, `drop_stream`).

use crate::pg::convert::ColumnType;
use crate::pg::errors::{self, raise};
use crate::pg::owner;
use crate::pg::spi;
use crate::pg::store::{self, Store};
use crate::pg::subxact::{self, SubResult};
use crate::stream::citus;
use ecst_core::schema::Schema;
use ecst_core::spec::{ChildSpec, OnConflict, Path, Shape, StreamSpec, Table};
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::spi::quote_identifier;
use pgrx::{pg_sys, JsonB, PgSqlErrorCode as Code};
use serde_json::{Map, Value};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

/// A replica column with its type.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub quoted: String,
    pub ty: ColumnType,
    /// The column's attribute number (for row access through the executor, `direct.rs`).
    pub attnum: i16,
}

/// A replica table: its quoted name, key columns (in key order) and writable columns
/// (aligned with the core's `Table::columns`).
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub oid: pg_sys::Oid,
    pub qualified: String,
    pub keys: Vec<Column>,
    pub columns: Vec<Column>,
    /// Managed by Citus ([`citus::managed`]): written through SQL only.
    pub citus: bool,
}

/// A child table of an aggregate: the parent key columns it holds and the columns of the
/// unique index that identifies a child row (`ON CONFLICT` target).
#[derive(Debug, Clone)]
pub struct ChildInfo {
    pub table: TableInfo,
    pub parent: Vec<Column>,
    pub conflict: Vec<String>,
}

/// A stream, ready to apply events.
#[derive(Debug)]
pub struct Stream {
    pub id: i32,
    /// Keep applied events in `ecst.event_log` (for `ecst.rebuild`).
    pub retain_events: bool,
    pub spec: StreamSpec,
    pub table: TableInfo,
    pub children: Vec<ChildInfo>,
    /// The replica column holding the entity's version exactly (entity snapshots whose version is
    /// a mapped integer/numeric field). Entities bulk-loaded into an empty replica have no
    /// version-state row: their state is this column until an event gives them one.
    pub row_version: Option<usize>,
    /// An entity key (the stream's or a child's) of a type whose text depends on session settings:
    /// the stream is applied under `convert::fixed_style` (see [`Stream::styled`]).
    pub fixed_style: bool,
    /// Where its version state and event ids are (`ecst.entity_state`, or tables of its own
    /// co-located with a distributed replica: then its events are applied on the shards' nodes).
    pub store: Store,
}

impl Stream {
    /// The stream ready to be applied or read: under fixed date/time and number styles where its
    /// keys need them (until the returned guard is dropped), so that every session and the worker
    /// know an entity by the same key text (and read its values alike). The engine's entrance
    /// takes a [`Styled`], so nothing applies a stream without them.
    pub fn styled(&self) -> Styled<'_> {
        Styled { stream: self, _style: self.fixed_style.then(crate::pg::convert::fixed_style) }
    }
}

/// A stream whose fixed styles are in effect (see [`Stream::styled`]).
pub struct Styled<'s> {
    stream: &'s Stream,
    _style: Option<crate::pg::gucs::Override>,
}

impl std::ops::Deref for Styled<'_> {
    type Target = Stream;

    fn deref(&self) -> &Stream {
        self.stream
    }
}

/// Which version's `ecst.streams` this database has: a database keeps the catalog of its installed
/// version until `ALTER EXTENSION pg_ecst UPDATE`, while this library is already in use.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Catalog {
    /// 0.1.0 and 0.2.0.
    V2,
    /// 0.3.0: `event_path`.
    V3,
    /// 0.4.0: `schema`.
    V4,
}

fn catalog() -> Catalog {
    let Some(streams) = crate::pg::syscache::own_relation(c"streams") else { return Catalog::V2 };
    // SAFETY: syscache lookups of attributes by name.
    let has = |column: &std::ffi::CStr| unsafe {
        pg_sys::get_attnum(streams, column.as_ptr()) != pg_sys::InvalidAttrNumber as i16
    };
    if has(c"schema") {
        Catalog::V4
    } else if has(c"event_path") {
        Catalog::V3
    } else {
        Catalog::V2
    }
}

/// A stream definition as stored in `ecst.streams` / `ecst.stream_children`.
struct Definition {
    id: i32,
    name: String,
    target: pg_sys::Oid,
    shape: String,
    key: Value,
    state_path: Option<String>,
    columns: Value,
    version: Option<String>,
    event_id: Option<String>,
    on_conflict: String,
    retain_events: bool,
    event_path: Option<String>,
    /// The JSON Schema every payload is checked against (0.4.0).
    schema: Option<Value>,
    children: Vec<ChildDefinition>,
    /// Over one shard group, on the node that holds it (its store is set by the caller).
    on_shard: bool,
}

struct ChildDefinition {
    name: String,
    path: String,
    target: pg_sys::Oid,
    key: Value,
    parent_key: Value,
    columns: Value,
}

/// A definition error: SQLSTATE, message, hint.
type Invalid = (Code, String, Option<String>);

fn invalid(code: Code, message: impl Into<String>, hint: Option<&str>) -> Invalid {
    (code, message.into(), hint.map(str::to_string))
}

// ---------------------------------------------------------------------------------------
// The per-backend cache and its invalidation.

thread_local! {
    static CACHE: RefCell<HashMap<String, Rc<Stream>>> = RefCell::new(HashMap::new());
    static WATCHED: RefCell<HashSet<pg_sys::Oid>> = RefCell::new(HashSet::new());
    static STALE: Cell<bool> = const { Cell::new(false) };
    /// How many times the cache was dropped: a cache of something built from streams' tables
    /// ([`generation`]) is valid while this stays the same.
    static GENERATION: Cell<u64> = const { Cell::new(0) };
}

/// Drops the cached streams if a watched table or the catalog changed since they were built.
fn drop_if_stale() {
    if STALE.with(|s| s.replace(false)) {
        CACHE.with(|c| c.borrow_mut().clear());
        GENERATION.with(|g| g.set(g.get() + 1));
    }
}

/// The cache's generation: it changes whenever a table that a stream built here was watching
/// (see [`watch`]) or the catalog changed.
pub fn generation() -> u64 {
    drop_if_stale();
    GENERATION.with(|g| g.get())
}

/// Tables whose changes (an `ALTER TABLE`, a `DROP`) must make the cache's [`generation`] change.
fn watch(oids: impl IntoIterator<Item = pg_sys::Oid>) {
    WATCHED.with(|w| w.borrow_mut().extend(oids));
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    // Only flag here: no catalog access or freeing inside an invalidation callback.
    if relid == pg_sys::Oid::INVALID || WATCHED.with(|w| w.borrow().contains(&relid)) {
        STALE.with(|s| s.set(true));
    }
}

pub fn register_invalidation() {
    // SAFETY: registered once per backend from _PG_init.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_invalidation), pg_sys::Datum::from(0)) };
}

/// Tells every backend (at commit; this one at once) that stream definitions changed.
fn invalidate_everywhere() {
    let [streams, _] = catalog_oids();
    // SAFETY: queues an ordinary relcache invalidation for the catalog table.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(streams) };
    STALE.with(|s| s.set(true));
}

/// The OIDs of `ecst.streams` and `ecst.stream_children` (one query).
fn catalog_oids() -> [pg_sys::Oid; 2] {
    let (streams, children) = owner::pinned(|| {
        Spi::get_two::<pg_sys::Oid, pg_sys::Oid>(
            "SELECT 'ecst.streams'::regclass::oid, 'ecst.stream_children'::regclass::oid",
        )
    })
    .expect("reading the catalog OIDs");
    [streams.expect("ecst.streams exists"), children.expect("ecst.stream_children exists")]
}

/// The stream named `name`, or an ERROR (42704) if there is none.
pub fn stream(name: &str) -> Rc<Stream> {
    try_stream(name).unwrap_or_else(|| {
        let hint = if citus::on_worker_node() {
            "This is a Citus worker node, and pg_ecst's streams are defined on the coordinator: apply events \
             there. A trigger on a distributed table runs here, on the shards' nodes: keep the table that \
             receives events local to the coordinator, or send them to ecst.inbox or ecst.feed."
        } else {
            "Create it with ecst.create_stream(...); SELECT name FROM ecst.streams lists the streams."
        };
        raise(Code::ERRCODE_UNDEFINED_OBJECT, format!("stream \"{name}\" does not exist"), Some(hint))
    })
}

/// What a dead letter says of an event for a stream that does not exist (`unknown_stream`).
pub fn unknown_stream_message(name: &str) -> String {
    let mut message = format!("stream {name:?} does not exist");
    if citus::on_worker_node() {
        message.push_str(": this is a Citus worker node, and pg_ecst's streams are defined on the coordinator");
    }
    message
}

/// The stream named `name`, if it exists, with its tables locked (`AccessShareLock`, until the
/// transaction ends) before its cached column types are trusted: an `ALTER TABLE` that changed a
/// column (it holds `AccessExclusiveLock`) has committed by then and its invalidation has been
/// taken — the stream is rebuilt — and no other can start until this transaction ends. Without
/// the lock a session would convert values for the old type and write them into the new one.
pub fn try_stream(name: &str) -> Option<Rc<Stream>> {
    // Once its tables are locked a stream is rebuilt at most once more, unless its definition is
    // being changed and changed again meanwhile.
    for _ in 0..100 {
        let stream = cached_stream(name)?;
        for oid in std::iter::once(stream.table.oid).chain(stream.children.iter().map(|c| c.table.oid)) {
            // SAFETY: a transaction-level lock on a relation (a dropped one's OID is harmless:
            // its invalidation marks the stream stale and the rebuild reports it).
            unsafe { pg_sys::LockRelationOid(oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
        }
        if !STALE.with(|s| s.get()) {
            return Some(stream);
        }
    }
    raise(
        Code::ERRCODE_T_R_SERIALIZATION_FAILURE,
        format!("the definition of stream \"{name}\" or of its tables kept changing"),
        Some("Retry the transaction."),
    )
}

/// A stream found (or not), or why its definition cannot be used (message, SQLSTATE).
pub type Lookup = Result<Option<Rc<Stream>>, (String, String)>;

/// [`try_stream`], with a definition that no longer builds (its table or a mapped column dropped,
/// a temporary table's session ended) as an answer instead of an error: looked up in a
/// subtransaction, for those that must go on with the other streams (the worker, a retry of every
/// dead letter). Errors about the session or the server still propagate.
pub fn try_stream_quietly(name: &str) -> Lookup {
    match subxact::run(|| Ok::<_, ()>(try_stream(name))) {
        SubResult::Committed(stream) => Ok(stream),
        SubResult::RolledBack(()) => unreachable!("the lookup returns Ok"),
        SubResult::Failed(caught) => match *caught {
            CaughtError::PostgresError(ref r) | CaughtError::ErrorReport(ref r)
                if !errors::is_session_error(&errors::sqlstate(r.sql_error_code())) =>
            {
                Err((r.message().to_string(), errors::sqlstate(r.sql_error_code())))
            }
            other => other.rethrow(),
        },
    }
}

fn cached_stream(name: &str) -> Option<Rc<Stream>> {
    drop_if_stale();
    if let Some(s) = CACHE.with(|c| c.borrow().get(name).cloned()) {
        return Some(s);
    }
    let def = read_definition(name)?;
    let stream = build(&def).unwrap_or_else(|(code, message, hint)| {
        raise(code, format!("stream \"{name}\" no longer matches its tables: {message}"), hint.as_deref())
    });
    let stream = Rc::new(stream);
    WATCHED.with(|w| {
        let mut w = w.borrow_mut();
        w.insert(stream.table.oid);
        w.extend(stream.children.iter().map(|c| c.table.oid));
    });
    // Outside any borrow of WATCHED: the query can take invalidation messages, whose callback
    // (`on_relcache_invalidation`) reads it — run inside the borrow, that callback failed with
    // XX000 "RefCell already mutably borrowed" (seen now and then in the tests, when DDL was
    // pending). The stream's tables are watched already, so such a message still marks it stale.
    let catalog = catalog_oids();
    WATCHED.with(|w| w.borrow_mut().extend(catalog));
    CACHE.with(|c| c.borrow_mut().insert(name.to_string(), stream.clone()));
    Some(stream)
}

// ---------------------------------------------------------------------------------------
// Reading, validating and storing definitions.

fn read_definition(name: &str) -> Option<Definition> {
    Spi::connect_mut(|client| {
        // A database whose extension is not updated yet has no event_path (0.2.0) or schema (0.3.0).
        let sql = match catalog() {
            Catalog::V4 => {
                "SELECT id, target::oid, shape, key::text, state_path, columns::text, version, event_id, on_conflict,
                        retain_events, event_path, schema::text
                 FROM ecst.streams WHERE name = $1"
            }
            Catalog::V3 => {
                "SELECT id, target::oid, shape, key::text, state_path, columns::text, version, event_id, on_conflict,
                        retain_events, event_path, NULL::text
                 FROM ecst.streams WHERE name = $1"
            }
            Catalog::V2 => {
                "SELECT id, target::oid, shape, key::text, state_path, columns::text, version, event_id, on_conflict,
                        retain_events, NULL::text, NULL::text
                 FROM ecst.streams WHERE name = $1"
            }
        };
        let mut rows = spi::internal::run_once(client, sql, &[name.into()]);
        {
            let row = rows.next()?;
            let id: i32 = row.get(1).unwrap().unwrap();
            let json = |i: usize| -> Value { serde_json::from_str(&row.get::<String>(i).unwrap().unwrap()).unwrap() };
            let mut def = Definition {
                id,
                name: name.to_string(),
                target: row.get(2).unwrap().unwrap(),
                shape: row.get(3).unwrap().unwrap(),
                key: json(4),
                state_path: row.get(5).unwrap(),
                columns: json(6),
                version: row.get(7).unwrap(),
                event_id: row.get(8).unwrap(),
                on_conflict: row.get(9).unwrap().unwrap(),
                retain_events: row.get(10).unwrap().unwrap(),
                event_path: row.get(11).unwrap(),
                schema: row.get::<String>(12).unwrap().map(|s| serde_json::from_str(&s).unwrap()),
                children: Vec::new(),
                on_shard: false,
            };
            let children = spi::internal::run_once(
                client,
                "SELECT name, path, target::oid, key::text, parent_key::text, columns::text
                 FROM ecst.stream_children WHERE stream_id = $1 ORDER BY name",
                &[id.into()],
            );
            for row in children {
                let json =
                    |i: usize| -> Value { serde_json::from_str(&row.get::<String>(i).unwrap().unwrap()).unwrap() };
                def.children.push(ChildDefinition {
                    name: row.get(1).unwrap().unwrap(),
                    path: row.get(2).unwrap().unwrap(),
                    target: row.get(3).unwrap().unwrap(),
                    key: json(4),
                    parent_key: json(5),
                    columns: json(6),
                });
            }
            Some(def)
        }
    })
}

/// A table's columns as stored in pg_attribute.
struct Attribute {
    column: Column,
    readonly: bool,
}

struct Relation {
    qualified: String,
    display: String,
    relkind: String,
    owned: bool,
    attributes: Vec<Attribute>,
}

fn relation(oid: pg_sys::Oid) -> Result<Relation, Invalid> {
    // Pinned: the caller must not be able to answer these queries (ownership included) with a
    // function or operator of its own, nor run one as the worker or a superuser who applies.
    owner::pinned(|| relation_pinned(oid))
}

fn relation_pinned(oid: pg_sys::Oid) -> Result<Relation, Invalid> {
    Spi::connect(|client| {
        let rows = client
            .select(
                "SELECT format('%I.%I', n.nspname, c.relname), c.oid::regclass::text, c.relkind::text,
                        pg_has_role(c.relowner, 'USAGE')
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
                None,
                &[oid.into()],
            )
            .expect("reading pg_class");
        let Some(row) = rows.into_iter().next() else {
            return Err(invalid(
                Code::ERRCODE_UNDEFINED_TABLE,
                format!("relation with OID {oid:?} does not exist"),
                None,
            ));
        };
        let mut rel = Relation {
            qualified: row.get(1).unwrap().unwrap(),
            display: row.get(2).unwrap().unwrap(),
            relkind: row.get(3).unwrap().unwrap(),
            owned: row.get(4).unwrap().unwrap(),
            attributes: Vec::new(),
        };
        let attrs = client
            .select(
                "SELECT attname::text, atttypid, atttypmod, format_type(atttypid, atttypmod),
                        attgenerated <> '' OR attidentity = 'a', attnum
                 FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                None,
                &[oid.into()],
            )
            .expect("reading pg_attribute");
        for a in attrs {
            let name: String = a.get(1).unwrap().unwrap();
            let ty =
                ColumnType::new(a.get(2).unwrap().unwrap(), a.get(3).unwrap().unwrap(), a.get(4).unwrap().unwrap());
            rel.attributes.push(Attribute {
                column: Column { quoted: quote_identifier(&name), name, ty, attnum: a.get(6).unwrap().unwrap() },
                readonly: a.get(5).unwrap().unwrap(),
            });
        }
        Ok(rel)
    })
}

/// The quoted name of a snapshot source: any relation with a `payload` column.
pub fn payload_source(oid: pg_sys::Oid) -> String {
    let rel = relation(oid).unwrap_or_else(|(c, m, h)| raise(c, m, h.as_deref()));
    if !rel.attributes.iter().any(|a| a.column.name == "payload") {
        raise(
            Code::ERRCODE_UNDEFINED_COLUMN,
            format!("{} has no column \"payload\"", rel.display),
            Some("A snapshot source needs a column payload (text, json or jsonb) holding one event per row."),
        );
    }
    rel.qualified
}

/// Whether a valid, non-partial unique index (or primary key) has exactly these key columns.
fn has_unique_index(oid: pg_sys::Oid, columns: &[String]) -> bool {
    owner::pinned(|| has_unique_index_pinned(oid, columns))
}

fn has_unique_index_pinned(oid: pg_sys::Oid, columns: &[String]) -> bool {
    Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (
           SELECT 1 FROM pg_index i
           WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
             AND i.indnkeyatts = cardinality($2::text[])
             AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text) FROM pg_attribute a
                  WHERE a.attrelid = i.indrelid AND a.attnum = ANY ((i.indkey::int2[])[0:i.indnkeyatts - 1]))
                 = (SELECT array_agg(x ORDER BY x) FROM unnest($2::text[]) x))",
        &[oid.into(), columns.to_vec().into()],
    )
    .expect("reading pg_index")
    .unwrap_or(false)
}

fn find<'a>(rel: &'a Relation, column: &str) -> Result<&'a Attribute, Invalid> {
    rel.attributes.iter().find(|a| a.column.name == column).ok_or_else(|| {
        invalid(
            Code::ERRCODE_UNDEFINED_COLUMN,
            format!("column \"{column}\" of relation {} does not exist", rel.display),
            None,
        )
    })
}

fn check_table(rel: &Relation) -> Result<(), Invalid> {
    if rel.relkind != "r" && rel.relkind != "p" {
        return Err(invalid(
            Code::ERRCODE_WRONG_OBJECT_TYPE,
            format!("{} is not a table", rel.display),
            Some("A replica must be a plain or partitioned table."),
        ));
    }
    Ok(())
}

/// A JSON object of field → column name (`key`, `columns`).
fn string_map<'a>(value: &'a Value, what: &str) -> Result<Vec<(&'a String, &'a String)>, Invalid> {
    let bad = || {
        invalid(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{what} must be a JSON object mapping JSON field names to column names"),
            Some(r#"For example: '{"addressId": "address_id"}'"#),
        )
    };
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Some((k, s)),
                _ => None,
            })
            .collect::<Option<_>>()
            .ok_or_else(bad),
        _ => Err(bad()),
    }
}

fn parse_path(text: &Option<String>, what: &str) -> Result<Option<Path>, Invalid> {
    text.as_deref()
        .map(|t| {
            Path::parse(t).map_err(|e| {
                invalid(
                    Code::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("{what}: {e}"),
                    Some("Use a dotted path such as 'newState.addressContent.addressTS'."),
                )
            })
        })
        .transpose()
}

/// Builds the core table: key columns, writable columns, explicit mappings (all checked).
fn table_of(
    oid: pg_sys::Oid,
    rel: &Relation,
    key_columns: &[String],
    excluded: &[String],
    columns: &Value,
    what: &str,
) -> Result<(Table, TableInfo), Invalid> {
    let keys = key_columns.iter().map(|c| find(rel, c).map(|a| a.column.clone())).collect::<Result<Vec<_>, _>>()?;
    if let Some(key) = key_columns.iter().find(|c| find(rel, c).is_ok_and(|a| a.readonly)) {
        return Err(invalid(
            Code::ERRCODE_GENERATED_ALWAYS,
            format!("{what}: key column \"{key}\" cannot be written (generated or identity ALWAYS)"),
            Some("Events name their entities by the key: map it to a column they can write (identity BY DEFAULT is fine)."),
        ));
    }
    if let Some(key) = keys.iter().find(|k| k.ty.unkeyable) {
        return Err(invalid(
            Code::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!(
                "{what}: key column \"{}\" has type {}, whose text depends on the session (composite and reg* types)",
                key.name, key.ty.name
            ),
            Some("An entity is known by its key's text in every session: key by text, integers, numeric, uuid or date/time columns."),
        ));
    }
    let writable: Vec<Column> = rel
        .attributes
        .iter()
        .filter(|a| !a.readonly && !key_columns.contains(&a.column.name) && !excluded.contains(&a.column.name))
        .map(|a| a.column.clone())
        .collect();
    let mut explicit = Vec::new();
    for (field, column) in string_map(columns, &format!("{what} columns"))? {
        let attr = find(rel, column)?;
        if attr.readonly {
            return Err(invalid(
                Code::ERRCODE_GENERATED_ALWAYS,
                format!("{what}: field \"{field}\" maps to column \"{column}\", which cannot be written (generated or identity ALWAYS)"),
                None,
            ));
        }
        if key_columns.contains(column) || excluded.contains(column) {
            return Err(invalid(
                Code::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("{what}: field \"{field}\" maps to key column \"{column}\"; keys come from the key mapping"),
                None,
            ));
        }
        explicit.push((field.clone(), column.clone()));
    }
    let table = Table::new(key_columns.to_vec(), writable.iter().map(|c| c.name.clone()).collect(), explicit);
    let citus = citus::managed(oid);
    Ok((table, TableInfo { oid, qualified: rel.qualified.clone(), keys, columns: writable, citus }))
}

fn build(def: &Definition) -> Result<Stream, Invalid> {
    let shape: Shape = def.shape.parse().map_err(|e: String| {
        invalid(Code::ERRCODE_INVALID_PARAMETER_VALUE, e, Some(&format!("shape must be {}.", Shape::NAMES)))
    })?;
    let on_conflict: OnConflict = def.on_conflict.parse().map_err(|e: String| {
        invalid(Code::ERRCODE_INVALID_PARAMETER_VALUE, e, Some(&format!("on_conflict must be {}.", OnConflict::NAMES)))
    })?;
    let rel = relation(def.target)?;
    check_table(&rel)?;
    let key = string_map(&def.key, "key")?;
    if key.is_empty() {
        return Err(invalid(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            "key must map at least one JSON field to a key column",
            Some(r#"For example: key => '{"addressId": "address_id"}'"#),
        ));
    }
    let key_fields: Vec<String> = key.iter().map(|(f, _)| (*f).clone()).collect();
    let key_columns: Vec<String> = key.iter().map(|(_, c)| (*c).clone()).collect();
    let (table, info) = table_of(def.target, &rel, &key_columns, &[], &def.columns, "columns")?;
    if !has_unique_index(def.target, &key_columns) {
        return Err(unique_missing(&rel.display, &key_columns));
    }
    if shape != Shape::AggregateSnapshot && !def.children.is_empty() {
        return Err(invalid(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            "children are only for aggregate_snapshot streams",
            None,
        ));
    }
    let mut children = Vec::new();
    let mut child_infos = Vec::new();
    for c in &def.children {
        let (spec, info) = build_child(c, &key_columns)?;
        // Each child set replaces its table's rows of the aggregate: two sets in one table (or
        // the aggregate's own table) would delete each other's rows.
        if info.table.oid == def.target || child_infos.iter().any(|other: &ChildInfo| other.table.oid == info.table.oid)
        {
            return Err(invalid(
                Code::ERRCODE_INVALID_PARAMETER_VALUE,
                format!(
                    "child \"{}\": table {} already holds another part of the aggregate",
                    c.name, info.table.qualified
                ),
                Some("Give each child set a table of its own."),
            ));
        }
        children.push(spec);
        child_infos.push(info);
    }
    let spec = StreamSpec {
        name: def.name.clone(),
        shape,
        key_fields,
        table,
        event_path: parse_path(&def.event_path, "event_path")?,
        state_path: parse_path(&def.state_path, "state_path")?,
        version: parse_path(&def.version, "version")?,
        event_id: parse_path(&def.event_id, "event_id")?,
        on_conflict,
        children,
        schema: def.schema.as_ref().map(compile_schema).transpose()?,
    };
    // Integer and unconstrained numeric columns hold any version exactly (a typmod would round).
    let row_version = spec.version_column().filter(|&i| {
        let ty = &info.columns[i].ty;
        [pg_sys::INT2OID, pg_sys::INT4OID, pg_sys::INT8OID].contains(&ty.oid)
            || (ty.oid == pg_sys::NUMERICOID && ty.typmod < 0)
    });
    let fixed_style = info
        .keys
        .iter()
        .chain(child_infos.iter().flat_map(|c| c.table.keys.iter().chain(c.parent.iter())))
        .any(|k| k.ty.style_sensitive);
    let store = match def.id {
        _ if def.on_shard => Store::Shared,
        0 => Store::Shared,
        id => {
            let column = citus::distribution_column(def.target);
            let part = (info.keys.len() > 1)
                .then(|| info.keys.iter().position(|k| Some(&k.name) == column.as_ref()))
                .flatten();
            let store = Spi::connect_mut(|client| Store::of_stream(client, id, part));
            // Its versions live beside the shards of a table that is no longer distributed.
            if store != Store::Shared && column.is_none() {
                return Err(invalid(
                    Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!(
                        "its version state is in ecst.{}, co-located with the shards of {}, which is no longer hash-distributed",
                        store::state_table(id),
                        info.qualified
                    ),
                    Some(&format!(
                        "Distribute the table again by the same column, co-located with its versions: \
                         SELECT create_distributed_table('{}', '<column>', colocate_with => 'ecst.{}'); \
                         or drop the stream and create it again (its versions are lost).",
                        info.qualified.replace('\'', "''"),
                        store::state_table(id)
                    )),
                ));
            }
            store
        }
    };
    Ok(Stream {
        id: def.id,
        retain_events: def.retain_events,
        spec,
        table: info,
        children: child_infos,
        row_version,
        fixed_style,
        store,
    })
}

fn unique_missing(table: &str, columns: &[String]) -> Invalid {
    let cols: Vec<String> = columns.iter().map(quote_identifier).collect();
    invalid(
        Code::ERRCODE_INVALID_COLUMN_REFERENCE,
        format!("{table} has no primary key or unique index on exactly ({})", columns.join(", ")),
        Some(&format!("CREATE UNIQUE INDEX ON {table} ({});", cols.join(", "))),
    )
}

fn build_child(c: &ChildDefinition, parent_key: &[String]) -> Result<(ChildSpec, ChildInfo), Invalid> {
    let what = format!("child \"{}\"", c.name);
    let rel = relation(c.target)?;
    check_table(&rel)?;
    let key = string_map(&c.key, &format!("{what} key"))?;
    if key.is_empty() {
        return Err(invalid(Code::ERRCODE_INVALID_PARAMETER_VALUE, format!("{what} needs a key"), None));
    }
    // A column, an array of columns (matched to the parent's key fields sorted by name), or an
    // object naming, for each of the parent's key columns, the child column that holds it.
    let parent_columns: Vec<String> = match &c.parent_key {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) if a.iter().all(Value::is_string) => {
            a.iter().map(|v| v.as_str().unwrap().to_string()).collect()
        }
        Value::Object(m) if m.len() == parent_key.len() && m.values().all(Value::is_string) => {
            parent_key.iter().filter_map(|k| m.get(k).and_then(Value::as_str).map(str::to_string)).collect()
        }
        _ => Vec::new(),
    };
    if parent_columns.len() != parent_key.len() {
        let example = if parent_key.len() == 1 {
            format!(r#"For example: "parent_key": "{}""#, parent_key[0])
        } else {
            let pairs: Vec<String> = parent_key.iter().map(|k| format!(r#""{k}": "<child column>""#)).collect();
            format!(
                "Name the child column holding each key column of the parent: \"parent_key\": {{{}}}",
                pairs.join(", ")
            )
        };
        return Err(invalid(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!(
                "{what}: parent_key must name {} column(s) of {} holding the parent's key",
                parent_key.len(),
                rel.display
            ),
            Some(&example),
        ));
    }
    let parent =
        parent_columns.iter().map(|p| find(&rel, p).map(|a| a.column.clone())).collect::<Result<Vec<_>, _>>()?;
    let key_columns: Vec<String> = key.iter().map(|(_, col)| (*col).clone()).collect();
    let (table, info) = table_of(c.target, &rel, &key_columns, &parent_columns, &c.columns, &what)?;
    let with_parent: Vec<String> = parent_columns.iter().chain(key_columns.iter()).cloned().collect();
    let conflict = if has_unique_index(c.target, &key_columns) {
        key_columns.clone()
    } else if has_unique_index(c.target, &with_parent) {
        with_parent
    } else {
        return Err(unique_missing(&rel.display, &with_parent));
    };
    let path = Path::parse(&c.path)
        .map_err(|e| invalid(Code::ERRCODE_INVALID_PARAMETER_VALUE, format!("{what} path: {e}"), None))?;
    let spec = ChildSpec {
        name: c.name.clone(),
        path,
        table,
        key_fields: key.iter().map(|(f, _)| (*f).clone()).collect(),
        parent_columns,
    };
    Ok((spec, ChildInfo { table: info, parent, conflict: conflict.iter().map(quote_identifier).collect() }))
}

// ---------------------------------------------------------------------------------------
// Streams on distributed replicas: their definitions on every node, their streams on a shard.

/// A definition as the nodes of a Citus cluster share it (`ecst.sharded_streams`): tables by
/// qualified name, since each node has its own OIDs.
fn definition_json(def: &Definition) -> Value {
    let name_of =
        |oid: pg_sys::Oid| relation(oid).map(|r| r.qualified).unwrap_or_else(|(c, m, h)| raise(c, m, h.as_deref()));
    serde_json::json!({
        "name": def.name, "target": name_of(def.target), "shape": def.shape, "key": def.key,
        "state_path": def.state_path, "columns": def.columns, "version": def.version, "event_id": def.event_id,
        "on_conflict": def.on_conflict, "retain_events": def.retain_events, "event_path": def.event_path,
        "schema": def.schema,
        "children": def.children.iter().map(|c| serde_json::json!({
            "name": c.name, "path": c.path, "target": name_of(c.target), "key": c.key,
            "parent_key": c.parent_key, "columns": c.columns,
        })).collect::<Vec<_>>(),
    })
}

/// [`definition_json`]'s inverse, each table resolved by `table` (from its qualified name).
fn definition_from_json(id: i32, v: &Value, table: &dyn Fn(&str) -> pg_sys::Oid) -> Definition {
    let text = |v: &Value, f: &str| v.get(f).and_then(Value::as_str).map(str::to_string);
    let must = |v: &Value, f: &str| text(v, f).unwrap_or_else(|| panic!("a shared definition has {f}"));
    let json = |v: &Value, f: &str| v.get(f).cloned().unwrap_or(Value::Null);
    Definition {
        id,
        name: must(v, "name"),
        target: table(&must(v, "target")),
        shape: must(v, "shape"),
        key: json(v, "key"),
        state_path: text(v, "state_path"),
        columns: json(v, "columns"),
        version: text(v, "version"),
        event_id: text(v, "event_id"),
        on_conflict: must(v, "on_conflict"),
        retain_events: v.get("retain_events").and_then(Value::as_bool).unwrap_or(false),
        event_path: text(v, "event_path"),
        schema: v.get("schema").filter(|s| !s.is_null()).cloned(),
        children: v
            .get("children")
            .and_then(Value::as_array)
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|c| ChildDefinition {
                name: must(c, "name"),
                path: must(c, "path"),
                target: table(&must(c, "target")),
                key: json(c, "key"),
                parent_key: json(c, "parent_key"),
                columns: json(c, "columns"),
            })
            .collect(),
        on_shard: true,
    }
}

/// Shares stream `id`'s definition with every node (`ecst.sharded_streams`, a Citus reference
/// table the first sharded stream creates), where its shards' events are applied.
fn share_definition(id: i32, def: &Definition) {
    store::share_definition(id, &definition_json(def));
}

/// Stream `id` applied to one shard group on the node that holds it: its definition `json` as
/// shared (`ecst.sharded_streams`), each table replaced by its shard of the group (`shard_of`: a
/// table's OID to its shard's). Also returns where the replica's distribution column sits in a
/// key of several columns (for the store of the group's shards, which the caller sets). Its
/// tables are watched: a change to them changes the cache's [`generation`].
pub fn shard_stream(id: i32, json: &Value, shard_of: &dyn Fn(pg_sys::Oid) -> pg_sys::Oid) -> (Stream, Option<usize>) {
    let table = |name: &str| -> pg_sys::Oid {
        Spi::get_one_with_args::<pg_sys::Oid>("SELECT pg_catalog.to_regclass($1)::oid", &[name.into()])
            .ok()
            .flatten()
            .unwrap_or_else(|| {
                raise(Code::ERRCODE_UNDEFINED_TABLE, format!("relation \"{name}\" does not exist on this node"), None)
            })
    };
    let def = definition_from_json(id, json, &|name| shard_of(table(name)));
    let column = json.get("target").and_then(Value::as_str).and_then(|t| citus::distribution_column(table(t)));
    let stream = build(&def).unwrap_or_else(|(code, message, hint)| {
        raise(code, format!("stream \"{}\" no longer matches its shard tables: {message}", def.name), hint.as_deref())
    });
    let part = (stream.table.keys.len() > 1)
        .then(|| stream.table.keys.iter().position(|k| Some(&k.name) == column.as_ref()))
        .flatten();
    watch(std::iter::once(stream.table.oid).chain(stream.children.iter().map(|c| c.table.oid)));
    (stream, part)
}

// ---------------------------------------------------------------------------------------
// create_stream / drop_stream

#[allow(clippy::too_many_arguments)]
pub fn create_stream(
    name: &str,
    target: pg_sys::Oid,
    shape: &str,
    key: Value,
    state_path: Option<String>,
    columns: Option<Value>,
    version: Option<String>,
    event_id: Option<String>,
    children: Option<Value>,
    on_conflict: &str,
    retain_events: bool,
    event_path: Option<String>,
    schema: Option<Value>,
) {
    if name.is_empty() {
        raise(Code::ERRCODE_INVALID_PARAMETER_VALUE, "a stream name must not be empty", None);
    }
    let exists = Spi::connect_mut(|client| {
        spi::internal::run_once(client, "SELECT EXISTS (SELECT 1 FROM ecst.streams WHERE name = $1)", &[name.into()])
            .first()
            .get::<bool>(1)
    });
    if exists.unwrap().unwrap_or(false) {
        raise(
            Code::ERRCODE_DUPLICATE_OBJECT,
            format!("stream \"{name}\" already exists"),
            Some("Drop it first with ecst.drop_stream(name) (the replica tables are kept)."),
        );
    }
    let children = parse_children(children.unwrap_or(Value::Null));
    let def = Definition {
        id: 0,
        name: name.to_string(),
        target,
        shape: shape.to_string(),
        key: key.clone(),
        state_path: state_path.clone(),
        columns: columns.clone().unwrap_or(Value::Object(Map::new())),
        version: version.clone(),
        event_id: event_id.clone(),
        on_conflict: on_conflict.to_string(),
        retain_events,
        event_path,
        schema,
        children,
        on_shard: false,
    };
    for oid in std::iter::once(def.target).chain(def.children.iter().map(|c| c.target)) {
        let rel = relation(oid).unwrap_or_else(|(c, m, h)| raise(c, m, h.as_deref()));
        if !rel.owned {
            raise(
                Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("must be owner of table {}", rel.display),
                Some("Only the owner of a replica table (or a member of the owning role) can bind a stream to it."),
            );
        }
    }
    let stream = build(&def).unwrap_or_else(|(c, m, h)| raise(c, m, h.as_deref()));
    // Replicas that Citus distributes: each entity's rows on one node.
    fn placed<'a>(info: &'a TableInfo, keys: &'a [Column]) -> citus::Placed<'a> {
        citus::Placed { oid: info.oid, name: &info.qualified, keys: keys.iter().map(|k| k.name.as_str()).collect() }
    }
    let children: Vec<_> = stream.children.iter().map(|c| placed(&c.table, &c.parent)).collect();
    citus::check(&placed(&stream.table, &stream.table.keys), &children)
        .unwrap_or_else(|(c, m, h)| raise(c, m, h.as_deref()));
    let id = Spi::connect_mut(|client| store_with(client, &def));
    // On a hash-distributed replica: version state and event ids co-located with it, and the
    // definition on every node, so that its shards' nodes apply its events.
    if let Some(column) = citus::distribution_column(def.target) {
        match store::unshardable(def.target, &column) {
            None => {
                store::create_sharded(id, def.target, &column);
                share_definition(id, &def);
            }
            Some(ty) => pgrx::notice!(
                "stream \"{name}\" is decided on the coordinator: its replica is distributed by \"{column}\" of type {ty}, \
                 whose values pg_ecst does not cast on the shards' nodes (a domain, or an array or range); \
                 distribute it by a column of a built-in type to apply its events where its shards are"
            ),
        }
    }
    invalidate_everywhere();
}

/// Writes a validated definition to `ecst.streams` / `ecst.stream_children`; returns its id.
fn store_with(client: &mut pgrx::spi::SpiClient, def: &Definition) -> i32 {
    let catalog = catalog();
    for (needs, what, version) in [
        (def.event_path.is_some() && catalog < Catalog::V3, "event_path", "0.3.0"),
        (def.schema.is_some() && catalog < Catalog::V4, "schema", "0.4.0"),
    ] {
        if needs {
            raise(
                Code::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("{what} needs pg_ecst {version}'s catalog in this database"),
                Some("Run ALTER EXTENSION pg_ecst UPDATE first."),
            )
        }
    }
    // Before ALTER EXTENSION pg_ecst UPDATE, the parameters of absent columns are NULL.
    let sql = match catalog {
        Catalog::V4 => {
            "INSERT INTO ecst.streams (name, target, shape, key, state_path, columns, version, event_id, on_conflict,
                                       retain_events, event_path, schema)
             VALUES ($1, $2::oid::regclass, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id"
        }
        Catalog::V3 => {
            "INSERT INTO ecst.streams (name, target, shape, key, state_path, columns, version, event_id, on_conflict,
                                       retain_events, event_path)
             SELECT $1, $2::oid::regclass, $3, $4, $5, $6, $7, $8, $9, $10, $11 WHERE $12::jsonb IS NULL RETURNING id"
        }
        Catalog::V2 => {
            "INSERT INTO ecst.streams (name, target, shape, key, state_path, columns, version, event_id, on_conflict,
                                       retain_events)
             SELECT $1, $2::oid::regclass, $3, $4, $5, $6, $7, $8, $9, $10
             WHERE $11::text IS NULL AND $12::jsonb IS NULL RETURNING id"
        }
    };
    let id = spi::internal::run_once(
        client,
        sql,
        &[
            def.name.as_str().into(),
            def.target.into(),
            def.shape.as_str().into(),
            JsonB(def.key.clone()).into(),
            def.state_path.as_deref().into(),
            JsonB(def.columns.clone()).into(),
            def.version.as_deref().into(),
            def.event_id.as_deref().into(),
            def.on_conflict.as_str().into(),
            def.retain_events.into(),
            def.event_path.as_deref().into(),
            def.schema.clone().map(JsonB).into(),
        ],
    )
    .first()
    .get::<i32>(1)
    .unwrap()
    .unwrap();
    for c in &def.children {
        spi::internal::run_once(
            client,
            "INSERT INTO ecst.stream_children (stream_id, name, path, target, key, parent_key, columns)
             VALUES ($1, $2, $3, $4::oid::regclass, $5, $6, $7)",
            &[
                id.into(),
                c.name.as_str().into(),
                c.path.as_str().into(),
                c.target.into(),
                JsonB(c.key.clone()).into(),
                JsonB(c.parent_key.clone()).into(),
                JsonB(c.columns.clone()).into(),
            ],
        );
    }
    id
}

/// `children => {"addresses": {"path": ..., "table": ..., "key": {...}, "parent_key": ..., "columns": {...}}}`
fn parse_children(value: Value) -> Vec<ChildDefinition> {
    let hint = Some(
        r#"For example: '{"addresses": {"path": "addressContent.addresses", "table": "public.customer_address", "key": {"addressId": "address_id"}, "parent_key": "customer_id"}}'"#,
    );
    let obj = match value {
        Value::Null => return Vec::new(),
        Value::Object(m) => m,
        _ => raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            "children must be a JSON object of child name -> definition",
            hint,
        ),
    };
    obj.into_iter()
        .map(|(name, def)| {
            let field = |f: &str| def.get(f).cloned().unwrap_or(Value::Null);
            let text = |f: &str| match def.get(f) {
                Some(Value::String(s)) => s.clone(),
                _ => raise(
                    Code::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("child \"{name}\" needs \"{f}\" (a string)"),
                    hint,
                ),
            };
            let table = text("table");
            let target = Spi::get_one_with_args::<pg_sys::Oid>(
                "SELECT pg_catalog.to_regclass($1)::oid",
                &[table.as_str().into()],
            )
            .unwrap()
            .unwrap_or_else(|| {
                raise(
                    Code::ERRCODE_UNDEFINED_TABLE,
                    format!("relation \"{table}\" (child \"{name}\") does not exist"),
                    None,
                )
            });
            ChildDefinition {
                path: text("path"),
                target,
                key: field("key"),
                parent_key: field("parent_key"),
                columns: match field("columns") {
                    Value::Null => Value::Object(Map::new()),
                    v => v,
                },
                name,
            }
        })
        .collect()
}

/// The replica table of stream `name`, if there is such a stream.
fn stream_target(name: &str) -> Option<pg_sys::Oid> {
    Spi::connect_mut(|client| {
        spi::internal::run_once(client, "SELECT target::oid FROM ecst.streams WHERE name = $1", &[name.into()])
            .next()
            .and_then(|row| row.get::<pg_sys::Oid>(1).expect("an oid"))
    })
}

/// A stream's `schema`, compiled, or why it does not compile (22023).
fn compile_schema(schema: &Value) -> Result<Schema, Invalid> {
    Schema::compile(schema)
        .map_err(|e| (Code::ERRCODE_INVALID_PARAMETER_VALUE, format!("schema: {}", e.message), e.hint))
}

/// Replaces the JSON Schema a stream checks payloads against (`None`: no check). The stream's
/// version state, event ids and counters stay; events already applied are not checked again.
pub fn set_schema(name: &str, schema: Option<Value>) {
    let target = stream_target(name);
    let Some(target) = target else {
        raise(
            Code::ERRCODE_UNDEFINED_OBJECT,
            format!("stream \"{name}\" does not exist"),
            Some("SELECT name FROM ecst.streams lists the streams."),
        )
    };
    owner::require_owner(name, target, "change the schema of");
    if catalog() < Catalog::V4 {
        raise(
            Code::ERRCODE_FEATURE_NOT_SUPPORTED,
            "schema needs pg_ecst 0.4.0's catalog in this database",
            Some("Run ALTER EXTENSION pg_ecst UPDATE first."),
        )
    }
    if let Some(Err((code, message, hint))) = schema.as_ref().map(compile_schema) {
        raise(code, message, hint.as_deref());
    }
    let id = Spi::connect_mut(|client| {
        spi::internal::run_once(
            client,
            "UPDATE ecst.streams SET schema = $2 WHERE name = $1 RETURNING id",
            &[name.into(), schema.map(JsonB).into()],
        )
        .first()
        .get::<i32>(1)
        .ok()
        .flatten()
    });
    if let Some(id) = id.filter(|&id| store::shared_definition(id).is_some()) {
        share_definition(id, &read_definition(name).expect("the stream was just updated"));
    }
    invalidate_everywhere();
}

/// Drops a stream's definition, version state, event ids and counters. Never drops the
/// replica tables; dead letters stay for inspection. Returns false if there was none.
pub fn drop_stream(name: &str) -> bool {
    let target = stream_target(name);
    let Some(target) = target else { return false };
    owner::require_owner(name, target, "drop");
    let dropped = Spi::connect_mut(|client| {
        spi::internal::run_once(client, "DELETE FROM ecst.streams WHERE name = $1 RETURNING id", &[name.into()])
            .first()
            .get::<i32>(1)
            .ok()
            .flatten()
    });
    if let Some(id) = dropped {
        store::drop_sharded(id);
        invalidate_everywhere();
    }
    dropped.is_some()
}
