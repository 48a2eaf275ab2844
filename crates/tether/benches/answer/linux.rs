// The Linux body of `benches/answer.rs` (epoll and io_uring are Linux's).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

const HEARTBEAT: [u8; 4] = [0, 0, 0, 0];
/// A completion's user data: the connection, and this bit for a send's.
const SEND: u64 = 1 << 32;
/// How long a server waits before it looks at the stop flag again.
const LOOK: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Way {
    Epoll,
    Uring,
    UringDefer,
    Multishot,
}

const WAYS: [Way; 4] = [Way::Epoll, Way::Uring, Way::UringDefer, Way::Multishot];

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn serve_epoll(socks: &[TcpStream], answered: &AtomicU64, stop: &AtomicBool) -> Duration {
    // SAFETY: plain system calls on descriptors this thread keeps open for the whole call.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0, "epoll_create1: {}", std::io::Error::last_os_error());
    for (i, s) in socks.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: i as u64,
        };
        // SAFETY: as above; `ev` is valid for the call.
        let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) };
        assert_eq!(r, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut buf = [0u8; 512];
    let t0 = thread_cpu();
    while !stop.load(Relaxed) {
        // SAFETY: `events` has room for the 1,024 events asked for.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 1024, LOOK.as_millis() as i32) };
        for ev in &events[..n.max(0) as usize] {
            let fd = socks[ev.u64 as usize].as_raw_fd();
            loop {
                // SAFETY: `buf` is valid for `buf.len()` bytes.
                let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if r <= 0 {
                    break;
                }
                let heartbeats = r as usize / 4;
                for _ in 0..heartbeats {
                    // SAFETY: the answer is 4 valid bytes.
                    unsafe { libc::send(fd, HEARTBEAT.as_ptr().cast(), 4, libc::MSG_NOSIGNAL) };
                }
                answered.fetch_add(heartbeats as u64, Relaxed);
                if (r as usize) < buf.len() {
                    // Drained until the next edge: no `recv` for `EAGAIN`.
                    break;
                }
            }
        }
    }
    let cpu = thread_cpu() - t0;
    // SAFETY: the epoll is this function's.
    unsafe { libc::close(ep) };
    cpu
}

/// Queues `pending` (submitting whenever the ring is full), then waits up to [`LOOK`] for a
/// completion.
fn submit_and_wait(ring: &mut IoUring, pending: &mut Vec<squeue::Entry>) {
    let mut i = 0;
    while i < pending.len() {
        let mut pushed = 0;
        {
            let mut sq = ring.submission();
            // SAFETY: every buffer an entry names outlives the ring (the caller's buffers
            // and the static answer).
            while i + pushed < pending.len() && unsafe { sq.push(&pending[i + pushed]) }.is_ok() {
                pushed += 1;
            }
        }
        i += pushed;
        if i < pending.len() {
            ring.submit().expect("io_uring submit");
        }
    }
    pending.clear();
    let ts = types::Timespec::from(LOOK);
    let args = types::SubmitArgs::new().timespec(&ts);
    match ring.submitter().submit_with_args(1, &args) {
        Ok(_) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
        Err(e) => panic!("io_uring_enter: {e}"),
    }
}

fn answer(sock: &TcpStream, i: usize) -> squeue::Entry {
    opcode::Send::new(types::Fd(sock.as_raw_fd()), HEARTBEAT.as_ptr(), 4)
        .build()
        .user_data(SEND | i as u64)
}

fn ring(n: usize, defer: bool) -> std::io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_cqsize((4 * n).max(8192) as u32);
    if defer {
        b.setup_single_issuer().setup_defer_taskrun();
    }
    b.build(4096)
}

