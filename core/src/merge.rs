//! What one event does to one entity, given what pg_ecst remembers about that entity.
//!
//! The remembered [`EntityState`] is small: the highest version of a create/update applied
//! (`live`), the highest version of a delete applied (`tomb`, the tombstone), and for `delta`
//! streams the version of the last write of every column written since the last delete.
//!
//! The rules (docs/concepts.md), which make any delivery order converge to the in-order result:
//! - a version already seen is a `duplicate`; one older than what the entity reflects is `stale`;
//! - snapshots replace the entity (or delete it) only when newer than everything applied;
//! - a delta writes a field only when newer than that field's last write and than the last
//!   delete; a delta older than the last delete is stale (the delete erased it);
//! - a delete at `v` removes the row if no create/update newer than `v` was applied; otherwise
//!   it resets (to their DEFAULT) exactly the columns last written before `v`.

use crate::event::{Cell, ChildSet, Event, Op};
use crate::reject::{RejectCode, Rejection};
use crate::spec::{OnConflict, Shape, StreamSpec};
use crate::version::Version;
use std::collections::BTreeMap;

/// What pg_ecst remembers per entity (per stream and key).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntityState {
    /// Highest version of a create/update applied.
    pub live: Option<Version>,
    /// Highest version of a delete applied (the tombstone).
    pub tomb: Option<Version>,
    /// `delta` streams: column → version of its last write since the last delete.
    pub fields: BTreeMap<String, Version>,
}

impl EntityState {
    /// The highest version the entity reflects.
    pub fn version(&self) -> Option<&Version> {
        self.live.as_ref().max(self.tomb.as_ref())
    }

    /// Whether the replica row exists: a create/update newer than the last delete was applied.
    pub fn exists(&self) -> bool {
        match (&self.live, &self.tomb) {
            (Some(l), Some(t)) => l > t,
            (Some(_), None) => true,
            _ => false,
        }
    }

    fn has_seen(&self, v: &Version) -> bool {
        self.live.as_ref() == Some(v) || self.tomb.as_ref() == Some(v) || self.fields.values().any(|f| f == v)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Applied,
    Duplicate,
    Stale,
    Skipped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Stale => "stale",
            Outcome::Skipped => "skipped",
        }
    }
}

/// The change to make to the replica, referring to the event's own cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write<'e> {
    Nothing,
    /// Insert the row if absent (untouched columns take their DEFAULT), then set these cells.
    /// For aggregates, also make each child table's rows exactly `children`.
    Upsert {
        cells: Vec<&'e Cell>,
        children: &'e [ChildSet],
    },
    /// Reset these columns (indexes into the table's writable columns) to their DEFAULT.
    Clear {
        columns: Vec<usize>,
    },
    /// Delete the row (and an aggregate's child rows).
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'e> {
    Done {
        outcome: Outcome,
        /// `oldState` disagreed with the replica (counted whatever the policy).
        conflict: bool,
        write: Write<'e>,
        /// The entity's new state to remember; `None` when it is unchanged.
        state: Option<EntityState>,
    },
    /// `on_conflict => 'dead_letter'`.
    DeadLetter(Rejection),
    /// `on_conflict => 'error'`: the caller raises this message.
    Raise(String),
}

impl<'e> Decision<'e> {
    fn unchanged(outcome: Outcome) -> Decision<'e> {
        Decision::Done { outcome, conflict: false, write: Write::Nothing, state: None }
    }
}

/// Decides what `ev` does to the entity whose remembered state is `state` (`None`: never seen).
///
/// `mismatches` is asked, only for an event newer than everything applied that carries
/// `oldState`, which of those cells differ from the replica's current values; it returns the
/// JSON field names that differ (empty: no conflict).
pub fn decide<'e>(
    spec: &StreamSpec,
    state: Option<&EntityState>,
    ev: &'e Event,
    mismatches: impl FnOnce(&[Cell]) -> Vec<String>,
) -> Decision<'e> {
    let Some(v) = &ev.version else {
        // Unversioned stream: arrival order decides, every event is the newest.
        let conflict = match check_conflict(spec, ev, true, mismatches) {
            Ok(c) => c,
            Err(d) => return *d,
        };
        return Decision::Done { outcome: Outcome::Applied, conflict, write: full_write(ev), state: None };
    };
    let cur = state.cloned().unwrap_or_default();
    if cur.has_seen(v) {
        return Decision::unchanged(Outcome::Duplicate);
    }
    let newest = cur.version().is_none_or(|m| v > m);
    if spec.shape == Shape::Delta {
        return decide_delta(spec, cur, v, ev, newest, mismatches);
    }
    if !newest {
        return Decision::unchanged(Outcome::Stale);
    }
    let conflict = match check_conflict(spec, ev, newest, mismatches) {
        Ok(c) => c,
        Err(d) => return *d,
    };
    let mut next = cur;
    match ev.op {
        Op::Upsert { .. } => next.live = Some(v.clone()),
        Op::Delete => next.tomb = Some(v.clone()),
    }
    Decision::Done { outcome: Outcome::Applied, conflict, write: full_write(ev), state: Some(next) }
}

