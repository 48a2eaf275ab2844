//! Who may use `/api/`: with `--api-token-file`, whoever sends `Authorization: Bearer
//! <token>`; without it, only peers on loopback (a request from elsewhere is refused with a
//! message that says which flag to add).
//!
//! One axum middleware ([`require`]), applied to every `/api/` route (the status page's
//! `/api/clients` included). The token is compared in constant time.

// Refusals are answers: an axum `Response` in the `Err` of cold-path helpers, not boxed.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq as _;

use super::api::error;

/// The API's access rule.
#[derive(Clone)]
pub(crate) struct ApiAuth {
    token: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for ApiAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiAuth")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl ApiAuth {
    /// Loopback only.
    pub(crate) fn loopback_only() -> Self {
        ApiAuth { token: None }
    }

    /// A bearer token.
    pub(crate) fn token(token: &[u8]) -> Self {
        ApiAuth {
            token: Some(Arc::from(token)),
        }
    }

    /// The token in `path` (surrounding whitespace trimmed; at least 16 bytes).
    pub(crate) fn from_file(path: &Path) -> anyhow::Result<Self> {
        let raw = std::fs::read(path)
            .with_context(|| format!("cannot read the API token file {}", path.display()))?;
        let token = raw.trim_ascii();
        if token.len() < 16 {
            return Err(crate::exit::UsageError(format!(
                "the API token in {} is {} bytes; use at least 16 (e.g. `head -c 32 /dev/urandom | base64 > {}`)",
                path.display(),
                token.len(),
                path.display()
            ))
            .into());
        }
        if token.iter().any(|b| !b.is_ascii_graphic()) {
            return Err(crate::exit::UsageError(format!(
                "the API token in {} must be printable ASCII without spaces (it goes in an HTTP header)",
                path.display()
            ))
            .into());
        }
        Ok(ApiAuth::token(token))
    }

    /// Whether a token is required.
    pub(crate) fn has_token(&self) -> bool {
        self.token.is_some()
    }

    fn check(
        &self,
        peer: Option<SocketAddr>,
        authorization: Option<&HeaderValue>,
    ) -> Result<(), Response> {
        let Some(token) = &self.token else {
            return match peer {
                Some(p) if p.ip().is_loopback() || p.ip().to_canonical().is_loopback() => Ok(()),
                _ => Err(error(
                    StatusCode::FORBIDDEN,
                    "the API answers only on loopback without a token: start `tether serve` with --api-token-file FILE and send `Authorization: Bearer <token>`".into(),
                )),
            };
        };
        let presented = authorization.and_then(|v| v.to_str().ok()).and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
        match presented {
            None => {
                let mut r = error(
                    StatusCode::UNAUTHORIZED,
                    "this API needs `Authorization: Bearer <token>` (the token in the server's --api-token-file)".into(),
                );
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                Err(r)
            }
            Some(p) if bool::from(p.as_bytes().ct_eq(token)) => Ok(()),
            Some(_) => {
                let mut r = error(StatusCode::UNAUTHORIZED, "wrong API token".into());
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
                Err(r)
            }
        }
    }
}

/// The middleware: lets the request through or answers 401/403 in JSON.
pub(crate) async fn require(State(auth): State<ApiAuth>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    match auth.check(peer, req.headers().get(header::AUTHORIZATION)) {
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
    fn loopback_only_without_a_token_and_the_bearer_token_with_one() {
        let lo: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let lo6: SocketAddr = "[::1]:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
        let far: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let open = ApiAuth::loopback_only();
        assert_eq!(status(open.check(Some(lo), None)), 200);
        assert_eq!(status(open.check(Some(lo6), None)), 200);
        assert_eq!(status(open.check(Some(mapped), None)), 200);
        assert_eq!(status(open.check(Some(far), None)), 403);
        assert_eq!(status(open.check(None, None)), 403);

        let t = ApiAuth::token(b"0123456789abcdef");
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(
            status(t.check(Some(far), Some(&h("Bearer 0123456789abcdef")))),
            200
        );
        assert_eq!(
            status(t.check(Some(far), Some(&h("bearer 0123456789abcdef")))),
            200
        );
        assert_eq!(
            status(t.check(Some(lo), None)),
            401,
            "a token binds loopback too"
        );
        assert_eq!(
            status(t.check(Some(far), Some(&h("Bearer 0123456789abcdeX")))),
            401
        );
        assert_eq!(
            status(t.check(Some(far), Some(&h("Basic 0123456789abcdef")))),
            401
        );
        assert_eq!(status(t.check(Some(far), Some(&h("Bearer")))), 401);
    }

    #[test]
    fn token_files_are_trimmed_and_short_ones_refused() {
        let dir = std::env::temp_dir().join(format!("tether-api-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, "  0123456789abcdef0123\n").unwrap();
        let a = ApiAuth::from_file(&good).unwrap();
        assert_eq!(a.token.as_deref(), Some(&b"0123456789abcdef0123"[..]));
        let short = dir.join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let e = ApiAuth::from_file(&short).unwrap_err().to_string();
        assert!(e.contains("at least 16"), "{e}");
        assert!(ApiAuth::from_file(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
