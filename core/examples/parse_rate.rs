//! How fast the core parses events: `cargo run --release -p ecst_core --example parse_rate --
//! <entity_snapshot|delta|aggregate> <file.ndjson> [passes] [schema.json]`.
//!
//! Reads the file (one event per line) into memory, then parses every line with
//! `ecst_core::event::parse` for the fixture stream of that shape (`examples`), `passes` times
//! (default 3), on one core. Prints one JSON object: events, rejected (per pass), and the fastest
//! pass's seconds. The benchmark (`bench/`) uses it for the parse floor of a drain: whatever else
//! applying an event costs, its JSON has to be parsed once; and, with a JSON Schema file, for what
//! checking each event against the schema adds (`create_stream(..., schema)`).

use ecst_core::{event, examples};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: parse_rate <entity_snapshot|delta|aggregate> <file.ndjson> [passes] [schema.json]";
    let (shape, file) = match (args.first(), args.get(1)) {
        (Some(s), Some(f)) => (s.as_str(), f.as_str()),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let mut spec = match shape {
        "entity_snapshot" => examples::address_snapshot(),
        "delta" => examples::address_delta(),
        "aggregate" => examples::customer_aggregate(),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let passes: usize = match args.get(2).map(|p| p.parse()) {
        None => 3,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    if let Some(path) = args.get(3) {
        let schema: serde_json::Value =
            std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_else(|| {
                eprintln!("parse_rate: {path} is not a readable JSON file");
                std::process::exit(2);
            });
        spec.schema = Some(ecst_core::schema::Schema::compile(&schema).unwrap_or_else(|e| {
            eprintln!("parse_rate: {path}: {e}");
            std::process::exit(2);
        }));
    }
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| {
        eprintln!("parse_rate: cannot read {file}: {e}");
        std::process::exit(2);
    });
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let mut best = f64::INFINITY;
    let mut rejected = 0;
    for _ in 0..passes {
        let start = Instant::now();
        rejected = 0;
        for line in &lines {
            match event::parse(&spec, line) {
                Ok(ev) => {
                    std::hint::black_box(ev);
                }
                Err(_) => rejected += 1,
            }
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    println!("{{\"events\": {}, \"rejected\": {}, \"seconds\": {:.6}}}", lines.len(), rejected, best);
}
