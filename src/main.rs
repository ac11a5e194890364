//! `lumen`: the one command-line binary.

fn main() {
    println!("lumen {}", env!("CARGO_PKG_VERSION"));
}