fn serve_uring(
    socks: &[TcpStream],
    answered: &AtomicU64,
    stop: &AtomicBool,
    defer: bool,
) -> Duration {
    let mut ring = ring(socks.len(), defer).expect("io_uring");
    let mut bufs = vec![[0u8; 16]; socks.len()];
    let recv = |i: usize, b: &mut [u8; 16]| {
        opcode::Recv::new(types::Fd(socks[i].as_raw_fd()), b.as_mut_ptr(), 16)
            .build()
            .user_data(i as u64)
    };
    let mut pending: Vec<_> = bufs.iter_mut().enumerate().map(|(i, b)| recv(i, b)).collect();
    let mut done: Vec<(u64, i32)> = Vec::new();
    let t0 = thread_cpu();
    while !stop.load(Relaxed) {
        submit_and_wait(&mut ring, &mut pending);
        done.clear();
        done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for &(ud, res) in &done {
            let i = ud as usize;
            if ud & SEND != 0 || res <= 0 {
                continue;
            }
            let heartbeats = res as usize / 4;
            pending.extend((0..heartbeats).map(|_| answer(&socks[i], i)));
            answered.fetch_add(heartbeats as u64, Relaxed);
            pending.push(recv(i, &mut bufs[i]));
        }
    }
    thread_cpu() - t0
}

/// A buffer ring of `E` buffers of `BL` bytes registered as group 0.
struct BufRing {
    entries: *mut types::BufRingEntry,
    bufs: Vec<u8>,
    tail: u16,
}

impl BufRing {
    const E: usize = 4096;
    const BL: usize = 64;

    fn new(ring: &IoUring) -> std::io::Result<BufRing> {
        // SAFETY: an anonymous private mapping (page-aligned, as the kernel requires).
        let m = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::E * std::mem::size_of::<types::BufRingEntry>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if m == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let mut r = BufRing {
            entries: m.cast(),
            bufs: vec![0u8; Self::E * Self::BL],
            tail: 0,
        };
        for bid in 0..Self::E as u16 {
            r.give(bid);
        }
        r.publish();
        // SAFETY: the mapping holds `E` entries and lives as long as the ring uses it (the
        // ring is dropped before this `BufRing`: see `serve_multishot`).
        unsafe { ring.submitter().register_buf_ring_with_flags(m as u64, Self::E as u16, 0, 0)? };
        Ok(r)
    }

    /// Puts buffer `bid` back at the tail (seen by the kernel after [`publish`](Self::publish)).
    fn give(&mut self, bid: u16) {
        // SAFETY: the index is within the `E` entries of the mapping.
        let e = unsafe { &mut *self.entries.add(self.tail as usize & (Self::E - 1)) };
        e.set_addr(self.bufs.as_ptr() as u64 + u64::from(bid) * Self::BL as u64);
        e.set_len(Self::BL as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail is the first entry's reserved field, a u16 the kernel reads.
        let tail = unsafe { &*types::BufRingEntry::tail(self.entries).cast::<AtomicU16>() };
        tail.store(self.tail, Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used.
        unsafe {
            libc::munmap(
                self.entries.cast(),
                Self::E * std::mem::size_of::<types::BufRingEntry>(),
            )
        };
    }
}

fn serve_multishot(socks: &[TcpStream], answered: &AtomicU64, stop: &AtomicBool) -> Duration {
    let mut ring = ring(socks.len(), true).expect("io_uring");
    let mut bufs = BufRing::new(&ring).expect("a registered buffer ring");
    let arm = |i: usize| {
        opcode::RecvMulti::new(types::Fd(socks[i].as_raw_fd()), 0)
            .build()
            .user_data(i as u64)
    };
    let mut pending: Vec<_> = (0..socks.len()).map(arm).collect();
    let mut done: Vec<(u64, i32, u32)> = Vec::new();
    let t0 = thread_cpu();
    while !stop.load(Relaxed) {
        submit_and_wait(&mut ring, &mut pending);
        done.clear();
        done.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(ud, res, flags) in &done {
            if ud & SEND != 0 {
                continue;
            }
            let i = ud as usize;
            if let Some(bid) = cqueue::buffer_select(flags) {
                bufs.give(bid);
            }
            if res > 0 {
                let heartbeats = res as usize / 4;
                pending.extend((0..heartbeats).map(|_| answer(&socks[i], i)));
                answered.fetch_add(heartbeats as u64, Relaxed);
            }
            // Ended without more to come because the buffers ran out: armed again (not at
            // the end of the stream or on an error, which would only end it again).
            if !cqueue::more(flags) && (res > 0 || res == -libc::ENOBUFS) {
                pending.push(arm(i));
            }
        }
        bufs.publish();
    }
    let cpu = thread_cpu() - t0;
    drop(ring);
    drop(bufs);
    cpu
}

/// One round of one way (`per_tick` heartbeats a millisecond): µs of the server thread's
/// CPU per heartbeat, and how many.
fn round(way: Way, n: usize, per_tick: usize, secs: f64) -> (f64, u64) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let (mut clients, mut servers) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let c = TcpStream::connect(addr).expect("connect");
        let (s, _) = l.accept().expect("accept");
        for t in [&c, &s] {
            t.set_nodelay(true).expect("nodelay");
            t.set_nonblocking(true).expect("nonblocking");
        }
        clients.push(c);
        servers.push(s);
    }
    let answered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (answered, stop) = (answered.clone(), stop.clone());
        std::thread::spawn(move || match way {
            Way::Epoll => serve_epoll(&servers, &answered, &stop),
            Way::Uring => serve_uring(&servers, &answered, &stop, false),
            Way::UringDefer => serve_uring(&servers, &answered, &stop, true),
            Way::Multishot => serve_multishot(&servers, &answered, &stop),
        })
    };
    // The server's setup (registrations, the first requests) is not counted: it has begun
    // by the time the first heartbeat goes.
    std::thread::sleep(Duration::from_millis(300));
    let (start, mut tick, mut next, mut sent) = (Instant::now(), 0u64, 0usize, 0u64);
    let mut buf = [0u8; 64];
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..per_tick {
            if (&clients[next]).write(&HEARTBEAT).is_ok() {
                sent += 1;
            }
            next = (next + 1) % n;
        }
        // The answers to the clump before last (each socket's answer has had a tick).
        for k in 0..per_tick {
            let i = (next + 2 * n - 2 * per_tick + k) % n;
            while matches!((&clients[i]).read(&mut buf), Ok(r) if r > 0) {}
        }
        tick += 1;
        if let Some(d) = (start + Duration::from_millis(tick)).checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    // Every heartbeat answered, however busy the machine (a bound, not a measure).
    let waited = Instant::now();
    while answered.load(Relaxed) < sent && waited.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Relaxed);
    let cpu = server.join().expect("server thread");
    let a = answered.load(Relaxed);
    assert_eq!(a, sent, "{way:?}: {a} of {sent} heartbeats answered");
    (cpu.as_secs_f64() * 1e6 / a.max(1) as f64, a)
}

