//! Prints "spinning", then burns CPU forever: only a time limit ends it.

use std::ptr;

fn main() {
    println!("spinning");
    let mut counter: u64 = 0;
    loop {
        // A volatile write is a side effect the optimiser must keep, so the loop stays busy.
        counter = counter.wrapping_add(1);
        unsafe { ptr::write_volatile(&mut counter, counter) };
    }
}
