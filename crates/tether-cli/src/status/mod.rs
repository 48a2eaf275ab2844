//! The HTTP face of `tether serve`: the presence page, the JSON API and `/metrics`, on the
//! shared HTTP stack ([`crate::http`]).
//!
//! ```text
//!   GET /                       the page (server-rendered first page; ?state=&cursor=&limit=)
//!   GET /status.js, /status.css its script and style (CSP: nothing inline)
//!   GET /api/clients            one page of clients as JSON (see api.rs)
//!   GET /api/clients/{id}       one client as JSON
//!   GET /metrics                OpenMetrics text (see metrics.rs)
//! ```
//!
//! The page is a client of the JSON API: one model ([`model`]), two renderings of it; the
//! page's script fetches `/api/clients` like any backend (with the API token when the
//! server has one: open the page as `/#token=…`). The gateway (`crate::gateway`) adds the
//! write side and the event stream beside [`api_routes`].

pub(crate) mod api;
pub(crate) mod html;
pub(crate) mod metrics;
pub(crate) mod model;

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;

use model::StatusSource;

/// Every route of the status server, unprotected (tests; `serve` protects the API with
/// [`crate::gateway::protect`]).
#[cfg(test)]
pub(crate) fn router(source: Arc<dyn StatusSource>, registry: Arc<Registry>) -> Router {
    page_routes(source.clone(), registry).merge(api_routes(source))
}

/// The JSON API's read side: `/api/clients` and `/api/clients/{id}`.
pub(crate) fn api_routes(source: Arc<dyn StatusSource>) -> Router {
    Router::new()
        .route("/api/clients", get(clients))
        .route("/api/clients/{id}", get(api::one))
        .with_state(source)
}

/// The page, its assets and `/metrics`.
pub(crate) fn page_routes(source: Arc<dyn StatusSource>, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/index.html", get(page))
        .route(
            "/status.js",
            get(|| async { asset("text/javascript; charset=utf-8", html::SCRIPT) }),
        )
        .route(
            "/status.css",
            get(|| async { asset("text/css; charset=utf-8", html::STYLE) }),
        )
        .with_state(source)
        .merge(crate::metrics::route(registry))
}

const CSP: HeaderName = header::CONTENT_SECURITY_POLICY;

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (CSP, HeaderValue::from_static(html::CSP)),
        ],
        body,
    )
        .into_response()
}

async fn page(
    State(source): State<Arc<dyn StatusSource>>,
    query: Result<Query<api::RawQuery>, QueryRejection>,
) -> Response {
    let q = match query
        .map_err(|e| e.body_text())
        .and_then(|Query(raw)| raw.parse().map_err(|e| e.to_string()))
    {
        Ok(q) => q,
        Err(e) => return (axum::http::StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let p = source.page(&q);
    let mut body = html::render(&p, &q, source.rtt_every(), SystemTime::now());
    if let Some(note) = source.note() {
        // A line above the counts (the cluster's state): static, the script leaves it alone.
        body = body.replacen(
            "<p id=\"summary\">",
            &format!(
                "<p id=\"cluster\">{}</p>\n<p id=\"summary\">",
                html::escape(&note)
            ),
            1,
        );
    }
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (CSP, HeaderValue::from_static(html::CSP)),
        ],
        body,
    )
        .into_response()
}

async fn clients(
    state: State<Arc<dyn StatusSource>>,
    query: Result<Query<api::RawQuery>, QueryRejection>,
) -> Response {
    match query {
        Ok(q) => api::list(state, q).await,
        Err(e) => api::bad_query(e.body_text()),
    }
}

#[cfg(test)]
mod tests {
    use super::model::tests::row;
    use super::model::{ClientRow, StatusSource};
    use super::*;
    use crate::http::testing::{get as http_get, header as head_value};
    use std::net::SocketAddr;
    use std::time::Duration;
    use tether_proto::presence::PresenceKind;
    use tether_proto::DisconnectReason;
    use tokio::net::TcpListener;

    struct Fake(Vec<ClientRow>);

    impl StatusSource for Fake {
        fn clients(&self) -> Vec<ClientRow> {
            self.0.clone()
        }
        fn client(&self, id: &str) -> Option<ClientRow> {
            self.0.iter().find(|r| r.id == id).cloned()
        }
        fn rtt_every(&self) -> Option<Duration> {
            Some(Duration::from_secs(30))
        }
    }

    fn fake() -> Arc<dyn StatusSource> {
        let mut rows = vec![
            row("<script>alert(1)</script>", PresenceKind::Offline),
            row("a/b c", PresenceKind::Online),
            row("phone-1", PresenceKind::Online),
            row("phone-2", PresenceKind::Suspect),
            ClientRow {
                hold_left: Some(Duration::from_millis(20_500)),
                reason: Some(DisconnectReason::PeerReset),
                ..row("tablet-3", PresenceKind::Resuming)
            },
        ];
        rows[3].rtt = None;
        Arc::new(Fake(rows))
    }

