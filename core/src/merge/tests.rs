use super::*;
use crate::event::{parse, Value};
use crate::examples::{address_delta, address_snapshot};
use crate::sim::Replica;

fn ev(spec: &StreamSpec, json: &str) -> Event {
    parse(spec, json).unwrap()
}

fn line1(r: &Replica) -> Option<&Value> {
    r.rows.get(&vec!["1".to_string()]).and_then(|row| row.get(&1))
}

#[test]
fn snapshots_apply_newer_ignore_older_and_equal() {
    let spec = address_snapshot();
    let mut r = Replica::default();
    let at = |ts: i64, line: &str| {
        ev(
            &spec,
            &format!(
                r#"{{"addressId":"1","newState":{{"addressContent":{{"addressLine1":"{line}","addressTS":{ts}}}}}}}"#
            ),
        )
    };
    assert_eq!(r.apply(&spec, &at(5, "five")), Outcome::Applied);
    assert_eq!(r.apply(&spec, &at(3, "three")), Outcome::Stale);
    assert_eq!(r.apply(&spec, &at(5, "five")), Outcome::Duplicate);
    assert_eq!(line1(&r), Some(&Value::Text("five".into())));
    assert_eq!(r.apply(&spec, &at(9, "nine")), Outcome::Applied);
    assert_eq!(line1(&r), Some(&Value::Text("nine".into())));
}

#[test]
fn deletes_leave_a_tombstone_that_older_creates_cannot_pass() {
    let mut spec = address_snapshot();
    spec.version = Some(crate::spec::Path::parse("ts").unwrap());
    let mut r = Replica::default();
    let del = ev(&spec, r#"{"addressId":"1","ts":10,"oldState":{"addressContent":{}}}"#);
    let create = ev(&spec, r#"{"addressId":"1","ts":7,"newState":{"addressContent":{"addressLine1":"x"}}}"#);
    assert_eq!(r.apply(&spec, &del), Outcome::Applied);
    assert_eq!(r.apply(&spec, &create), Outcome::Stale);
    assert!(r.rows.is_empty());
    let state = &r.states[&vec!["1".to_string()]];
    assert_eq!(state.tomb, Some(Version::from_i64(10)));
    assert!(!state.exists());
}

#[test]
fn deltas_merge_per_field_out_of_order() {
    let spec = address_delta();
    let mut r = Replica::default();
    let a = ev(&spec, r#"{"addressId":"1","ts":2,"newState":{"addressLine1":"new line"}}"#);
    let b = ev(&spec, r#"{"addressId":"1","ts":1,"newState":{"addressLine1":"old line","addressPurpose":"billing"}}"#);
    assert_eq!(r.apply(&spec, &a), Outcome::Applied);
    assert_eq!(r.apply(&spec, &b), Outcome::Applied, "older event still brings a field nobody newer wrote");
    let row = &r.rows[&vec!["1".to_string()]];
    assert_eq!(row[&1], Value::Text("new line".into()));
    assert_eq!(row[&0], Value::Text("billing".into()));
    assert_eq!(r.apply(&spec, &b), Outcome::Duplicate);
}

#[test]
fn delta_delete_clears_older_fields_and_keeps_newer_ones() {
    let spec = address_delta();
    let mut r = Replica::default();
    let create = ev(&spec, r#"{"addressId":"1","ts":1,"newState":{"addressLine1":"a","addressPurpose":"p"}}"#);
    let newer = ev(&spec, r#"{"addressId":"1","ts":4,"newState":{"addressPurpose":"q"}}"#);
    let delete = ev(&spec, r#"{"addressId":"1","ts":3,"oldState":{}}"#);
    r.apply(&spec, &create);
    r.apply(&spec, &newer);
    let decision = decide(&spec, r.states.get(&vec!["1".into()]), &delete, |_| vec![]);
    let Decision::Done { write, .. } = &decision else { panic!() };
    assert_eq!(write, &Write::Clear { columns: vec![1] }, "line1 (written at 1) is cleared, purpose (4) survives");
    r.apply(&spec, &delete);
    let row = &r.rows[&vec!["1".to_string()]];
    assert_eq!(row.get(&1), None);
    assert_eq!(row[&0], Value::Text("q".into()));
    let late = ev(&spec, r#"{"addressId":"1","ts":2,"newState":{"addressLine1":"b"}}"#);
    assert_eq!(r.apply(&spec, &late), Outcome::Stale, "the delete at 3 erased it");
}

#[test]
fn conflicts_follow_the_policy() {
    let mut spec = address_delta();
    let e = ev(&spec, r#"{"addressId":"1","ts":2,"oldState":{"addressLine1":"x"},"newState":{"addressLine1":"y"}}"#);
    let mismatch = |_: &[Cell]| vec!["addressLine1".to_string()];
    let d = decide(&spec, None, &e, mismatch);
    assert!(matches!(d, Decision::Done { outcome: Outcome::Applied, conflict: true, .. }));
    spec.on_conflict = OnConflict::Skip;
    let d = decide(&spec, None, &e, mismatch);
    assert!(matches!(d, Decision::Done { outcome: Outcome::Skipped, conflict: true, state: None, .. }));
    spec.on_conflict = OnConflict::DeadLetter;
    let Decision::DeadLetter(rej) = decide(&spec, None, &e, mismatch) else { panic!() };
    assert_eq!(rej.code, RejectCode::Conflict);
    assert!(rej.message.contains("addressLine1"));
    spec.on_conflict = OnConflict::Error;
    assert!(matches!(decide(&spec, None, &e, mismatch), Decision::Raise(_)));
    // Matching oldState is no conflict; a stale event is never checked.
    assert!(matches!(decide(&spec, None, &e, |_| vec![]), Decision::Done { conflict: false, .. }));
    let state = EntityState { live: Some(Version::from_i64(9)), ..Default::default() };
    let d = decide(&spec, Some(&state), &e, |_| panic!("a stale event is not checked"));
    assert!(matches!(d, Decision::Done { conflict: false, .. }));
}

#[test]
fn unversioned_streams_apply_in_arrival_order() {
    let mut spec = address_snapshot();
    spec.version = None;
    let mut r = Replica::default();
    let at = |line: &str| {
        ev(&spec, &format!(r#"{{"addressId":"1","newState":{{"addressContent":{{"addressLine1":"{line}"}}}}}}"#))
    };
    assert_eq!(r.apply(&spec, &at("a")), Outcome::Applied);
    assert_eq!(r.apply(&spec, &at("b")), Outcome::Applied);
    assert_eq!(line1(&r), Some(&Value::Text("b".into())));
    assert!(r.states.is_empty(), "no version state is kept without versions");
}
