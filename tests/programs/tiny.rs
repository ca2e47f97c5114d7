//! Prints one short line naming its array task (`SSHWASM_ARRAY_TASK_ID`, "-" outside an
//! array): the smallest useful job, so a benchmark of it measures overhead, not work.

use std::env;

fn main() {
    let task = env::var("SSHWASM_ARRAY_TASK_ID").unwrap_or_else(|_| "-".to_string());
    println!("tiny {}", task);
}
