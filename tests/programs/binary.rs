//! Writes every byte value 0..=255 four times to stdout, then "é" as Latin-1 (0xE9) to
//! stderr: output that is not UTF-8 must come back byte for byte.

use std::io::{self, Write};

fn main() {
    let bytes: Vec<u8> = (0..=255u8).cycle().take(1024).collect();
    io::stdout().write_all(&bytes).unwrap();
    io::stderr().write_all(&[0xE9, b'\n']).unwrap();
}
