//! The one HTTP server of the `tether` command: the status page and JSON API of `serve`, and
//! `/metrics` of `serve`, `proxy` and `tunnel`.
//!
//! ```text
//!   TcpListener ─accept─▶ slot (Semaphore) ─▶ TimeoutStream (write deadline)
//!        ▲ excess waits in the                 └─▶ hyper http1 (head ≤ 8 KiB, read within 5 s,
//!        │ kernel's backlog                          keep-alive) ─▶ axum Router ─▶ handler
//! ```
//!
//! hyper does the HTTP/1.1 (parsing, HEAD, keep-alive, 431 for an oversized head); axum does
//! the routing, query strings, JSON and 404/405. This module adds what neither does alone:
//! a bounded number of connections served at once, a deadline on every write (a client that
//! stops reading cannot hold a slot forever), and the headers every answer carries
//! (`Cache-Control: no-store`, `X-Content-Type-Options: nosniff`). Accept errors (for
//! example running out of file descriptors) are logged and retried after a short pause;
//! they never end the server.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderValue};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;

/// Limits of one HTTP listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Longest request head (request line and headers) accepted; longer gets 431.
    pub(crate) max_head: usize,
    /// A request head must arrive within this (also closes idle keep-alive connections).
    pub(crate) head_deadline: Duration,
    /// Each write of the answer must make progress within this.
    pub(crate) write_deadline: Duration,
    /// Connections served at once; more wait in the accept queue.
    pub(crate) max_connections: usize,
}

/// The status page of `serve`: a browser polls it, a few scrapers and scripts.
pub(crate) const STATUS_LIMITS: Limits = Limits {
    max_head: 8 * 1024,
    head_deadline: Duration::from_secs(5),
    write_deadline: Duration::from_secs(5),
    max_connections: 64,
};

/// `serve`'s listener: the status page, the server API and its event streams. A backend
/// holds one connection per event stream and a few for requests; an event stream that
/// cannot write for 15 s is cut (the backend resumes it with `Last-Event-ID`).
pub(crate) const GATEWAY_LIMITS: Limits = Limits {
    write_deadline: Duration::from_secs(15),
    max_connections: 256,
    ..STATUS_LIMITS
};

/// A `/metrics` listener of `proxy` or `tunnel`: scrapers only.
pub(crate) const METRICS_LIMITS: Limits = Limits {
    max_connections: 16,
    ..STATUS_LIMITS
};

/// hyper's smallest read buffer: the head limit cannot go below it.
const HYPER_MIN_BUF: usize = 8 * 1024;

/// Serves `app` on `listener` until the task is dropped or aborted.
pub(crate) async fn serve(listener: TcpListener, app: Router, limits: Limits) {
    let app = app.layer(axum::middleware::map_response(common_headers));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        // Wait for a free slot first, so that excess clients queue in the kernel's backlog.
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return; // the semaphore is never closed
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "http: accept failed; retrying in 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut io = TimeoutStream::new(stream);
            io.set_write_timeout(Some(limits.write_deadline));
            let io = TokioIo::new(Box::pin(io));
            // Handlers that care who asks (the API's loopback rule) read the peer address.
            let app = app.layer(axum::Extension(ConnectInfo(peer)));
            let result = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.head_deadline)
                .max_buf_size(limits.max_head.max(HYPER_MIN_BUF))
                .max_header_size(limits.max_head)
                .serve_connection(io, TowerToHyperService::new(app))
                .await;
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "http: connection ended with an error");
            }
        });
    }
}

/// Headers every answer carries.
async fn common_headers(mut response: axum::response::Response) -> axum::response::Response {
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// Binds `addr` for HTTP, with an error that says what the listener is for.
pub(crate) async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr}"))
}

#[cfg(test)]
pub(crate) mod testing {
    //! A raw HTTP/1.1 client for tests: what a curl or a scraper would send, byte for byte.

    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Sends `request` raw, reads until the server closes; returns (status, head, body).
    /// `None` when the server closed without an answer.
    pub(crate) async fn exchange(
        addr: SocketAddr,
        request: &[u8],
    ) -> Option<(u16, String, String)> {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .expect("server answered and closed within 10 s");
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.get(9..12)?.parse().ok()?;
        Some((status, head.to_owned(), body.to_owned()))
    }

