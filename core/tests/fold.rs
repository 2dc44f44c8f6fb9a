//! The fold's promise, as a property: folding a run of events of one entity into one plan and
//! executing it leaves the replica, the remembered state, the event-id record and every event's
//! outcome exactly as applying the events one at a time does — for all three shapes, versioned or
//! not, with deletes (tombstones, a delta's reset of older fields), per-field versions, child sets,
//! `oldState` checked under every `on_conflict` policy, and event ids (repeated, dead-lettered).

use ecst_core::event::{Cell, ChildRow, ChildSet, Event, Op, Value};
use ecst_core::examples::{address_delta, address_snapshot, customer_aggregate};
use ecst_core::fold::{fold, Fate, Folded, Ids};
use ecst_core::merge::Decision;
use ecst_core::sim::Replica;
use ecst_core::spec::{OnConflict, Path, StreamSpec};
use ecst_core::version::Version;
use proptest::prelude::*;
use std::collections::HashSet;

#[derive(Debug, Clone)]
struct Gen {
    version: u8,
    delete: bool,
    /// Per column: absent, NULL, or one of a few values.
    cells: [Option<Option<u8>>; 4],
    /// Per column: an `oldState` cell (absent, NULL, or a value).
    old: [Option<Option<u8>>; 4],
    children: Vec<u8>,
    id: Option<u8>,
}

fn gen() -> impl Strategy<Value = Gen> {
    let cell = prop::option::of(prop::option::of(0u8..3));
    let old = prop::option::weighted(0.15, prop::option::of(0u8..3));
    (
        0u8..8,
        prop::bool::weighted(0.2),
        prop::array::uniform4(cell),
        prop::array::uniform4(old),
        prop::collection::vec(0u8..4, 0..3),
        prop::option::weighted(0.3, 0u8..4),
    )
        .prop_map(|(version, delete, cells, old, children, id)| Gen { version, delete, cells, old, children, id })
}

fn value(v: &Option<u8>) -> Value {
    match v {
        None => Value::Null,
        Some(x) => Value::Text(format!("v{x}")),
    }
}

fn spec(shape: u8, versioned: bool, on_conflict: u8, ids: bool) -> StreamSpec {
    let mut spec = match shape {
        0 => address_snapshot(),
        1 => address_delta(),
        _ => customer_aggregate(),
    };
    spec.version = versioned.then(|| Path::parse("ts").unwrap());
    spec.event_id = ids.then(|| Path::parse("id").unwrap());
    spec.on_conflict =
        [OnConflict::Apply, OnConflict::Skip, OnConflict::DeadLetter, OnConflict::Error][on_conflict as usize % 4];
    spec
}

/// The event `g` describes, as the parser would produce it for `spec`.
fn event(spec: &StreamSpec, g: &Gen) -> Event {
    let columns = spec.table.columns.len();
    let snapshot = spec.shape.is_snapshot();
    let cell = |column: usize, v: &Option<u8>| Cell { column, field: format!("f{column}"), value: value(v) };
    let op = if g.delete {
        Op::Delete
    } else {
        let cells = (0..columns)
            .filter_map(|c| match &g.cells[c] {
                Some(v) => Some(cell(c, v)),
                None if snapshot => Some(cell(c, &None)),
                None => None,
            })
            .collect();
        let mut children = Vec::new();
        if !spec.children.is_empty() {
            let mut keys = g.children.clone();
            keys.sort_unstable();
            keys.dedup();
            let rows = keys
                .iter()
                .map(|k| ChildRow { key: vec![k.to_string()], cells: vec![cell(0, &Some(*k + g.version))] })
                .collect();
            children.push(ChildSet { child: 0, rows });
        }
        Op::Upsert { cells, children }
    };
    let old = (0..columns).filter_map(|c| g.old[c].as_ref().map(|v| cell(c, v))).collect();
    Event {
        key: vec!["1".into()],
        version: spec.is_versioned().then(|| Version::from_i64(g.version as i64)),
        event_id: spec.event_id.as_ref().and(g.id.map(|i| format!("id{i}"))),
        op,
        old,
    }
}

/// One event applied alone, as the engine's one-by-one path does. `Err`: `on_conflict 'error'`.
fn apply_one(r: &mut Replica, recorded: &mut HashSet<String>, spec: &StreamSpec, ev: &Event) -> Result<Fate, ()> {
    if let Some(id) = &ev.event_id {
        if recorded.contains(id) {
            return Ok(Fate::Done { outcome: ecst_core::merge::Outcome::Duplicate, conflict: false });
        }
    }
    match r.apply_checked(spec, ev) {
        Decision::Done { outcome, conflict, .. } => {
            if let Some(id) = &ev.event_id {
                recorded.insert(id.clone());
            }
            Ok(Fate::Done { outcome, conflict })
        }
        Decision::DeadLetter(rejection) => Ok(Fate::DeadLetter(rejection)),
        Decision::Raise(_) => Err(()),
    }
}

