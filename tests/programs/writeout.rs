//! Writes what its arguments say, in order, so a test can shape a job's output:
//!
//!   write:PATH:TEXT    /output/PATH gets TEXT (parent directories made as needed)
//!   sparse:PATH:BYTES  /output/PATH is created and set_len to BYTES (a hole, no data)
//!   fill:PATH:BYTES    /output/PATH gets BYTES bytes of 'o', written 64 KiB at a time
//!   print:BYTES        BYTES bytes of 'x' on stdout, no newline
//!   eprint:BYTES       BYTES bytes of 'e' on stderr, no newline
//!   sleep:SECONDS      sleep that long
//!
//! The first failing step is reported on stderr and ends the job with exit code 3.

use std::env;
use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::process;
use std::thread;
use std::time::Duration;

fn write_bytes(out: &mut dyn Write, byte: u8, count: u64) -> io::Result<()> {
    let block = vec![byte; 64 * 1024];
    let mut left = count;
    while left > 0 {
        let now = left.min(block.len() as u64) as usize;
        out.write_all(&block[..now])?;
        left -= now as u64;
    }
    out.flush()
}

fn parent_made(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) => fs::create_dir_all(parent),
        None => Ok(()),
    }
}

fn step(op: &str) -> io::Result<()> {
    let parts: Vec<&str> = op.splitn(3, ':').collect();
    let number = |text: &str| -> u64 { text.parse().expect("a number of bytes") };
    match parts.as_slice() {
        ["write", path, text] => {
            let path = Path::new("/output").join(path);
            parent_made(&path)?;
            fs::write(path, text.as_bytes())
        }
        ["sparse", path, bytes] => {
            let path = Path::new("/output").join(path);
            parent_made(&path)?;
            fs::File::create(path)?.set_len(number(bytes))
        }
        ["fill", path, bytes] => {
            let path = Path::new("/output").join(path);
            parent_made(&path)?;
            write_bytes(&mut fs::File::create(path)?, b'o', number(bytes))
        }
        ["print", bytes] => write_bytes(&mut io::stdout(), b'x', number(bytes)),
        ["eprint", bytes] => write_bytes(&mut io::stderr(), b'e', number(bytes)),
        ["sleep", seconds] => {
            thread::sleep(Duration::from_secs(number(seconds)));
            Ok(())
        }
        _ => panic!("unknown step {}", op),
    }
}

fn main() {
    for op in env::args().skip(1) {
        if let Err(e) = step(&op) {
            eprintln!("{}: {}", op, e);
            process::exit(3);
        }
    }
}
