//! What the server's heap holds per idle connection (issue 17 target 1), counted by a
//! tracking allocator over real loopback: every block allocated on the server's thread and
//! still live, by requested size, its glibc chunk size beside it (16 B granularity, 8 B
//! header, 32 B minimum: fewer blocks matter as much as fewer bytes).
//!
//! The server runs on this test's thread (a current-thread runtime) and on the threads it
//! starts (the lot's), the clients on a runtime of their own whose threads are marked
//! untracked, so every allocation of the server's is counted, whichever thread made it (the
//! lot's parked entries, wakers and deadline heap included), and none of the clients'. The figure
//! per connection is the difference between two snapshots (`N1` and `N2` idle clients, each
//! after a heartbeat exchange and with every connection parked) divided by `N2 - N1`: what
//! the server keeps for one more idle client, tables' growth included, constants excluded.
//!
//! `cargo test -p tether --test idle_alloc -- --nocapture` prints the blocks per connection;
//! with `TETHER_IDLE_ALLOC_SITES=1` also the owner of each row: where one of its blocks was
//! allocated (a backtrace per allocation between the snapshots, the first frames in tether;
//! capturing and resolving them takes seconds, so the test suite skips it). The bounds fail
//! when an idle connection's heap grows back.
//!
//! The counts are 100 and 500 by default; `TETHER_IDLE_ALLOC_N=N2` (or `N1,N2`) measures
//! 100 → `N2` (or `N1` → `N2`) instead: the tables' share depends on N (their growth by
//! doubling, hash load, B-tree fill). Beyond 8,000 clients the two ends of every connection
//! no longer fit this process's open files (20,000 here): the clients then run in a child
//! process (this binary's `idle_connection_heap` again, as the clients). The bounds below are checked
//! only for the default counts.
//!
//! Then it counts the server's allocations over 3 s of idleness (every connection parked,
//! woken by its client's heartbeats): none. A parked connection's wake-up thaws its frozen
//! `Conn` on the stack and answers into the transmit buffer its lot lends it (one per lot,
//! given back with the write); it allocated that buffer per heartbeat until 2026-12-01.
//! With `TETHER_IDLE_ALLOC_SITES=1` it prints where any come from.

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use tether::{Connection, Policy, Server, ServerConfig};

struct Tracking;

struct Rec {
    size: usize,
    site: Option<Box<Backtrace>>,
}

static LIVE: Mutex<Option<HashMap<usize, Rec>>> = Mutex::new(None);
/// Capture a backtrace per tracked block (slow: only for a few connections).
static SITES: AtomicBool = AtomicBool::new(false);
/// Tracking is on (between the start of the measurement and its end).
static TRACK: AtomicBool = AtomicBool::new(false);
/// Tracked allocations so far (the server's, while tracking is on).
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
/// Where the allocations made while idle come from (on request), by site.
static IDLE_SITES: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);
static WANT_IDLE_SITES: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This thread is the clients' (its allocations are not the server's).
    static CLIENT: Cell<bool> = const { Cell::new(false) };
    /// Inside the tracker (its own allocations are not tracked).
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

fn guarded(f: impl FnOnce()) {
    let entered = BUSY.try_with(|b| !b.replace(true)).unwrap_or(false);
    if entered {
        f();
        let _ = BUSY.try_with(|b| b.set(false));
    }
}

fn lock_live() -> std::sync::MutexGuard<'static, Option<HashMap<usize, Rec>>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn note_alloc(p: *mut u8, size: usize) {
    if p.is_null() || !TRACK.load(Relaxed) || CLIENT.try_with(Cell::get).unwrap_or(true) {
        return;
    }
    // The tracker's own allocations (its maps, the backtraces) are not the server's.
    if BUSY.try_with(Cell::get).unwrap_or(true) {
        return;
    }
    ALLOCS.fetch_add(1, Relaxed);
    if WANT_IDLE_SITES.load(Relaxed) {
        guarded(|| {
            let site = tether_frames(&Backtrace::force_capture());
            let mut m = IDLE_SITES.lock().unwrap_or_else(|e| e.into_inner());
            *m.get_or_insert_with(HashMap::new).entry(site).or_insert(0) += 1;
        });
    }
    guarded(|| {
        let site = SITES
            .load(Relaxed)
            .then(|| Box::new(Backtrace::force_capture()));
        lock_live()
            .get_or_insert_with(HashMap::new)
            .insert(p as usize, Rec { size, site });
    });
}

