//! Applying a stream whose replica Citus distributes where its shards are.
//!
//! Such a stream keeps its version state and event ids in tables co-located with the replica
//! (`pg::store`, sharded). On the coordinator, [`apply_routed`] decides nothing: it converts each
//! event's key (a key that does not fit is a dead letter here), inserts the events into the
//! stream's stage table — Citus sends each to the shard of its entity — and then runs one query
//! over the stage table that Citus splits into one task per shard, all at once: each task calls
//! `ecst._apply_shard` on the node holding the shard ([`apply_staged`]), which applies that shard's
//! events with the same engine as a local replica's, against the shard group's tables (replica,
//! children, state, ids), and returns their results. Everything runs in the coordinator's
//! transaction: one commit (two-phase) for all nodes, or none.
//!
//! The staging and the query run as the calling role (Citus's connections are the caller's, so
//! the rest of the transaction sees the writes); the node checks the role's privileges on the
//! shards and reads the stream's definition from its own copy (`ecst.sharded_streams`), never
//! from the caller.

use crate::engine::apply;
use crate::engine::bulk;
use crate::engine::outcome::{self, Applied, ErrorPolicy};
use crate::pg::errors::raise;
use crate::pg::spi;
use crate::pg::store::Store;
use crate::stream::catalog::{self, Stream};
use crate::stream::citus;
use crate::stream::security;
use ecst_core::event::Event;
use ecst_core::reject::{RejectCode, Rejection};
use pgrx::pg_sys;
use pgrx::spi::SpiClient;
use pgrx::PgSqlErrorCode as Code;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// Applies `events` (with their `payloads`) of a stream on a distributed replica on the shards'
/// nodes; one result per event, as [`crate::engine::apply`] returns them.
pub fn apply_routed(
    client: &mut SpiClient,
    stream: &Stream,
    payloads: &[Option<&str>],
    events: &[Result<Event, Rejection>],
    policy: ErrorPolicy,
) -> Vec<Applied> {
    let sharded = stream.store.sharded().expect("a sharded stream");
    let part = sharded.part.unwrap_or(0);
    let mut results: Vec<Option<Applied>> = vec![None; events.len()];
    let (mut dists, mut seqs, mut staged) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (payload, event)) in payloads.iter().zip(events).enumerate() {
        let ev = match event {
            Ok(ev) => ev,
            Err(r) => {
                results[i] = Some(Applied::rejected(r.clone()));
                continue;
            }
        };
        match apply::bind_keys(&stream.table.keys, &stream.spec.key_fields, &ev.key) {
            Ok((_, mut canonical)) => {
                dists.push(canonical.swap_remove(part));
                seqs.push(i as i32);
                staged.push(payload.map(str::to_string));
            }
            Err(r) => results[i] = Some(Applied::rejected(r)),
        }
    }
    if !seqs.is_empty() {
        let token = token();
        // Fully qualified, as the caller: the caller's search_path must not matter.
        crate::pg::owner::pinned(|| {
            let (token, id, policy) = (token.as_str(), sharded.stream_id, outcome::policy_name(policy));
            let reports = if let [seq] = seqs[..] {
                // One event (an `ecst.apply`): two statements Citus sends straight to the shard's
                // node, planned once per session (a function call in the INSERT's RETURNING would
                // save the second round trip, but Citus refuses it: it is not IMMUTABLE).
                let insert = stream
                    .store
                    .render("INSERT INTO {stage} (dist, token, seq, payload) VALUES ({dist:$2}, $1, $3, $4)");
                let dist = dists.pop().expect("one event");
                let payload = staged.pop().expect("one event");
                spi::run(client, &insert, &[token.into(), dist.as_str().into(), seq.into(), payload.into()]);
                let query = stream
                    .store
                    .render("SELECT ecst._apply_shard($1, s.tableoid, $2, $3) FROM {stage} s WHERE s.dist = {dist:$4}");
                spi::run(client, &query, &[id.into(), token.into(), policy.into(), dist.as_str().into()])
            } else {
                // A node's tasks are CPU-bound applies: a few connections use its cores, more only
                // add backends to start and caches to fill (`ecst.shard_connections`).
                let _pool = crate::pg::gucs::shard_pool();
                let insert = stream.store.render(
                    "INSERT INTO {stage} (dist, token, seq, payload)
                     SELECT {dist:u.d}, $1, u.s, u.p
                       FROM ROWS FROM (pg_catalog.unnest($2::pg_catalog.text[]), pg_catalog.unnest($3::pg_catalog.int4[]),
                                       pg_catalog.unnest($4::pg_catalog.text[])) AS u (d, s, p)",
                );
                spi::run_once(client, &insert, &[token.into(), dists.into(), seqs.into(), staged.into()]);
                // One task per shard, all at once; only the first call of each returns a report.
                let query = stream.store.render(
                    "SELECT q.r FROM (SELECT ecst._apply_shard($1, s.tableoid, $2, $3) AS r FROM {stage} s) q
                      WHERE q.r IS NOT NULL",
                );
                spi::run_once(client, &query, &[id.into(), token.into(), policy.into()])
            };
            for report in reports {
                let Some(text) = report.get::<String>(1).ok().flatten() else { continue };
                let list: Vec<serde_json::Value> = serde_json::from_str(&text).expect("a shard's report is JSON");
                for item in &list {
                    let (seq, applied) = outcome::from_wire(item).expect("a shard's result");
                    results[seq as usize] = Some(applied);
                }
            }
        });
    }
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| {
                raise(
                    Code::ERRCODE_INTERNAL_ERROR,
                    format!(
                        "event {} of stream \"{}\" was sent to its shard, and no node applied it",
                        i + 1,
                        stream.spec.name
                    ),
                    Some("Is pg_ecst installed, in the same version, on every node of the cluster?"),
                )
            })
        })
        .collect()
}

