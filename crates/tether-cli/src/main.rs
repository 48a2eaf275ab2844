//! The tether command (temporary skeleton on the presence branch).
// TEMPORARY (presence branch): `mod http;` so the status server compiles and its tests run
// before `tether serve` wires it in. The lead replaces this file; keep only the `mod http;`.
#[allow(dead_code)]
mod http;

fn main() {}
