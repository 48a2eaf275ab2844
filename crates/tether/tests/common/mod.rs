//! Test helpers: a userspace blackhole proxy and raw-protocol peers.
#![allow(dead_code, unreachable_pub)]

pub mod manual;
pub mod pki;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_proto::{Keepalive, Policy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A policy with small timers for loopback tests.
pub fn fast_policy(h_ms: u64, d_ms: u64) -> Policy {
    Policy {
        heartbeat_interval: Duration::from_millis(h_ms),
        dead_after: Duration::from_millis(d_ms),
        idle_timeout: None,
        keepalive: Some(Keepalive {
            idle: Duration::from_secs(5),
            interval: Duration::from_secs(1),
            count: 3,
        }),
        user_timeout: Some(Duration::from_secs(8)),
        ping_interval: None,
        detect_within: Duration::from_millis(d_ms),
        ..Policy::default()
    }
}

/// A TCP proxy on loopback that can stop forwarding in both directions ("blackhole"):
/// bytes are read and discarded, nothing is closed, no FIN or RST reaches either side.
pub struct Blackhole {
    pub addr: SocketAddr,
    holed: Arc<AtomicBool>,
}

impl Blackhole {
    pub async fn start(upstream: SocketAddr) -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let holed = Arc::new(AtomicBool::new(false));
        let h = holed.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(pump(dr, uw, h.clone()));
                tokio::spawn(pump(ur, dw, h.clone()));
            }
        });
        Blackhole { addr, holed }
    }

    pub fn set(&self, on: bool) {
        self.holed.store(on, Ordering::SeqCst);
    }
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    holed: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16384];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => {
                // Never forward FIN/RST while holed: a blackhole closes nothing.
                while holed.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let _ = w.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if holed.load(Ordering::SeqCst) {
            continue;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Performs the server side of the handshake by hand and returns the raw stream.
pub async fn raw_accept(listener: &TcpListener, h_ms: u32, d_ms: u32) -> TcpStream {
    let (mut s, _) = listener.accept().await.unwrap();
    // Read preamble + HELLO frame.
    let mut pre = [0u8; 5];
    s.read_exact(&mut pre).await.unwrap();
    assert_eq!(&pre[..4], b"TTHR");
    let len = s.read_u32().await.unwrap();
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(body[0], 0x10, "first frame is HELLO");
    let mut out = Vec::new();
    out.extend_from_slice(b"TTHR\x01");
    out.extend_from_slice(&10u32.to_be_bytes());
    out.push(0x11);
    out.push(0);
    out.extend_from_slice(&h_ms.to_be_bytes());
    out.extend_from_slice(&d_ms.to_be_bytes());
    s.write_all(&out).await.unwrap();
    s
}

/// Sends the preamble and `hello` on a new connection to `addr` and returns the body of the
/// first frame the server answers with (its type byte first). The connection is dropped
/// without a goodbye on return.
pub async fn raw_first_frame(addr: SocketAddr, hello: tether_proto::codec::Hello) -> Vec<u8> {
    raw_hello_answer(addr, hello).await.1
}

/// [`raw_first_frame`] that keeps the connection open: the stream and the answer's body.
pub async fn raw_hello_answer(
    addr: SocketAddr,
    hello: tether_proto::codec::Hello,
) -> (TcpStream, Vec<u8>) {
    use tether_proto::codec::{self, Frame};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = bytes::BytesMut::new();
    codec::encode_preamble(&mut out);
    codec::encode(&Frame::Hello(hello), &mut out);
    s.write_all(&out).await.unwrap();
    let body = tokio::time::timeout(Duration::from_secs(3), read_first_frame(&mut s))
        .await
        .expect("answered within 3 s");
    (s, body)
}

/// The server's preamble, then the body of its first frame.
async fn read_first_frame(s: &mut TcpStream) -> Vec<u8> {
    let mut pre = [0u8; 5];
    s.read_exact(&mut pre).await.unwrap();
    assert_eq!(&pre, b"TTHR\x01");
    let len = s.read_u32().await.unwrap();
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body).await.unwrap();
    body
}

/// Performs the client side of the handshake by hand and returns the raw stream.
pub async fn raw_connect(addr: SocketAddr, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&raw_hello(id)).await.unwrap();
    let body = read_first_frame(&mut s).await;
    assert_eq!(body[0], 0x11, "expected WELCOME, got {body:?}");
    s
}

/// Preamble + HELLO for `id`, as bytes.
pub fn raw_hello(id: &str) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"TTHR\x01");
    let body_len = 1 + 1 + 4 + 1 + id.len();
    out.extend_from_slice(&(body_len as u32).to_be_bytes());
    out.push(0x10);
    out.push(0);
    out.extend_from_slice(&0u32.to_be_bytes());
    out.push(id.len() as u8);
    out.extend_from_slice(id.as_bytes());
    out
}

/// A TCP proxy whose connections can all be reset at once (RST both ways, like a NAT that
/// forgot the flow and answers the next packet with a reset).
pub struct Flaky {
    pub addr: SocketAddr,
    live: Arc<Mutex<HashMap<u64, (tokio::task::AbortHandle, tokio::task::AbortHandle)>>>,
}

impl Flaky {
    pub async fn start(upstream: SocketAddr) -> Flaky {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let live: Arc<Mutex<HashMap<u64, _>>> = Arc::default();
        let live2 = live.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while let Ok((down, _)) = l.accept().await {
                let Ok(up) = TcpStream::connect(upstream).await else {
                    continue;
                };
                socket2::SockRef::from(&down)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                socket2::SockRef::from(&up)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                let (mut dr, mut dw) = down.into_split();
                let (mut ur, mut uw) = up.into_split();
                let a = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut dr, &mut uw).await;
                });
                let b = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut ur, &mut dw).await;
                });
                n += 1;
                live2
                    .lock()
                    .unwrap()
                    .insert(n, (a.abort_handle(), b.abort_handle()));
            }
        });
        Flaky { addr, live }
    }

    /// Resets every connection through the proxy; how many were live.
    pub fn reset_all(&self) -> usize {
        let mut live = self.live.lock().unwrap();
        let n = live
            .values()
            .filter(|(a, b)| !a.is_finished() && !b.is_finished())
            .count();
        for (_, (a, b)) in live.drain() {
            a.abort();
            b.abort();
        }
        n
    }
}
