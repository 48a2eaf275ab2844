//! The lot's deadline heap (`driver/park.rs`, `Deadlines`): a push and a pop per answered
//! heartbeat, on a heap of one 12 B place per idle connection, with the caches cold between
//! operations (on a lot thread a heartbeat's kernel work runs in between). Compares the
//! standard library's binary heap with `dary_heap`'s four- and eight-ary heaps, alternating,
//! and prints each one's median time per push and pop.
//!
//! `cargo bench -p tether --bench deadlines [-- --bench] [N]` (N places, 19,000 by default;
//! under `cargo test --all-targets` it runs a quick smoke version).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use dary_heap::{OctonaryHeap, QuaternaryHeap};

/// As the lot's `Place`: a deadline (ns) and a slot, 12 B.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(C, packed(4))]
struct Place {
    at: i64,
    idx: u32,
}

trait Heap {
    fn push(&mut self, p: Place);
    fn pop(&mut self) -> Option<Place>;
}

macro_rules! heap {
    ($t:ty) => {
        impl Heap for $t {
            fn push(&mut self, p: Place) {
                <$t>::push(self, Reverse(p));
            }
            fn pop(&mut self) -> Option<Place> {
                <$t>::pop(self).map(|r| r.0)
            }
        }
    };
}
heap!(BinaryHeap<Reverse<Place>>);
heap!(QuaternaryHeap<Reverse<Place>>);
heap!(OctonaryHeap<Reverse<Place>>);

/// xorshift64: the same deadlines for every heap.
fn next(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Nanoseconds per pop + push over `ops` operations on `n` places: each pops the earliest
/// deadline and pushes the connection's next one, an interval (30 s) and up to 1 ms later,
/// after 256 KiB of `evict` were written (what the kernel's TCP work does to the caches).
fn run(heap: &mut dyn Heap, n: usize, ops: usize, evict: &mut [u8]) -> f64 {
    const INTERVAL: i64 = 30_000_000_000;
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for idx in 0..n as u32 {
        let at = (next(&mut s) % INTERVAL as u64) as i64;
        heap.push(Place { at, idx });
    }
    let mut spent = 0u128;
    let mut now = 0i64;
    for _ in 0..ops {
        let from = (next(&mut s) as usize % 32) << 18;
        for i in (0..256 << 10).step_by(64) {
            let j = (from + i) % evict.len();
            evict[j] = evict[j].wrapping_add(1);
        }
        let t = Instant::now();
        let p = heap.pop().expect("n places");
        now = now.max(p.at);
        let at = now + INTERVAL + (next(&mut s) % 1_000_000) as i64;
        heap.push(Place { at, idx: p.idx });
        spent += t.elapsed().as_nanos();
    }
    spent as f64 / ops as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    let n = args
        .iter()
        .skip(1)
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(19_000);
    let (rounds, ops) = if full { (7, 200_000) } else { (1, 2_000) };
    let mut evict = vec![0u8; 8 << 20];
    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    for r in 0..rounds {
        // Each heap goes first in turn: a machine that drifts favours none.
        for k in 0..3 {
            let which = (k + r) % 3;
            let t = match which {
                0 => run(&mut BinaryHeap::new(), n, ops, &mut evict),
                1 => run(&mut QuaternaryHeap::new(), n, ops, &mut evict),
                _ => run(&mut OctonaryHeap::new(), n, ops, &mut evict),
            };
            times[which].push(t);
        }
    }
    println!(
        "{n} places, {rounds} round{} of {ops} pops and pushes, caches evicted between them",
        if rounds == 1 { "" } else { "s" }
    );
    let binary = median(times[0].clone());
    for (name, t) in ["binary (std)", "4-ary", "8-ary"].iter().zip(times) {
        let m = median(t);
        println!(
            "  {name:<13} {m:>7.1} ns per pop + push ({:.2}x binary)",
            m / binary
        );
    }
}
