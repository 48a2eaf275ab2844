//! The application side of a tunnelled connection: the program's socket at the entry, the
//! target connection at the exit.
//!
//! The reading and the writing half run in one task and share the socket by reference: no
//! split halves, because an owned write half sends FIN when dropped, which must not happen
//! before an RST. The trait is the seam that lets the tunnel's own logic run over an
//! in-memory stream in the paused-time tests.

use std::io;

use bytes::{BufMut, BytesMut};
use tokio::net::TcpStream;

use crate::sockopt;

/// An application connection as the tunnel uses it.
pub(super) trait AppStream: Send + Sync + 'static {
    /// Reads what is there, at most `max` bytes, appended to `buf` (at least one byte; 0 at
    /// EOF). Into `buf`'s spare room: the bytes are not copied again on their way out.
    async fn read_some(&self, buf: &mut BytesMut, max: usize) -> io::Result<usize>;
    /// Writes all of `b`.
    async fn write_all(&self, b: &[u8]) -> io::Result<()>;
    /// Half-closes: the application reads EOF, the other direction keeps flowing.
    async fn shutdown_write(&self) -> io::Result<()>;
    /// The connection failed: closing it must reset it (RST), not end it in order.
    fn set_abortive(&self);
}

impl AppStream for TcpStream {
    async fn read_some(&self, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
        buf.reserve(max);
        loop {
            self.readable().await?;
            match self.try_read_buf(&mut (&mut *buf).limit(max)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }

    async fn write_all(&self, mut b: &[u8]) -> io::Result<()> {
        while !b.is_empty() {
            self.writable().await?;
            match self.try_write(b) {
                Ok(n) => b = &b[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn shutdown_write(&self) -> io::Result<()> {
        socket2::SockRef::from(self).shutdown(std::net::Shutdown::Write)
    }

    fn set_abortive(&self) {
        let _ = sockopt::set_abortive_close(self);
    }
}
