//! [`Transport`]: the byte stream a tether connection runs over (TCP, or TLS and anything
//! else that implements `AsyncRead + AsyncWrite`).

use std::io;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A byte stream tether can run over. Implemented for `TcpStream` and tokio's in-memory
/// `DuplexStream`; for TLS or other streams implement it with the default methods (one
/// line), or forward them to the TCP stream underneath.
///
/// ```
/// use tether::Transport;
/// # use std::{io, pin::Pin, task::{Context, Poll}};
/// # use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
/// struct MyStream(tokio::net::TcpStream);
/// # impl AsyncRead for MyStream {
/// #     fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
/// #         Pin::new(&mut self.get_mut().0).poll_read(cx, b)
/// #     }
/// # }
/// # impl AsyncWrite for MyStream {
/// #     fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
/// #         Pin::new(&mut self.get_mut().0).poll_write(cx, b)
/// #     }
/// #     fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
/// #         Pin::new(&mut self.get_mut().0).poll_flush(cx)
/// #     }
/// #     fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
/// #         Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
/// #     }
/// # }
/// impl Transport for MyStream {}
/// ```
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The connection ends because of a failure: make the close abortive (RST) if possible.
    fn abort_on_close(&self) {}
    /// Whether sent data is still unacknowledged, if the transport can tell (TCP_INFO).
    fn has_unacked(&self) -> Option<bool> {
        None
    }
    /// Whether received bytes are waiting unread, if the transport can tell without reading
    /// (registers for a wake-up when it says no). Used while reading is paused: a peer whose
    /// bytes wait is alive; a peer with nothing waiting is silent however slow we are.
    fn poll_unread(&mut self, _cx: &mut Context<'_>) -> Option<bool> {
        None
    }
    /// Whether an idle connection over this transport may be parked: kept without a task of
    /// its own (in the server's lot, `driver/park.rs`) and polled from there with a waker
    /// of the lot's. True when the transport keeps no per-task state: every `poll_*` that
    /// returns `Pending` registers the waker it was given and nothing else (a `TcpStream`
    /// registers it with tokio's reactor). Default: false (the connection keeps its task).
    fn parkable(&self) -> bool {
        false
    }
    /// Parking on a lot thread: leaves the runtime's reactor and answers the socket's
    /// descriptor, after which reads and writes are the socket's own non-blocking calls and
    /// readiness comes from the caller's epoll (edge-triggered, readable; reported with
    /// [`readable`](Self::readable)). `None` (the default): the transport cannot leave the
    /// reactor, and the connection keeps its task.
    #[doc(hidden)]
    fn detach(&mut self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The caller's epoll reported the detached socket readable.
    #[doc(hidden)]
    fn readable(&mut self) {}
    /// Back into the current runtime's reactor after [`detach`](Self::detach) (called with
    /// the runtime's context entered).
    #[doc(hidden)]
    fn attach(&mut self) {}
}

impl Transport for TcpStream {
    fn abort_on_close(&self) {
        let _ = crate::sockopt::set_abortive_close(self);
    }
    fn has_unacked(&self) -> Option<bool> {
        crate::sockopt::tcp_info(self).map(|i| i.unacked > 0)
    }
    fn poll_unread(&mut self, cx: &mut Context<'_>) -> Option<bool> {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        Some(self.poll_peek(cx, &mut buf).is_ready())
    }
    fn parkable(&self) -> bool {
        true
    }
}

/// Parkable too (its reads and writes register the waker they are given): the driver's
/// paused-time tests park over it.
impl Transport for tokio::io::DuplexStream {
    fn parkable(&self) -> bool {
        true
    }
}

