//! An array sweep: `sshwasm run examples/sweep.rs --array 8 --tag`
//!
//! Task i of N estimates pi with a different number of random points (1000 * 2^i), using
//! a small deterministic generator seeded by the task id, and prints its estimate.

use std::env;

fn main() {
    let task: u32 = env::var("SSHWASM_ARRAY_TASK_ID")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    let points: u64 = 1000u64 << task.min(20);
    // xorshift64*: enough randomness for a demonstration, and the same on every host.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(task + 1);
    let mut next = || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut inside = 0u64;
    for _ in 0..points {
        let (x, y) = (next(), next());
        if x * x + y * y <= 1.0 {
            inside += 1;
        }
    }
    println!("points={} pi~{:.6}", points, 4.0 * inside as f64 / points as f64);
}
