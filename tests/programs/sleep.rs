//! Prints "start", sleeps argv[1] seconds (a decimal number), then prints "end".

use std::env;
use std::process;
use std::thread;
use std::time::Duration;

fn main() {
    let seconds: f64 = match env::args().nth(1).map(|text| text.parse::<f64>()) {
        Some(Ok(value)) if value.is_finite() && value >= 0.0 => value,
        _ => {
            eprintln!("usage: sleep SECONDS");
            process::exit(2);
        }
    };
    println!("start");
    thread::sleep(Duration::from_secs_f64(seconds));
    println!("end");
}