fn note_free(p: *mut u8) {
    guarded(|| {
        let gone = lock_live().as_mut().and_then(|m| m.remove(&(p as usize)));
        drop(gone);
    });
}

// SAFETY: every call is passed to the system allocator unchanged; the bookkeeping around it
// neither reads nor writes the blocks.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's layout, passed on.
        let p = unsafe { System.alloc(l) };
        note_alloc(p, l.size());
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(l) };
        note_alloc(p, l.size());
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        note_free(p);
        // SAFETY: a block this allocator handed out, with its layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: a block this allocator handed out, with its layout.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            note_free(p);
            note_alloc(q, new);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// glibc's chunk for a request of `size` bytes (x86-64): 8 B header, 16 B steps, 32 B least.
fn chunk(size: usize) -> usize {
    ((size + 8 + 15) & !15).max(32)
}

/// Live tracked blocks by requested size.
fn snapshot() -> BTreeMap<usize, i64> {
    let mut h = BTreeMap::new();
    guarded(|| {
        if let Some(m) = lock_live().as_ref() {
            for r in m.values() {
                *h.entry(r.size).or_insert(0i64) += 1;
            }
        }
    });
    h
}

fn policy() -> Policy {
    Policy::builder(Duration::from_secs(3))
        .heartbeat(Duration::from_secs(1))
        .build()
        .expect("a policy")
}

/// Where the clients run: on a runtime of this process whose threads are untracked, or in
/// a child process (this binary's `idle_connection_heap`, told by [`CHILD_ENV`]) when both ends of every connection
/// would not fit this process's open files.
enum Clients {
    Here {
        rt: tokio::runtime::Runtime,
        keep: Vec<Connection>,
    },
    Child {
        child: std::process::Child,
        stdin: Option<std::process::ChildStdin>,
    },
}

/// The child process that runs the clients (see [`Clients`]) reads this server address.
const CHILD_ENV: &str = "TETHER_IDLE_ALLOC_SERVER";

/// Opens the clients with ids in `ids` to `addr`, each with the test's policy.
async fn connect_all(addr: std::net::SocketAddr, ids: std::ops::Range<usize>) -> Vec<Connection> {
    let mut v = Vec::with_capacity(ids.len());
    for i in ids {
        let c = Connection::connect(addr, &format!("client-{i:05}"), &policy())
            .await
            .expect("connect");
        v.push(c);
    }
    v
}

/// Opens `ids` clients from the client thread (or process) and waits until the server holds
/// `total` connections parked, then a little more than a heartbeat interval (every
/// connection has been woken by heartbeats since it parked) and until all are parked again.
async fn add_clients(
    server: &tether::ServerHandle,
    clients: &mut Clients,
    ids: std::ops::Range<usize>,
) {
    let addr = server.local_addr();
    let total = ids.end;
    match clients {
        Clients::Here { rt, keep } => {
            let opened = rt
                .spawn(connect_all(addr, ids))
                .await
                .expect("the client task");
            keep.extend(opened);
        }
        Clients::Child { stdin, .. } => {
            use std::io::Write;
            let w = stdin.as_mut().expect("the child's stdin");
            writeln!(w, "{} {}", ids.start, ids.end).expect("a command to the clients' child");
            w.flush().expect("a command to the clients' child");
        }
    }
    until_parked(server, total).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    until_parked(server, total).await;
}

/// `(N1, N2)`: 100 and 500, or `TETHER_IDLE_ALLOC_N` (`N2`, or `N1,N2`).
fn counts() -> (usize, usize) {
    let Ok(v) = std::env::var("TETHER_IDLE_ALLOC_N") else {
        return (100, 500);
    };
    let n: Vec<usize> = v
        .split(',')
        .map(|s| s.trim().parse().expect("TETHER_IDLE_ALLOC_N: N2 or N1,N2"))
        .collect();
    let (n1, n2) = match n[..] {
        [n2] => (100, n2),
        [n1, n2] => (n1, n2),
        _ => panic!("TETHER_IDLE_ALLOC_N: N2 or N1,N2"),
    };
    assert!(n1 >= 1 && n1 < n2, "TETHER_IDLE_ALLOC_N: 1 <= N1 < N2");
    (n1, n2)
}

