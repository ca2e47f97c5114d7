//! Shows what a job receives: its arguments, the GREETING variable and its stdin.
//!
//! Prints `arg[i]=<value>` for each argument after the program name, `GREETING=<value>`
//! when that variable is set, then `stdin lines: N` and `sum: S`, the sum of every
//! whitespace-separated integer found on stdin.

use std::env;
use std::io::{self, Read};

fn main() {
    for (index, argument) in env::args_os().enumerate().skip(1) {
        println!("arg[{}]={}", index, argument.to_string_lossy());
    }
    if let Some(greeting) = env::var_os("GREETING") {
        println!("GREETING={}", greeting.to_string_lossy());
    }
    let mut raw = Vec::new();
    if let Err(error) = io::stdin().read_to_end(&mut raw) {
        eprintln!("cannot read stdin: {}", error);
        std::process::exit(1);
    }
    let input = String::from_utf8_lossy(&raw);
    let mut lines = 0u64;
    let mut sum: i128 = 0;
    for line in input.lines() {
        lines += 1;
        for word in line.split_whitespace() {
            if let Ok(number) = word.parse::<i64>() {
                sum += i128::from(number);
            }
        }
    }
    println!("stdin lines: {}", lines);
    println!("sum: {}", sum);
}
