//! Does not compile, on purpose: a string where a number is required (error E0308).

fn main() {
    let answer: u32 = "forty-two";
    println!("{}", answer);
}