/// How a parked connection keeps its transport between two wake-ups (a lot entry,
/// `driver/park.rs`, issue 17): the transports a lot is made for. `park` and `unpark` give
/// back the same transport, allocate nothing on a lot thread's path and decide nothing.
pub(crate) trait ParkIo: Transport + Sized {
    /// The transport while parked.
    type Parked: Send + 'static;
    /// The transport in its parked form.
    fn park(self) -> Self::Parked;
    /// The transport again.
    fn unpark(p: Self::Parked) -> Self;
    /// [`Transport::readable`] of the parked form: the lot's epoll reported it readable.
    fn parked_readable(p: &mut Self::Parked);
    /// A read on the parked form, for a wake-up that leaves it parked (a lot thread's
    /// frozen step, `driver::park`): as [`AsyncRead::poll_read`] would, `Pending` once
    /// drained until the next edge. `None` when the parked form cannot (a lot task's
    /// socket, in the reactor; the tests' pipes): the caller unparks it first.
    fn parked_read(_p: &mut Self::Parked, _buf: &mut [u8]) -> Option<Poll<io::Result<usize>>> {
        None
    }
    /// A write on the parked form (`None` as for [`parked_read`](Self::parked_read)): how
    /// many bytes went out; 0 when none could (`WouldBlock`, or an error, which the full
    /// wake-up the caller then runs meets again on its own write).
    fn parked_write(_p: &mut Self::Parked, _buf: &[u8]) -> Option<usize> {
        None
    }
}

/// The driver's paused-time tests park in-memory pipes as they are.
impl ParkIo for tokio::io::DuplexStream {
    type Parked = Self;
    fn park(self) -> Self {
        self
    }
    fn unpark(p: Self) -> Self {
        p
    }
    fn parked_readable(p: &mut Self) {
        p.readable();
    }
}

/// A parked [`Tcp`] in one word, 8 B (16 as an enum of the three forms, 32 / 40 in a
/// debug build as the whole `Tcp`; issue 17: every parked connection keeps one). On a lot
/// thread it is a bare socket: its descriptor and the readable flag. A lot task's socket
/// stays in the reactor and is boxed while parked (the server's lots run on threads; a lot
/// task serves a server that could not have an epoll, out of descriptors: one allocation
/// per wake-up there).
///
/// The word: `fd << 32 | readable << 1 | 1` for [`Tcp::Bare`]; the box's address for
/// [`Tcp::Reactor`] (aligned, so its low bit is 0; never 0); 0 for [`Tcp::Gone`]. It owns
/// what it holds: [`take`](Self::take) gives it back as a `Tcp` and leaves `Gone`, and
/// dropping it closes the socket as dropping the `Tcp` would.
pub(crate) struct ParkedTcp(u64);

/// The word of a bare socket has its low bit set.
const PARKED_BARE: u64 = 1;
/// A bare socket's readable flag.
const PARKED_READABLE: u64 = 2;
/// [`Tcp::Gone`].
const PARKED_GONE: u64 = 0;

// A box's address has its low bit clear (the tag of a bare socket).
const _: () = assert!(std::mem::align_of::<TcpStream>() >= 2);

impl ParkedTcp {
    fn new(t: Tcp) -> ParkedTcp {
        use std::os::fd::IntoRawFd;
        match t {
            Tcp::Bare(s, r) => {
                // A descriptor is non-negative: 31 bits.
                let fd = u64::from(s.into_raw_fd().unsigned_abs());
                ParkedTcp((fd << 32) | (u64::from(r) * PARKED_READABLE) | PARKED_BARE)
            }
            Tcp::Reactor(s) => {
                let p = Box::into_raw(Box::new(s));
                ParkedTcp(p.expose_provenance() as u64)
            }
            Tcp::Gone => ParkedTcp(PARKED_GONE),
        }
    }

    /// The transport it holds; it holds [`Tcp::Gone`] after.
    fn take(&mut self) -> Tcp {
        use std::os::fd::FromRawFd;
        let w = std::mem::replace(&mut self.0, PARKED_GONE);
        if w == PARKED_GONE {
            Tcp::Gone
        } else if w & PARKED_BARE != 0 {
            // SAFETY: a word with the bare tag was made by `new` from a socket's descriptor,
            // taken with `into_raw_fd` (so nothing else closes it), and is read once: the
            // word is `Gone` from here on. The `u32` is that non-negative descriptor.
            let s = unsafe { std::net::TcpStream::from_raw_fd((w >> 32) as u32 as i32) };
            Tcp::Bare(s, w & PARKED_READABLE != 0)
        } else {
            // SAFETY: any other word is the address `new` had from `Box::into_raw` (exposed
            // there; nonzero and with the low bit clear, so neither `Gone` nor bare), the
            // box not freed since: it is taken back once, the word `Gone` from here on.
            let b = unsafe {
                Box::from_raw(std::ptr::with_exposed_provenance_mut::<TcpStream>(
                    w as usize,
                ))
            };
            Tcp::Reactor(*b)
        }
    }
}

