//! Moving one direction's bytes: [`OneWay`] reads the source into a channel (a pipe for
//! `splice(2)`, or a buffer) only while the channel is empty, drains it completely into the
//! destination, and gives the channel back after [`CHANNEL_RELEASE_AFTER`] without traffic.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::relay::{Activity, Fault};
use super::Leg;

/// Size of one direction's channel: the buffer, or the amount asked of one `splice` (the
/// default pipe capacity is 64 KiB).
pub const CHANNEL_BYTES: usize = 64 * 1024;

/// A direction that has moved nothing for this long gives its channel (pipe or buffer) back.
pub const CHANNEL_RELEASE_AFTER: Duration = Duration::from_secs(1);

/// How a direction moves its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CopyMode {
    /// `splice(2)` through a pipe (Linux only; elsewhere it behaves as [`CopyMode::Buffer`]).
    Splice,
    /// `read`/`write` through a 64 KiB heap buffer.
    Buffer,
}

impl Default for CopyMode {
    /// [`CopyMode::Splice`] on Linux, [`CopyMode::Buffer`] elsewhere.
    fn default() -> Self {
        if cfg!(target_os = "linux") {
            CopyMode::Splice
        } else {
            CopyMode::Buffer
        }
    }
}

impl CopyMode {
    /// `"splice"` or `"buffer"`.
    pub fn label(self) -> &'static str {
        match self {
            CopyMode::Splice => "splice",
            CopyMode::Buffer => "buffer",
        }
    }
}

/// One direction of a relayed connection.
pub(super) struct OneWay<'a> {
    pub(super) src: &'a TcpStream,
    pub(super) dst: &'a TcpStream,
    pub(super) src_leg: Leg,
    pub(super) moved: &'a AtomicU64,
    pub(super) global: Option<&'a AtomicU64>,
    pub(super) channels: Option<&'a AtomicU64>,
    pub(super) activity: &'a Activity,
    pub(super) mode: CopyMode,
}

impl OneWay<'_> {
    /// Copies until the source sends FIN (then forwards it and returns `Ok`) or a socket
    /// fails.
    pub(super) async fn run(self) -> Result<(), Fault> {
        let src_fault = |error| Fault {
            leg: self.src_leg,
            error,
        };
        let dst_fault = |error| Fault {
            leg: self.src_leg.other(),
            error,
        };
        let mut chan: Option<Held<'_>> = None;
        loop {
            // Fill: the channel is empty here. It is created only when the source is readable.
            let filled = self.src.try_io(Interest::READABLE, || {
                let ch =
                    chan.get_or_insert_with(|| Held::new(Channel::new(self.mode), self.channels));
                ch.fill(self.src)
            });
            let n = match filled {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Keep the channel for the next burst or reply for a moment; give it
                    // back once the direction has been idle for CHANNEL_RELEASE_AFTER.
                    if chan.is_some() {
                        match tokio::time::timeout(CHANNEL_RELEASE_AFTER, self.src.readable()).await
                        {
                            Ok(r) => {
                                r.map_err(src_fault)?;
                                continue;
                            }
                            Err(_) => chan = None,
                        }
                    }
                    self.src.readable().await.map_err(src_fault)?;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(src_fault(e)),
            };
            if n == 0 {
                // FIN from the source: forward it, keep the other direction going.
                SockRef::from(self.dst)
                    .shutdown(Shutdown::Write)
                    .map_err(dst_fault)?;
                return Ok(());
            }
            // Drain completely before reading again (flow control end to end).
            let Some(Held { chan: ch, .. }) = chan.as_mut() else {
                // `fill` returned bytes, so the closure ran and created the channel.
                continue;
            };
            while !ch.is_empty() {
                let wrote = self.dst.try_io(Interest::WRITABLE, || ch.drain(self.dst));
                match wrote {
                    Ok(w) => {
                        self.moved.fetch_add(w as u64, Relaxed);
                        if let Some(g) = self.global {
                            g.fetch_add(w as u64, Relaxed);
                        }
                        self.activity.touch();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.dst.writable().await.map_err(dst_fault)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(dst_fault(e)),
                }
            }
        }
    }
}

