//! Exits with the code given as argv[1].

use std::env;
use std::process;

fn main() {
    match env::args().nth(1).map(|text| text.parse::<i32>()) {
        Some(Ok(code)) => process::exit(code),
        _ => {
            eprintln!("usage: exitcode CODE");
            process::exit(2);
        }
    }
}