impl Drop for ParkedTcp {
    fn drop(&mut self) {
        drop(self.take());
    }
}

impl std::fmt::Debug for ParkedTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = self.0;
        if w == PARKED_GONE {
            f.write_str("ParkedTcp::Gone")
        } else if w & PARKED_BARE != 0 {
            write!(
                f,
                "ParkedTcp::Bare(fd {}, readable {})",
                w >> 32,
                w & PARKED_READABLE != 0
            )
        } else {
            f.write_str("ParkedTcp::Reactor")
        }
    }
}

impl ParkIo for Tcp {
    type Parked = ParkedTcp;
    fn park(self) -> ParkedTcp {
        ParkedTcp::new(self)
    }
    fn unpark(mut p: ParkedTcp) -> Self {
        p.take()
    }
    fn parked_readable(p: &mut ParkedTcp) {
        if p.0 & PARKED_BARE != 0 {
            p.0 |= PARKED_READABLE;
        }
    }
    fn parked_read(p: &mut ParkedTcp, buf: &mut [u8]) -> Option<Poll<io::Result<usize>>> {
        p.with_bare(|s, readable| bare_read(s, readable, buf))
    }
    fn parked_write(p: &mut ParkedTcp, buf: &[u8]) -> Option<usize> {
        use std::io::Write;
        p.with_bare(|mut s, _| s.write(buf).unwrap_or(0))
    }
}

impl ParkedTcp {
    /// `f` on the bare socket and its readable flag, lent in place (`None`: not bare).
    fn with_bare<R>(&mut self, f: impl FnOnce(&std::net::TcpStream, &mut bool) -> R) -> Option<R> {
        use std::os::fd::FromRawFd;
        let w = self.0;
        if w & PARKED_BARE == 0 {
            return None;
        }
        // SAFETY: a word with the bare tag owns the descriptor `new` took with
        // `into_raw_fd` (see `take`); it is lent here and never closed: `ManuallyDrop`.
        let s = std::mem::ManuallyDrop::new(unsafe {
            std::net::TcpStream::from_raw_fd((w >> 32) as u32 as i32)
        });
        let mut readable = w & PARKED_READABLE != 0;
        let r = f(&s, &mut readable);
        self.0 = (w & !PARKED_READABLE) | (u64::from(readable) * PARKED_READABLE);
        Some(r)
    }
}

/// A read of a bare non-blocking socket (see [`Tcp`]): `Pending` without a call when the
/// last one drained it (`readable` false); a short read or `WouldBlock` clears `readable`
/// (0, the end, keeps it).
fn bare_read(
    s: &std::net::TcpStream,
    readable: &mut bool,
    dst: &mut [u8],
) -> Poll<io::Result<usize>> {
    use std::io::Read;
    if !*readable {
        return Poll::Pending;
    }
    let room = dst.len();
    let r = bare((&*s).read(dst));
    match &r {
        Poll::Ready(Ok(n)) => *readable = *n == 0 || *n == room,
        Poll::Pending => *readable = false,
        Poll::Ready(Err(_)) => {}
    }
    r
}