/// A batch's mark, unguessable: a node applies the staged rows carrying it, and only once.
fn token() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: fills the buffer with cryptographically strong random bytes.
    if !unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) } {
        raise(Code::ERRCODE_INTERNAL_ERROR, "could not generate random bytes", None);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

thread_local! {
    /// The token each stage shard was last applied for in this backend: the query that calls
    /// `_apply_shard` calls it once per staged row, and the first call applies them all.
    static APPLIED: RefCell<HashMap<pg_sys::Oid, String>> = RefCell::new(HashMap::new());
    /// Streams over shard groups, by (stream, stage shard), with the cache generation and the
    /// definition they were built from (`catalog::generation`, `ecst.sharded_streams`).
    static SHARD_STREAMS: RefCell<HashMap<(i32, pg_sys::Oid), ShardStream>> = RefCell::new(HashMap::new());
}

type ShardStream = (u64, serde_json::Value, Rc<Stream>);

/// Stream `stream_id` over the shard group of `stage` (a shard of its stage table on this node).
fn shard_stream(client: &mut SpiClient, stream_id: i32, stage: pg_sys::Oid, definition: &serde_json::Value) -> Stream {
    let Some(shard) = citus::stage_shard(stream_id, stage) else {
        raise(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("relation {} is not a shard of stream {stream_id}'s stage table on this node", stage.to_u32()),
            Some("ecst._apply_shard is called by pg_ecst on the coordinator, not by hand."),
        )
    };
    let shard_of = |table: pg_sys::Oid| {
        citus::colocated_shard(table, shard).unwrap_or_else(|| {
            raise(
                Code::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("no shard of relation {} is co-located with shard {shard} on this node", table.to_u32()),
                Some("A stream's tables must stay co-located with its replica."),
            )
        })
    };
    let own = |name: String| {
        let oid = crate::pg::syscache::own_relation(&std::ffi::CString::new(name.clone()).expect("no NUL"))
            .unwrap_or_else(|| {
                raise(Code::ERRCODE_UNDEFINED_TABLE, format!("relation ecst.{name} does not exist"), None)
            });
        shard_of(oid)
    };
    let shards = [
        own(crate::pg::store::state_table(stream_id)),
        own(crate::pg::store::ids_table(stream_id)),
        own(crate::pg::store::stage_table(stream_id)),
    ];
    let (mut stream, part) = catalog::shard_stream(stream_id, definition, &shard_of);
    stream.store = Store::of_shard(client, stream_id, part, shard, shards);
    stream
}

/// On the node holding a shard: applies the events staged in `stage` (a shard of stream
/// `stream_id`'s stage table) under `token`, and returns their results as JSON
/// ([`outcome::to_wire`]), or `None` if this backend has applied them already.
pub fn apply_staged(
    client: &mut SpiClient,
    stream_id: i32,
    stage: pg_sys::Oid,
    token: &str,
    policy: &str,
) -> Option<String> {
    if APPLIED.with(|a| a.borrow().get(&stage).is_some_and(|t| t == token)) {
        return None;
    }
    APPLIED.with(|a| a.borrow_mut().insert(stage, token.to_string()));
    let Some((policy, last)) = outcome::policy_from_name(policy) else {
        raise(Code::ERRCODE_INVALID_PARAMETER_VALUE, format!("unknown policy {policy:?}"), None)
    };
    let Some(definition) = crate::pg::store::shared_definition(stream_id) else {
        raise(
            Code::ERRCODE_UNDEFINED_OBJECT,
            format!("stream {stream_id} has no shared definition on this node"),
            Some("A stream created in this transaction is known to the other nodes once it commits."),
        )
    };
    let generation = catalog::generation();
    let cached = SHARD_STREAMS.with(|c| {
        c.borrow().get(&(stream_id, stage)).filter(|e| e.0 == generation && e.1 == definition).map(|e| e.2.clone())
    });
    let mut stream = match cached {
        Some(stream) => stream,
        None => Rc::new(shard_stream(client, stream_id, stage, &definition)),
    };
    // Its tables locked before its column types are trusted (as `catalog::try_stream` does): a
    // change that committed meanwhile has been seen, and the stream is built again.
    for oid in std::iter::once(stream.table.oid).chain(stream.children.iter().map(|c| c.table.oid)) {
        // SAFETY: a transaction-level lock on a relation.
        unsafe { pg_sys::LockRelationOid(oid, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
    }
    let generation = match catalog::generation() {
        g if g == generation => g,
        g => {
            stream = Rc::new(shard_stream(client, stream_id, stage, &definition));
            g
        }
    };
    SHARD_STREAMS.with(|c| c.borrow_mut().insert((stream_id, stage), (generation, definition, stream.clone())));
    security::require_apply(&stream);
    let styled = stream.styled();
    // The batch's rows, and any row someone committed there by hand (everyone may insert; pg_ecst
    // consumes its rows in the transaction that staged them): those are removed and ignored —
    // unless another batch is removing them (no waiting on it). Each row's distribution value as
    // its type prints it, under the stream's styles (as keys are compared).
    let mut rows: Vec<(i32, Option<String>, String)> = styled
        .store
        .run(
            client,
            "DELETE FROM {stage} s
              WHERE s.token = $1
                 OR s.ctid = ANY (ARRAY(SELECT g.ctid FROM {stage} g WHERE g.token <> $1 FOR UPDATE SKIP LOCKED))
             RETURNING s.token = $1, s.seq, s.payload, pg_catalog.format('%s', s.dist)",
            &[token.into()],
        )
        .filter(|r| r.get::<bool>(1).unwrap().unwrap_or(false))
        .map(|r| (r.get::<i32>(2).unwrap().unwrap(), r.get::<String>(3).unwrap(), r.get::<String>(4).unwrap().unwrap()))
        .collect();
    rows.sort_by_key(|r| r.0);
    let part = styled.store.sharded().and_then(|s| s.part).unwrap_or(0);
    let events: Vec<Result<Event, Rejection>> = rows
        .iter()
        .map(|(_, payload, dist)| {
            let event = apply::parse_payload(&styled.spec, payload.as_deref())?;
            // Citus put the row in this shard by `dist`: it must be the event's own.
            match apply::bind_keys(&styled.table.keys, &styled.spec.key_fields, &event.key) {
                Ok((_, canonical)) if canonical.get(part) != Some(dist) => Err(Rejection::new(
                    RejectCode::InvalidKey,
                    format!("staged for the shard of {dist:?}, which is not the event's entity's"),
                )),
                _ => Ok(event),
            }
        })
        .collect();
    let results = outcome::last_try(last, || bulk::apply_run(client, &styled, &events, policy));
    let wire: Vec<serde_json::Value> =
        rows.iter().zip(&results).map(|((seq, _, _), r)| outcome::to_wire(*seq, r)).collect();
    Some(serde_json::Value::Array(wire).to_string())
}
