//! An array task for `sshwasm report`: sleeps a little, longer for some tasks
//! (REPORT_SLEEP_MS * (task % 5), default 40 ms a step), and exits with code 3 when the task
//! id is 1 modulo the number in argv[1] (default: no task fails), so an array has failures.

use std::env;
use std::process;
use std::thread;
use std::time::Duration;

fn main() {
    let task: u64 = env::var("SSHWASM_ARRAY_TASK_ID")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    let step: u64 = env::var("REPORT_SLEEP_MS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(40);
    thread::sleep(Duration::from_millis(step * (task % 5)));
    println!("task {} done", task);
    let every: u64 = env::args()
        .nth(1)
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    if every > 0 && task % every == 1 {
        eprintln!("task {} fails on purpose", task);
        process::exit(3);
    }
}