/// A server's plain-TCP connection: in tokio's reactor while it has a task, or — parked on a
/// lot thread (`driver/park.rs`) — a bare non-blocking socket in the lot's own epoll, which
/// frees tokio's per-socket registration (issue 17) and lets the lot run outside tokio's run
/// queue.
///
/// Bare, reads and writes are the socket's own non-blocking calls, `WouldBlock` answering
/// `Pending` *without* registering the waker: the lot's epoll (edge-triggered, readable
/// interest only) is what wakes a parked connection, through [`Transport::readable`]. A
/// short read or a `WouldBlock` means the socket is drained until the next edge, so a
/// heartbeat costs one `recv` (not a second one for `EAGAIN`), the way tokio clears its
/// readiness after a short read. A write that cannot finish leaves bytes to send, and a
/// connection with bytes to send gets its task back (where tokio waits for writability).
#[derive(Debug)]
pub(crate) enum Tcp {
    /// Registered with the runtime's reactor.
    Reactor(TcpStream),
    /// Out of the reactor, non-blocking; `readable`: a read may find bytes (no short read or
    /// `WouldBlock` since the last edge).
    Bare(std::net::TcpStream, bool),
    /// Lost between the two (the reactor refused it back: the runtime is shutting down).
    /// Every call fails, and the connection ends.
    Gone,
}

impl From<TcpStream> for Tcp {
    fn from(s: TcpStream) -> Self {
        Tcp::Reactor(s)
    }
}

fn gone() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::NotConnected)
}

/// A non-blocking call's answer as a poll: `WouldBlock` is `Pending` (the caller's poller
/// wakes the connection, not a waker).
fn bare<R>(r: std::io::Result<R>) -> std::task::Poll<std::io::Result<R>> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::task::Poll::Pending,
        r => std::task::Poll::Ready(r),
    }
}

impl Tcp {
    /// The socket's descriptor (for socket options), `None` once gone.
    fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        match self {
            Tcp::Reactor(s) => Some(s.as_fd()),
            Tcp::Bare(s, _) => Some(s.as_fd()),
            Tcp::Gone => None,
        }
    }
}

impl AsyncRead for Tcp {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Tcp::Reactor(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Tcp::Bare(_, false) => Poll::Pending,
            Tcp::Bare(s, readable) => {
                let r = bare_read(s, readable, buf.initialize_unfilled());
                r.map_ok(|n| buf.advance(n))
            }
            Tcp::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for Tcp {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::io::Write;
        match self.get_mut() {
            Tcp::Reactor(s) => std::pin::Pin::new(s).poll_write(cx, b),
            Tcp::Bare(s, _) => bare((&*s).write(b)),
            Tcp::Gone => std::task::Poll::Ready(Err(gone())),
        }
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::io::Write;
        match self.get_mut() {
            Tcp::Reactor(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            Tcp::Bare(s, _) => bare((&*s).write_vectored(bufs)),
            Tcp::Gone => std::task::Poll::Ready(Err(gone())),
        }
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Tcp::Reactor(s) => std::pin::Pin::new(s).poll_flush(cx),
            Tcp::Bare(..) => std::task::Poll::Ready(Ok(())),
            Tcp::Gone => std::task::Poll::Ready(Err(gone())),
        }
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Tcp::Reactor(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Tcp::Bare(s, _) => bare(s.shutdown(std::net::Shutdown::Write)),
            Tcp::Gone => std::task::Poll::Ready(Err(gone())),
        }
    }
}

impl Transport for Tcp {
    fn abort_on_close(&self) {
        if let Some(fd) = self.fd() {
            let _ = crate::sockopt::set_abortive_close(&fd);
        }
    }
    fn has_unacked(&self) -> Option<bool> {
        crate::sockopt::tcp_info(&self.fd()?).map(|i| i.unacked > 0)
    }
    fn poll_unread(&mut self, cx: &mut Context<'_>) -> Option<bool> {
        match self {
            Tcp::Reactor(s) => s.poll_unread(cx),
            // Nothing to register: the lot's epoll reports the next bytes.
            Tcp::Bare(s, _) => Some(!matches!(
                bare(s.peek(&mut [0u8; 1])),
                std::task::Poll::Pending
            )),
            Tcp::Gone => Some(true),
        }
    }
    fn parkable(&self) -> bool {
        true
    }
    fn detach(&mut self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        if let Tcp::Reactor(_) = self {
            let Tcp::Reactor(s) = std::mem::replace(self, Tcp::Gone) else {
                unreachable!("matched just above")
            };
            // Leaves the reactor (its registration freed); the socket stays non-blocking.
            *self = match s.into_std() {
                Ok(s) => Tcp::Bare(s, true),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot take a socket out of the reactor");
                    Tcp::Gone
                }
            };
        }
        match self {
            Tcp::Bare(s, _) => Some(s.as_raw_fd()),
            _ => None,
        }
    }
    fn readable(&mut self) {
        if let Tcp::Bare(_, r) = self {
            *r = true;
        }
    }
    fn attach(&mut self) {
        if let Tcp::Bare(..) = self {
            let Tcp::Bare(s, _) = std::mem::replace(self, Tcp::Gone) else {
                unreachable!("matched just above")
            };
            // Needs the runtime's context (the lot thread entered it).
            *self = match TcpStream::from_std(s) {
                Ok(s) => Tcp::Reactor(s),
                Err(e) => {
                    tracing::debug!(error = %e, "the reactor did not take a socket back");
                    Tcp::Gone
                }
            };
        }
    }
}