    async fn start() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(fake(), Arc::new(Registry::default()));
        let task = tokio::spawn(crate::http::serve(
            listener,
            app,
            crate::http::STATUS_LIMITS,
        ));
        (addr, task)
    }

    #[tokio::test]
    async fn page_and_assets_carry_a_content_security_policy() {
        let (addr, task) = start().await;
        let (status, head, body) = http_get(addr, "/").await;
        assert_eq!(status, 200);
        assert_eq!(
            head_value(&head, "content-type"),
            Some("text/html; charset=utf-8")
        );
        let csp = head_value(&head, "content-security-policy").expect("a CSP header");
        assert!(
            csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert!(body.contains("phone-1") && body.contains("id=\"clients\""));
        for (path, ctype) in [
            ("/status.js", "text/javascript"),
            ("/status.css", "text/css"),
        ] {
            let (status, head, body) = http_get(addr, path).await;
            assert_eq!(status, 200, "{path}");
            assert!(head_value(&head, "content-type")
                .unwrap()
                .starts_with(ctype));
            assert!(!body.is_empty());
        }
        task.abort();
    }

    #[tokio::test]
    async fn api_paginates_filters_and_finds_one_client() {
        let (addr, task) = start().await;
        let (status, head, body) = http_get(addr, "/api/clients?limit=2").await;
        assert_eq!(status, 200);
        assert_eq!(head_value(&head, "content-type"), Some("application/json"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let ids = |v: &serde_json::Value| -> Vec<String> {
            v["clients"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(ids(&v), ["<script>alert(1)</script>", "a/b c"]);
        assert_eq!(v["matching"], 5);
        assert_eq!(v["next_cursor"], "a/b c");
        // The cursor goes back URL-encoded; the next page starts after it.
        let (_, _, body) = http_get(addr, "/api/clients?limit=2&cursor=a%2Fb%20c").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(ids(&v), ["phone-1", "phone-2"]);
        let (_, _, body) = http_get(addr, "/api/clients?state=online").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(ids(&v), ["a/b c", "phone-1"]);
        assert_eq!(v["next_cursor"], serde_json::Value::Null);
        assert_eq!(v["counts"]["offline"], 1, "counts are of all clients");
        // Bad parameters: 400 with a JSON error naming the parameter.
        for q in ["state=asleep", "limit=0", "limit=5000"] {
            let (status, _, body) = http_get(addr, &format!("/api/clients?{q}")).await;
            assert_eq!(status, 400, "{q}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let param = q.split('=').next().unwrap();
            assert!(v["error"].as_str().unwrap().contains(param), "{body}");
        }
        // One client, by (encoded) id; an unknown one is a 404 in JSON.
        let (status, _, body) = http_get(addr, "/api/clients/a%2Fb%20c").await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (v["id"].as_str(), v["state"].as_str()),
            (Some("a/b c"), Some("online"))
        );
        let (status, _, body) = http_get(addr, "/api/clients/nobody").await;
        assert_eq!(status, 404);
        assert!(body.contains("unknown client id"), "{body}");
        // The page takes the same query.
        let (status, _, body) = http_get(addr, "/?state=offline").await;
        assert_eq!(status, 200);
        assert!(
            body.contains("offline since") && !body.contains(">phone-1<"),
            "{body}"
        );
        assert_eq!(http_get(addr, "/?limit=x").await.0, 400);
        task.abort();
    }

    /// Renders the page in headless chromium through `scripts/browser-check` and keeps the
    /// screenshot (`$BROWSER_CHECK_OUT`, default `target/browser-check/status.png`). Runs
    /// whenever chromium is installed; prints a visible `SKIP:` line otherwise.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn browser_renders_the_status_page() {
        let Some(chromium) = [
            "/usr/bin/chromium",
            "/usr/bin/chromium-browser",
            "/usr/bin/google-chrome",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists()) else {
            println!("SKIP: browser_renders_the_status_page: chromium is not installed (apt-get install chromium)");
            return;
        };
        let (addr, task) = start().await;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = std::env::var_os("BROWSER_CHECK_OUT")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| root.join("target/browser-check/status.png"));
        let dom = out.with_extension("dom.html");
        let output = tokio::process::Command::new(root.join("scripts/browser-check"))
            .arg(format!("http://{addr}/?limit=4"))
            .arg(&out)
            .arg("phone-1")
            .env("BROWSER_CHECK_DOM", &dom)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "browser-check with {chromium} failed: {stderr}"
        );
        let dom = std::fs::read_to_string(&dom).unwrap();
        // The page's script ran under the CSP and re-rendered the table from /api/clients.
        assert!(
            dom.contains("data-updated=\""),
            "the refresh script did not run:\n{dom}"
        );
        assert!(dom.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(dom.contains("offline since 23:16:40"), "{dom}");
        assert!(
            dom.contains("title=\"measured after the first ping\""),
            "{dom}"
        );
        assert!(
            dom.contains("id=\"next\""),
            "the pager links to the next page:\n{dom}"
        );
        assert!(!dom.contains("tablet-3"), "limit=4 shows four rows");
        assert!(
            std::fs::metadata(&out).unwrap().len() > 10_000,
            "a real screenshot"
        );
        task.abort();
    }
}
