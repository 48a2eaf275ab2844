//! One tunnelled connection's bytes, both ways, with credit ([`pump`]), and its ending
//! ([`finish`]).
//!
//! ```text
//!  app ──read (≤ credit)──▶ DATA ──▶ peer          peer ──DATA──▶ write ──▶ app
//!       EOF ──────────────▶ FIN                         FIN ───▶ shutdown(Write)
//!       credit ◀── WINDOW ◀── peer wrote our bytes      wrote ≥ ¼ window ──▶ WINDOW
//! ```

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tether_proto::wire::tunnel::{kind, Msg};
use tokio::sync::{mpsc, watch, Semaphore};

use super::app::AppStream;
use super::link::{Inbound, Outbound, Source};
use super::{TunnelEnd, TunnelEvent, CHUNK, WINDOW};

/// Return credit once this much was written (fewer, larger WINDOW messages).
const GRANT_EVERY: u64 = WINDOW as u64 / 4;
/// A read buffer with less room than this left is replaced by a new one (see `app_to_peer`).
const MIN_READ: usize = 4096;
/// Reads at least this large leave in their read buffer (no copy); smaller ones are copied.
const SHARE_FROM: usize = 16 * 1024;
/// Read buffers kept for reuse while a stream moves (see [`ReadBuffers`]).
const SPARE_BUFFERS: usize = 6;
/// Spare read buffers are released once the application sent nothing for this long.
const SPARE_IDLE: Duration = Duration::from_millis(250);
/// How long a closing tunnel waits for its last messages to be queued or flushed.
pub(super) const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Counters of one tunnelled connection.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) from_app: AtomicU64,
    pub(super) to_app: AtomicU64,
    /// Credit the peer granted us (WINDOW), on top of the initial window.
    granted_to_us: AtomicU64,
    /// Credit we granted the peer (WINDOW sent), on top of the initial window.
    granted_by_us: AtomicU64,
}

/// Result of [`pump`]: how it ended, and the outages seen.
pub(super) struct Pumped {
    pub(super) end: TunnelEnd,
    pub(super) outages: u32,
}

/// Who is pumping: the tunnel id, which side (the entry's completion needs DONE), its
/// counters and where its events go.
#[derive(Clone, Copy)]
pub(super) struct Ctx<'a> {
    pub(super) id: &'a str,
    pub(super) is_entry: bool,
    pub(super) n: &'a Counters,
    pub(super) events: &'a mpsc::UnboundedSender<TunnelEvent>,
}

/// Sends `m`, giving up after [`FLUSH_WAIT`] (for the last word of a tunnel that is ending).
pub(super) async fn send_last(out: &impl Outbound, m: Msg) {
    let _ = tokio::time::timeout(FLUSH_WAIT, out.send(m.encode())).await;
}

