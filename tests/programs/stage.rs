//! Exercises file staging: summarises every file under /input into /output/summary.txt
//! (one "path bytes" line each, sorted, then one line per escape attempt), and prints the
//! same text on stdout.
//!
//! The escape attempts must all fail: writing under the read-only /input, opening the
//! host's /etc/hostname, and creating symlinks in /output that point out of it.
//! Optional argv[1]: seconds to sleep after writing the summary (a decimal number), so a
//! test can see output written by a job that is still running or then times out.

use std::env;
use std::fs;
use std::io::Write;
use std::os::wasi::io::AsRawFd;
use std::path::Path;
use std::thread;
use std::time::Duration;

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn path_symlink(
        old_path: *const u8,
        old_path_len: usize,
        fd: i32,
        new_path: *const u8,
        new_path_len: usize,
    ) -> i32;
}

fn walk(dir: &Path, prefix: &str, found: &mut Vec<(String, u64)>) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(_) => return,
    };
    for entry in entries.flatten() {
        let name = format!("{}{}", prefix, entry.file_name().to_string_lossy());
        let kind = match entry.file_type() {
            Ok(kind) => kind,
            Err(_) => continue,
        };
        if kind.is_dir() {
            walk(&entry.path(), &format!("{}/", name), found);
        } else {
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            found.push((name, size));
        }
    }
}

fn outcome<T, E: std::fmt::Display>(result: Result<T, E>) -> String {
    match result {
        Ok(_) => "ALLOWED".to_string(),
        Err(e) => format!("denied ({})", e),
    }
}

fn symlink_outcome(dir: &fs::File, target: &str, name: &str) -> String {
    let errno = unsafe {
        path_symlink(target.as_ptr(), target.len(), dir.as_raw_fd(), name.as_ptr(), name.len())
    };
    if errno == 0 {
        "ALLOWED".to_string()
    } else {
        format!("denied (errno {})", errno)
    }
}

fn main() {
    let mut found = Vec::new();
    walk(Path::new("/input"), "", &mut found);
    found.sort();
    let mut text = String::new();
    for (name, size) in &found {
        text.push_str(&format!("{} {}\n", name, size));
    }
    text.push_str(&format!(
        "write /input/new: {}\n",
        outcome(fs::write("/input/new", b"x"))
    ));
    text.push_str(&format!(
        "read /etc/hostname: {}\n",
        outcome(fs::read("/etc/hostname"))
    ));
    match fs::File::open("/output") {
        Ok(dir) => {
            text.push_str(&format!(
                "symlink absolute: {}\n",
                symlink_outcome(&dir, "/etc/hostname", "abs-link")
            ));
            text.push_str(&format!(
                "symlink upward: {}\n",
                symlink_outcome(&dir, "../../../../../../etc/hostname", "up-link")
            ));
            text.push_str(&format!(
                "read via upward link: {}\n",
                outcome(fs::read("/output/up-link"))
            ));
        }
        Err(e) => text.push_str(&format!("open /output: {}\n", e)),
    }
    let written = fs::File::create("/output/summary.txt")
        .and_then(|mut file| file.write_all(text.as_bytes()));
    if let Err(e) = written {
        eprintln!("cannot write /output/summary.txt: {}", e);
    }
    print!("{}", text);
    let _ = std::io::stdout().flush();
    if let Some(seconds) = env::args().nth(1).and_then(|text| text.parse::<f64>().ok()) {
        thread::sleep(Duration::from_secs_f64(seconds));
        println!("woke");
    }
}
