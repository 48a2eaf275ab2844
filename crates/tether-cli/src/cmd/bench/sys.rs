//! What the bench reads from the kernel: a process's memory and CPU, socket memory, slabs, and a
//! clock that is comparable between processes.

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
/// column of `/proc/stat`'s `cpu` line), in seconds summed over the CPUs; `None` where the
/// kernel does not count it. A benchmark run while the host is busy runs slower for
/// reasons of its own.
pub(crate) fn steal_secs() -> Option<f64> {
    parse_steal(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_steal(stat: &str) -> Option<f64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    // cpu user nice system idle iowait irq softirq steal ...
    let ticks: u64 = line.split_whitespace().nth(8)?.parse().ok()?;
    Some(ticks as f64 / ticks_per_sec())
}

/// Context switches of process `pid` so far, voluntary (a wait) and not (preempted): the
/// sum over its live threads' `/proc/PID/task/*/status` (the process's own file counts its
/// main thread only).
pub(crate) fn context_switches(pid: u32) -> anyhow::Result<(u64, u64)> {
    let dir = format!("/proc/{pid}/task");
    let (mut vol, mut invol) = (0, 0);
    for e in std::fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
        // A thread that ended since the listing is skipped.
        let Ok(s) = std::fs::read_to_string(e?.path().join("status")) else {
            continue;
        };
        vol += status_number(&s, "voluntary_ctxt_switches:").unwrap_or(0);
        invol += status_number(&s, "nonvoluntary_ctxt_switches:").unwrap_or(0);
    }
    Ok((vol, invol))
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

/// A process's CPU time (user + system) in seconds: the sum of its threads' run time in
/// nanoseconds from `/proc/PID/task/*/schedstat` (tick-based `/proc/PID/stat` has 10 ms
/// resolution, too coarse for 1,000 idle clients), falling back to `/proc/PID/stat`.
pub(crate) fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    if let Some(s) = schedstat_secs(pid) {
        return Ok(s);
    }
    stat_cpu_secs(pid)
}

fn schedstat_secs(pid: u32) -> Option<f64> {
    let mut ns: u64 = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = t.ok()?.path().join("schedstat");
        let s = std::fs::read_to_string(path).ok()?;
        ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
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
        // This test's thread waited at least once (the `sleep` child above).
        let (vol, _) = context_switches(pid).unwrap();
        assert!(vol > 0, "{vol}");
        assert!(context_switches(u32::MAX).is_err(), "no such process");
        let sched = cpu_secs(pid).unwrap();
        let stat = stat_cpu_secs(pid).unwrap();
        // schedstat sums the live threads only (other tests' threads come and go), /proc/PID/stat
        // keeps what exited threads used too: the latter is the monotonic one.
        assert!(sched > 0.0, "{sched}");
        assert!(sched <= stat + 0.5, "{sched} vs {stat}");
        let a = mono_ns();
        let b = instant_ns(Instant::now());
        let c = mono_ns();
        assert!(a <= b + 1_000_000 && b <= c + 1_000_000, "{a} {b} {c}");
    }
}
