//! An in-memory replica that executes [`Decision`]s exactly as the SQL layer does, plus the
//! in-order reference semantics of the version rules (docs/concepts.md). The property tests and the fuzz target check that
//! any delivery order through [`Replica::apply`] equals [`reference`].

use crate::event::{Cell, Event, Op, Value};
use crate::fold::RowWrite;
use crate::merge::{decide, Decision, EntityState, Outcome, Write};
use crate::spec::{Shape, StreamSpec};
use std::collections::BTreeMap;

/// Rows by key: column index → value; a column absent from the map holds its DEFAULT.
pub type Rows = BTreeMap<Vec<String>, BTreeMap<usize, Value>>;
/// Child rows by (child index, parent key, child key).
pub type ChildRows = BTreeMap<(usize, Vec<String>, Vec<String>), BTreeMap<usize, Value>>;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Replica {
    pub rows: Rows,
    pub children: ChildRows,
    pub states: BTreeMap<Vec<String>, EntityState>,
}

impl Replica {
    /// Applies one event (never conflicts: the oracle reports no mismatches).
    pub fn apply(&mut self, spec: &StreamSpec, ev: &Event) -> Outcome {
        match decide(spec, self.states.get(&ev.key), ev, |_| Vec::new()) {
            Decision::Done { outcome, write, state, .. } => {
                self.write(&ev.key, write);
                if let Some(s) = state {
                    self.states.insert(ev.key.clone(), s);
                }
                outcome
            }
            other => panic!("unexpected decision {other:?}"),
        }
    }

    /// Decides one event as the engine does, comparing its `oldState` with this replica's row
    /// (an absent column reads as NULL), and executes the decision.
    pub fn apply_checked<'e>(&mut self, spec: &StreamSpec, ev: &'e Event) -> Decision<'e> {
        let row = self.rows.get(&ev.key);
        let mismatches = |cells: &[Cell]| -> Vec<String> {
            let Some(row) = row else { return Vec::new() };
            let value = |c: &Cell| row.get(&c.column).cloned().unwrap_or(Value::Null);
            cells.iter().filter(|c| value(c) != c.value).map(|c| c.field.clone()).collect()
        };
        let decision = decide(spec, self.states.get(&ev.key), ev, mismatches);
        if let Decision::Done { write, state, .. } = &decision {
            self.write(&ev.key, write.clone());
            if let Some(s) = state {
                self.states.insert(ev.key.clone(), s.clone());
            }
        }
        decision
    }

    /// The row of `key` as compared values per column (NULL where absent), if it exists.
    pub fn row_values(&self, spec: &StreamSpec, key: &[String]) -> Option<Vec<Value>> {
        let row = self.rows.get(key)?;
        Some((0..spec.table.columns.len()).map(|c| row.get(&c).cloned().unwrap_or(Value::Null)).collect())
    }

    /// Executes the write a run of `events` of the entity `key` folded into (`crate::fold`), as
    /// the engine's executors do: delete, reset to DEFAULT, upsert, child sets.
    pub fn execute(&mut self, key: &[String], events: &[&Event], write: &RowWrite, state: Option<EntityState>) {
        if write.delete {
            self.write(key, Write::Delete);
        }
        if let Some(row) = self.rows.get_mut(key) {
            for c in &write.clear {
                row.remove(c);
            }
        }
        if let Some(upsert) = &write.upsert {
            let row = self.rows.entry(key.to_vec()).or_default();
            for (&column, &i) in upsert {
                let Op::Upsert { cells, .. } = &events[i].op else { panic!("an upsert's cell comes from an upsert") };
                let cell = cells.iter().find(|c| c.column == column).expect("the event writes this column");
                set(row, column, cell.value.clone());
            }
        }
        if let Some(i) = write.children {
            let Op::Upsert { children, .. } = &events[i].op else { panic!("child sets come from an upsert") };
            self.write(key, Write::Upsert { cells: Vec::new(), children });
        }
        if let Some(s) = state {
            self.states.insert(key.to_vec(), s);
        }
    }

    fn write(&mut self, key: &[String], write: Write) {
        match write {
            Write::Nothing => {}
            Write::Upsert { cells, children } => {
                let row = self.rows.entry(key.to_vec()).or_default();
                for c in cells {
                    set(row, c.column, c.value.clone());
                }
                for set_ in children {
                    self.children.retain(|(ci, pk, _), _| !(*ci == set_.child && pk == key));
                    for r in &set_.rows {
                        let row = self.children.entry((set_.child, key.to_vec(), r.key.clone())).or_default();
                        for c in &r.cells {
                            set(row, c.column, c.value.clone());
                        }
                    }
                }
            }
            Write::Clear { columns } => {
                let row = self.rows.get_mut(key).expect("Clear targets an existing row");
                for c in columns {
                    row.remove(&c);
                }
            }
            Write::Delete => {
                self.rows.remove(key);
                self.children.retain(|(_, pk, _), _| pk != key);
            }
        }
    }

    /// The replica's visible contents (rows and child rows), without the version state.
    pub fn tables(&self) -> (Rows, ChildRows) {
        (self.rows.clone(), self.children.clone())
    }
}

/// NULL and DEFAULT are the same in the model: a NULL cell is not stored.
fn set(row: &mut BTreeMap<usize, Value>, column: usize, value: Value) {
    match value {
        Value::Null => {
            row.remove(&column);
        }
        v => {
            row.insert(column, v);
        }
    }
}

/// The version rules' definition: every distinct event applied once, in version order, with no
/// version bookkeeping at all. Events must be versioned with distinct versions per entity.
pub fn reference(spec: &StreamSpec, events: &[Event]) -> (Rows, ChildRows) {
    let mut sorted: Vec<&Event> = events.iter().collect();
    sorted.sort_by(|a, b| (&a.key, &a.version).cmp(&(&b.key, &b.version)));
    sorted.dedup_by(|a, b| a.key == b.key && a.version == b.version);
    let mut r = Replica::default();
    for ev in sorted {
        let write = match &ev.op {
            Op::Delete => Write::Delete,
            Op::Upsert { cells, children } => {
                if spec.shape == Shape::Delta {
                    Write::Upsert { cells: cells.iter().collect(), children: &[] }
                } else {
                    // A snapshot replaces the whole row.
                    r.rows.remove(&ev.key);
                    Write::Upsert { cells: cells.iter().collect(), children }
                }
            }
        };
        r.write(&ev.key, write);
    }
    r.tables()
}
