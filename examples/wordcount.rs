//! File staging: `sshwasm run examples/wordcount.rs --input DIR --output results/`
//!
//! Counts the lines and words of every file under /input (read-only) and writes one line
//! per file to /output/counts.txt, which sshwasm copies back into results/.

use std::fs;
use std::io::Write;
use std::path::Path;

fn walk(dir: &Path, found: &mut Vec<(String, usize, usize)>) {
    let mut entries: Vec<_> = match fs::read_dir(dir) {
        Ok(entries) => entries.flatten().collect(),
        Err(error) => {
            eprintln!("cannot read {}: {}", dir.display(), error);
            return;
        }
    };
    entries.sort_by_key(|entry| entry.path());
    for entry in entries {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, found);
        } else if let Ok(text) = fs::read_to_string(&path) {
            let name = path.strip_prefix("/input").unwrap_or(&path).display().to_string();
            found.push((name, text.lines().count(), text.split_whitespace().count()));
        }
    }
}

fn main() {
    let mut found = Vec::new();
    walk(Path::new("/input"), &mut found);
    let mut report = String::new();
    for (name, lines, words) in &found {
        report.push_str(&format!("{} lines={} words={}\n", name, lines, words));
    }
    match fs::File::create("/output/counts.txt").and_then(|mut f| f.write_all(report.as_bytes())) {
        Ok(()) => println!("counted {} files", found.len()),
        Err(error) => {
            eprintln!("cannot write /output/counts.txt: {}", error);
            std::process::exit(1);
        }
    }
}
