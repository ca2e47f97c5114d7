//! Prints everything a job is given besides stdin: `argv <value>` for each argument
//! (the program name first), then `env <NAME>=<value>` for every environment variable, in
//! the order the guest sees them. Nothing is filtered, so a leaked variable shows.

use std::env;

fn main() {
    for argument in env::args_os() {
        println!("argv {}", argument.to_string_lossy());
    }
    for (name, value) in env::vars_os() {
        println!("env {}={}", name.to_string_lossy(), value.to_string_lossy());
    }
}
