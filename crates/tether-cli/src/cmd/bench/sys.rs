//! What the bench reads from the kernel: a process's memory and CPU, socket memory, slabs, and a
//! clock that is comparable between processes.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Context;

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock in every process on this machine (and the
/// one `Instant` uses on Linux), so the coordinator can compare times taken in its children.
pub(crate) fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always available on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// `at` (an `Instant` of this process) on the [`mono_ns`] clock.
pub(crate) fn instant_ns(at: Instant) -> u64 {
    let now = Instant::now();
    let n = mono_ns();
    match now.checked_duration_since(at) {
        Some(ago) => n.saturating_sub(ago.as_nanos() as u64),
        None => n + at.duration_since(now).as_nanos() as u64,
    }
}

/// Sets the nice value of every thread of process `pid` (Linux nice is per thread: the
/// threads a process already started keep their own). Returns how many threads were set.
/// Lowering it below 0 needs root or `CAP_SYS_NICE`.
pub(crate) fn set_nice(pid: u32, nice: i32) -> anyhow::Result<usize> {
    let dir = format!("/proc/{pid}/task");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
        let Some(tid) = e?.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        // SAFETY: setpriority only reads its integer arguments.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot set nice {nice} on thread {tid} of {pid}"));
        }
        n += 1;
    }
    Ok(n)
}

/// A process's resident memory in bytes (`VmRSS`).
pub(crate) fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    status_number(&s, "VmRSS:")
        .map(|kb| kb * 1024)
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// CPU time the hypervisor gave to others while this machine's CPUs wanted it (the `steal`
/// column of `/proc/stat`'s `cpu` line, which sums the `cpuN` lines), in seconds per CPU;
/// `None` where the kernel does not count it. A benchmark run while the host is busy runs slower for
/// reasons of its own.
pub(crate) fn steal_secs() -> Option<f64> {
    parse_steal(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_steal(stat: &str) -> Option<f64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    // cpu user nice system idle iowait irq softirq steal ...
    let ticks: u64 = line.split_whitespace().nth(8)?.parse().ok()?;
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count()
        .max(1);
    Some(ticks as f64 / ticks_per_sec() / cpus as f64)
}

/// A process's CPU time and context switches, read again and again from its threads
/// (`/proc/PID/task/*`): each thread's run time in nanoseconds (`schedstat`; the tick-based
/// `/proc/PID/stat` has 10 ms resolution, too coarse for 1,000 idle clients) and its
/// switches, voluntary (a wait) and not (preempted) (`status`; the process's own file counts
/// its main thread only). A thread that ended keeps what it had when last read: summed over
/// the live threads alone, a server's CPU went down when one of its threads ended during a
/// hold ("server CPU -0.00 s" after 10 s, in three of five 19k holds on 2026-12-02), and
/// that thread's time was taken off the hold's (less than 5 ms there).
pub(crate) struct Threads {
    pid: u32,
    /// Whether this kernel keeps `schedstat` (`/proc/PID/stat` in ticks otherwise).
    schedstat: bool,
    /// Per thread id, the most it was read at.
    seen: HashMap<u32, Counts>,
    /// Threads whose id was taken again by a new one (its counts fell): what they had.
    gone: Counts,
}

/// Run time (ns) and context switches (voluntary, preempted) of a thread or a process.
#[derive(Clone, Copy, Default, PartialEq, Debug)]
pub(crate) struct Counts {
    pub(crate) ns: u64,
    pub(crate) voluntary: u64,
    pub(crate) preempted: u64,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.ns += o.ns;
        self.voluntary += o.voluntary;
        self.preempted += o.preempted;
    }

    /// CPU seconds since `earlier`.
    pub(crate) fn cpu_secs_since(&self, earlier: &Counts) -> f64 {
        self.ns.saturating_sub(earlier.ns) as f64 / 1e9
    }

    /// Context switches since `earlier`: (voluntary, preempted).
    pub(crate) fn switches_since(&self, earlier: &Counts) -> (u64, u64) {
        (
            self.voluntary.saturating_sub(earlier.voluntary),
            self.preempted.saturating_sub(earlier.preempted),
        )
    }
}

impl Threads {
    pub(crate) fn new(pid: u32) -> Self {
        Threads {
            pid,
            schedstat: std::path::Path::new("/proc/self/schedstat").exists(),
            seen: HashMap::new(),
            gone: Counts::default(),
        }
    }

