//! [`Transport`]: the byte stream a tether connection runs over (TCP, or TLS and anything
//! else that implements `AsyncRead + AsyncWrite`).

use std::task::Context;

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
