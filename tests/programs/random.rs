//! Prints a fixed line; with argv[1] "random", also 16 bytes from WASI random_get in hex,
//! so two runs of the same job differ (`rerun --compare`, `run --verify`).

use std::env;

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn random_get(buf: *mut u8, len: usize) -> u16;
}

fn main() {
    println!("same on every run");
    if env::args().nth(1).as_deref() == Some("random") {
        let mut bytes = [0u8; 16];
        let errno = unsafe { random_get(bytes.as_mut_ptr(), bytes.len()) };
        assert_eq!(errno, 0, "random_get failed");
        let hex: Vec<String> = bytes.iter().map(|b| format!("{:02x}", b)).collect();
        println!("{}", hex.join(""));
    }
}