    /// The process's counts so far: its live threads' now, its ended threads' when last
    /// read. Without `schedstat` (a kernel built without it) the run time is the process's
    /// `/proc/PID/stat`, in ticks.
    pub(crate) fn read(&mut self) -> anyhow::Result<Counts> {
        let dir = format!("/proc/{}/task", self.pid);
        for e in std::fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
            let path = e?.path();
            let Some(tid) = path
                .file_name()
                .and_then(|n| n.to_str()?.parse::<u32>().ok())
            else {
                continue;
            };
            // A thread that ended since the listing is skipped (it keeps its last reading).
            let Ok(status) = std::fs::read_to_string(path.join("status")) else {
                continue;
            };
            let ns = std::fs::read_to_string(path.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
            let ns = match ns {
                Some(ns) => ns,
                None if !self.schedstat => 0,
                // It ended between the two reads.
                None => continue,
            };
            let now = Counts {
                ns,
                voluntary: status_number(&status, "voluntary_ctxt_switches:").unwrap_or(0),
                preempted: status_number(&status, "nonvoluntary_ctxt_switches:").unwrap_or(0),
            };
            let was = self.seen.entry(tid).or_default();
            if now.ns < was.ns || now.voluntary < was.voluntary {
                // A new thread with an old one's id.
                self.gone.add(*was);
            }
            *was = now;
        }
        let mut total = self.gone;
        for c in self.seen.values() {
            total.add(*c);
        }
        if !self.schedstat {
            total.ns = (stat_cpu_secs(self.pid)? * 1e9) as u64;
        }
        Ok(total)
    }
}

/// The number after `key` on its line of a `/proc` status file (kB for the memory fields).
fn status_number(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A process's CPU time (user + system) in seconds, from `/proc/PID/stat`.
pub(crate) fn stat_cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    parse_stat_cpu(&s).with_context(|| format!("unexpected /proc/{pid}/stat"))
}

fn parse_stat_cpu(stat: &str) -> Option<f64> {
    // The command name (field 2) may contain spaces: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_sec())
}

/// The unit of `/proc`'s CPU times (`CLK_TCK`, 100 where it cannot be read).
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if tck > 0 {
        tck as f64
    } else {
        100.0
    }
}

/// Kernel memory that grows with TCP connections, machine-wide (both ends of a loopback
/// connection are counted): socket buffers and the slab caches for TCP sockets and their inodes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KernelMem {
    /// `/proc/net/sockstat` `TCP: ... mem` pages, in bytes (buffers charged to TCP sockets).
    pub(crate) tcp_buffers: u64,
    /// Slab bytes of `TCP`, `TCPv6`, `sock_inode_cache` (`None` without /proc/slabinfo access).
    pub(crate) slabs: Option<u64>,
}

/// Slab caches counted by [`KernelMem::slabs`].
pub(crate) const SLABS: &[&str] = &["TCP", "TCPv6", "sock_inode_cache"];

pub(crate) fn kernel_mem() -> KernelMem {
    let tcp_buffers = std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("TCP:"))?;
            let f: Vec<&str> = line.split_whitespace().collect();
            let i = f.iter().position(|w| *w == "mem")?;
            f.get(i + 1)?.parse::<u64>().ok()
        })
        .map(|pages| pages * page_size())
        .unwrap_or(0);
    let slabs = std::fs::read_to_string("/proc/slabinfo").ok().map(|s| {
        s.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() < 4 || !SLABS.contains(&f[0]) {
                    return None;
                }
                let objs: u64 = f[2].parse().ok()?;
                let size: u64 = f[3].parse().ok()?;
                Some(objs * size)
            })
            .sum()
    });
    KernelMem { tcp_buffers, slabs }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// The 1-minute load average.