    /// `GET path` with `Connection: close`; panics unless answered.
    pub(crate) async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        exchange(addr, req.as_bytes()).await.expect("an answer")
    }

    /// A header's value from a response head.
    pub(crate) fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{exchange, get, header};
    use super::*;
    use axum::routing::get as route_get;
    use std::net::SocketAddr;
    use std::time::Instant;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    async fn start(limits: Limits) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/hello", route_get(|| async { "hi\n" }));
        (addr, tokio::spawn(serve(listener, app, limits)))
    }

    #[tokio::test]
    async fn routes_head_404_405_and_common_headers() {
        let (addr, task) = start(STATUS_LIMITS).await;
        let (status, head, body) = get(addr, "/hello").await;
        assert_eq!((status, body.as_str()), (200, "hi\n"));
        assert_eq!(header(&head, "cache-control"), Some("no-store"));
        assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
        let (status, head, body) = exchange(
            addr,
            b"HEAD /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        assert_eq!((status, body.as_str()), (200, ""));
        assert_eq!(header(&head, "content-length"), Some("3"));
        assert_eq!(get(addr, "/nope").await.0, 404);
        let (status, head, _) = exchange(
            addr,
            b"POST /hello HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        )
        .await
        .unwrap();
        assert_eq!(status, 405);
        assert!(header(&head, "allow").unwrap().contains("GET"), "{head}");
        task.abort();
    }

    #[tokio::test]
    async fn garbage_and_oversized_heads_are_refused_and_the_server_keeps_serving() {
        let (addr, task) = start(STATUS_LIMITS).await;
        // A TLS ClientHello and plain words: 400 or a plain close, never a panic.
        for garbage in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"[..],
            b"hello there\r\n\r\n",
        ] {
            if let Some((status, _, _)) = exchange(addr, garbage).await {
                assert_eq!(status, 400);
            }
        }
        // 9 KiB of header: 431, though the client keeps sending.
        let mut big = b"GET /hello HTTP/1.1\r\nX-Filler: ".to_vec();
        big.resize(9 * 1024, b'a');
        big.extend_from_slice(b"\r\n\r\n");
        let (status, _, _) = exchange(addr, &big).await.expect("a 431");
        assert_eq!(status, 431);
        // Just under the limit is fine.
        let mut fits = b"GET /hello HTTP/1.1\r\nConnection: close\r\nX-Filler: ".to_vec();
        fits.resize(8 * 1024 - 8, b'a');
        fits.extend_from_slice(b"\r\n\r\n");
        assert_eq!(exchange(addr, &fits).await.unwrap().0, 200);
        // A client that connects and leaves without a word disturbs nothing.
        drop(TcpStream::connect(addr).await.unwrap());
        assert_eq!(get(addr, "/hello").await.0, 200);
        task.abort();
    }

    #[tokio::test]
    async fn a_silent_client_is_closed_at_the_head_deadline() {
        let limits = Limits {
            head_deadline: Duration::from_millis(300),
            ..STATUS_LIMITS
        };
        let (addr, task) = start(limits).await;
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, b"GET /hello HTTP/1.1\r\n")
            .await
            .unwrap(); // never finishes the head
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink))
            .await
            .expect("closed within 10 s");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(5),
            "closed after {took:?}"
        );
        task.abort();
    }

    #[tokio::test]
    async fn clients_beyond_the_slot_limit_queue_and_are_served() {
        let limits = Limits {
            max_connections: 2,
            head_deadline: Duration::from_millis(500),
            ..STATUS_LIMITS
        };
        let (addr, task) = start(limits).await;
        // Two silent clients hold both slots until their head deadline.
        let silent = [
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        let started = Instant::now();
        assert_eq!(get(addr, "/hello").await.0, 200);
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(silent);
        task.abort();
    }
}
