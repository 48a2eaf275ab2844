//! `--auth-webhook URL`: the backend decides whether a HELLO may connect (Centrifugo's
//! connect proxy is the model). One HTTP POST per HELLO, through hyper's pooled client.
//!
//! ```text
//!   HELLO ─▶ server: AuthDecision::Pending ─▶ POST URL {"client_id", "remote", "credential" |
//!            (handshake deadline and cap        "credential_base64", "resume"}
//!             bound the wait)            ◀─ 200 {"allow": true, "principal"?, "ids"?}
//!                                        ◀─ 200 {"allow": false, "code"?, "reason"?}
//!   anything else (timeout, refused connection, non-2xx, not that JSON): REFUSE(15
//!   refused, "authorization unavailable: …") — fail closed; clients retry with backoff
//! ```
//!
//! Plain `http://` only: the backend is expected beside the gateway (loopback or a private
//! network); TLS to the webhook is not implemented.

use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tether::auth::{
    AllowedIds, AuthDecision, AuthRequest, Authorize, Denial, PendingDecision, Principal, Scheme,
};
use tether::CloseCode;

/// The longest answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// The webhook client.
pub(crate) struct Webhook {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    timeout: Duration,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("uri", &self.uri)
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[derive(Serialize)]
struct Question<'a> {
    client_id: &'a str,
    remote: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credential: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credential_base64: Option<String>,
    resume: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    allow: bool,
    principal: Option<String>,
    ids: Option<Vec<String>>,
    code: Option<u16>,
    reason: Option<String>,
}

impl Webhook {
    /// A client for `url` (`http://host:port/path`) that waits at most `timeout` per HELLO.
    pub(crate) fn new(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("--auth-webhook {url:?} is not a URL"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(crate::exit::UsageError(format!(
                "--auth-webhook {url:?}: expected http://HOST[:PORT]/PATH (https is not supported; keep the backend beside the gateway)"
            ))
            .into());
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Webhook {
            client,
            uri,
            timeout,
        })
    }

