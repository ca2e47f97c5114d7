//! Panics with the message "boom" (wasm32-wasi aborts on panic: the runner sees a trap).

fn main() {
    panic!("boom");
}