#[cfg(test)]
mod park_tests {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn fd(t: &Tcp) -> Option<i32> {
        t.fd().map(|f| f.as_raw_fd())
    }

    /// A parked `Tcp` is one word and comes back the same socket, in the same form, with
    /// its readable flag (set by the lot's epoll while parked).
    #[tokio::test]
    async fn a_parked_tcp_is_compact_and_comes_back_the_same() {
        assert_eq!(std::mem::size_of::<ParkedTcp>(), 8);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut peer =
            std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().await.expect("accept");

        // In the reactor (a lot task's): boxed, and usable again once back.
        let t = Tcp::from(s);
        let before = fd(&t);
        let p = t.park();
        assert_eq!(format!("{p:?}"), "ParkedTcp::Reactor");
        let mut t = Tcp::unpark(p);
        assert!(matches!(t, Tcp::Reactor(_)));
        assert_eq!(fd(&t), before);
        peer.write_all(b"ab").expect("write");
        let mut buf = [0u8; 2];
        t.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ab");

        // Bare (a lot thread's): the descriptor and the flag, either way.
        assert_eq!(t.detach().map(Some), Some(before));
        let Tcp::Bare(_, true) = t else {
            panic!("detached: bare and readable")
        };
        let mut t = Tcp::unpark(t.park());
        assert!(matches!(t, Tcp::Bare(_, true)), "a set flag is kept");
        if let Tcp::Bare(_, r) = &mut t {
            *r = false;
        }
        let mut p = t.park();
        let fd_no = before.expect("a socket");
        assert_eq!(
            format!("{p:?}"),
            format!("ParkedTcp::Bare(fd {fd_no}, readable false)")
        );
        let t = Tcp::unpark(p);
        assert!(matches!(t, Tcp::Bare(_, false)), "a clear flag is kept");
        p = t.park();
        Tcp::parked_readable(&mut p);
        let mut t = Tcp::unpark(p);
        assert!(
            matches!(t, Tcp::Bare(_, true)),
            "the flag set while parked is kept"
        );
        assert_eq!(fd(&t), before);
        t.attach();
        t.write_all(b"cd").await.expect("write");
        let mut got = [0u8; 2];
        peer.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"cd");

        let mut p = Tcp::Gone.park();
        Tcp::parked_readable(&mut p);
        assert_eq!(format!("{p:?}"), "ParkedTcp::Gone");
        assert!(matches!(Tcp::unpark(p), Tcp::Gone));
    }

    /// A parked `Tcp` dropped closes its socket, in either form (the peer reads the end of
    /// the stream), as the `Tcp` would.
    #[tokio::test]
    async fn a_parked_tcp_dropped_closes_its_socket() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        for bare in [false, true] {
            let mut peer =
                std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
            let (s, _) = l.accept().await.expect("accept");
            let mut t = Tcp::from(s);
            if bare {
                assert!(t.detach().is_some());
            }
            let p = t.park();
            drop(p);
            peer.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .expect("timeout");
            let mut buf = [0u8; 1];
            assert_eq!(peer.read(&mut buf).expect("the end"), 0, "bare: {bare}");
        }
    }
}
