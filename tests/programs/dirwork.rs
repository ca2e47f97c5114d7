//! Works on directories as `--dir` and `--host-dir` give them: under /data it reads
//! keep.txt, creates new.txt and sub/deep.txt, appends to edit.txt, renames old.txt to
//! renamed.txt and deletes gone.txt; under /ref (read-only) it reads ref.txt and tries to
//! write, which must be refused. Prints one line per step ("STEP: ok" or "STEP: denied").
//! With argv[1], only writes /data/task-ARG.txt and appends "ARG\n" to /data/edit.txt
//! (then exits 3 if ARG is "fail").

use std::env;
use std::fs;
use std::io::Write;

fn say<T, E: std::fmt::Display>(step: &str, result: Result<T, E>) {
    match result {
        Ok(_) => println!("{}: ok", step),
        Err(e) => println!("{}: denied ({})", step, e),
    }
}

fn append(path: &str, text: &str) -> std::io::Result<()> {
    fs::OpenOptions::new().append(true).open(path)?.write_all(text.as_bytes())
}

fn main() {
    if let Some(task) = env::args().nth(1) {
        say("task file", fs::write(format!("/data/task-{}.txt", task), &task));
        say("append", append("/data/edit.txt", &format!("{}\n", task)));
        if task == "fail" {
            std::process::exit(3); // what it wrote still comes back
        }
        return;
    }
    match fs::read_to_string("/data/keep.txt") {
        Ok(text) => println!("keep: {}", text.trim()),
        Err(e) => println!("keep: denied ({})", e),
    }
    say("create", fs::write("/data/new.txt", "made by the job\n"));
    say("mkdir", fs::create_dir("/data/sub"));
    say("create deep", fs::write("/data/sub/deep.txt", "deep\n"));
    say("append", append("/data/edit.txt", "and the job\n"));
    say("rename", fs::rename("/data/old.txt", "/data/renamed.txt"));
    say("delete", fs::remove_file("/data/gone.txt"));
    say("delete dir", fs::remove_dir("/data/empty"));
    match fs::read_to_string("/ref/ref.txt") {
        Ok(text) => println!("ref: {}", text.trim()),
        Err(e) => println!("ref: denied ({})", e),
    }
    say("write ref", fs::write("/ref/new.txt", "x"));
    say("write ref existing", append("/ref/ref.txt", "x"));
    say("delete ref", fs::remove_file("/ref/ref.txt"));
    say("read host", fs::read_to_string("/etc/hostname"));
}