async fn until_parked(server: &tether::ServerHandle, n: usize) {
    // Up to 30 s (and 1 s more per 100 clients): a loaded machine may take a while to
    // connect thousands of clients.
    for _ in 0..3000 + n {
        let m = server.metrics();
        if m.parked == n && m.presence.online == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let m = server.metrics();
    panic!(
        "{} parked, {} online; expected {n}",
        m.parked, m.presence.online
    );
}

/// The first frames of `bt` that are tether's own (not std, tokio or this test).
fn tether_frames(bt: &Backtrace) -> String {
    let s = bt.to_string();
    let frames: Vec<&str> = s
        .lines()
        .map(str::trim)
        .filter_map(|l| l.split_once(": ").map(|(_, f)| f))
        .filter(|f| f.starts_with("tether") && !f.starts_with("idle_alloc"))
        .take(3)
        .collect();
    if frames.is_empty() {
        // Not tether's: the first frames outside the allocator and std.
        let rest: Vec<&str> = s
            .lines()
            .map(str::trim)
            .filter_map(|l| l.split_once(": ").map(|(_, f)| f))
            .filter(|f| {
                ![
                    "std::",
                    "alloc::",
                    "core::",
                    "idle_alloc",
                    "<idle_alloc",
                    "__rust",
                    "<alloc",
                    "<core",
                    "<std",
                ]
                .iter()
                .any(|p| f.starts_with(p))
            })
            .take(3)
            .collect();
        rest.join(" < ")
    } else {
        frames.join(" < ")
    }
}

/// The live blocks' addresses.
fn live_set() -> HashSet<usize> {
    let mut s = HashSet::new();
    guarded(|| {
        if let Some(m) = lock_live().as_ref() {
            s.extend(m.keys().copied());
        }
    });
    s
}

/// For each requested size, where one of its live blocks allocated since `before` (with a
/// site captured) came from: the owner of that row of the table.
fn owners(before: &HashSet<usize>) -> HashMap<usize, String> {
    let mut one: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    let mut sites = HashMap::new();
    guarded(|| {
        if let Some(m) = lock_live().as_ref() {
            for (&p, r) in m {
                if r.site.is_some() && !before.contains(&p) {
                    let e = one.entry(r.size).or_insert((p, 0));
                    e.1 += 1;
                }
            }
            for (&size, &(p, _)) in &one {
                if let Some(bt) = m.get(&p).and_then(|r| r.site.as_deref()) {
                    sites.insert(size, tether_frames(bt));
                }
            }
        }
    });
    sites
}

/// The clients of a child process (see [`Clients`]): for each line `a b` read from stdin,
/// clients `a..b` are opened to the server at `addr`; kept until stdin ends.
fn child_clients(addr: &str) {
    use std::io::BufRead;
    let addr: std::net::SocketAddr = addr.parse().expect("the server's address");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("client runtime");
    let mut keep = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("a command");
        let (a, b) = line.split_once(' ').expect("a command: a b");
        let ids = a.parse().expect("a")..b.parse().expect("b");
        keep.extend(rt.block_on(connect_all(addr, ids)));
    }
}

