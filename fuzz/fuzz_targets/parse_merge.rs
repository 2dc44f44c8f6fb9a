//! Fuzzes the pure core: any bytes, read as lines of events, must parse or be rejected without
//! panicking for every fixture stream; and the events that parse (distinct versions per entity)
//! must converge — delivered forwards, or backwards with every event twice — to the in-order
//! reference.

#![no_main]

use ecst_core::event::{parse, Event};
use ecst_core::examples::{address_delta, address_snapshot, customer_aggregate};
use ecst_core::sim::{reference, Replica};
use ecst_core::spec::Path;
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut aggregate = customer_aggregate();
    aggregate.version = Some(Path::parse("ts").expect("a path"));
    for spec in [address_snapshot(), address_delta(), aggregate] {
        let mut seen = HashSet::new();
        let events: Vec<Event> = text
            .lines()
            .filter_map(|line| parse(&spec, line).ok())
            .filter(|e| e.version.is_some() && seen.insert((e.key.clone(), e.version.clone())))
            .collect();
        let expected = reference(&spec, &events);
        let mut forwards = Replica::default();
        for e in &events {
            forwards.apply(&spec, e);
        }
        assert_eq!(forwards.tables(), expected, "forwards");
        let mut backwards = Replica::default();
        for e in events.iter().rev() {
            backwards.apply(&spec, e);
            backwards.apply(&spec, e);
        }
        assert_eq!(backwards.tables(), expected, "backwards with duplicates");
    }
});
