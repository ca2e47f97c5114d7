//! A job that fails on purpose: a line on stderr, then exit code 3.

fn main() {
    eprintln!("about to fail");
    std::process::exit(3);
}
