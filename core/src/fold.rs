//! The fold of a run of events of one entity into one plan: each event's outcome, the one
//! replica write the run amounts to, and the entity's new state. Every entrance of the engine
//! (`ecst.apply`, batches, the inbox, snapshots' general path, retry and rebuild) decides through
//! [`fold`]; a single event is a run of one. The shell executes the [`Plan`]; it decides nothing.
//!
//! The fold is [`decide`] applied event after event to the state the previous events left, with
//! the writes composed: a delete drops what the run wrote before it; a later cell overwrites an
//! earlier one; a reset to DEFAULT (a delta's delete that newer fields survive) cancels earlier
//! writes of its columns. Folding a run therefore leaves the replica exactly as applying its events
//! one by one would (property-tested against [`crate::sim`] in `tests/fold.rs`).
//!
//! `oldState` is compared with the replica row as the run has left it so far. The shell passes
//! the row as it was before the run (compared values, e.g. each type's output text); the fold
//! follows it through the run's writes. A column the run's own insert left at its DEFAULT has a
//! value the fold cannot know: an `oldState` naming it ends the fold with [`Folded::OneByOne`],
//! and the shell applies those events one at a time against the real row.

use crate::event::Event;
use crate::merge::{decide, Decision, EntityState, Outcome, Write};
use crate::reject::Rejection;
use crate::spec::StreamSpec;
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// What happened to one event of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    Done {
        outcome: Outcome,
        /// `oldState` disagreed with the replica (counted whatever the policy).
        conflict: bool,
    },
    /// `on_conflict => 'dead_letter'`: the event goes to the dead letters.
    DeadLetter(Rejection),
}

impl Fate {
    fn duplicate() -> Fate {
        Fate::Done { outcome: Outcome::Duplicate, conflict: false }
    }
}

/// The one write a run amounts to, executed in this order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowWrite {
    /// Delete the row (and an aggregate's child rows) first.
    pub delete: bool,
    /// Then reset these columns of the row, if it exists, to their DEFAULT.
    pub clear: BTreeSet<usize>,
    /// Then insert the row if absent (untouched columns take their DEFAULT) and set these columns,
    /// each to the cell of the event at that position of the run (`None`: no insert or update).
    pub upsert: Option<BTreeMap<usize, usize>>,
    /// An aggregate: each child table's rows become exactly the child sets of the event at this
    /// position of the run.
    pub children: Option<usize>,
}

impl RowWrite {
    pub fn is_nothing(&self) -> bool {
        !self.delete && self.clear.is_empty() && self.upsert.is_none()
    }
}

/// What a run does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// One per event of the run, in order.
    pub fates: Vec<Fate>,
    pub write: RowWrite,
    /// The entity's new state to remember; `None` when the run leaves it unchanged.
    pub state: Option<EntityState>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Folded {
    Plan(Plan),
    /// An `oldState` names a column whose value the fold cannot know (see the module doc): apply
    /// the run's events one at a time.
    OneByOne,
    /// `on_conflict => 'error'`: the caller raises this message.
    Raise(String),
}

/// The event ids of a batch: which are fresh (not applied before; the shell records them all
/// first), which an event went on with, and which must be unrecorded again because no event of
/// the batch kept them. Ids are shared by all entities of a batch.
#[derive(Debug, Clone, Default)]
pub struct Ids {
    fresh: HashSet<String>,
    unapplied: Vec<String>,
    kept: HashSet<String>,
}

impl Ids {
    /// `fresh`: the ids the shell recorded as new (the rest of the batch's ids were seen before).
    pub fn new(fresh: impl IntoIterator<Item = String>) -> Ids {
        Ids { fresh: fresh.into_iter().collect(), ..Ids::default() }
    }

    /// The ids to remove from the record again: taken by events that were not applied (a dead
    /// letter, or a run handed to the one-by-one path, which records them itself), unless another
    /// event of the batch went on with them.
    pub fn unrecorded(mut self) -> Vec<String> {
        self.unapplied.retain(|id| !self.kept.contains(id));
        self.unapplied
    }
}

/// The row as the fold follows it: per column, the compared value, or unknown (a DEFAULT the run's
/// own insert or reset left there).
type Tracked<V> = Vec<Option<V>>;

