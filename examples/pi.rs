//! Estimates pi from `POINTS` random points with the generator seeded by `SEED`:
//! `pi POINTS SEED` prints `points=POINTS seed=SEED pi~ESTIMATE`. examples/sweep.py runs a
//! grid of these through the Python API.

use std::env;
use std::process;

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let (points, seed) = match (args.first(), args.get(1)) {
        (Some(p), Some(s)) => match (p.parse::<u64>(), s.parse::<u64>()) {
            (Ok(p), Ok(s)) if p > 0 => (p, s),
            _ => usage(),
        },
        _ => usage(),
    };
    // xorshift64*: enough randomness for a demonstration, and the same on every host.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_add(1);
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
    println!("points={} seed={} pi~{:.6}", points, seed, 4.0 * inside as f64 / points as f64);
}

fn usage() -> ! {
    eprintln!("usage: pi POINTS SEED (whole numbers, POINTS at least 1)");
    process::exit(2);
}
