//! Who may use `/api/` when the HTTP listener has no token: only peers on loopback. A
//! request from elsewhere is refused with `403` and a message that names the flag to add.
//!
//! With `--http-token-file` every route of the listener (the page, `/metrics`, `/api/`)
//! needs the token instead ([`crate::http_auth`]), and this gate is not installed.
//!
//! The API can send to, broadcast to and close any client: without a token it must not
//! answer the network, whatever address `--http` listens on.

// Refusals are answers: an axum `Response` in the `Err` of cold-path helpers, not boxed.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::api::error;

/// Lets a request from loopback through; anything else gets `403`.
fn check(peer: Option<SocketAddr>) -> Result<(), Response> {
    match peer {
        Some(p) if p.ip().is_loopback() || p.ip().to_canonical().is_loopback() => Ok(()),
        _ => Err(error(
            StatusCode::FORBIDDEN,
            "the API answers only on loopback without a token: start `tether serve` with --http-token-file FILE and send `Authorization: Bearer <token>`".into(),
        )),
    }
}

/// The middleware: lets the request through or answers 403 in JSON.
pub(crate) async fn loopback_only(req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    match check(peer) {
        Ok(()) => next.run(req).await,
        Err(r) => r.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(r: Result<(), Response>) -> u16 {
        match r {
            Ok(()) => 200,
            Err(r) => r.status().as_u16(),
        }
    }

    #[test]
    fn loopback_passes_and_nothing_else_does() {
        let lo: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let lo6: SocketAddr = "[::1]:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
        let far: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        assert_eq!(status(check(Some(lo))), 200);
        assert_eq!(status(check(Some(lo6))), 200);
        assert_eq!(status(check(Some(mapped))), 200);
        assert_eq!(status(check(Some(far))), 403);
        assert_eq!(status(check(None)), 403, "an unknown peer is not trusted");
    }
}