/// A channel, counted in [`ProxyMetrics::channels`] while it exists.
struct Held<'a> {
    chan: Channel,
    gauge: Option<&'a AtomicU64>,
}

impl<'a> Held<'a> {
    fn new(chan: Channel, gauge: Option<&'a AtomicU64>) -> Self {
        if let Some(g) = gauge {
            g.fetch_add(1, Relaxed);
        }
        Held { chan, gauge }
    }

    fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        self.chan.fill(src)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.gauge {
            g.fetch_sub(1, Relaxed);
        }
    }
}

/// Where one direction's bytes sit between read and write.
enum Channel {
    #[cfg(target_os = "linux")]
    Pipe(splice::Pipe),
    Buffer(Buffer),
}

impl Channel {
    fn new(mode: CopyMode) -> Channel {
        #[cfg(target_os = "linux")]
        if mode == CopyMode::Splice {
            // No pipe (EMFILE, ENFILE): copy through a buffer for this burst instead.
            if let Ok(p) = splice::Pipe::new() {
                return Channel::Pipe(p);
            }
        }
        let _ = mode;
        Channel::Buffer(Buffer {
            data: Vec::with_capacity(CHANNEL_BYTES),
            pos: 0,
        })
    }

    fn is_empty(&self) -> bool {
        match self {
            #[cfg(target_os = "linux")]
            Channel::Pipe(p) => p.len == 0,
            Channel::Buffer(b) => b.pos == b.data.len(),
        }
    }

    /// Reads from `src` into the (empty) channel; 0 means FIN.
    fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
        match self {
            #[cfg(target_os = "linux")]
            Channel::Pipe(p) => p.fill(src),
            Channel::Buffer(b) => {
                b.data.clear();
                b.pos = 0;
                src.try_read_buf(&mut b.data)
            }
        }
    }

    /// Writes from the channel to `dst`.
    fn drain(&mut self, dst: &TcpStream) -> io::Result<usize> {
        match self {
            #[cfg(target_os = "linux")]
            Channel::Pipe(p) => p.drain(dst),
            Channel::Buffer(b) => {
                let n = dst.try_write(&b.data[b.pos..])?;
                b.pos += n;
                Ok(n)
            }
        }
    }
}

struct Buffer {
    data: Vec<u8>,
    pos: usize,
}

#[cfg(target_os = "linux")]
mod splice {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use tokio::net::TcpStream;

    use super::CHANNEL_BYTES;

    /// A non-blocking pipe and how many bytes it holds.
    pub(super) struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        pub(super) len: usize,
    }

    impl Pipe {
        pub(super) fn new() -> io::Result<Pipe> {
            let mut fds = [0; 2];
            // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
            let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
            let (read, write) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            Ok(Pipe {
                read,
                write,
                len: 0,
            })
        }

        /// socket → pipe. Returns 0 at FIN.
        pub(super) fn fill(&mut self, src: &TcpStream) -> io::Result<usize> {
            let n = splice(src.as_raw_fd(), self.write.as_raw_fd(), CHANNEL_BYTES)?;
            self.len += n;
            Ok(n)
        }

        /// pipe → socket.
        pub(super) fn drain(&mut self, dst: &TcpStream) -> io::Result<usize> {
            let n = splice(self.read.as_raw_fd(), dst.as_raw_fd(), self.len)?;
            if n == 0 {
                // Cannot happen with bytes in the pipe; do not spin if a kernel says so.
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "splice to socket moved nothing",
                ));
            }
            self.len -= n;
            Ok(n)
        }
    }

    fn splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
        // SAFETY: both fds are open for the duration of the call (borrowed from live
        // objects); null offsets are valid for pipes and sockets; splice does not touch
        // user memory.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}
