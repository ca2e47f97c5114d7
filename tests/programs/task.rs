//! An array task: prints its task id and count, three lines, then exits with code 5 when
//! it is the task named in argv[1] (if any).

use std::env;
use std::process;

fn main() {
    let task = env::var("SSHWASM_ARRAY_TASK_ID").unwrap_or_default();
    let count = env::var("SSHWASM_ARRAY_TASK_COUNT").unwrap_or_default();
    for line in 0..3 {
        println!("task {} of {} line {}", task, count, line);
    }
    if env::args().nth(1).as_deref() == Some(task.as_str()) {
        eprintln!("task {} fails", task);
        process::exit(5);
    }
}
