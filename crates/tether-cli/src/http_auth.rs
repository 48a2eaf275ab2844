//! Access control for the HTTP listener of `serve` (status page, JSON API, `/metrics`, and
//! the gateway routes added beside them): an optional bearer token on every route, and a
//! Content-Security-Policy on every answer that does not set its own.
//!
//! ```text
//!  request ─▶ Authorization: Bearer TOKEN ──────────────┐
//!           ─▶ Authorization: Basic base64(any:TOKEN) ───┼─▶ route ─▶ CSP (default-src 'none'
//!           ─▶ anything else: 401 + WWW-Authenticate ────┘            unless the route set one)
//! ```
//!
//! Basic is accepted beside Bearer so that a browser can open the page: it asks for a user
//! name and password once (any user name, the token as the password) and then sends it with
//! every request of the page, the script's API calls included. The comparison is in
//! constant time.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{from_fn_with_state, map_response, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine as _;
use subtle::ConstantTimeEq;

/// The policy of answers that set none (JSON, metrics, errors): nothing may load, nothing
/// may frame them.
const DEFAULT_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// Requires `token` (when given) on every route of `app`, and adds the default CSP.
pub(crate) fn protect(app: Router, token: Option<String>) -> Router {
    let app = app.layer(map_response(default_csp));
    match token {
        Some(t) => app.layer(from_fn_with_state(Arc::new(t), check)),
        None => app,
    }
}

async fn default_csp(mut r: Response) -> Response {
    r.headers_mut()
        .entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static(DEFAULT_CSP));
    r
}

async fn check(State(token): State<Arc<String>>, req: Request, next: Next) -> Response {
    if authorized(req.headers(), &token) {
        return next.run(req).await;
    }
    // JSON like every other refusal of the API (`{"error": …}`), readable in a browser too.
    let mut r = (
        StatusCode::UNAUTHORIZED,
        axum::Json(serde_json::json!({
            "error": "unauthorized: send Authorization: Bearer TOKEN (the token of --http-token-file), or log in with HTTP Basic (any user, the token as the password)"
        })),
    )
        .into_response();
    let h = r.headers_mut();
    h.insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(
            "Bearer realm=\"tether\", Basic realm=\"tether\", charset=\"UTF-8\"",
        ),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(DEFAULT_CSP),
    );
    r
}

fn same(presented: &[u8], token: &str) -> bool {
    bool::from(presented.ct_eq(token.as_bytes()))
}

/// Whether the request carries the token (Bearer, or Basic with it as the password).
fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let (scheme, rest) = v.trim().split_once(' ').unwrap_or((v, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return same(rest.as_bytes(), token);
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(rest) else {
            return false;
        };
        return match raw.iter().position(|b| *b == b':') {
            Some(i) => same(&raw[i + 1..], token),
            None => false,
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::testing;
    use axum::routing::get;

    const TOKEN: &str = "s3cret-token-for-tests";

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn bearer_and_basic_with_the_token_pass_and_nothing_else_does() {
        let basic = |s: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        };
        for ok in [
            format!("Bearer {TOKEN}"),
            format!("bearer  {TOKEN} "),
            basic(&format!("admin:{TOKEN}")),
            basic(&format!(":{TOKEN}")),
        ] {
            assert!(authorized(&headers(&ok), TOKEN), "{ok}");
        }
        for no in [
            "Bearer".to_owned(),
            "Bearer wrong".to_owned(),
            format!("Bearer {TOKEN}x"),
            format!("Token {TOKEN}"),
            basic(TOKEN),
            basic(&format!("{TOKEN}:x")),
            "Basic !!!".to_owned(),
        ] {
            assert!(!authorized(&headers(&no), TOKEN), "{no}");
        }
        assert!(!authorized(&HeaderMap::new(), TOKEN));
    }

    async fn start(app: Router, token: Option<&str>) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(crate::http::serve(
            l,
            protect(app, token.map(str::to_owned)),
            crate::http::STATUS_LIMITS,
        ));
        addr
    }

    #[tokio::test]
    async fn every_route_needs_the_token_and_every_answer_has_a_csp() {
        let app = Router::new()
            .route("/", get(|| async { "page" }))
            .route("/api/clients", get(|| async { "[]" }));
        let addr = start(app, Some(TOKEN)).await;
        for path in ["/", "/api/clients", "/nope"] {
            let (status, head, _) = testing::get(addr, path).await;
            assert_eq!(status, 401, "{path}");
            let www = testing::header(&head, "www-authenticate").unwrap();
            assert!(www.starts_with("Bearer realm=\"tether\", Basic"), "{www}");
            assert_eq!(
                testing::header(&head, "content-security-policy"),
                Some(DEFAULT_CSP)
            );
        }
        let req = format!(
            "GET /api/clients HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
        );
        let (status, head, body) = testing::exchange(addr, req.as_bytes()).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "[]"));
        assert_eq!(
            testing::header(&head, "content-security-policy"),
            Some(DEFAULT_CSP)
        );
        // A route's own policy is kept.
        let page = Router::new().route(
            "/",
            get(|| async {
                (
                    [(header::CONTENT_SECURITY_POLICY, "default-src 'self'")],
                    "page",
                )
            }),
        );
        // Without a token configured: open, still with a CSP.
        let addr = start(page, None).await;
        let (status, head, _) = testing::get(addr, "/").await;
        assert_eq!(status, 200);
        assert_eq!(
            testing::header(&head, "content-security-policy"),
            Some("default-src 'self'")
        );
    }
}
