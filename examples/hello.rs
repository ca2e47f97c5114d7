//! The seed job: waits a while, then reports success.
//!
//! The wait is `HELLO_SLEEP_S` seconds (a decimal number, default 5), so tests can skip it.

use std::env;
use std::process;
use std::thread;
use std::time::Duration;

const DEFAULT_SLEEP_S: f64 = 5.0;

fn main() {
    let seconds = match env::var("HELLO_SLEEP_S") {
        Err(_) => DEFAULT_SLEEP_S,
        Ok(text) => match text.trim().parse::<f64>() {
            Ok(value) if value.is_finite() && value >= 0.0 => value,
            _ => {
                eprintln!("HELLO_SLEEP_S must be a number of seconds >= 0, not {:?}", text);
                process::exit(2);
            }
        },
    };
    thread::sleep(Duration::from_secs_f64(seconds));
    println!("job done, hello!");
}
