//! What `io_uring` would save a lot thread per answered heartbeat (issue 17, target 2).
//!
//! N loopback connections. A client thread sends 4-byte heartbeats at a steady rate in
//! 1 ms clumps (round robin, as a fleet's timers do) and drains the answers; a server
//! thread answers each with 4 bytes, one of four ways, in turn:
//!
//! - `epoll`: edge-triggered `epoll_wait`, then a `recv` and a `send` per heartbeat, and no
//!   second `recv` after a short read — what a lot thread does (`driver/park.rs`);
//! - `uring`: `io_uring`, one outstanding `recv` per connection; each completion is answered
//!   by a `send` and a new `recv`, all submitted together, one `io_uring_enter` per loop;
//! - `uring-defer`: the same with `SINGLE_ISSUER | DEFER_TASKRUN` (completions run only in
//!   `io_uring_enter`);
//! - `multishot`: one multishot `recv` per connection on a registered buffer ring (a buffer
//!   given back by a memory write, not a request), `DEFER_TASKRUN`: a heartbeat costs one
//!   `send` request and its share of an `io_uring_enter`.
//!
//! The figure: the server thread's CPU (`CLOCK_THREAD_CPUTIME_ID`; on loopback it includes
//! the client's receive, run inside the answer's send, as in `tether bench hold`) per
//! heartbeat answered, each way's median over the rounds.
//!
//! `cargo bench -p tether --bench answer [-- --bench] [N] [RATE]` (9,000 connections and
//! 10,000 heartbeats/s by default: 18,000 descriptors in one process; under
//! `cargo test --all-targets` it runs a quick pass that checks every heartbeat is answered).

#[cfg(target_os = "linux")]
mod common;
#[cfg(target_os = "linux")]
include!("answer/linux.rs");

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("answer: epoll and io_uring are Linux's; nothing to compare here");
}