/// Moves bytes both ways until the connection ends.
pub(super) async fn pump(
    app: &impl AppStream,
    out: &impl Outbound,
    src: &mut impl Source,
    ctx: Ctx<'_>,
    stop: &mut watch::Receiver<bool>,
) -> Pumped {
    let Ctx {
        id,
        is_entry,
        n,
        events,
    } = ctx;
    let credit = Semaphore::new(WINDOW as usize);
    let (to_app, mut to_app_rx) = mpsc::unbounded_channel();
    let reader = app_to_peer(app, &credit, out, n);
    let writer = peer_to_app(app, &mut to_app_rx, out, n);
    tokio::pin!(reader, writer);
    let (mut reader_done, mut writer_done, mut done_seen, mut fin_seen) =
        (false, false, false, false);
    let mut received: u64 = 0;
    let mut outages = 0;
    let end = loop {
        if reader_done && writer_done && (done_seen || !is_entry) {
            break TunnelEnd::Closed;
        }
        if *stop.borrow() {
            break TunnelEnd::Shutdown;
        }
        tokio::select! {
            r = &mut reader, if !reader_done => match r {
                Ok(()) => reader_done = true,
                Err(e) => break e,
            },
            w = &mut writer, if !writer_done => match w {
                Ok(()) => writer_done = true,
                Err(e) => break e,
            },
            _ = stop.changed() => break TunnelEnd::Shutdown,
            // After DONE the peer has nothing more to say and everything it sent is here:
            // what is left (writing to the application) is local, and a path that ends now
            // must not turn a complete connection into a failed one.
            inbound = src.next(), if !done_seen => match inbound {
                Inbound::End(e) => break e,
                Inbound::PathDown(reason) => {
                    outages += 1;
                    let _ = events.send(TunnelEvent::PathDown { id: id.to_owned(), reason });
                }
                Inbound::PathUp => {
                    let _ = events.send(TunnelEvent::PathUp { id: id.to_owned() });
                }
                Inbound::Msg(m) => match Msg::decode(&m) {
                    Err(e) => break TunnelEnd::Protocol(e.to_string()),
                    Ok(Msg::Data(d)) => {
                        received += d.len() as u64;
                        let allowed = u64::from(WINDOW) + n.granted_by_us.load(Relaxed);
                        if fin_seen {
                            break TunnelEnd::Protocol("DATA after FIN".into());
                        }
                        if received > allowed {
                            break TunnelEnd::Protocol(format!(
                                "peer sent {received} bytes with credit for {allowed}"
                            ));
                        }
                        let _ = to_app.send(ToApp::Data(d));
                    }
                    Ok(Msg::Fin) => {
                        if fin_seen {
                            break TunnelEnd::Protocol("second FIN".into());
                        }
                        fin_seen = true;
                        let _ = to_app.send(ToApp::Fin);
                    }
                    Ok(Msg::Window(g)) => {
                        let total = n.granted_to_us.fetch_add(u64::from(g), Relaxed) + u64::from(g);
                        if total > n.from_app.load(Relaxed) {
                            break TunnelEnd::Protocol(format!(
                                "peer granted credit for {total} bytes, only {} sent",
                                n.from_app.load(Relaxed)
                            ));
                        }
                        credit.add_permits(g as usize);
                    }
                    Ok(Msg::Abort(reason)) => break TunnelEnd::PeerAborted(reason),
                    Ok(Msg::Done) if is_entry => {
                        if !fin_seen {
                            break TunnelEnd::Protocol("DONE before FIN".into());
                        }
                        done_seen = true;
                    }
                    Ok(Msg::Done) => break TunnelEnd::Protocol("DONE sent to the exit".into()),
                    Ok(Msg::Open(_)) => break TunnelEnd::Protocol("OPEN on an open tunnel".into()),
                },
            },
        }
    };
    Pumped { end, outages }
}

/// After [`pump`]: close the application connection with FIN (orderly) or RST (any failure),
/// then tell the peer what it must know.
pub(super) async fn finish(
    app: impl AppStream,
    out: &impl Outbound,
    end: &TunnelEnd,
    is_entry: bool,
) {
    let tell = match end {
        TunnelEnd::Closed if !is_entry => Some(Msg::Done),
        TunnelEnd::Closed => None,
        TunnelEnd::LocalReset(s) => Some(Msg::Abort(s.clone())),
        TunnelEnd::Protocol(s) => Some(Msg::Abort(format!("protocol error: {s}"))),
        TunnelEnd::Shutdown => Some(Msg::Abort("tunnel shutting down".into())),
        TunnelEnd::PeerAborted(_) | TunnelEnd::PathLost(_) => None,
    };
    if end.is_failure() {
        app.set_abortive();
    }
    drop(app);
    if let Some(m) = tell {
        send_last(out, m).await;
    }
}

