//! Rebuilds the crate when platform migration files change (they are embedded).
fn main() {
    // The platform migrations are embedded; rebuild when a file is added or changed.
    println!("cargo:rerun-if-changed=../../migrations");
}
