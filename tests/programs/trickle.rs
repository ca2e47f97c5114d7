//! Prints "line 1" to "line N" (argv[1]), flushing each and pausing argv[2] ms between them,
//! so output arrives over time (for tests that drop connections mid-stream).

use std::env;
use std::io::{self, Write};
use std::process;
use std::thread;
use std::time::Duration;

fn main() {
    let args: Vec<String> = env::args().collect();
    let parse = |index: usize| args.get(index).and_then(|text| text.parse::<u64>().ok());
    let (count, pause_ms) = match (parse(1), parse(2)) {
        (Some(count), Some(pause_ms)) => (count, pause_ms),
        _ => {
            eprintln!("usage: trickle LINES PAUSE_MS");
            process::exit(2);
        }
    };
    let stdout = io::stdout();
    for index in 1..=count {
        let mut out = stdout.lock();
        if writeln!(out, "line {}", index).and_then(|_| out.flush()).is_err() {
            process::exit(1);
        }
        drop(out);
        thread::sleep(Duration::from_millis(pause_ms));
    }
}
