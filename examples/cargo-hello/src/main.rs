//! Prints the greeting of its path dependency, for the name in its first argument.

fn main() {
    let name = std::env::args().nth(1).unwrap_or_else(|| "wasm".to_string());
    println!("{}", greeting::greeting(&name));
}