/// Application → peer: read only what the credit allows, one DATA message per read; FIN at EOF.
async fn app_to_peer(
    app: &impl AppStream,
    credit: &Semaphore,
    out: &impl Outbound,
    n: &Counters,
) -> Result<(), TunnelEnd> {
    // Each read lands behind a DATA kind byte in this buffer's spare room. A large read
    // leaves as a message that shares the buffer (no copy; the next read goes on in the rest
    // of it, or in a new buffer once less than `MIN_READ` is left); a small one is copied out
    // at its exact size and the buffer is reused, so a stream of small reads does not pin a
    // buffer per queued message. Queued messages pin little more than their own bytes, and
    // the pump holds one buffer (1 + CHUNK bytes) of its own, plus, while the stream moves,
    // the spare ones of `ReadBuffers` (reused once their messages are gone).
    let mut buf = BytesMut::new();
    let mut buffers = ReadBuffers::default();
    loop {
        // Wait for at least one byte of credit, then take what is there (up to a chunk).
        // This future is the only consumer of the semaphore.
        match credit.acquire().await {
            Ok(p) => p.forget(),
            Err(_) => return Err(TunnelEnd::Shutdown),
        }
        let mut allowed = 1;
        let extra = credit.available_permits().min(CHUNK - 1);
        if extra > 0 {
            if let Ok(p) = credit.try_acquire_many(extra as u32) {
                p.forget();
                allowed += extra;
            }
        }
        if buf.capacity() < 1 + allowed.min(MIN_READ) {
            buf = buffers.next(std::mem::take(&mut buf));
        }
        let room = allowed.min(buf.capacity() - 1);
        buf.put_u8(kind::DATA);
        // At most the credit's worth: a read can never take more than was granted.
        let read = match buffers.read(app, &mut buf, room).await {
            Ok(r) => r,
            Err(e) => return Err(TunnelEnd::LocalReset(format!("read: {e}"))),
        };
        if read < allowed {
            credit.add_permits(allowed - read);
        }
        if read == 0 {
            out.send(Msg::Fin.encode())
                .await
                .map_err(TunnelEnd::PathLost)?;
            return Ok(());
        }
        n.from_app.fetch_add(read as u64, Relaxed);
        let msg = if read < SHARE_FROM {
            let m = Bytes::copy_from_slice(&buf);
            buf.clear();
            m
        } else {
            buf.split().freeze()
        };
        out.send(msg).await.map_err(TunnelEnd::PathLost)?;
    }
}

/// The read buffers of a stream that moves: a buffer whose reads all left as messages is
/// kept, and used again once those messages are gone (written and acknowledged): a fresh
/// 256 KiB buffer per read cost a page fault per 4 KiB (glibc hands such blocks back to the
/// kernel when they are freed), ~40 % of the tunnel's page faults (issue 17, target 5).
/// At most [`SPARE_BUFFERS`] are kept, and none once the application has been quiet for
/// [`SPARE_IDLE`]: an idle tunnel holds one read buffer per direction, as before.
#[derive(Default)]
struct ReadBuffers {
    /// Oldest first: each still shares its allocation with the messages read into it.
    spares: VecDeque<BytesMut>,
    /// A buffer was handed out (the first `used` is the pump's empty initial one).
    started: bool,
}

impl ReadBuffers {
    /// A buffer with room for a chunk, for the one that ran out of room (`used`): a spare
    /// whose messages are all gone, or a new one.
    fn next(&mut self, used: BytesMut) -> BytesMut {
        let reusable = self
            .spares
            .iter_mut()
            .position(|b| b.try_reclaim(1 + CHUNK));
        let fresh = match reusable.and_then(|i| self.spares.remove(i)) {
            Some(mut b) => {
                b.clear();
                b
            }
            None => BytesMut::with_capacity(1 + CHUNK),
        };
        if std::mem::replace(&mut self.started, true) {
            self.spares.push_back(used);
        }
        if self.spares.len() > SPARE_BUFFERS {
            // Its messages are still queued: they free it when they go.
            self.spares.pop_front();
        }
        fresh
    }

    /// Reads into `buf` (see [`AppStream::read_some`]); the spares are released when the
    /// application sends nothing for [`SPARE_IDLE`] (the read is cancel-safe: nothing is
    /// taken from the socket until it completes, and it starts over without them).
    async fn read(
        &mut self,
        app: &impl AppStream,
        buf: &mut BytesMut,
        max: usize,
    ) -> std::io::Result<usize> {
        if self.spares.is_empty() {
            return app.read_some(buf, max).await;
        }
        match tokio::time::timeout(SPARE_IDLE, app.read_some(buf, max)).await {
            Ok(r) => r,
            Err(_) => {
                self.spares = VecDeque::new();
                app.read_some(buf, max).await
            }
        }
    }
}

enum ToApp {
    Data(Bytes),
    Fin,
}

