//! Allocates N MiB (argv[1]) in 1 MiB chunks, writing every page, then prints
//! "allocated N MiB". Used to hit memory limits.

use std::env;
use std::process;

const MIB: usize = 1 << 20;
const PAGE: usize = 4096;

fn main() {
    let count: usize = match env::args().nth(1).map(|text| text.parse()) {
        Some(Ok(count)) => count,
        _ => {
            eprintln!("usage: alloc MEBIBYTES");
            process::exit(2);
        }
    };
    let mut chunks: Vec<Vec<u8>> = Vec::with_capacity(count);
    for index in 0..count {
        let mut chunk = vec![0u8; MIB];
        // Distinct values on every page, read back below, so no allocation can be elided.
        let mut offset = 0;
        while offset < MIB {
            chunk[offset] = (index + offset / PAGE) as u8 | 1;
            offset += PAGE;
        }
        chunks.push(chunk);
    }
    let touched = chunks
        .iter()
        .filter(|chunk| chunk.iter().step_by(PAGE).all(|&byte| byte != 0))
        .count();
    if touched != count {
        eprintln!("only {} of {} chunks hold their data", touched, count);
        process::exit(1);
    }
    println!("allocated {} MiB", count);
}
