//! Running out of file descriptors: the accept loop must not spin, and must recover when
//! descriptors free up. This binary lowers its own open-file limit, so it holds only this
//! test.
#![cfg(target_os = "linux")]

mod common;

use std::time::{Duration, Instant};

use common::fast_policy;
use tether::{Connection, Server, ServerConfig};
use tokio::net::TcpStream;

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

fn cpu_time() -> Duration {
    // SAFETY: `rusage` is plain old data and getrusage writes exactly one into it.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut ru), 0);
        ru
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn set_soft_limit(n: u64) {
    // SAFETY: plain get/setrlimit on our own process with a valid struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = n.min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_accept_loop_waits_and_recovers() {
    let cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap())
        .policy(fast_policy(300, 3000))
        .max_connections(10_000)
        .max_handshakes(10_000)
        .handshake_timeout(Duration::from_secs(60));
    let srv = Server::bind(cfg).await.unwrap();
    let addr = srv.local_addr();
    set_soft_limit(open_fds() + 150);
    // Connect until this process has no descriptor left (the server's accepts fail first
    // or the clients' sockets do).
    let mut held = Vec::new();
    while held.len() < 1000 {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
    }
    assert!(held.len() < 1000, "never ran out of descriptors");
    // Out of descriptors, with connections waiting in the kernel's accept queue: the accept
    // loop must wait, not spin.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu0 = cpu_time();
    let wall0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu = cpu_time() - cpu0;
    let wall = wall0.elapsed();
    println!(
        "{} connections held; out of descriptors for {wall:?}: {cpu:?} of CPU",
        held.len()
    );
    assert!(
        cpu < wall / 4,
        "{cpu:?} of CPU in {wall:?}: the accept loop spins"
    );
    // Descriptors free up: the server serves again.
    drop(held);
    let t = Instant::now();
    let c = loop {
        match Connection::connect(addr, "after", &fast_policy(300, 3000)).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(5), "never recovered: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let took = t.elapsed();
    println!("served again {took:?} after the descriptors were freed");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(c.disconnected().is_none());
}
