//! Per-socket liveness options, applied through `socket2::SockRef` on the tokio socket itself
//! (no fd duplication, no switch to blocking mode), and read back from the kernel.
//!
//! | option | Linux | other Unix | Windows |
//! |---|---|---|---|
//! | `TCP_NODELAY` | yes | yes | yes |
//! | `SO_KEEPALIVE` + `TCP_KEEPIDLE` | yes | yes (`TCP_KEEPALIVE` on Apple) | yes |
//! | `TCP_KEEPINTVL`, `TCP_KEEPCNT` | yes | most | interval only |
//! | `TCP_USER_TIMEOUT` | yes | no | no |

use std::io;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tether_proto::{Keepalive, Policy};

/// The liveness-related options of one socket, as set or as read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketSettings {
    /// `TCP_NODELAY`.
    pub nodelay: bool,
    /// `SO_KEEPALIVE` with its idle/interval/count, or `None` when keepalive is off.
    pub keepalive: Option<Keepalive>,
    /// `TCP_USER_TIMEOUT` (Linux only; `None` when 0/unset or unsupported).
    pub user_timeout: Option<Duration>,
}

impl SocketSettings {
    /// What [`apply`] sets for `policy`.
    pub fn from_policy(policy: &Policy) -> Self {
        SocketSettings {
            nodelay: true,
            keepalive: policy.keepalive,
            user_timeout: if cfg!(target_os = "linux") {
                policy.user_timeout
            } else {
                None
            },
        }
    }
}

/// Applies `policy`'s socket options to `sock` (a `tokio::net::TcpStream`, `std::net::TcpStream`,
/// or anything else with a socket fd).
pub fn apply<S: socket2_fd::AsSocket>(sock: &S, policy: &Policy) -> io::Result<()> {
    let s = SockRef::from(sock);
    s.set_nodelay(true)?;
    match policy.keepalive {
        Some(k) => {
            let ka = TcpKeepalive::new().with_time(k.idle);
            #[cfg(any(
                target_os = "linux",
                target_os = "android",
                target_vendor = "apple",
                target_os = "freebsd",
                target_os = "windows"
            ))]
            let ka = ka.with_interval(k.interval);
            #[cfg(any(
                target_os = "linux",
                target_os = "android",
                target_vendor = "apple",
                target_os = "freebsd"
            ))]
            let ka = ka.with_retries(k.count);
            s.set_tcp_keepalive(&ka)?;
        }
        None => s.set_keepalive(false)?,
    }
    #[cfg(target_os = "linux")]
    s.set_tcp_user_timeout(policy.user_timeout)?;
    Ok(())
}

/// Reads the liveness options back from the kernel.
pub fn read_back<S: socket2_fd::AsSocket>(sock: &S) -> io::Result<SocketSettings> {
    let s = SockRef::from(sock);
    let keepalive = if s.keepalive()? {
        #[cfg(any(
            target_os = "linux",
            target_os = "android",
            target_vendor = "apple",
            target_os = "freebsd"
        ))]
        let (interval, count) = (s.keepalive_interval()?, s.keepalive_retries()?);
        #[cfg(not(any(
            target_os = "linux",
            target_os = "android",
            target_vendor = "apple",
            target_os = "freebsd"
        )))]
        let (interval, count) = (Duration::ZERO, 0);
        Some(Keepalive {
            idle: s.keepalive_time()?,
            interval,
            count,
        })
    } else {
        None
    };
    #[cfg(target_os = "linux")]
    let user_timeout = s.tcp_user_timeout()?;
    #[cfg(not(target_os = "linux"))]
    let user_timeout = None;
    Ok(SocketSettings {
        nodelay: s.nodelay()?,
        keepalive,
        user_timeout,
    })
}

/// Makes the next close of `sock` abortive (RST instead of FIN): `SO_LINGER` with a zero
/// timeout. Used when a connection ends because of a failure, so the kernel does not keep
/// retransmitting into a dead path and the peer (if reachable) learns at once.
pub fn set_abortive_close<S: socket2_fd::AsSocket>(sock: &S) -> io::Result<()> {
    SockRef::from(sock).set_linger(Some(Duration::ZERO))
}

/// The few `TCP_INFO` fields tether uses: why the kernel gave up on a connection, and when
/// data last arrived (the probe's idle periods).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpInfo {
    /// Segments sent but not yet acknowledged (`tcpi_unacked`).
    pub unacked: u32,
    /// Unanswered keepalive probes (`tcpi_probes`).
    pub probes: u8,
    /// Retransmissions of the current unacknowledged data (`tcpi_retransmits`).
    pub retransmits: u8,
    /// Time since the last data segment arrived (`tcpi_last_data_recv`), in the kernel's
    /// ticks (1–10 ms).
    pub last_data_recv: Duration,
}

/// Reads [`TcpInfo`] from the kernel (Linux; `None` elsewhere or on error).
#[cfg(target_os = "linux")]
pub fn tcp_info<S: std::os::fd::AsRawFd>(sock: &S) -> Option<TcpInfo> {
    // SAFETY: `tcp_info` is plain old data; getsockopt writes at most `len` bytes into it and
    // we pass its exact size. The fd is borrowed from a live socket for the call's duration.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        (rc == 0).then_some(TcpInfo {
            unacked: info.tcpi_unacked,
            probes: info.tcpi_probes,
            retransmits: info.tcpi_retransmits,
            last_data_recv: Duration::from_millis(u64::from(info.tcpi_last_data_recv)),
        })
    }
}

/// Reads [`TcpInfo`] from the kernel (Linux; `None` elsewhere or on error).
#[cfg(not(target_os = "linux"))]
pub fn tcp_info<S>(_sock: &S) -> Option<TcpInfo> {
    None
}

/// The process's soft limit on open file descriptors (`RLIMIT_NOFILE`), where the platform
/// has one. A server derives its default connection limit from it.
#[cfg(unix)]
pub fn open_files_limit() -> Option<u64> {
    // SAFETY: `rlimit` is plain old data and getrlimit writes exactly one into it.
    let (rc, lim) = unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        (libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), lim)
    };
    #[allow(clippy::useless_conversion)] // `rlim_t` is not `u64` on every Unix
    (rc == 0 && lim.rlim_cur != libc::RLIM_INFINITY).then(|| u64::from(lim.rlim_cur))
}

/// The process's soft limit on open file descriptors (`None`: not limited or unknown).
#[cfg(not(unix))]
pub fn open_files_limit() -> Option<u64> {
    None
}

/// True for the errors `accept` returns when the process or the system is out of file
/// descriptors or socket memory: waiting helps, retrying at once does not.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    #[cfg(unix)]
    if let Some(code) = e.raw_os_error() {
        return matches!(
            code,
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
        );
    }
    let _ = e;
    false
}

/// Platform glue: what `SockRef::from` accepts.
pub mod socket2_fd {
    #[cfg(unix)]
    pub use std::os::fd::AsFd as AsSocket;
    #[cfg(windows)]
    pub use std::os::windows::io::AsSocket;
}
