//! tether-lab: reproduce real middlebox failures in Linux network namespaces and measure how
//! fast each detection method notices them, on both sides of the connection.
//!
//! Real kernels, not mocks: a userspace proxy cannot reproduce a half-open connection
//! faithfully (its own kernel answers keepalives), but three namespaces joined by veth pairs,
//! with nftables NAT and conntrack on the one in the middle, can.
//!
//! ```text
//!   client ns ──veth── router ns ──veth── server ns
//!   (side thread       nft NAT, conntrack,  (side thread
//!    or peer process)  fault rules          or peer process)
//!
//!   Cell = fault × method × topology ─▶ Lab::run_cell ─▶ CellResult { client, server }
//!   Lab::run_matrix runs cells in parallel ─▶ report::{text_table, markdown, write_json, write_svg}
//! ```
//!
//! - [`Topology`]: the namespaces, veths, addresses (198.18.0.0/15, unique per run) and the
//!   router's rules; an RAII guard and a SIGINT/SIGTERM handler remove everything.
//! - [`Fault`]: what breaks, each documented with the real-world cause and its source.
//! - [`Method`]: how the application detects it (`os-default`, `keepalive`, `user-timeout`,
//!   `idle-timer`, `tether`), all configured from one derived policy ([`Scale::policy`]).
//! - [`ClientNet`]: a namespace for a bench's load generators behind one veth pair whose
//!   receive runs in kernel threads (`tether bench hold --clients-over veth`).
//! - [`cluster::ClusterTopology`]: clients, a load-balancing router, N `tether serve
//!   --cluster` hosts and Redis, for the cluster's failure tests (`tests/cluster.rs`).
//! - [`Lab`]: runs cells; [`report`] turns results into tables, JSON and a chart, and
//!   [`report::check`] tests the claims (tether within its bound + 25%, no false deaths).
//!
//! What it deliberately does not do: emulate latency or loss (`tc netem` is not available on
//! every kernel; nftables and conntrack are), run on anything but Linux, or run without root.
//! Durations are scaled down ([`Scale`]); the scale is printed with every result.
//!
//! Unlike the core crate, the lab uses `unsafe` for three libc calls (`setns`, `geteuid`,
//! `kill`), each with a SAFETY comment.

pub mod client_cmd;
pub mod clientnet;
pub mod cluster;
pub mod error;
pub mod fault;
pub mod method;
pub mod peer;
pub mod report;
pub mod run;
mod side;
pub mod sys;
pub mod test_tls;
mod tether_method;
pub mod topology;

pub use client_cmd::ClientCommand;
pub use clientnet::ClientNet;
pub use error::LabError;
pub use fault::{Fault, FaultKind};
pub use method::{Method, Scale};
pub use peer::{peer_main, PeerCommand};
pub use run::{Cell, CellResult, Hook, Lab, Outcome, Progress};
pub use sys::{check_environment, enter_netns};

/// Why the lab cannot run here — `TETHER_LAB_SKIP` is set, not root, or a tool is missing —
/// or `None` when it can. Tests report it with [`report_skip`] and return.
pub fn skip_reason() -> Option<String> {
    if let Some(v) = std::env::var_os("TETHER_LAB_SKIP") {
        let v = v.to_string_lossy();
        return Some(if v.is_empty() || v == "1" {
            "TETHER_LAB_SKIP is set".into()
        } else {
            format!("TETHER_LAB_SKIP is set ({v})")
        });
    }
    check_environment().err().map(|e| e.to_string())
}

/// Reports that test `test` did not run, and why, in the form `scripts/test` collects: one
/// line `SKIP: <test>: <reason>` on stderr. It is written straight to the stream in one
/// write (the test harness captures `eprintln!` of passing tests, and parallel tests must not
/// interleave inside a line), so the script can count the skipped tests of each test binary
/// and never report them as passed.
pub fn report_skip(test: &str, why: &str) {
    use std::io::Write;
    let why = why.replace('\n', " ");
    let line = format!("\nSKIP: {test}: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// [`skip_reason`], reported for `test` with [`report_skip`]: `true` when the test must
/// return without running.
pub fn skip_test(test: &str) -> bool {
    match skip_reason() {
        Some(why) => {
            report_skip(test, &why);
            true
        }
        None => false,
    }
}

/// Runs `f` on a new thread that first enters network namespace `ns`: every socket it makes
/// belongs to that namespace. Panics (in that thread) when the namespace cannot be entered.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        if let Err(e) = enter_netns(&ns) {
            panic!("cannot enter network namespace {ns}: {e}");
        }
        f()
    })
}

/// Runs `fut` to completion on a current-thread tokio runtime, on a new thread inside
/// network namespace `ns` (see [`spawn_in_netns`]).
pub fn spawn_async_in_netns<T: Send + 'static>(
    ns: &str,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    spawn_in_netns(ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime")
            .block_on(fut)
    })
}
pub use topology::{Role, Shape, Topology};

/// Every cell for the given faults, methods and shapes, in report order.
pub fn cells(faults: &[Fault], methods: &[Method], shapes: &[Shape]) -> Vec<Cell> {
    let mut out = Vec::new();
    for &fault in faults {
        for &shape in shapes {
            for &method in methods {
                out.push(Cell {
                    fault,
                    method,
                    shape,
                });
            }
        }
    }
    out
}