/// Folds a run of events of one entity (in delivery order) against its remembered `state`.
///
/// - `row`: the replica row before the run, as compared values per column (`None`: no row). Only
///   read when an event carries `oldState`; the shell may pass `None` otherwise.
/// - `old(i, k)`: the compared value of the `k`-th `oldState` cell of event `i`.
/// - `new(i, column)`: the compared value event `i` writes into `column` (asked only to follow the
///   row for a later `oldState`).
/// - `ids`: the batch's event ids; an event whose id is not fresh is a duplicate.
pub fn fold<V: PartialEq>(
    spec: &StreamSpec,
    state: Option<EntityState>,
    row: Option<Vec<V>>,
    events: &[&Event],
    old: impl Fn(usize, usize) -> V,
    mut new: impl FnMut(usize, usize) -> V,
    ids: &mut Ids,
) -> Folded {
    let track_row = events.iter().any(|ev| !ev.old.is_empty());
    let mut row: Option<Tracked<V>> = if track_row { row.map(|r| r.into_iter().map(Some).collect()) } else { None };
    let columns = spec.table.columns.len();
    let mut state = state;
    let mut changed = false;
    let mut write = RowWrite::default();
    let mut fates = Vec::with_capacity(events.len());
    // The ids this run took, in order, and whether the event that took each went on.
    let mut taken: Vec<(String, bool)> = Vec::new();
    let mut one_by_one = false;
    for (i, ev) in events.iter().enumerate() {
        if let Some(id) = &ev.event_id {
            if !ids.fresh.remove(id) {
                fates.push(Fate::duplicate());
                continue;
            }
            taken.push((id.clone(), true));
        }
        if one_by_one {
            continue; // the ids are still taken, so that they are all handed back
        }
        let unknown = row.as_ref().is_some_and(|r| ev.old.iter().any(|c| r[c.column].is_none()));
        if unknown {
            one_by_one = true;
            continue;
        }
        let mismatches = |cells: &[crate::event::Cell]| -> Vec<String> {
            let Some(r) = row.as_ref() else { return Vec::new() };
            cells
                .iter()
                .enumerate()
                .filter(|(k, c)| r[c.column].as_ref() != Some(&old(i, *k)))
                .map(|(_, c)| c.field.clone())
                .collect()
        };
        match decide(spec, state.as_ref(), ev, mismatches) {
            Decision::Done { outcome, conflict, write: w, state: next } => {
                fates.push(Fate::Done { outcome, conflict });
                match w {
                    Write::Nothing => {}
                    Write::Upsert { cells, children } => {
                        if !children.is_empty() {
                            write.children = Some(i);
                        }
                        let upsert = write.upsert.get_or_insert_with(BTreeMap::new);
                        for c in &cells {
                            upsert.insert(c.column, i);
                            write.clear.remove(&c.column);
                        }
                        if track_row {
                            let r = row.get_or_insert_with(|| (0..columns).map(|_| None).collect());
                            for c in &cells {
                                r[c.column] = Some(new(i, c.column));
                            }
                        }
                    }
                    Write::Clear { columns: cleared } => {
                        for c in cleared {
                            if let Some(upsert) = write.upsert.as_mut() {
                                upsert.remove(&c);
                            }
                            write.clear.insert(c);
                            if let Some(r) = row.as_mut() {
                                r[c] = None;
                            }
                        }
                        // An upsert left with no column still inserts the row if absent.
                    }
                    Write::Delete => {
                        write = RowWrite { delete: true, ..RowWrite::default() };
                        row = None;
                    }
                }
                if let Some(next) = next {
                    state = Some(next);
                    changed = true;
                }
            }
            Decision::DeadLetter(rejection) => {
                if let Some(id) = &ev.event_id {
                    // Not applied: a later event with this id is not its duplicate.
                    ids.fresh.insert(id.clone());
                    if let Some(t) = taken.last_mut() {
                        t.1 = false;
                    }
                    ids.unapplied.push(id.clone());
                }
                fates.push(Fate::DeadLetter(rejection));
            }
            Decision::Raise(message) => return Folded::Raise(message),
        }
    }
    if one_by_one {
        // Every id this run took is unrecorded: the one-by-one path, which runs after the batch's
        // other entities, records them again. They stay taken for the batch's later entities,
        // which come after this one in the order one call at a time would apply them. (A
        // duplicate's id was recorded before the batch and stays.)
        ids.unapplied.extend(taken.into_iter().map(|(id, _)| id));
        return Folded::OneByOne;
    }
    ids.kept.extend(taken.into_iter().filter(|(_, kept)| *kept).map(|(id, _)| id));
    Folded::Plan(Plan { fates, write, state: state.filter(|_| changed) })
}