/// The run folded and executed on `r` (falling back to one by one as the engine does).
fn apply_run(
    r: &mut Replica,
    recorded: &mut HashSet<String>,
    spec: &StreamSpec,
    run: &[Event],
) -> Result<Vec<Fate>, ()> {
    let key = vec!["1".to_string()];
    let fresh: Vec<String> =
        run.iter().filter_map(|e| e.event_id.clone()).filter(|id| !recorded.contains(id)).collect();
    let mut ids = Ids::new(fresh.iter().cloned());
    let refs: Vec<&Event> = run.iter().collect();
    let value_of = |i: usize, column: usize| -> Value {
        let Op::Upsert { cells, .. } = &refs[i].op else { unreachable!() };
        cells.iter().find(|c| c.column == column).unwrap().value.clone()
    };
    let folded = fold(
        spec,
        r.states.get(&key).cloned(),
        r.row_values(spec, &key),
        &refs,
        |i, k| refs[i].old[k].value.clone(),
        value_of,
        &mut ids,
    );
    match folded {
        Folded::Raise(_) => Err(()),
        Folded::OneByOne => {
            assert_eq!(ids.unrecorded().into_iter().collect::<HashSet<_>>(), fresh.into_iter().collect());
            run.iter().map(|ev| apply_one(r, recorded, spec, ev)).collect()
        }
        Folded::Plan(plan) => {
            assert_eq!(plan.fates.len(), run.len());
            r.execute(&key, &refs, &plan.write, plan.state.clone());
            recorded.extend(fresh);
            for id in ids.unrecorded() {
                recorded.remove(&id);
            }
            Ok(plan.fates)
        }
    }
}

fn check(spec: StreamSpec, before: Vec<Gen>, run: Vec<Gen>) -> Result<(), TestCaseError> {
    let before: Vec<Event> = before.iter().map(|g| event(&spec, g)).collect();
    let run: Vec<Event> = run.iter().map(|g| event(&spec, g)).collect();
    // The entity as earlier events left it (one by one; a raise there just stops the prefix).
    let mut start = Replica::default();
    let mut start_ids = HashSet::new();
    for ev in &before {
        if apply_one(&mut start, &mut start_ids, &spec, ev).is_err() {
            break;
        }
    }
    let (mut one, mut one_ids) = (start.clone(), start_ids.clone());
    let expected: Result<Vec<Fate>, ()> = run.iter().map(|ev| apply_one(&mut one, &mut one_ids, &spec, ev)).collect();
    let (mut folded, mut folded_ids) = (start, start_ids);
    let got = apply_run(&mut folded, &mut folded_ids, &spec, &run);
    prop_assert_eq!(&got, &expected);
    if expected.is_ok() {
        prop_assert_eq!(folded.tables(), one.tables());
        prop_assert_eq!(folded.states, one.states);
        prop_assert_eq!(folded_ids, one_ids);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn a_folded_run_equals_its_events_one_by_one(
        shape in 0u8..3,
        versioned in prop::bool::weighted(0.85),
        on_conflict in 0u8..4,
        ids in prop::bool::ANY,
        before in prop::collection::vec(gen(), 0..5),
        run in prop::collection::vec(gen(), 1..8),
    ) {
        check(spec(shape, versioned, on_conflict, ids), before, run)?;
    }
}

/// The cases the property must reach, spelled out.
#[test]
fn a_delta_delete_that_newer_fields_survive_resets_the_older_ones_in_the_plan() {
    let spec = spec(1, true, 0, false);
    let g = |version, delete, cells| Gen { version, delete, cells, old: [None; 4], children: Vec::new(), id: None };
    let run = vec![
        g(3, false, [Some(Some(1)), None, None, None]),
        g(7, false, [None, Some(Some(2)), None, None]),
        g(5, true, [None; 4]),
    ];
    let events: Vec<Event> = run.iter().map(|g| event(&spec, g)).collect();
    let refs: Vec<&Event> = events.iter().collect();
    let Folded::Plan(plan) =
        fold::<Value>(&spec, None, None, &refs, |_, _| unreachable!(), |_, _| unreachable!(), &mut Ids::default())
    else {
        panic!("a plan")
    };
    assert_eq!(plan.write.upsert.as_ref().map(|u| u.keys().copied().collect::<Vec<_>>()), Some(vec![1]));
    assert_eq!(plan.write.clear.iter().copied().collect::<Vec<_>>(), vec![0]);
    check(spec, Vec::new(), run).unwrap();
}

#[test]
fn an_old_state_naming_a_column_the_run_left_at_its_default_goes_one_by_one() {
    let spec = spec(1, true, 1, false);
    let first = Gen {
        version: 1,
        delete: false,
        cells: [Some(Some(1)), None, None, None],
        old: [None; 4],
        children: Vec::new(),
        id: None,
    };
    let second = Gen { version: 2, old: [None, Some(Some(1)), None, None], ..first.clone() };
    let events: Vec<Event> = [first.clone(), second.clone()].iter().map(|g| event(&spec, g)).collect();
    let refs: Vec<&Event> = events.iter().collect();
    let row: Option<Vec<Value>> = None;
    let folded =
        fold(&spec, None, row, &refs, |i, k| refs[i].old[k].value.clone(), |_, _| Value::Null, &mut Ids::default());
    assert_eq!(folded, Folded::OneByOne);
    check(spec, Vec::new(), vec![first, second]).unwrap();
}