#[test]
fn idle_connection_heap() {
    // Started by this test as the clients' process (see `Clients`): only that.
    if let Ok(addr) = std::env::var(CHILD_ENV) {
        return child_clients(&addr);
    }
    let (n1, n2) = counts();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("server runtime");
    rt.block_on(async {
        let cfg = ServerConfig::new("127.0.0.1:0".parse().expect("an address"))
            .policy(policy())
            // Every client comes from 127.0.0.1 (a per-source limit would refuse thousands).
            .max_connections(n2 + 100)
            .max_connections_per_source(n2 + 100);
        let mut server = Server::bind(cfg).await.expect("bind");
        let h = server.handle();
        // Events are taken, as an application does (the bench server drains them too).
        tokio::spawn(async move { while server.next_event().await.is_some() {} });
        let mut clients = if n2 > 8000 {
            let mut child = std::process::Command::new(std::env::current_exe().expect("this test"))
                .args(["--exact", "idle_connection_heap", "--nocapture"])
                .env(CHILD_ENV, h.local_addr().to_string())
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("the clients' process");
            let stdin = child.stdin.take();
            Clients::Child { child, stdin }
        } else {
            Clients::Here {
                rt: tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .on_thread_start(|| CLIENT.with(|c| c.set(true)))
                    .enable_all()
                    .build()
                    .expect("client runtime"),
                // The clients are kept here, on the server's thread: room made before
                // tracking starts.
                keep: Vec::with_capacity(n2 + 1),
            }
        };
        TRACK.store(true, Relaxed);
        add_clients(&h, &mut clients, 0..n1).await;
        let a = snapshot();
        // Where each block comes from (on request: slow): a backtrace per allocation.
        let want_sites = std::env::var_os("TETHER_IDLE_ALLOC_SITES").is_some();
        let before = if want_sites { live_set() } else { HashSet::new() };
        SITES.store(want_sites, Relaxed);
        add_clients(&h, &mut clients, n1..n2).await;
        SITES.store(false, Relaxed);
        let b = snapshot();
        let owner = if want_sites { owners(&before) } else { HashMap::new() };

        let n = (n2 - n1) as f64;
        let mut rows = Vec::new();
        let (mut blocks, mut req, mut chunks) = (0f64, 0f64, 0f64);
        // A connection's own blocks (one each, or nearly) apart from the shared tables'
        // nodes and growth (amortized: a table that doubled between the snapshots counts
        // its whole new block, so this part moves by a few tens of bytes from run to run).
        let (mut own_blocks, mut own_chunks) = (0f64, 0f64);
        for (&size, &cb) in &b {
            let d = cb - a.get(&size).copied().unwrap_or(0);
            if d == 0 {
                continue;
            }
            let per = d as f64 / n;
            blocks += per;
            req += per * size as f64;
            chunks += per * chunk(size) as f64;
            if per >= 0.5 {
                own_blocks += per;
                own_chunks += per * chunk(size) as f64;
            }
            rows.push((size, per));
        }
        eprintln!("per idle connection ({n1} -> {n2} clients), live blocks by requested size:");
        eprintln!(
            "{:>8} {:>8} {:>10} {:>10}  owner",
            "size", "chunk", "blocks/c", "chunk B/c"
        );
        for (size, per) in &rows {
            if (per * chunk(*size) as f64).abs() >= 1.0 {
                eprintln!(
                    "{size:>8} {:>8} {per:>10.2} {:>10.1}  {}",
                    chunk(*size),
                    per * chunk(*size) as f64,
                    owner.get(size).map_or("", String::as_str)
                );
            }
        }
        eprintln!(
            "total: {blocks:.2} blocks, {req:.0} B requested, {chunks:.0} B in glibc chunks per connection"
        );
        eprintln!(
            "of which the connection's own blocks: {own_blocks:.2}, {own_chunks:.0} B; tables: {:.0} B",
            chunks - own_chunks
        );

        // Idle: every connection parked, woken by its client's heartbeat once a second
        // (and answering it) for 3 s. A wake-up thaws the parked `Conn` on the stack,
        // answers into the transmit buffer its lot lends it (`Yard::spare`, back with the
        // write: an idle connection holds none) and freezes it back: nothing allocated.
        // With sites on, the table below says where any come from.
        let allocs = ALLOCS.load(Relaxed);
        WANT_IDLE_SITES.store(want_sites, Relaxed);
        tokio::time::sleep(Duration::from_secs(3)).await;
        WANT_IDLE_SITES.store(false, Relaxed);
        let idle_allocs = ALLOCS.load(Relaxed) - allocs;
        until_parked(&h, n2).await;
        if let Some(m) = IDLE_SITES.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let mut v: Vec<_> = m.into_iter().collect();
            v.sort_by_key(|b| std::cmp::Reverse(b.1));
            for (site, n) in v.iter().take(12) {
                eprintln!("{n:>8}  {site}");
            }
        }
        let per_wake = idle_allocs as f64 / (3 * n2) as f64;
        eprintln!(
            "while idle: {idle_allocs} allocations in 3 s for {n2} connections ({per_wake:.3} per heartbeat)"
        );
        // 0 measured (0.000 per heartbeat, debug and release; 1.000 while each answer was
        // encoded into a buffer of its own). The slack is for a table's growth by an
        // eighth (the lot's heap, should its places peak); an allocation per wake-up,
        // for the answer, the thaw or anything else, gives 1 or more.
        assert!(
            per_wake <= 0.01,
            "{per_wake:.3} allocations per idle heartbeat"
        );

        TRACK.store(false, Relaxed);
        match clients {
            Clients::Here { rt, keep } => {
                drop(keep);
                rt.shutdown_background();
            }
            Clients::Child { mut child, stdin } => {
                drop(stdin); // the child's clients end with its input
                let status = child.wait().expect("the clients' process");
                assert!(status.success(), "the clients' process: {status}");
            }
        }
        if (n1, n2) != (100, 500) {
            return; // the bounds are for the default counts
        }

        // Bounds (issue 17): what an idle plain-TCP connection keeps on the server's heap,
        // every server thread counted (the lot's included). Own blocks: the client id (a 32 B
        // chunk), the lot entry (the driver's compact form and, frozen inline without its
        // counters, its `Conn`; its socket parked in one word), `Shared` (120 B, a 128 B
        // chunk): 384 B of chunks in 3 blocks in a release build and in a debug one
        // (`scripts/test`'s): the entry is 216 B in both, a 224 B chunk. 400 B while the entry
        // was 232 B (a 240 B chunk; 224 B with the frozen liveness engine's heartbeats sent
        // gone, the socket still parked in 16 B); 464 B while `Shared` kept its queues' byte
        // counts and a `Notify` for its waiting senders (a 192 B chunk); 480 / 496 B while the
        // entry kept the whole `Tcp` (32 B, 40 in debug: entry 248 / 256 B); 496 B both while
        // the sink boxed its probe request apart (entry 256 / 264 B, a 272 B chunk both); 528 /
        // 544 B while the frozen `Conn` kept its counters (entry 296 / 304 B); 576 / 592 B
        // while the entry kept the whole driver (344 / 352 B); 608 B while the sink kept a
        // 32-byte `SocketAddr` and an `Option<u64>`; 688 B in 4 with a waker `Arc` per entry
        // and a 16-byte `Arc<str>` id in the sink; 912 B in 5 while the `Conn` was a 368 B
        // block of its own beside a 256 B entry; 928 B before `Shared` shared its settings.
        // (tokio's I/O registration lives in its slab pages, counted with the tables.)
        assert!(own_blocks <= 3.1, "{own_blocks:.2} blocks of its own per idle connection");
        assert!(own_chunks <= 392.0, "{own_chunks:.0} B of its own per idle connection");
        // With the tables' share (presence and client records, the lot's slab, heap and slot
        // states): 544-546 B measured in release and in debug at 500 (523 B at 5,000, 552 B
        // before the two steps below; 556-559 B (536 B) with a 16 B client record, the
        // connection beside the box of the rare ones, now one word; 577-579 B with a 64 B
        // presence slot, its counts inline and a box each for
        // its end and its counters, now one box a first connection lacks; 590-593 B with a
        // 24 B client record; 607-608 B with a 240 B entry chunk; 659 B with 16 B lot slab slots, 16 B heap places, the
        // presence B-tree holding its 64 B slots in its nodes and the lot's slab and heap
        // growing by doubling; at 500 the slab's steps of 64 places move this figure by ten
        // bytes or so either way; 728 / 702-723 B while `Shared` kept its queues' byte counts
        // and a `Notify`; 744 / 755 B with the whole `Tcp` parked, 760 / 755 B with the
        // sink's own probe box, 794 / 803 B while the frozen `Conn` kept its counters, 835 /
        // 851 B while the entry kept the whole driver, 867 B with the larger sink, 992 B with
        // a waker `Arc` per entry and ids as 16-byte `Arc<str>` keys, 1,216 B before the
        // parked `Conn` was frozen, 1,346 B before the presence slot, the client record and
        // `Shared` shrank; the tables' share moves by a few tens of bytes run to run).
        assert!(chunks <= 555.0, "{chunks:.0} B per idle connection");
    });
}