fn main() {
    let full = !common::quick();
    let mut numbers = std::env::args().skip(1).filter_map(|a| a.parse::<u64>().ok());
    let n = numbers.next().unwrap_or(if full { 9_000 } else { 200 }) as usize;
    let rate = numbers.next().unwrap_or(if full { 10_000 } else { 2_000 });
    let (rounds, secs) = if full { (4, 10.0) } else { (1, 0.5) };
    // Each socket's answer is read two clumps after its heartbeat: two clumps must fit.
    let clump = (rate / 1000).max(1) as usize;
    if n < 2 * clump {
        eprintln!(
            "answer: {n} connections cannot carry {rate} heartbeats/s in 1 ms clumps of {clump}: \
             give at least {} connections (or a lower rate)",
            2 * clump
        );
        std::process::exit(2);
    }
    if let Err(e) = ring(8, false) {
        eprintln!("answer: io_uring is not available here ({e}): nothing to compare");
        std::process::exit(1);
    }
    println!("{n} connections, {rate} heartbeats/s in 1 ms clumps, {rounds} round(s) of {secs} s per way");
    let mut times = vec![Vec::new(); WAYS.len()];
    for r in 0..rounds {
        // Each way goes first in turn: a machine that drifts favours none.
        for k in 0..WAYS.len() {
            let w = (k + r) % WAYS.len();
            let (us, a) = round(WAYS[w], n, clump, secs);
            println!("  round {} {:<12} {us:>6.2} µs per heartbeat ({a} answered)", r + 1, format!("{:?}", WAYS[w]));
            times[w].push(us);
        }
    }
    let epoll = common::spread(&times[0]).0;
    for (w, t) in WAYS.iter().zip(times) {
        let m = common::spread(&t).0;
        println!("  {:<12} median {m:>6.2} µs per heartbeat ({:.2}x epoll)", format!("{w:?}"), m / epoll);
    }
}
