//! The greeting the cargo-hello example prints, in a crate of its own.

/// A greeting for `name`.
pub fn greeting(name: &str) -> String {
    format!("hello from Cargo, {}!", name)
}