pub(crate) fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_skips_names_with_spaces() {
        let stat = "42 (a b) c) S 1 1 1 0 -1 4194560 10 0 0 0 250 150 0 0 20 0 3 0 5 0 0";
        // utime 250 + stime 150 ticks.
        let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert_eq!(parse_stat_cpu(stat), Some(400.0 / tck));
        assert_eq!(parse_stat_cpu("garbage"), None);
    }

    #[test]
    fn set_nice_reaches_every_thread_of_a_child() {
        // A child of our own: raising its nice value needs no privilege.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let set = set_nice(pid, 7);
        let read = unsafe { libc::getpriority(libc::PRIO_PROCESS, pid) };
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(set.unwrap(), 1, "sleep has one thread");
        assert_eq!(read, 7);
        assert!(set_nice(u32::MAX, 0).is_err(), "no such process");
    }

    #[test]
    fn steal_is_the_eighth_number_of_the_cpu_line() {
        let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let stat =
            "cpu  2585529 2396 793319 10494778 21220 0 74290 4443 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(parse_steal(stat), Some(4443.0 / tck));
        // Per CPU: the `cpu` line sums the `cpuN` lines.
        let two =
            "cpu  1 2 3 4 5 6 7 800 0 0\ncpu0 1 2 3 4 5 6 7 400 0 0\ncpu1 0 0 0 0 0 0 0 400 0 0\n";
        assert_eq!(parse_steal(two), Some(400.0 / tck));
        assert_eq!(parse_steal("cpu  1 2 3\n"), None);
        assert_eq!(parse_steal("intr 5\n"), None);
        assert!(steal_secs().is_some(), "this kernel counts steal");
    }

    #[test]
    fn status_field() {
        let s = "Name:\tx\nVmRSS:\t  1234 kB\nRssAnon:\t 99 kB\n";
        assert_eq!(status_number(s, "VmRSS:"), Some(1234));
        assert_eq!(status_number(s, "VmHWM:"), None);
    }

    /// A thread that ends between two reads keeps its time and switches in the sum: the
    /// process's counts never go down (they went down by the thread's time when only the live
    /// threads were summed).
    #[test]
    fn a_thread_that_ended_keeps_its_counts() {
        let mut threads = Threads::new(std::process::id());
        let (burnt, burning) = std::sync::mpsc::channel::<()>();
        let (end, ending) = std::sync::mpsc::channel::<()>();
        let burner = std::thread::spawn(move || {
            // 50 ms of this thread's own CPU time, however busy the machine.
            let cpu_ns = || {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: `ts` is a valid, writable timespec.
                unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
                ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
            };
            let t = cpu_ns();
            while cpu_ns() < t + 50_000_000 {
                std::hint::black_box(t);
            }
            burnt.send(()).unwrap();
            ending.recv().unwrap();
        });
        burning.recv().unwrap();
        let before = threads.read().unwrap();
        end.send(()).unwrap();
        burner.join().unwrap();
        let after = threads.read().unwrap();
        assert!(before.ns >= 50_000_000, "the burner's 50 ms: {before:?}");
        assert!(after.ns >= before.ns, "{before:?} then {after:?}");
        assert!(
            after.voluntary >= before.voluntary,
            "{before:?} then {after:?}"
        );
        assert!(after.cpu_secs_since(&before) >= 0.0);
        assert_eq!(before.switches_since(&after), (0, 0), "never below zero");
    }

    #[test]
    fn own_process_is_readable_and_clocks_agree() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() > 0);
        // Burn CPU until /proc/PID/stat, which counts in 10 ms ticks (sampled: a 20 ms burn
        // may show as one tick), has counted 20 ms more; schedstat counts in ns.
        let stat0 = stat_cpu_secs(pid).unwrap();
        let t = Instant::now();
        while stat_cpu_secs(pid).unwrap() < stat0 + 0.02 {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(20),
                "/proc/{pid}/stat never counted 20 ms of CPU"
            );
        }
        let mut threads = Threads::new(pid);
        let c = threads.read().unwrap();
        // This test's thread waited at least once (the `sleep` child above).
        assert!(c.voluntary > 0, "{c:?}");
        assert!(Threads::new(u32::MAX).read().is_err(), "no such process");
        let stat = stat_cpu_secs(pid).unwrap();
        // Both count the whole process; only the threads this reader never saw (those that
        // ended before its first read) are missing from its sum.
        assert!(c.ns > 0, "{c:?}");
        assert!(c.ns as f64 / 1e9 <= stat + 0.5, "{c:?} vs {stat}");
        let a = mono_ns();
        let b = instant_ns(Instant::now());
        let c = mono_ns();
        assert!(a <= b + 1_000_000 && b <= c + 1_000_000, "{a} {b} {c}");
    }
}