    async fn ask(&self, q: &Query) -> Result<AuthDecision, String> {
        let (credential, credential_base64) = match q.credential.as_deref() {
            None => (None, None),
            Some(c) => match std::str::from_utf8(c) {
                Ok(t) => (Some(t), None),
                Err(_) => (
                    None,
                    Some(base64::engine::general_purpose::STANDARD.encode(c)),
                ),
            },
        };
        let body = serde_json::to_vec(&Question {
            client_id: &q.client_id,
            remote: q.remote.map(|r| r.to_string()),
            credential,
            credential_base64,
            resume: q.resume,
        })
        .map_err(|e| e.to_string())?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("tether/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| format!("cannot reach the webhook: {}", chain(&e)))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("cannot read the webhook's answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("the webhook answered HTTP {}", status.as_u16()));
        }
        decide(&q.client_id, &body)
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The decision in a webhook's answer (see the module docs).
fn decide(client_id: &str, body: &[u8]) -> Result<AuthDecision, String> {
    let a: Answer = serde_json::from_slice(body)
        .map_err(|e| format!("the webhook's answer is not {{\"allow\": true|false, …}}: {e}"))?;
    if !a.allow {
        let code = CloseCode(a.code.unwrap_or(CloseCode::UNAUTHORIZED.0));
        let ok = [
            CloseCode::UNAUTHORIZED,
            CloseCode::ID_NOT_ALLOWED,
            CloseCode::THROTTLED,
            CloseCode::REFUSED,
        ]
        .contains(&code)
            || code >= CloseCode::APPLICATION_MIN;
        if !ok {
            return Err(format!(
                "the webhook denied with code {}; use 15, 17, 18, 19 or 1000 and up",
                code.0
            ));
        }
        return Ok(AuthDecision::Deny(Denial {
            code,
            text: a.reason.unwrap_or_else(|| "denied by the backend".into()),
        }));
    }
    let allowed = match &a.ids {
        None => AllowedIds::only(client_id),
        Some(ids) => AllowedIds::parse(ids).map_err(|e| format!("the webhook's \"ids\": {e}"))?,
    };
    let name = a.principal.unwrap_or_else(|| client_id.to_owned());
    Ok(AuthDecision::Allow(Principal::new(
        Scheme::Custom("webhook".into()),
        name,
        allowed,
    )))
}

/// What the webhook is asked: the parts of an [`AuthRequest`] it sends, owned (the request
/// borrows from the connection; the question outlives the call).
struct Query {
    client_id: String,
    credential: Option<Vec<u8>>,
    remote: Option<std::net::SocketAddr>,
    resume: bool,
}

impl Authorize for Webhook {
    fn authorize(&self, req: &AuthRequest<'_>) -> AuthDecision {
        let query = Query {
            client_id: req.client_id.to_owned(),
            credential: req.credential.map(<[u8]>::to_vec),
            remote: req.remote,
            resume: req.resume,
        };
        let this = Webhook {
            client: self.client.clone(),
            uri: self.uri.clone(),
            timeout: self.timeout,
        };
        AuthDecision::Pending(PendingDecision::new(async move {
            let unavailable = |why: String| {
                tracing::warn!(client = %query.client_id, %why, "auth webhook: refusing (fail closed)");
                AuthDecision::Deny(Denial {
                    code: CloseCode::REFUSED,
                    text: format!("authorization unavailable: {why}"),
                })
            };
            match tokio::time::timeout(this.timeout, this.ask(&query)).await {
                Ok(Ok(d)) => d,
                Ok(Err(why)) => unavailable(why),
                Err(_) => unavailable(format!(
                    "the webhook did not answer within {}",
                    tether_proto::duration::Human(this.timeout)
                )),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(d: AuthDecision) -> Principal {
        match d {
            AuthDecision::Allow(p) => p,
            AuthDecision::Deny(d) => panic!("denied: {d:?}"),
            AuthDecision::Pending(_) => panic!("pending"),
        }
    }

    #[test]
    fn answers_allow_with_a_principal_and_ids_or_deny_with_a_code() {
        let p = allow(decide("phone-1", br#"{"allow": true}"#).unwrap());
        assert_eq!(p.name, "phone-1");
        assert!(p.allows("phone-1") && !p.allows("phone-2"));
        let p = allow(
            decide(
                "phone-1",
                br#"{"allow": true, "principal": "alice", "ids": ["phone-*"]}"#,
            )
            .unwrap(),
        );
        assert_eq!(p.name, "alice");
        assert!(p.allows("phone-2") && !p.allows("tablet"));
        match decide(
            "x",
            br#"{"allow": false, "code": 18, "reason": "not yours"}"#,
        )
        .unwrap()
        {
            AuthDecision::Deny(d) => {
                assert_eq!(
                    (d.code, d.text.as_str()),
                    (CloseCode::ID_NOT_ALLOWED, "not yours")
                )
            }
            _ => panic!(),
        }
        match decide("x", br#"{"allow": false}"#).unwrap() {
            AuthDecision::Deny(d) => assert_eq!(d.code, CloseCode::UNAUTHORIZED),
            _ => panic!(),
        }
        // Not the format: an error, which the server turns into a refusal (fail closed).
        for bad in [
            &br#"{"allow": "yes"}"#[..],
            br#"{"ok": true}"#,
            br#"{"allow": false, "code": 5}"#,
            br#"{"allow": true, "ids": ["a*b"]}"#,
            b"",
        ] {
            assert!(
                decide("x", bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn only_plain_http_urls() {
        assert!(Webhook::new("http://127.0.0.1:9000/auth", Duration::from_secs(1)).is_ok());
        for bad in ["https://example.invalid/auth", "127.0.0.1:9000", "ftp://x/"] {
            assert!(Webhook::new(bad, Duration::from_secs(1)).is_err(), "{bad}");
        }
    }
}
