//! Prints argv[1] lines, "line 1" to "line N", on stdout.

use std::env;
use std::io::{self, BufWriter, Write};
use std::process;

fn main() {
    let count: u64 = match env::args().nth(1).map(|text| text.parse()) {
        Some(Ok(count)) => count,
        _ => {
            eprintln!("usage: bigout LINES");
            process::exit(2);
        }
    };
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    for index in 1..=count {
        if writeln!(out, "line {}", index).is_err() {
            process::exit(1);
        }
    }
    if out.flush().is_err() {
        process::exit(1);
    }
}