/// Peer → application: write DATA, return credit after writing; FIN → shutdown(Write).
async fn peer_to_app(
    app: &impl AppStream,
    rx: &mut mpsc::UnboundedReceiver<ToApp>,
    out: &impl Outbound,
    n: &Counters,
) -> Result<(), TunnelEnd> {
    let mut ungranted: u64 = 0;
    loop {
        match rx.recv().await {
            Some(ToApp::Data(d)) => {
                app.write_all(&d)
                    .await
                    .map_err(|e| TunnelEnd::LocalReset(format!("write: {e}")))?;
                n.to_app.fetch_add(d.len() as u64, Relaxed);
                ungranted += d.len() as u64;
                if ungranted >= GRANT_EVERY {
                    n.granted_by_us.fetch_add(ungranted, Relaxed);
                    let g = ungranted as u32;
                    ungranted = 0;
                    out.send(Msg::Window(g).encode())
                        .await
                        .map_err(TunnelEnd::PathLost)?;
                }
            }
            Some(ToApp::Fin) => {
                app.shutdown_write()
                    .await
                    .map_err(|e| TunnelEnd::LocalReset(format!("shutdown: {e}")))?;
                return Ok(());
            }
            None => return Err(TunnelEnd::Shutdown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads into `buf` until it has no room for another chunk, each read leaving as a
    /// message (as `app_to_peer` does); returns the messages.
    fn fill(buf: &mut BytesMut) -> Vec<Bytes> {
        let mut msgs = Vec::new();
        while buf.capacity() - buf.len() > CHUNK / 2 {
            buf.put_u8(kind::DATA);
            buf.put_bytes(7, CHUNK);
            msgs.push(buf.split().freeze());
        }
        msgs
    }

    #[test]
    fn a_read_buffer_is_used_again_once_its_messages_are_gone() {
        let mut buffers = ReadBuffers::default();
        let mut first = buffers.next(BytesMut::new());
        let at = first.as_ptr();
        let msgs = fill(&mut first);
        // Its message is still queued: the next read needs another buffer.
        let mut second = buffers.next(first);
        assert_ne!(second.as_ptr(), at);
        let more = fill(&mut second);
        drop(msgs);
        // Written and acknowledged: the first buffer comes back, whole.
        let third = buffers.next(second);
        assert_eq!(third.as_ptr(), at, "the freed buffer is reused");
        assert!(third.capacity() > CHUNK && third.is_empty());
        drop(more);
        assert!(!buffers.spares.is_empty());
    }

    /// An application that stops sending leaves the tunnel holding one read buffer, not the
    /// spares of its last burst.
    #[tokio::test(start_paused = true)]
    async fn the_spares_go_when_the_application_is_quiet() {
        let (app, mut program) = tokio::io::duplex(1 << 20);
        let mut buffers = ReadBuffers::default();
        let mut buf = buffers.next(BytesMut::new());
        let _queued = fill(&mut buf);
        buf = buffers.next(buf);
        assert_eq!(buffers.spares.len(), 1);
        let (app, _) = super::super::tests::MemApp::new(app);
        let t0 = tokio::time::Instant::now();
        let read = tokio::spawn(async move {
            let n = buffers.read(&app, &mut buf, 100).await.unwrap();
            (n, buffers.spares.len(), tokio::time::Instant::now() - t0)
        });
        // Still sending within the idle time: the spares stay.
        tokio::time::sleep(SPARE_IDLE - Duration::from_millis(1)).await;
        tokio::io::AsyncWriteExt::write_all(&mut program, b"x")
            .await
            .unwrap();
        let (n, spares, at) = read.await.unwrap();
        assert_eq!((n, spares), (1, 1));
        assert_eq!(at, SPARE_IDLE - Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_spares_are_released_after_the_idle_time() {
        let (app, mut program) = tokio::io::duplex(1 << 20);
        let mut buffers = ReadBuffers::default();
        let mut buf = buffers.next(BytesMut::new());
        let _queued = fill(&mut buf);
        buf = buffers.next(buf);
        let (app, _) = super::super::tests::MemApp::new(app);
        let read = tokio::spawn(async move {
            let n = buffers.read(&app, &mut buf, 100).await.unwrap();
            (n, buffers.spares.len())
        });
        // Quiet for longer: released while the read goes on waiting, and the bytes that come
        // later are read all the same.
        tokio::time::sleep(SPARE_IDLE * 3).await;
        tokio::io::AsyncWriteExt::write_all(&mut program, b"later")
            .await
            .unwrap();
        assert_eq!(read.await.unwrap(), (5, 0));
    }

    #[test]
    fn at_most_a_few_spare_buffers_are_kept() {
        let mut buffers = ReadBuffers::default();
        let mut buf = BytesMut::new();
        let mut queued = Vec::new();
        for _ in 0..3 * SPARE_BUFFERS {
            buf = buffers.next(buf);
            queued.extend(fill(&mut buf));
            assert!(buffers.spares.len() <= SPARE_BUFFERS);
        }
    }
}