fn decide_delta<'e>(
    spec: &StreamSpec,
    cur: EntityState,
    v: &Version,
    ev: &'e Event,
    newest: bool,
    mismatches: impl FnOnce(&[Cell]) -> Vec<String>,
) -> Decision<'e> {
    if cur.tomb.as_ref().is_some_and(|t| t > v) {
        // A later delete already erased whatever this event would write.
        return Decision::unchanged(Outcome::Stale);
    }
    let columns = &spec.table.columns;
    match &ev.op {
        Op::Delete => {
            let conflict = match check_conflict(spec, ev, newest, mismatches) {
                Ok(c) => c,
                Err(d) => return *d,
            };
            let mut next = cur;
            next.tomb = Some(v.clone());
            let survives = next.live.as_ref().is_some_and(|l| l > v);
            let write = if survives {
                let cleared: Vec<usize> = next
                    .fields
                    .iter()
                    .filter(|(_, fv)| *fv < v)
                    .filter_map(|(col, _)| columns.iter().position(|c| c == col))
                    .collect();
                next.fields.retain(|_, fv| &*fv > v);
                if cleared.is_empty() {
                    Write::Nothing
                } else {
                    Write::Clear { columns: cleared }
                }
            } else {
                next.fields.clear();
                Write::Delete
            };
            Decision::Done { outcome: Outcome::Applied, conflict, write, state: Some(next) }
        }
        Op::Upsert { cells, .. } => {
            let writable: Vec<&Cell> =
                cells.iter().filter(|c| cur.fields.get(&columns[c.column]).is_none_or(|fv| fv < v)).collect();
            let raises_live = cur.live.as_ref().is_none_or(|l| l < v);
            if writable.is_empty() && !raises_live {
                return Decision::unchanged(Outcome::Stale);
            }
            let conflict = match check_conflict(spec, ev, newest, mismatches) {
                Ok(c) => c,
                Err(d) => return *d,
            };
            let needs_row = !cur.exists();
            let mut next = cur;
            if raises_live {
                next.live = Some(v.clone());
            }
            for c in &writable {
                next.fields.insert(columns[c.column].clone(), v.clone());
            }
            let write = if writable.is_empty() && !needs_row {
                Write::Nothing
            } else {
                Write::Upsert { cells: writable, children: &[] }
            };
            Decision::Done { outcome: Outcome::Applied, conflict, write, state: Some(next) }
        }
    }
}

fn full_write(ev: &Event) -> Write<'_> {
    match &ev.op {
        Op::Upsert { cells, children } => Write::Upsert { cells: cells.iter().collect(), children },
        Op::Delete => Write::Delete,
    }
}

/// `Ok(conflict)` to go on, or the decision the stream's `on_conflict` policy makes.
fn check_conflict<'e>(
    spec: &StreamSpec,
    ev: &Event,
    newest: bool,
    mismatches: impl FnOnce(&[Cell]) -> Vec<String>,
) -> Result<bool, Box<Decision<'e>>> {
    if !newest || ev.old.is_empty() {
        return Ok(false);
    }
    let differing = mismatches(&ev.old);
    if differing.is_empty() {
        return Ok(false);
    }
    let message = format!(
        "oldState disagrees with the replica of stream {:?} in field(s) {} (the replica missed an event)",
        spec.name,
        differing.join(", ")
    );
    match spec.on_conflict {
        OnConflict::Apply => Ok(true),
        OnConflict::Skip => Err(Box::new(Decision::Done {
            outcome: Outcome::Skipped,
            conflict: true,
            write: Write::Nothing,
            state: None,
        })),
        OnConflict::DeadLetter => Err(Box::new(Decision::DeadLetter(Rejection::new(RejectCode::Conflict, message)))),
        OnConflict::Error => Err(Box::new(Decision::Raise(message))),
    }
}

#[cfg(test)]
mod tests;
